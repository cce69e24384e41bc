import Foundation
import GRDB
import Testing
@testable import Billboard

@Suite("The audit chain detects edits, deletions, insertions and truncation")
struct AuditTests {
    /// A store with a dozen entries: init, certificate, bootstrap, registrations, admissions, refusals.
    private func populated() throws -> Fixture {
        let f = try Fixture()
        try f.store.registry.register(web1(), signedBy: f.admin)
        for _ in 0..<4 { try admitWeb1(f.store) }
        _ = refusal { try admitWeb1(f.store, memory: 1 << 30) }
        try f.store.registry.revoke(name: "web1", signedBy: f.admin)
        _ = refusal { try admitWeb1(f.store) }
        #expect(try f.store.audit.verify() == .intact(entries: 11, headSeq: 11))
        return f
    }

    @Test("the log is append-only through the store's own connection")
    func triggersRefuseEdits() throws {
        let f = try populated()
        defer { f.remove() }
        #expect(throws: (any Error).self) {
            try f.store.database.write { db in try db.execute(sql: "DELETE FROM audit WHERE seq = 3") }
        }
    }

    @Test("an entry's details edited with raw SQL is detected at that entry")
    func edited() throws {
        let f = try populated()
        defer { f.remove() }
        try f.attacker("UPDATE audit SET details = '{\"reason\":\"nothing to see\"}' WHERE seq = 7")
        let v = try f.store.audit.verify()
        #expect(v.firstBadSeq == 7)
        #expect(v.description.contains("edited"))
    }

    @Test("a deleted entry is detected at its sequence number")
    func deleted() throws {
        let f = try populated()
        defer { f.remove() }
        try f.attacker("DELETE FROM audit WHERE seq = 5")
        #expect(try f.store.audit.verify().firstBadSeq == 5)
    }

    @Test("a deleted entry hidden by renumbering the rest is detected where the link breaks")
    func deletedAndRenumbered() throws {
        let f = try populated()
        defer { f.remove() }
        try f.attacker("DELETE FROM audit WHERE seq = 5")
        try f.attacker("UPDATE audit SET seq = seq - 1 WHERE seq > 5")
        #expect(try f.store.audit.verify().firstBadSeq == 5)
    }

    @Test("two entries swapped (reordered) are detected")
    func reordered() throws {
        let f = try populated()
        defer { f.remove() }
        try f.attacker("UPDATE audit SET seq = -1 WHERE seq = 4")
        try f.attacker("UPDATE audit SET seq = 4 WHERE seq = 5")
        try f.attacker("UPDATE audit SET seq = 5 WHERE seq = -1")
        #expect(try f.store.audit.verify().firstBadSeq == 4)
    }

    @Test("an inserted entry is detected")
    func inserted() throws {
        let f = try populated()
        defer { f.remove() }
        try f.attacker("UPDATE audit SET seq = seq + 100 WHERE seq > 3")
        try f.attacker("UPDATE audit SET seq = seq - 99 WHERE seq > 100")
        try f.attacker("""
            INSERT INTO audit(seq, time, actor, event, guest, details, prev_hash, hash)
            SELECT 4, time, 'admin:alice', 'admin.enroll', NULL, '{"name":"mallory"}', hash, hash FROM audit WHERE seq = 3
            """)
        #expect(try f.store.audit.verify().firstBadSeq == 4)
    }

    @Test("tail truncation is detected by the signed head")
    func truncated() throws {
        let f = try populated()
        defer { f.remove() }
        try f.attacker("DELETE FROM audit WHERE seq > 8")
        let v = try f.store.audit.verify()
        #expect(v.firstBadSeq == 9)
        #expect(v.description.contains("truncated"))
    }

    @Test("tail truncation with the head moved back to the new last entry fails the head signature")
    func truncatedAndHeadRewritten() throws {
        let f = try populated()
        defer { f.remove() }
        try f.attacker("DELETE FROM audit WHERE seq > 8")
        try f.attacker("UPDATE audit_head SET seq = 8, hash = (SELECT hash FROM audit WHERE seq = 8)")
        let v = try f.store.audit.verify()
        #expect(!v.isIntact)
        #expect(v.description.contains("signature"))
    }
}
