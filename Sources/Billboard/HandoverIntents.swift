#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import GRDB
import SystemCalls

/// A migration's hand-over, written down (synced to disk) before it may happen, by the side
/// whose store it will change: the source before its guest pauses (`outgoing`: the lease at
/// `epoch` may move to `peerHost`/`peerPid` at epoch + 1), the destination when it admits the
/// guest (`incoming`: it may take the lease from `peerHost`/`peerPid`, past `epoch`). The commit
/// inside the pause then need not wait for the disk: if the OS crashes and loses it, the intent
/// is still there and the next start or scan resolves it as the commit would have gone
/// (docs/migration.md, "Crash safety of the hand-over").
public struct HandoverIntent: Sendable, Equatable {
    public enum Role: String, Sendable { case outgoing, incoming }
    public let guestID: UUID
    public let role: Role
    /// The process on this host that wrote it: the lease's holder (outgoing) or the receiving VMM (incoming).
    public let pid: Int32
    /// The other side: the destination (outgoing) or the source (incoming).
    public let peerHost: String
    public let peerPid: Int32
    /// Outgoing: the epoch of the lease handed over. Incoming: the epoch the guest's state carries.
    public let epoch: Int64
    /// SHA-256 (hex) of the migration's challenge: the one connection this hand-over belongs to.
    public let challengeSHA256: String
    /// The kernel boot it was written in (`kernelBootID`; "unknown" if unreadable).
    public let bootID: String
}

/// What resolving an intent left by a process that is gone did.
public struct IntentResolution: Sendable, Equatable, CustomStringConvertible {
    public enum Outcome: String, Sendable {
        /// Written in this boot by a process that died before its commit: the store shows
        /// exactly what happened (nothing was handed over or taken); the intent is dropped.
        case void
        /// Written before the OS restarted: the commit may have been lost, so it is applied now
        /// as it would have been (outgoing: the lease moves to the destination; incoming: the
        /// dead process's claim is released and the epoch moved past the state's).
        case rolledForward = "rolled-forward"
        /// Its integrity code does not verify (planted or edited without host.key): never acted
        /// on; audited and dropped, the lease untouched.
        case refused
    }
    public let guestID: String
    public let role: String
    public let pid: Int32
    public let outcome: Outcome
    public let detail: String

    public var description: String { "\(role) hand-over intent of guest \(guestID) by pid \(pid): \(outcome.rawValue) (\(detail))" }
}

/// The hand-over intents of this host's store: written durably before a migration's pause,
/// consumed by the commit inside it, withdrawn when the migration fails, and resolved after
/// a crash (by every lease decision for its guest, and by the scan for all).
public struct HandoverIntents: Sendable {
    let database: BillboardDatabase
    let leaseRecords: LeaseRecords
    let instances: Instances

    static func state(_ i: HandoverIntent, host: String) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.handover-intent.v1"), "guestID": .string(guestIDText(i.guestID)),
                 "role": .string(i.role.rawValue), "host": .string(host), "pid": .int(Int64(i.pid)),
                 "peerHost": .string(i.peerHost), "peerPid": .int(Int64(i.peerPid)), "epoch": .int(i.epoch),
                 "challengeSHA256": .string(i.challengeSHA256), "bootID": .string(i.bootID)])
    }

    static func challengeDigest(_ challenge: String) -> String { Data(SHA256.hash(data: Data(challenge.utf8))).hex }

    /// Source, just before the pause: the lease this process holds (at its current epoch) may
    /// move to `toHost`/`toPid`. Synced to disk before it returns; replaces an earlier intent of
    /// this process for the guest.
    @discardableResult
    public func prepareOutgoing(guestID: UUID, toHost: String, toPid: Int32, challenge: String, pid: Int32 = getpid()) throws -> HandoverIntent {
        try prepareOutgoing(guestID: guestID, toHost: toHost, toPid: toPid, challenge: challenge, pid: pid, bootID: kernelBootID)
    }

    /// Tests: `bootID` stands for the boot the intent is written in (another one than this: a
    /// crash and a restart since).
    func prepareOutgoing(guestID: UUID, toHost: String, toPid: Int32, challenge: String, pid: Int32, bootID: String?) throws -> HandoverIntent {
        let guestText = guestIDText(guestID)
        return try database.decide(actor: "vmm pid \(pid)@\(database.hostName)", event: "handover.intent", guest: guestText,
                                   durability: .system) { db in
            guard let current = try leaseRecords.row(db, guestID), current.pid == pid, sameBytes(current.host, database.hostName) else {
                throw BillboardRefusal.leaseNotHeld(guestID: guestID, pid: pid)
            }
            let intent = HandoverIntent(guestID: guestID, role: .outgoing, pid: pid, peerHost: toHost, peerPid: toPid, epoch: current.epoch,
                                        challengeSHA256: Self.challengeDigest(challenge), bootID: bootID ?? "unknown")
            try insert(db, intent)
            try database.appendAudit(db, actor: "vmm pid \(pid)@\(database.hostName)", event: "handover.intent", guest: guestText, details: [
                "guestID": .string(guestText), "role": .string("outgoing"), "toHost": .string(toHost), "toPid": .int(Int64(toPid)),
                "epoch": .int(current.epoch)])
            return intent
        }
    }

    /// Destination, at admission: this process may take the lease from `fromHost`/`fromPid`,
    /// past `epoch` (the state's). Synced to disk before it returns.
    @discardableResult
    public func recordIncoming(guestID: UUID, fromHost: String, fromPid: Int32, epoch: Int64, challenge: String,
                               pid: Int32 = getpid()) throws -> HandoverIntent {
        try recordIncoming(guestID: guestID, fromHost: fromHost, fromPid: fromPid, epoch: epoch, challenge: challenge, pid: pid,
                           bootID: kernelBootID)
    }

    func recordIncoming(guestID: UUID, fromHost: String, fromPid: Int32, epoch: Int64, challenge: String, pid: Int32,
                        bootID: String?) throws -> HandoverIntent {
        let guestText = guestIDText(guestID)
        let intent = HandoverIntent(guestID: guestID, role: .incoming, pid: pid, peerHost: fromHost, peerPid: fromPid, epoch: epoch,
                                    challengeSHA256: Self.challengeDigest(challenge), bootID: bootID ?? "unknown")
        try database.decide(actor: "vmm pid \(pid)@\(database.hostName)", event: "handover.intent", guest: guestText,
                            durability: .system) { db in
            try insert(db, intent)
            try database.appendAudit(db, actor: "vmm pid \(pid)@\(database.hostName)", event: "handover.intent", guest: guestText, details: [
                "guestID": .string(guestText), "role": .string("incoming"), "fromHost": .string(fromHost),
                "fromPid": .int(Int64(fromPid)), "epoch": .int(epoch)])
        }
        return intent
    }

    private func insert(_ db: Database, _ i: HandoverIntent) throws {
        try db.execute(sql: """
            INSERT OR REPLACE INTO handover_intents(guest_id, role, host, pid, peer_host, peer_pid, epoch, challenge_sha256,
                boot_id, created_at, mac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            """, arguments: [guestIDText(i.guestID), i.role.rawValue, database.hostName, i.pid, i.peerHost, i.peerPid, i.epoch,
                             i.challengeSHA256, i.bootID, Date().milliseconds, database.rowMAC(Self.state(i, host: database.hostName))])
    }

    private func delete(_ db: Database, guestID: String, role: String, pid: Int32) throws {
        try db.execute(sql: "DELETE FROM handover_intents WHERE guest_id = ? AND role = ? AND host = ? AND pid = ?",
                       arguments: [guestID, role, database.hostName, pid])
    }

    /// The migration failed before its commit: the intent will not be acted on. Synced, so a
    /// crash later does not bring it back.
    public func withdraw(_ intent: HandoverIntent) throws {
        try database.write(.system) { db in
            try delete(db, guestID: guestIDText(intent.guestID), role: intent.role.rawValue, pid: intent.pid)
        }
    }

    /// Inside the commit's transaction: the stored intent must be exactly `intent`, authentic;
    /// it is consumed with the commit. Throws `handoverIntentMissing` (or `recordTampered`) if
    /// not, and the caller commits the durable way instead.
    func consume(_ db: Database, _ intent: HandoverIntent) throws {
        let guestText = guestIDText(intent.guestID)
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM handover_intents WHERE guest_id = ? AND role = ? AND host = ? AND pid = ?",
                                         arguments: [guestText, intent.role.rawValue, database.hostName, intent.pid]) else {
            throw BillboardRefusal.handoverIntentMissing(guestID: intent.guestID)
        }
        guard let stored = decode(row), database.checkRowMAC(Self.state(stored, host: database.hostName), row["mac"]) else {
            throw BillboardRefusal.recordTampered(what: "hand-over intent of guest \(intent.guestID)")
        }
        guard stored == intent else { throw BillboardRefusal.handoverIntentMissing(guestID: intent.guestID) }
        try delete(db, guestID: guestText, role: intent.role.rawValue, pid: intent.pid)
    }

    private func decode(_ row: Row) -> HandoverIntent? {
        guard let id = UUID(uuidString: row["guest_id"]), let role = HandoverIntent.Role(rawValue: row["role"]) else { return nil }
        return HandoverIntent(guestID: id, role: role, pid: row["pid"], peerHost: row["peer_host"], peerPid: row["peer_pid"],
                              epoch: row["epoch"], challengeSHA256: row["challenge_sha256"], bootID: row["boot_id"])
    }

    /// The intents of this host's store, authentic or not (for inspection and tests).
    public func list() throws -> [HandoverIntent] {
        try database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM handover_intents WHERE host = ? ORDER BY created_at", arguments: [database.hostName])
                .compactMap(decode)
        }
    }

    /// Resolves every intent whose process is gone (see `IntentResolution.Outcome`); an intent
    /// of a live process in this boot is a migration in flight and is left alone. Audited.
    @discardableResult
    public func resolve(actor: String? = nil) throws -> [IntentResolution] {
        try resolve(bootID: kernelBootID, actor: actor)
    }

    /// Tests: `bootID` stands for the boot this runs in.
    func resolve(bootID: String?, actor: String? = nil) throws -> [IntentResolution] {
        let hasAny = try database.read { db in
            try Bool.fetchOne(db, sql: "SELECT EXISTS(SELECT 1 FROM handover_intents WHERE host = ?)", arguments: [database.hostName]) ?? false
        }
        guard hasAny else { return [] }
        return try database.write { db in try resolve(db, guestID: nil, bootID: bootID, actor: actor ?? database.processActor) }
    }

    /// Resolves, inside the caller's transaction, the intents of one guest (nil: all), before a
    /// decision about its lease: a lease whose hand-over may have been lost in a crash is never
    /// taken over as if it had stayed here.
    func resolve(_ db: Database, guestID: UUID?, bootID: String?, actor: String) throws -> [IntentResolution] {
        var sql = "SELECT * FROM handover_intents WHERE host = ?"
        var arguments: StatementArguments = [database.hostName]
        if let guestID { sql += " AND guest_id = ?"; arguments += [guestIDText(guestID)] }
        var resolutions: [IntentResolution] = []
        for row in try Row.fetchAll(db, sql: sql, arguments: arguments) {
            let guestText: String = row["guest_id"], role: String = row["role"], pid: Int32 = row["pid"]
            func done(_ outcome: IntentResolution.Outcome, _ detail: String, event: String, _ extra: [String: CanonicalJSON] = [:]) throws {
                try delete(db, guestID: guestText, role: role, pid: pid)
                var details: [String: CanonicalJSON] = ["guestID": .string(guestText), "role": .string(role), "pid": .int(Int64(pid)),
                                                        "detail": .string(detail)]
                details.merge(extra) { $1 }
                try database.appendAudit(db, actor: actor, event: event, guest: guestText, details: details)
                resolutions.append(IntentResolution(guestID: guestText, role: role, pid: pid, outcome: outcome, detail: detail))
            }
            guard let intent = decode(row), database.checkRowMAC(Self.state(intent, host: database.hostName), row["mac"]) else {
                try done(.refused, "its integrity code does not verify: written or edited without host.key; the lease is left as it is",
                         event: "handover.intent-refused")
                continue
            }
            let sameBoot = bootID != nil && sameBytes(intent.bootID, bootID!)
            if sameBoot {
                // This boot: the store is exactly what the process left. A live one is mid-migration.
                if HostProcesses.alive(intent.pid) { continue }
                try done(.void, "process \(intent.pid) ended in this boot before its commit: nothing was handed over",
                         event: "handover.intent-void")
                continue
            }
            // Written before the OS restarted: whatever followed it unsynced may be lost.
            let lease = try leaseRecords.row(db, intent.guestID)
            switch intent.role {
            case .outgoing:
                guard let lease, lease.pid == intent.pid, sameBytes(lease.host, database.hostName), lease.epoch == intent.epoch else {
                    try done(.void, "the lease has moved on since (epoch \(lease?.epoch ?? 0)): nothing to recover",
                             event: "handover.intent-void")
                    continue
                }
                // As the commit would have: the destination holds it at epoch + 1. One on this
                // host ran in the boot that ended, so it holds nothing now: released.
                let local = sameBytes(intent.peerHost, database.hostName)
                let epoch = intent.epoch + 1
                try leaseRecords.write(db, intent.guestID, host: intent.peerHost, pid: local ? nil : intent.peerPid, epoch: epoch,
                                       now: Date().milliseconds)
                try instances.setState(db, pid: intent.pid, guestID: guestText, state: .migrated)
                try done(.rolledForward, local
                         ? "the OS restarted after the intent; the hand-over to pid \(intent.peerPid) here may have been lost: applied, and released (that process is gone)"
                         : "the OS restarted after the intent; the hand-over may have been lost: the lease is now \(intent.peerHost)'s",
                         event: "lease.handover-recovered",
                         ["toHost": .string(intent.peerHost), "toPid": .int(Int64(intent.peerPid)), "epoch": .int(epoch),
                          "intentBoot": .string(intent.bootID)])
            case .incoming:
                // The receiving process died with the OS: the guest does not run here. Its claim
                // (if the lease got that far) is released, and the epoch moves past the state's,
                // as the lost take would have moved it; a lease held by anyone else is theirs.
                let floor = intent.epoch + 1
                if let lease, let holder = lease.pid, !(holder == intent.pid && sameBytes(lease.host, database.hostName)) {
                    try done(.void, "the lease is held by pid \(holder) on \(lease.host): left to it", event: "handover.intent-void")
                    continue
                }
                let epoch = max(lease?.epoch ?? 0, floor)
                try leaseRecords.write(db, intent.guestID, host: lease?.host ?? database.hostName, pid: nil, epoch: epoch,
                                       now: Date().milliseconds)
                try done(.rolledForward, "the OS restarted after the intent; the guest does not run here: lease released at epoch \(epoch)",
                         event: "lease.incoming-recovered", ["epoch": .int(epoch), "intentBoot": .string(intent.bootID)])
            }
        }
        return resolutions
    }
}
