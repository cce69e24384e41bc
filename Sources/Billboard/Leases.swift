#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import GRDB

/// Who may run a guest right now, and the epoch that orders its successive owners.
public struct Lease: Sendable, Equatable {
    public let guestID: UUID
    public let host: String
    public let pid: Int32
    /// Grows by one with every new owner (acquisition after release, takeover, hand-over).
    public let epoch: Int64
    public let renewedAt: Date
}

extension BillboardStore {
    /// The epoch is the value worth protecting (lowering it would re-admit an old snapshot),
    /// so the integrity code covers guest and epoch.
    static func leaseState(_ id: UUID, epoch: Int64) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.lease.v1"), "guestID": .string(idText(id)), "epoch": .int(epoch)])
    }

    private struct LeaseRow {
        var host: String
        var pid: Int32?
        var epoch: Int64
        var renewedAt: Int64
    }

    private func leaseRow(_ db: Database, _ id: UUID) throws -> LeaseRow? {
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM leases WHERE guest_id = ?", arguments: [Self.idText(id)]) else {
            return nil
        }
        let epoch: Int64 = row["epoch"]
        guard checkRowMAC(Self.leaseState(id, epoch: epoch), row["mac"]) else {
            throw BillboardRefusal.recordTampered(what: "lease of guest \(id)")
        }
        return LeaseRow(host: row["host"], pid: row["pid"], epoch: epoch, renewedAt: row["renewed_at"])
    }

    private func writeLease(_ db: Database, _ id: UUID, host: String, pid: Int32?, epoch: Int64, now: Int64) throws {
        try db.execute(sql: """
            INSERT OR REPLACE INTO leases(guest_id, host, pid, epoch, renewed_at, mac) VALUES (?, ?, ?, ?, ?, ?)
            """, arguments: [Self.idText(id), host, pid, epoch, now, rowMAC(Self.leaseState(id, epoch: epoch))])
    }

    /// A pid can only be probed on this host. EPERM means it exists but belongs to someone else: alive.
    private func processExists(host: String, pid: Int32) -> Bool {
        guard host == hostName, pid > 0 else { return false }
        return kill(pid, 0) == 0 || errno == EPERM
    }

    /// Takes the one-owner lease of a guest. Refused while another owner is live (its process exists
    /// here, or it renewed within `takeoverAfter` seconds); a dead or expired owner is taken over
    /// (audited as `lease.takeover`). Every new owner gets epoch + 1; the same owner re-acquiring keeps it.
    @discardableResult
    public func acquireLease(guestID: UUID, host: String, pid: Int32, takeoverAfter: TimeInterval) throws -> Lease {
        let actor = "vmm pid \(pid)@\(host)"
        let guestText = Self.idText(guestID)
        return try decide(actor: actor, event: "lease.acquire", guest: guestText) { db in
            let now = Date().milliseconds
            let current = try leaseRow(db, guestID)
            var event = "lease.acquire"
            var details: [String: CanonicalJSON] = ["guestID": .string(guestText), "host": .string(host), "pid": .int(Int64(pid))]
            let epoch: Int64
            if let current, let holder = current.pid {
                if holder == pid && current.host == host {
                    try writeLease(db, guestID, host: host, pid: pid, epoch: current.epoch, now: now)
                    return Lease(guestID: guestID, host: host, pid: pid, epoch: current.epoch, renewedAt: Date(milliseconds: now))
                }
                let recent = Double(now - current.renewedAt) < takeoverAfter * 1000
                if processExists(host: current.host, pid: holder) || recent {
                    throw BillboardRefusal.leaseHeld(guestID: guestID, host: current.host, pid: holder, epoch: current.epoch)
                }
                event = "lease.takeover"
                details["previousHost"] = .string(current.host)
                details["previousPid"] = .int(Int64(holder))
                details["previousEpoch"] = .int(current.epoch)
                epoch = current.epoch + 1
            } else {
                epoch = (current?.epoch ?? 0) + 1
            }
            details["epoch"] = .int(epoch)
            try writeLease(db, guestID, host: host, pid: pid, epoch: epoch, now: now)
            try appendAudit(db, actor: actor, event: event, guest: guestText, details: details)
            return Lease(guestID: guestID, host: host, pid: pid, epoch: epoch, renewedAt: Date(milliseconds: now))
        }
    }

    /// Extends the lease; throws `leaseNotHeld` if it was taken over or handed over meanwhile,
    /// which tells a stale copy to stop. Not audited (it is periodic).
    @discardableResult
    public func renewLease(guestID: UUID, pid: Int32, host: String? = nil) throws -> Lease {
        let host = host ?? hostName
        return try db.write { db in
            guard let current = try leaseRow(db, guestID), current.pid == pid, current.host == host else {
                throw BillboardRefusal.leaseNotHeld(guestID: guestID, pid: pid)
            }
            let now = Date().milliseconds
            try writeLease(db, guestID, host: host, pid: pid, epoch: current.epoch, now: now)
            return Lease(guestID: guestID, host: host, pid: pid, epoch: current.epoch, renewedAt: Date(milliseconds: now))
        }
    }

    /// Gives the lease up (the epoch is kept, so the next owner still moves it forward).
    public func releaseLease(guestID: UUID, pid: Int32, host: String? = nil) throws {
        let host = host ?? hostName
        let guestText = Self.idText(guestID)
        try decide(actor: "vmm pid \(pid)@\(host)", event: "lease.release", guest: guestText) { db in
            guard let current = try leaseRow(db, guestID), current.pid == pid, current.host == host else {
                throw BillboardRefusal.leaseNotHeld(guestID: guestID, pid: pid)
            }
            try db.execute(sql: "UPDATE leases SET pid = NULL, renewed_at = ? WHERE guest_id = ?",
                           arguments: [Date().milliseconds, guestText])
            try appendAudit(db, actor: "vmm pid \(pid)@\(host)", event: "lease.release", guest: guestText, details: [
                "guestID": .string(guestText), "epoch": .int(current.epoch),
            ])
        }
    }

    /// Migration commit: moves the lease from `fromPid` on this host to `toPid` on `toHost` at
    /// epoch + 1, in one transaction. The source's later renewals fail, so it cannot resume.
    @discardableResult
    public func handOver(guestID: UUID, fromPid: Int32, toHost: String, toPid: Int32) throws -> Int64 {
        let guestText = Self.idText(guestID)
        let actor = "vmm pid \(fromPid)@\(hostName)"
        return try decide(actor: actor, event: "lease.handover", guest: guestText) { db in
            guard let current = try leaseRow(db, guestID), current.pid == fromPid, current.host == hostName else {
                throw BillboardRefusal.leaseNotHeld(guestID: guestID, pid: fromPid)
            }
            let epoch = current.epoch + 1
            try writeLease(db, guestID, host: toHost, pid: toPid, epoch: epoch, now: Date().milliseconds)
            try appendAudit(db, actor: actor, event: "lease.handover", guest: guestText, details: [
                "guestID": .string(guestText), "toHost": .string(toHost), "toPid": .int(Int64(toPid)),
                "epoch": .int(epoch),
            ])
            return epoch
        }
    }

    /// The current lease, if the guest has ever had one (pid 0 means released).
    public func lease(guestID: UUID) throws -> Lease? {
        try db.read { db in
            try leaseRow(db, guestID).map {
                Lease(guestID: guestID, host: $0.host, pid: $0.pid ?? 0, epoch: $0.epoch, renewedAt: Date(milliseconds: $0.renewedAt))
            }
        }
    }

    /// The guest's current epoch; 0 if it never had a lease.
    public func currentEpoch(guestID: UUID) throws -> Int64 {
        try db.read { db in try leaseRow(db, guestID)?.epoch ?? 0 }
    }

    /// Refuses state (a snapshot, a migration stream) from an epoch older than the current one:
    /// resuming it would fork the guest's history. Refusals are audited.
    public func checkEpoch(guestID: UUID, epoch: Int64) throws {
        let guestText = Self.idText(guestID)
        try decide(actor: processActor, event: "epoch.check", guest: guestText,
                   details: ["guestID": .string(guestText), "epoch": .int(epoch)]) { db in
            let current = try leaseRow(db, guestID)?.epoch ?? 0
            guard epoch >= current else {
                throw BillboardRefusal.staleEpoch(guestID: guestID, epoch: epoch, current: current)
            }
        }
    }
}
