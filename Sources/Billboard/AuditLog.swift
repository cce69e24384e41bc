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
            var walk = AuditChainWalk()
            let cursor = try Row.fetchCursor(db, sql: "SELECT * FROM audit ORDER BY seq")
            while let row = try cursor.next() {
                if let broken = walk.next(Self.entry(row)) { return broken }
            }
            let head = try Row.fetchOne(db, sql: "SELECT * FROM audit_head WHERE id = 1").map {
                AuditHead(seq: $0["seq"], hash: $0["hash"], signature: $0["signature"])
            }
            return walk.finish(head: head, host: database.hostName, signingKey: database.keys.signing.publicKey,
                               keyOwner: "this host's key")
        }
    }

    /// The whole chain and its signed head, read in one transaction, as an `AuditExport` file:
    /// what anyone with the host's public identity can check (`AuditExport.verify`).
    public func export() throws -> Data {
        let (entries, head) = try database.read { db -> ([AuditEntry], AuditHead?) in
            (try Row.fetchAll(db, sql: "SELECT * FROM audit ORDER BY seq").map(Self.entry),
             try Row.fetchOne(db, sql: "SELECT * FROM audit_head WHERE id = 1").map {
                AuditHead(seq: $0["seq"], hash: $0["hash"], signature: $0["signature"])
             })
        }
        guard let head else { throw BillboardRefusal.invalidAuditExport(reason: "the store has no signed audit head") }
        return try AuditExport.encode(host: database.hostName, entries: entries, head: head)
    }
}

/// The signed head of the chain: the host's Ed25519 signature over `AuditChain.headPayload`.
struct AuditHead: Sendable {
    let seq: Int64
    let hash: String
    let signature: Data
}

/// One walk along the chain, entry by entry, for the store's verification and an export's alike.
struct AuditChainWalk {
    private var expected: Int64 = 1
    private var prev = AuditChain.genesisHash

    /// Checks the next entry in order; the breakage if it does not belong there.
    mutating func next(_ e: AuditEntry) -> AuditVerification? {
        if e.seq != expected {
            return .broken(firstBadSeq: expected, reason: "entry \(expected) is missing: found entry \(e.seq) in its place (deleted, reordered, or entries renumbered)")
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
        return nil
    }

    /// After the last entry: the head must be signed by `signingKey` (named `keyOwner` in the
    /// reason) and name exactly the last entry.
    func finish(head: AuditHead?, host: String, signingKey: Curve25519.Signing.PublicKey, keyOwner: String) -> AuditVerification {
        let last = expected - 1
        guard let head else { return .broken(firstBadSeq: max(last, 1), reason: "the signed head is missing") }
        let signedHead = AuditChain.headPayload(host: host, seq: head.seq, hash: head.hash)
        guard signingKey.isValidSignature(head.signature, for: signedHead) else {
            return .broken(firstBadSeq: max(last, 1), reason: "the head signature does not verify with \(keyOwner) (chain rewritten, or another host's)")
        }
        if head.seq > last {
            return .broken(firstBadSeq: last + 1, reason: "entries \(last + 1)...\(head.seq) are missing (tail truncated)")
        }
        if head.seq < last {
            return .broken(firstBadSeq: head.seq + 1, reason: "entries after the signed head \(head.seq) were added without the host key")
        }
        if head.hash != prev {
            return .broken(firstBadSeq: last, reason: "the last entry differs from the signed head (chain rewritten)")
        }
        return .intact(entries: Int(last), headSeq: head.seq)
    }
}
