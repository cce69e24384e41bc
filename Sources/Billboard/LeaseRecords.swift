import Foundation
import GRDB

/// A lease row whose integrity code has been checked.
struct LeaseRow {
    var host: String
    /// nil once released.
    var pid: Int32?
    var epoch: Int64
    var renewedAt: Int64
}

/// The lease rows themselves, read and written inside a caller's transaction. Registration
/// (a name's new registration inherits its lease), instances and the scan read leases too, so
/// the rows live here and `Leases` keeps the rules for who may take one.
struct LeaseRecords: Sendable {
    let database: BillboardDatabase

    /// The epoch is the value worth protecting (lowering it would re-admit an old snapshot), and
    /// the holder decides whom a scan stops, so the integrity code covers guest, epoch and holder.
    /// The renewal time is advisory (it only delays takeovers).
    static func leaseState(_ id: UUID, epoch: Int64, host: String, pid: Int32?) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.lease.v2"), "guestID": .string(guestIDText(id)), "epoch": .int(epoch),
                 "host": .string(host), "pid": pid.map { .int(Int64($0)) } ?? .null])
    }

    func row(_ db: Database, _ id: UUID) throws -> LeaseRow? {
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM leases WHERE guest_id = ?", arguments: [guestIDText(id)]) else {
            return nil
        }
        let epoch: Int64 = row["epoch"]
        guard database.checkRowMAC(Self.leaseState(id, epoch: epoch, host: row["host"], pid: row["pid"]), row["mac"]) else {
            throw BillboardRefusal.recordTampered(what: "lease of guest \(id)")
        }
        return LeaseRow(host: row["host"], pid: row["pid"], epoch: epoch, renewedAt: row["renewed_at"])
    }

    func write(_ db: Database, _ id: UUID, host: String, pid: Int32?, epoch: Int64, now: Int64) throws {
        try db.execute(sql: """
            INSERT OR REPLACE INTO leases(guest_id, host, pid, epoch, renewed_at, mac) VALUES (?, ?, ?, ?, ?, ?)
            """, arguments: [guestIDText(id), host, pid, epoch, now,
                             database.rowMAC(Self.leaseState(id, epoch: epoch, host: host, pid: pid))])
    }

    /// Gives `current` up (the epoch is kept, so the next owner still moves it forward), audited
    /// as `lease.release` by `actor`: a VMM's release and its clean end write the same entry.
    func release(_ db: Database, _ id: UUID, _ current: LeaseRow, actor: String) throws {
        let guestText = guestIDText(id)
        try write(db, id, host: current.host, pid: nil, epoch: current.epoch, now: Date().milliseconds)
        try database.appendAudit(db, actor: actor, event: "lease.release", guest: guestText, details: [
            "guestID": .string(guestText), "epoch": .int(current.epoch)])
    }
}
