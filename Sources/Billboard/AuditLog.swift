import Crypto
import Foundation
import GRDB

/// One entry of the append-only audit log.
public struct AuditEntry: Sendable, Equatable {
    public let seq: Int64
    public let time: Date
    public let actor: String
    public let event: String
    public let guest: String?
    /// Canonical JSON text.
    public let details: String
    public let prevHash: String
    public let hash: String
}

/// The outcome of `AuditLog.verify`: intact, or the first sequence number at which the chain breaks and why.
public enum AuditVerification: Sendable, Equatable, CustomStringConvertible {
    case intact(entries: Int, headSeq: Int64)
    case broken(firstBadSeq: Int64, reason: String)

    public var isIntact: Bool { if case .intact = self { return true } else { return false } }

    public var firstBadSeq: Int64? { if case .broken(let s, _) = self { return s } else { return nil } }

    public var description: String {
        switch self {
        case .intact(let n, let head): return "audit log intact: \(n) entries, head \(head) signed by this host"
        case .broken(let seq, let reason): return "audit log broken at entry \(seq): \(reason)"
        }
    }
}

/// The hash chain's formulas, shared by the append (`BillboardDatabase.appendAudit`) and the verification.
enum AuditChain {
    static let genesisHash = String(repeating: "0", count: 64)

    /// The bytes hashed for an entry. `details` is included as the stored text, not re-encoded,
    /// so verification never depends on parsing it.
    static func entryBytes(seq: Int64, time: Int64, actor: String, event: String, guest: String?, details: String) -> Data {
        CanonicalJSON.object([
            "seq": .int(seq), "time": .int(time), "actor": .string(actor), "event": .string(event),
            "guest": .optional(guest), "details": .string(details),
        ]).bytes
    }

    static func chainHash(prev: String, entry: Data) -> String {
        var h = SHA256()
        h.update(data: Data(hex: prev) ?? Data())
        h.update(data: entry)
        return Data(h.finalize()).hex
    }

    /// What the host signs after every append: the chain's last entry, so a cut tail shows.
    static func headPayload(host: String, seq: Int64, hash: String) -> Data {
        CanonicalJSON.object(["kind": .string("swift-vmm.billboard.audit-head.v1"), "host": .string(host),
                              "seq": .int(seq), "hash": .string(hash)]).bytes
    }
}

/// Reading and checking the append-only audit log. Entries are written by every change through
/// the shared database, in the change's own transaction; this only reads them.
public struct AuditLog: Sendable {
    let database: BillboardDatabase

    /// Audit entries in order, starting after `afterSeq`.
    public func entries(afterSeq: Int64 = 0, limit: Int = .max) throws -> [AuditEntry] {
        try database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                             arguments: [afterSeq, Int64(clamping: limit)]).map(Self.entry)
        }
    }

    private static func entry(_ row: Row) -> AuditEntry {
        AuditEntry(seq: row["seq"], time: Date(milliseconds: row["time"]), actor: row["actor"], event: row["event"],
                   guest: row["guest"], details: row["details"], prevHash: row["prev_hash"], hash: row["hash"])
    }

    /// Walks the whole chain: contiguous sequence numbers from 1, each entry linked to the previous
    /// hash and hashing to its stored hash, and the last entry equal to the head signed with this
    /// host's key (from host.key, not from the database), which catches a truncated or rebuilt tail.
    public func verify() throws -> AuditVerification {
        try database.read { db in
            var expected: Int64 = 1
            var prev = AuditChain.genesisHash
            let cursor = try Row.fetchCursor(db, sql: "SELECT * FROM audit ORDER BY seq")
            while let row = try cursor.next() {
                let e = Self.entry(row)
                if e.seq != expected {
                    return .broken(firstBadSeq: expected, reason: "entry \(expected) is missing (deleted, or entries renumbered)")
                }
                if e.prevHash != prev {
                    return .broken(firstBadSeq: e.seq, reason: "does not link to the previous entry (inserted, reordered, or the previous one altered)")
                }
                let bytes = AuditChain.entryBytes(seq: e.seq, time: e.time.milliseconds, actor: e.actor, event: e.event,
                                                  guest: e.guest, details: e.details)
                if AuditChain.chainHash(prev: prev, entry: bytes) != e.hash {
                    return .broken(firstBadSeq: e.seq, reason: "content does not match its hash (edited)")
                }
                prev = e.hash
                expected += 1
            }
            let last = expected - 1
            guard let head = try Row.fetchOne(db, sql: "SELECT * FROM audit_head WHERE id = 1") else {
                return .broken(firstBadSeq: max(last, 1), reason: "the signed head is missing")
            }
            let headSeq: Int64 = head["seq"], headHash: String = head["hash"], signature: Data = head["signature"]
            let signedHead = AuditChain.headPayload(host: database.hostName, seq: headSeq, hash: headHash)
            guard database.keys.signing.publicKey.isValidSignature(signature, for: signedHead) else {
                return .broken(firstBadSeq: max(last, 1), reason: "the head signature does not verify with this host's key (chain rewritten)")
            }
            if headSeq > last {
                return .broken(firstBadSeq: last + 1, reason: "entries \(last + 1)...\(headSeq) are missing (tail truncated)")
            }
            if headSeq < last {
                return .broken(firstBadSeq: headSeq + 1, reason: "entries after the signed head \(headSeq) were added without the host key")
            }
            if headHash != prev {
                return .broken(firstBadSeq: last, reason: "the last entry differs from the signed head (chain rewritten)")
            }
            return .intact(entries: Int(last), headSeq: headSeq)
        }
    }
}
