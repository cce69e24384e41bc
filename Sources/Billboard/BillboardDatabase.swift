#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import GRDB
import SystemCalls

/// The one handle every part of a store shares: the SQLite queue, the host keys that seal and
/// sign its rows, and the two rules every change follows (integrity codes, audited decisions).
/// Each responsibility (registry, leases, instances, ...) holds this, never each other's state.
final class BillboardDatabase: Sendable {
    let queue: DatabaseQueue
    let keys: HostKeys
    /// The store's `billboard.sqlite`, as opened (the scan compares other processes' open files with it).
    let path: String

    /// The name of this host, fixed at `initialize`.
    var hostName: String { keys.hostName }

    /// The database file's device and inode: the scan knows this store in other processes by
    /// them, never by the name those processes opened it under.
    let fileStatus: FileStatus

    init(path: String, keys: HostKeys, configuration: Configuration) throws {
        self.path = path
        self.keys = keys
        do {
            let file = try OwnedFileDescriptor.open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
            fileStatus = try FileStatus.of(descriptor: file.raw)
        } catch {
            throw BillboardError.io(path: path, errno: error.errno)
        }
        self.queue = try DatabaseQueue(path: path, configuration: configuration)
    }

    func read<T>(_ body: (Database) throws -> T) throws -> T { try queue.read(body) }

    func write<T>(_ body: (Database) throws -> T) throws -> T { try queue.write(body) }

    /// Runs `body` in one IMMEDIATE transaction whose commit survives what `durability` says.
    func write<T>(_ durability: Durability, _ body: (Database) throws -> T) throws -> T {
        switch durability {
        case .process:
            return try queue.write(body)
        case .system:
            return try withPragma("synchronous", "FULL", body)
        case .pause:
            return try withPragma("wal_autocheckpoint", "0", body)
        }
    }

    /// One transaction with a connection setting changed for it, and put back after (SQLite
    /// reads both at the commit; neither may change inside a transaction).
    private func withPragma<T>(_ name: String, _ value: String, _ body: (Database) throws -> T) throws -> T {
        try queue.writeWithoutTransaction { db in
            let previous = try Int.fetchOne(db, sql: "PRAGMA \(name)") ?? 0
            try db.execute(sql: "PRAGMA \(name) = \(value)")
            defer { try? db.execute(sql: "PRAGMA \(name) = \(previous)") }
            var result: T?
            try db.inTransaction(.immediate) {
                result = try body(db)
                return .commit
            }
            return result!
        }
    }

    /// Who this process is, in audit entries.
    var processActor: String { "vmm pid \(getpid())@\(hostName)" }

    // MARK: - Integrity codes

    /// HMAC over a canonical description of a row's security-relevant state. Someone who can
    /// write the database but lacks host.key cannot forge one (e.g. to un-revoke a guest or add an admin).
    func rowMAC(_ payload: CanonicalJSON) -> Data {
        Data(HMAC<SHA256>.authenticationCode(for: payload.bytes, using: keys.macKey))
    }

    func checkRowMAC(_ payload: CanonicalJSON, _ mac: Data) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(mac, authenticating: payload.bytes, using: keys.macKey)
    }

    // MARK: - Audited changes

    /// Runs `body` in one IMMEDIATE transaction. A refusal rolls back whatever `body` did, then is
    /// itself recorded in the audit log in a second transaction, so refused attempts are never silent.
    func decide<T>(actor: String, event: String, guest: String?, details: [String: CanonicalJSON] = [:],
                   durability: Durability = .process, _ body: (Database) throws -> T) throws -> T {
        do {
            return try write(durability) { try body($0) }
        } catch let refusal as BillboardRefusal {
            var d = details
            d["reason"] = .string(refusal.description)
            try queue.write { db in
                try appendAudit(db, actor: actor, event: event + ".refused", guest: guest, details: d)
            }
            throw refusal
        }
    }

    /// Appends an entry and re-signs the chain head, inside the caller's transaction, so a change
    /// and its audit entry commit together or not at all.
    func appendAudit(_ db: Database, actor: String, event: String, guest: String?, details: [String: CanonicalJSON]) throws {
        let last = try Row.fetchOne(db, sql: "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        let seq: Int64 = (last?["seq"] ?? 0) + 1
        let prev: String = last?["hash"] ?? AuditChain.genesisHash
        let time = Date().milliseconds
        let text = CanonicalJSON.object(details).text
        let hash = AuditChain.chainHash(prev: prev, entry: AuditChain.entryBytes(seq: seq, time: time, actor: actor, event: event,
                                                                                guest: guest, details: text))
        try db.execute(sql: """
            INSERT INTO audit(seq, time, actor, event, guest, details, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            """, arguments: [seq, time, actor, event, guest, text, prev, hash])
        let signature = try keys.signing.signature(for: AuditChain.headPayload(host: hostName, seq: seq, hash: hash))
        try db.execute(sql: "INSERT OR REPLACE INTO audit_head(id, seq, hash, signature) VALUES (1, ?, ?, ?)",
                       arguments: [seq, hash, signature])
    }
}

/// How far a change must survive once its transaction has returned. The store runs SQLite's
/// WAL with synchronous=NORMAL (GRDB's setting for WAL): a commit is written to the WAL but
/// not synced, so it survives this process's crash, not the OS's, until a later synced commit
/// or checkpoint carries it to the disk (the WAL is replayed in order, so nothing later survives
/// without it).
enum Durability: Sendable {
    /// A crash of this process: every change but the two below.
    case process
    /// A crash of the OS or a power cut too: the WAL is synced before the commit returns
    /// (synchronous=FULL), with every change before it. For the hand-over intents, and for a
    /// hand-over made without one.
    case system
    /// As `.process`, and no checkpoint in this commit (one syncs the WAL and the database
    /// and copies pages, milliseconds): the lease's move inside a migration's pause, which a
    /// `.system` intent written before the pause covers (docs/migration.md, crash safety).
    case pause
}

/// A guest id as the store writes it (lowercase), in rows, requests and audit entries.
func guestIDText(_ id: UUID) -> String { id.uuidString.lowercased() }
