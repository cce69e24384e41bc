#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import GRDB
import SystemCalls

/// Who may run a guest right now, and the epoch that orders its successive owners.
public struct Lease: Sendable, Equatable {
    public let guestID: UUID
    public let host: String
    public let pid: Int32
    /// Grows by one with every new owner (acquisition after release, takeover, hand-over).
    public let epoch: Int64
    public let renewedAt: Date
}

/// Who may run a guest now: the one-owner lease of each guest, its epoch (which orders the
/// guest's successive owners, so old state is refused), its hand-over at migration, and the
/// administrators' one-time authorisations to restore an older state.
public struct Leases: Sendable {
    let database: BillboardDatabase
    let records: LeaseRecords
    let administrators: Administrators
    let registry: Registry
    let instances: Instances
    let intents: HandoverIntents

    /// A pid can only be probed on this host. EPERM means it exists but belongs to someone else: alive.
    private func processExists(host: String, pid: Int32) -> Bool {
        sameBytes(host, database.hostName) && HostProcesses.alive(pid)
    }

    /// Takes the one-owner lease of a guest. Refused while another owner is live (its process exists
    /// here, or it renewed within `takeoverAfter` seconds); a dead or expired owner is taken over
    /// (audited as `lease.takeover`). A lease held by another host never expires here (its renewals
    /// go to its own store): only that holder handing the guest back (`handedBy`, a migration
    /// returning) or an administrator (`release(guestName:signedBy:)`) frees it.
    /// Every new owner gets epoch + 1; the same owner re-acquiring keeps it.
    ///
    /// `stateEpoch`: the epoch of the state about to run (a restore); refused in the same
    /// transaction if the guest has moved past it since, unless `rollbackAuthorized`.
    ///
    /// A migration's take (`handedBy`) is synced to disk before it returns, unless `intent` (this
    /// process's incoming intent, synced at admission) covers it: then it is consumed in the
    /// same transaction, and the commit is not synced (`handoverIntentMissing` if the intent is
    /// not there as written: take it again without one).
    @discardableResult
    public func acquire(guestID: UUID, host: String, pid: Int32, takeoverAfter: TimeInterval,
                        minimumEpoch: Int64 = 0, handedBy: (host: String, pid: Int32)? = nil,
                        stateEpoch: Int64? = nil, rollbackAuthorized: Bool = false, intent: HandoverIntent? = nil) throws -> Lease {
        let actor = "vmm pid \(pid)@\(host)"
        let guestText = guestIDText(guestID)
        let durability: Durability = intent != nil ? .pause : handedBy != nil ? .system : .process
        return try database.decide(actor: actor, event: "lease.acquire", guest: guestText, durability: durability) { db in
            let now = Date().milliseconds
            if let intent { try intents.consume(db, intent) }
            // A hand-over a crash may have lost is settled before the lease is judged.
            _ = try intents.resolve(db, guestID: guestID, bootID: kernelBootID, actor: actor)
            let current = try records.row(db, guestID)
            var event = "lease.acquire"
            var details: [String: CanonicalJSON] = ["guestID": .string(guestText), "host": .string(host), "pid": .int(Int64(pid))]
            if let stateEpoch, let current, current.epoch > stateEpoch, !rollbackAuthorized {
                throw BillboardRefusal.staleEpoch(guestID: guestID, epoch: stateEpoch, current: current.epoch)
            }
            var epoch: Int64
            if let current, let holder = current.pid {
                if holder == pid && sameBytes(current.host, host) {
                    try records.write(db, guestID, host: host, pid: pid, epoch: current.epoch, now: now)
                    return Lease(guestID: guestID, host: host, pid: pid, epoch: current.epoch, renewedAt: Date(milliseconds: now))
                }
                switch takeover(current, holder: holder, handedBy: handedBy, takeoverAfter: takeoverAfter, now: now) {
                case .refused:
                    throw BillboardRefusal.leaseHeld(guestID: guestID, host: current.host, pid: holder, epoch: current.epoch)
                case .returned: event = "lease.return"
                case .takenOver: event = "lease.takeover"
                }
                details["previousHost"] = .string(current.host)
                details["previousPid"] = .int(Int64(holder))
                details["previousEpoch"] = .int(current.epoch)
                epoch = current.epoch + 1
            } else {
                epoch = (current?.epoch ?? 0) + 1
            }
            // A guest arriving from another store brings its epoch: ours moves past it.
            epoch = max(epoch, minimumEpoch)
            details["epoch"] = .int(epoch)
            try records.write(db, guestID, host: host, pid: pid, epoch: epoch, now: now)
            try database.appendAudit(db, actor: actor, event: event, guest: guestText, details: details)
            return Lease(guestID: guestID, host: host, pid: pid, epoch: epoch, renewedAt: Date(milliseconds: now))
        }
    }

    private enum Takeover { case refused, returned, takenOver }

    /// The one rule for a lease someone else holds (used by `acquire` and `checkAvailable`):
    /// - the migration source hands it over: for a holder here, the same process; for a holder
    ///   on another host, that host (its own store decides which of its processes);
    /// - a holder here whose process is gone and that has not renewed for `takeoverAfter` s;
    /// - anything else is refused (a holder on another host never expires by time here).
    private func takeover(_ current: LeaseRow, holder: Int32, handedBy: (host: String, pid: Int32)?,
                  takeoverAfter: TimeInterval, now: Int64) -> Takeover {
        if let handedBy, sameBytes(handedBy.host, current.host), !sameBytes(current.host, database.hostName) || handedBy.pid == holder {
            return .returned
        }
        guard sameBytes(current.host, database.hostName) else { return .refused }
        let recent = Double(now - current.renewedAt) < takeoverAfter * 1000
        return processExists(host: current.host, pid: holder) || recent ? .refused : .takenOver
    }

    /// Moves the epoch of a lease this process holds one step on: the running guest has moved
    /// past a snapshot taken of it, so that snapshot is now history (restoring it is a rollback).
    @discardableResult
    public func advanceEpoch(guestID: UUID, pid: Int32 = getpid()) throws -> Int64 {
        let guestText = guestIDText(guestID)
        return try database.decide(actor: database.processActor, event: "lease.advance", guest: guestText) { db in
            guard let current = try records.row(db, guestID), current.pid == pid, sameBytes(current.host, database.hostName) else {
                throw BillboardRefusal.leaseNotHeld(guestID: guestID, pid: pid)
            }
            let epoch = current.epoch + 1
            try records.write(db, guestID, host: database.hostName, pid: pid, epoch: epoch, now: Date().milliseconds)
            try database.appendAudit(db, actor: database.processActor, event: "lease.advance", guest: guestText, details: [
                "guestID": .string(guestText), "epoch": .int(epoch)])
            return epoch
        }
    }

    /// Extends the lease; throws `leaseNotHeld` if it was taken over or handed over meanwhile,
    /// which tells a stale copy to stop. Not audited (it is periodic).
    @discardableResult
    public func renew(guestID: UUID, pid: Int32, host: String? = nil) throws -> Lease {
        let host = host ?? database.hostName
        return try database.write { db in
            guard let current = try records.row(db, guestID), current.pid == pid, sameBytes(current.host, host) else {
                throw BillboardRefusal.leaseNotHeld(guestID: guestID, pid: pid)
            }
            let now = Date().milliseconds
            try records.write(db, guestID, host: host, pid: pid, epoch: current.epoch, now: now)
            return Lease(guestID: guestID, host: host, pid: pid, epoch: current.epoch, renewedAt: Date(milliseconds: now))
        }
    }

    /// Gives the lease up (the epoch is kept, so the next owner still moves it forward).
    public func release(guestID: UUID, pid: Int32, host: String? = nil) throws {
        let host = host ?? database.hostName
        let guestText = guestIDText(guestID)
        try database.decide(actor: "vmm pid \(pid)@\(host)", event: "lease.release", guest: guestText) { db in
            guard let current = try records.row(db, guestID), current.pid == pid, sameBytes(current.host, host) else {
                throw BillboardRefusal.leaseNotHeld(guestID: guestID, pid: pid)
            }
            try records.release(db, guestID, current, actor: "vmm pid \(pid)@\(host)")
        }
    }

    /// Migration commit: moves the lease from `fromPid` on this host to `toPid` on `toHost` at
    /// epoch + 1, in one transaction. The source's later renewals fail, so it cannot resume.
    ///
    /// Synced to disk before it returns, unless `intent` (written by `HandoverIntents.prepareOutgoing`
    /// before the pause, for exactly this hand-over at this epoch) covers it: then the intent is
    /// consumed in the same transaction and the commit is not synced, nor checkpointed (an OS
    /// crash that loses it leaves the intent, which is resolved as this commit). Throws
    /// `handoverIntentMissing` if the intent is not there as written: commit again without it.
    @discardableResult
    public func handOver(guestID: UUID, fromPid: Int32, toHost: String, toPid: Int32, intent: HandoverIntent? = nil) throws -> Int64 {
        let guestText = guestIDText(guestID)
        let actor = "vmm pid \(fromPid)@\(database.hostName)"
        return try database.decide(actor: actor, event: "lease.handover", guest: guestText, durability: intent != nil ? .pause : .system) { db in
            guard let current = try records.row(db, guestID), current.pid == fromPid, sameBytes(current.host, database.hostName) else {
                throw BillboardRefusal.leaseNotHeld(guestID: guestID, pid: fromPid)
            }
            if let intent {
                // The intent must describe this very move, or it covers nothing.
                guard intent.role == .outgoing, intent.pid == fromPid, intent.epoch == current.epoch,
                      sameBytes(intent.peerHost, toHost), intent.peerPid == toPid else {
                    throw BillboardRefusal.handoverIntentMissing(guestID: guestID)
                }
                try intents.consume(db, intent)
            }
            let epoch = current.epoch + 1
            try records.write(db, guestID, host: toHost, pid: toPid, epoch: epoch, now: Date().milliseconds)
            // In the same transaction the source's record says it no longer owns the guest.
            try instances.setState(db, pid: fromPid, guestID: guestText, state: .migrated)
            try database.appendAudit(db, actor: actor, event: "lease.handover", guest: guestText, details: [
                "guestID": .string(guestText), "toHost": .string(toHost), "toPid": .int(Int64(toPid)),
                "epoch": .int(epoch),
            ])
            return epoch
        }
    }

    /// The current lease, if the guest has ever had one (pid 0 means released).
    public func current(guestID: UUID) throws -> Lease? {
        try database.read { db in
            try records.row(db, guestID).map {
                Lease(guestID: guestID, host: $0.host, pid: $0.pid ?? 0, epoch: $0.epoch, renewedAt: Date(milliseconds: $0.renewedAt))
            }
        }
    }

    /// The guest's current epoch; 0 if it never had a lease.
    public func epoch(guestID: UUID) throws -> Int64 {
        try database.read { db in try records.row(db, guestID)?.epoch ?? 0 }
    }

    /// Refuses state (a snapshot, a migration stream) from an epoch older than the current one:
    /// resuming it would fork the guest's history. Refusals are audited.
    /// An older epoch passes only with an administrator's one-time authorisation for exactly this
    /// snapshot (`authorizeRestore`); `snapshotSHA256` is asked for only then (hashing a file costs).
    /// `consume: false` only checks that an authorisation exists (admission, before the file is
    /// verified); the restore consumes it once the state is verified and about to run.
    /// The snapshot is hashed outside any transaction, so other VMMs are never kept waiting.
    /// Returns whether an administrator's authorisation let an older epoch pass.
    @discardableResult
    public func checkEpoch(guestID: UUID, epoch: Int64, snapshotSHA256: (() throws -> String)? = nil,
                           consume: Bool = true) throws -> Bool {
        let guestText = guestIDText(guestID)
        let (current, authorisable) = try database.read { db -> (Int64, Bool) in
            let current = try records.row(db, guestID)?.epoch ?? 0
            let any = try Bool.fetchOne(db, sql: "SELECT EXISTS(SELECT 1 FROM restore_authorizations WHERE guest_id = ? AND used_at IS NULL)",
                                        arguments: [guestText]) ?? false
            return (current, any)
        }
        guard epoch < current else { return false }
        let digest = authorisable ? try snapshotSHA256?() : nil
        return try database.decide(actor: database.processActor, event: "epoch.check", guest: guestText,
                                   details: ["guestID": .string(guestText), "epoch": .int(epoch)]) { db -> Bool in
            let current = try records.row(db, guestID)?.epoch ?? 0
            guard epoch < current else { return false }
            if let digest, let used = try useRestoreAuthorization(db, guestID: guestText, digest: digest, consume: consume) {
                if consume {
                    try database.appendAudit(db, actor: database.processActor, event: "epoch.authorized-rollback",
                                             guest: guestText, details: [
                        "guestID": .string(guestText), "epoch": .int(epoch), "current": .int(current),
                        "authorizedBy": .string(used.signer), "snapshotSHA256": .string(used.digest),
                    ])
                }
                return true
            }
            throw BillboardRefusal.staleEpoch(guestID: guestID, epoch: epoch, current: current)
        }
    }

    /// An administrator frees a lease that no VMM here can free: one held by another host (after a
    /// migration whose outcome is in doubt, or a host that is gone). Signed and audited.
    public func release(guestName: String, signedBy signer: AdminKey) throws {
        try database.decide(actor: "admin:\(signer.name)", event: "lease.admin-release", guest: guestName) { db in
            guard let stored = try registry.findByName(db, guestName) else { throw BillboardRefusal.notRegistered(guest: guestName) }
            let id = stored.registration.id
            guard let current = try records.row(db, id), let holder = current.pid else { return }
            // A holder on this host that runs no VM at all (a process a rogue peer named, one
            // that died and whose number was reused) cannot be running the guest: releasable.
            if sameBytes(current.host, database.hostName) && processExists(host: current.host, pid: holder) && HostProcesses.holdsVM(holder) {
                throw BillboardRefusal.leaseHeld(guestID: id, host: current.host, pid: holder, epoch: current.epoch)
            }
            let payload = administrators.request("lease-release", [
                "guestID": .string(guestIDText(id)), "host": .string(current.host),
                "pid": .int(Int64(holder)), "epoch": .int(current.epoch)])
            _ = try administrators.authorize(db, key: signer, payload: payload, guest: guestName)
            try records.write(db, id, host: current.host, pid: nil, epoch: current.epoch, now: Date().milliseconds)
            try database.appendAudit(db, actor: "admin:\(signer.name)", event: "lease.admin-release", guest: guestName, details: [
                "guestID": .string(guestIDText(id)), "previousHost": .string(current.host),
                "previousPid": .int(Int64(holder)), "epoch": .int(current.epoch)])
        }
    }

    static func restoreAuthorizationState(id: Int64, guestID: String, digest: String, used: Bool) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.restore-authorization.v1"), "id": .int(id),
                 "guestID": .string(guestID), "snapshotSHA256": .string(digest), "used": .bool(used)])
    }

    /// An administrator allows one restore of one snapshot file (by its SHA-256) of `guestName`,
    /// even though its epoch is older than the guest's latest. Signed and audited; used once.
    public func authorizeRestore(guestName: String, snapshotSHA256: String, signedBy signer: AdminKey) throws {
        let digest = snapshotSHA256.lowercased()
        try database.decide(actor: "admin:\(signer.name)", event: "restore.authorize", guest: guestName,
                            details: ["snapshotSHA256": .string(digest)]) { db in
            guard let stored = try registry.findByName(db, guestName) else { throw BillboardRefusal.notRegistered(guest: guestName) }
            let guestText = guestIDText(stored.registration.id)
            let payload = administrators.request("restore-authorization", ["guestID": .string(guestText),
                                                                           "snapshotSHA256": .string(digest)])
            let (admin, signature) = try administrators.authorize(db, key: signer, payload: payload, guest: guestName)
            try db.execute(sql: """
                INSERT INTO restore_authorizations(guest_id, snapshot_sha256, signer_name, request, signature, created_at, mac)
                VALUES (?, ?, ?, ?, ?, ?, x'')
                """, arguments: [guestText, digest, admin, payload, signature, Date().milliseconds])
            let id = db.lastInsertedRowID
            try db.execute(sql: "UPDATE restore_authorizations SET mac = ? WHERE id = ?", arguments: [
                database.rowMAC(Self.restoreAuthorizationState(id: id, guestID: guestText, digest: digest, used: false)), id])
            try database.appendAudit(db, actor: "admin:\(signer.name)", event: "restore.authorize", guest: guestName, details: [
                "guestID": .string(guestText), "snapshotSHA256": .string(digest)])
        }
    }

    private func useRestoreAuthorization(_ db: Database, guestID: String, digest: String, consume: Bool) throws -> (signer: String, digest: String)? {
        let rows = try Row.fetchAll(db, sql: "SELECT * FROM restore_authorizations WHERE guest_id = ? AND used_at IS NULL",
                                    arguments: [guestID])
        guard !rows.isEmpty else { return nil }
        let actual = digest.lowercased()
        for row in rows where sameBytes(row["snapshot_sha256"] as String, actual) {
            let id: Int64 = row["id"]
            guard database.checkRowMAC(Self.restoreAuthorizationState(id: id, guestID: guestID, digest: actual, used: false), row["mac"]),
                  let admin = try administrators.activeAdmin(db, publicKey: try signerKey(db, name: row["signer_name"])), !admin.removed,
                  let key = try? Curve25519.Signing.PublicKey(rawRepresentation: try signerKey(db, name: row["signer_name"])),
                  key.isValidSignature(row["signature"] as Data, for: row["request"] as Data)
            else { throw BillboardRefusal.recordTampered(what: "restore authorisation \(id)") }
            guard consume else { return (row["signer_name"], actual) }
            try db.execute(sql: "UPDATE restore_authorizations SET used_at = ?, mac = ? WHERE id = ?", arguments: [
                Date().milliseconds, database.rowMAC(Self.restoreAuthorizationState(id: id, guestID: guestID, digest: actual, used: true)), id])
            return (row["signer_name"], actual)
        }
        return nil
    }

    private func signerKey(_ db: Database, name: String) throws -> Data {
        try Data.fetchOne(db, sql: "SELECT public_key FROM admins WHERE name = ?", arguments: [name]) ?? Data()
    }

    /// Whether this process could take the guest's lease now, by the same rule `acquire`
    /// applies later (so what passes admission cannot fail at GO or at the restore's start):
    /// nobody live holds it, or the holder is `handedBy`, the migration source sending the guest
    /// (a guest in flight is not a duplicate). Refusals are audited.
    public func checkAvailable(guestID: UUID, handedBy: (host: String, pid: Int32)?, takeoverAfter: TimeInterval) throws {
        let guestText = guestIDText(guestID)
        try database.decide(actor: database.processActor, event: "lease.check", guest: guestText,
                            details: ["guestID": .string(guestText)]) { db in
            _ = try intents.resolve(db, guestID: guestID, bootID: kernelBootID, actor: database.processActor)
            guard let current = try records.row(db, guestID), let holder = current.pid else { return }
            if takeover(current, holder: holder, handedBy: handedBy, takeoverAfter: takeoverAfter, now: Date().milliseconds) == .refused {
                throw BillboardRefusal.leaseHeld(guestID: guestID, host: current.host, pid: holder, epoch: current.epoch)
            }
        }
    }
}
