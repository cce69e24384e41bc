#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import GRDB
import SystemCalls

/// What a VMM process is doing with its guest, as the scan sees it.
public enum InstanceState: String, Sendable, Codable, Equatable {
    /// A migration destination that reserved the VM but has not received GO: not yet an owner.
    case incoming
    /// The guest runs (or may run) here; this process must hold the lease.
    case running
    /// The guest is paused here; it is not stale, but it still must hold the lease.
    case paused
    /// The lease was handed to a migration destination; this copy must never run again.
    case migrated
    /// The lease went to the destination with a post-copy GO, but this process keeps the
    /// guest's memory (paused for good) to serve the pages the destination still lacks.
    case pageServer = "page-server"
    /// As `pageServer`, while the post-copy link is down: it waits for the migration to be
    /// resumed (the guest is lost if this process ends before).
    case pageServerAwaitingRecovery = "page-server-awaiting-recovery"
    /// The guest has stopped; the process is tearing its VM down and exiting.
    case ended
}

/// One VMM process holding a guest on this host, with what its beacons said.
public struct GuestInstance: Sendable, Equatable {
    public let host: String
    public let pid: Int32
    public let guestID: UUID
    public let guestName: String
    public let state: InstanceState
    public let beaconsRequired: Bool
    public let startedAt: Date
    public let lastBeaconAt: Date?
    public let beaconCount: Int64
    /// The counter of the guest's latest beacon.
    public let beaconCounter: Int64?
    /// Evidence of a beacon whose token was not this instance's (a false VM), if one arrived.
    public let falseBeacon: String?
}

/// The guests VMM processes on this host hold, one record each: what state they say they are in,
/// the beacon token they issued (as an HMAC), and what their guests' beacons said. The scan
/// judges processes by these records.
public struct Instances: Sendable {
    let database: BillboardDatabase
    let leaseRecords: LeaseRecords

    /// HMAC of a per-boot beacon token: enough to check a beacon, useless to forge one.
    func tokenMAC(_ token: UInt64) -> Data {
        withUnsafeBytes(of: token.littleEndian) { raw in
            Data(HMAC<SHA256>.authenticationCode(for: Data(raw) + Data("swift-vmm beacon token".utf8),
                                                 using: database.keys.macKey))
        }
    }

    static func instanceState(host: String, pid: Int32, guestID: String, tokenMAC: Data, state: String,
                              falseBeacon: String?) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.instance.v2"), "host": .string(host), "pid": .int(Int64(pid)),
                 "guestID": .string(guestID), "token": .string(tokenMAC.hex), "state": .string(state),
                 "falseBeacon": .optional(falseBeacon)])
    }

    /// Re-computes a row's integrity code from what it now holds.
    func reseal(_ db: Database, pid: Int32, guestID: String) throws {
        guard let row = try Row.fetchOne(db, sql: "SELECT token_mac, state, false_beacon FROM instances WHERE host = ? AND pid = ? AND guest_id = ?",
                                         arguments: [database.hostName, pid, guestID]) else { return }
        try db.execute(sql: "UPDATE instances SET mac = ? WHERE host = ? AND pid = ? AND guest_id = ?", arguments: [
            database.rowMAC(Self.instanceState(host: database.hostName, pid: pid, guestID: guestID, tokenMAC: row["token_mac"],
                                               state: row["state"], falseBeacon: row["false_beacon"])),
            database.hostName, pid, guestID])
    }

    private func writeInstanceMAC(_ db: Database, pid: Int32, guestID: String, tokenMAC: Data, state: InstanceState) throws {
        try reseal(db, pid: pid, guestID: guestID)
    }

    /// Records that this process (`pid`) now holds `registration`'s guest in `state`, with the
    /// beacon token it gave the guest. Called before the VM is created, so a process with a VM
    /// and this store open but no row is never a legitimate VMM.
    public func record(_ registration: GuestRegistration, pid: Int32 = getpid(), token: UInt64, state: InstanceState) throws {
        let id = guestIDText(registration.id)
        let mac = tokenMAC(token)
        try database.decide(actor: database.processActor, event: "instance.start", guest: registration.name) { db in
            // One live copy of a guest per process: a second admission here is a duplicate.
            if let state = try String.fetchOne(db, sql: "SELECT state FROM instances WHERE host = ? AND pid = ? AND guest_id = ?",
                                               arguments: [database.hostName, pid, id]),
               state == InstanceState.running.rawValue || state == InstanceState.paused.rawValue || state == InstanceState.incoming.rawValue {
                throw BillboardRefusal.leaseHeld(guestID: registration.id, host: database.hostName, pid: pid,
                                                 epoch: try leaseRecords.row(db, registration.id)?.epoch ?? 0)
            }
            let now = Date().milliseconds
            try db.execute(sql: """
                INSERT OR REPLACE INTO instances(host, pid, guest_id, guest_name, token_mac, state, beacons_required,
                    started_at, updated_at, beacon_count, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, x'')
                """, arguments: [database.hostName, pid, id, registration.name, mac, state.rawValue,
                                 registration.beacons == .required, now, now])
            try writeInstanceMAC(db, pid: pid, guestID: id, tokenMAC: mac, state: state)
            try database.appendAudit(db, actor: database.processActor, event: "instance.start", guest: registration.name, details: [
                "guestID": .string(id), "pid": .int(Int64(pid)), "state": .string(state.rawValue),
            ])
        }
    }

    /// Changes this process's instance state (and, when given, its token: rotated on restore and
    /// migration, so a copy of the old memory cannot beacon as the new guest).
    public func update(guestID: UUID, pid: Int32 = getpid(), state: InstanceState, token: UInt64? = nil) throws {
        let id = guestIDText(guestID)
        try database.write { db in
            guard let row = try Row.fetchOne(db, sql: "SELECT token_mac FROM instances WHERE host = ? AND pid = ? AND guest_id = ?",
                                             arguments: [database.hostName, pid, id]) else { return }
            let mac = token.map(tokenMAC) ?? row["token_mac"]
            var sql = "UPDATE instances SET state = ?, token_mac = ?, updated_at = ?"
            // A new token starts a new beacon history: the guest's first beacon with it is due within the grace period.
            if token != nil { sql += ", last_beacon_at = NULL, beacon_counter = NULL, stale_since = NULL, false_beacon = NULL, started_at = ?" }
            sql += " WHERE host = ? AND pid = ? AND guest_id = ?"
            let now = Date().milliseconds
            var args: StatementArguments = [state.rawValue, mac, now]
            if token != nil { args += [now] }
            args += [database.hostName, pid, id]
            try db.execute(sql: sql, arguments: args)
            try writeInstanceMAC(db, pid: pid, guestID: id, tokenMAC: mac, state: state)
        }
    }

    /// Sets an instance's state (and its integrity code) inside the caller's transaction.
    func setState(_ db: Database, pid: Int32, guestID: String, state: InstanceState) throws {
        guard let row = try Row.fetchOne(db, sql: "SELECT token_mac FROM instances WHERE host = ? AND pid = ? AND guest_id = ?",
                                         arguments: [database.hostName, pid, guestID]) else { return }
        try db.execute(sql: "UPDATE instances SET state = ?, updated_at = ? WHERE host = ? AND pid = ? AND guest_id = ?",
                       arguments: [state.rawValue, Date().milliseconds, database.hostName, pid, guestID])
        try writeInstanceMAC(db, pid: pid, guestID: guestID, tokenMAC: row["token_mac"], state: state)
    }

    /// A VMM's clean end in one transaction: the lease given back (if it holds it) and its
    /// instance marked ended, so no scan ever sees a running record without its lease.
    public func end(guestID: UUID, pid: Int32 = getpid(), releaseLease release: Bool) throws {
        let guestText = guestIDText(guestID)
        try database.write { db in
            if release, let current = try leaseRecords.row(db, guestID), current.pid == pid, sameBytes(current.host, database.hostName) {
                try leaseRecords.release(db, guestID, current, actor: "vmm pid \(pid)@\(database.hostName)")
            }
            try setState(db, pid: pid, guestID: guestText, state: .ended)
            // A hand-over intent of this process that nothing consumed will never be acted on.
            try db.execute(sql: "DELETE FROM handover_intents WHERE guest_id = ? AND host = ? AND pid = ?",
                           arguments: [guestText, database.hostName, pid])
        }
    }

    /// Stores the latest beacon a guest sent through this process. A beacon whose token is not the
    /// one this process issued is kept as evidence of a false VM (the scan stops it).
    /// `received` is how many beacons arrived since the last call (the VMM records the latest only).
    public func recordBeacon(guestID: UUID, pid: Int32 = getpid(), token: UInt64, counter: UInt64, received: Int = 1,
                             at time: Date = Date()) throws {
        let id = guestIDText(guestID)
        try database.write { db in
            guard let row = try Row.fetchOne(db, sql: "SELECT token_mac FROM instances WHERE host = ? AND pid = ? AND guest_id = ?",
                                             arguments: [database.hostName, pid, id]) else { return }
            let expected: Data = row["token_mac"]
            if tokenMAC(token) == expected {
                try db.execute(sql: """
                    UPDATE instances SET last_beacon_at = ?, beacon_count = beacon_count + ?, beacon_counter = ?, stale_since = NULL
                    WHERE host = ? AND pid = ? AND guest_id = ?
                    """, arguments: [time.milliseconds, received, Int64(bitPattern: counter), database.hostName, pid, id])
            } else {
                let evidence = "beacon #\(counter) at \(ISO8601DateFormatter().string(from: time)) carried token \(String(token, radix: 16)), not the token this VMM issued"
                try db.execute(sql: "UPDATE instances SET false_beacon = COALESCE(false_beacon, ?) WHERE host = ? AND pid = ? AND guest_id = ?",
                               arguments: [evidence, database.hostName, pid, id])
                try reseal(db, pid: pid, guestID: id)
            }
        }
    }

    /// Every instance row of this host.
    public func list() throws -> [GuestInstance] {
        try database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM instances WHERE host = ? ORDER BY started_at", arguments: [database.hostName]).map { row in
                let id: String = row["guest_id"]
                return GuestInstance(host: row["host"], pid: row["pid"], guestID: UUID(uuidString: id) ?? UUID(),
                                     guestName: row["guest_name"], state: InstanceState(rawValue: row["state"]) ?? .running,
                                     beaconsRequired: row["beacons_required"], startedAt: Date(milliseconds: row["started_at"]),
                                     lastBeaconAt: (row["last_beacon_at"] as Int64?).map(Date.init(milliseconds:)),
                                     beaconCount: row["beacon_count"], beaconCounter: row["beacon_counter"], falseBeacon: row["false_beacon"])
            }
        }
    }

    /// Whether the instance row of (host, pid) carries a valid integrity code (a row planted
    /// by someone without host.key does not).
    func isAuthentic(_ db: Database, _ row: Row) -> Bool {
        let mac: Data = row["mac"]
        return database.checkRowMAC(Self.instanceState(host: row["host"], pid: row["pid"], guestID: row["guest_id"],
                                                       tokenMAC: row["token_mac"], state: row["state"],
                                                       falseBeacon: row["false_beacon"]), mac)
    }
}
