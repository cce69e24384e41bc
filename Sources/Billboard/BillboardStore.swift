#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import GRDB

/// One host's billboard: `billboard.sqlite` (registrations, administrators, peers, leases, audit)
/// and `host.key` (the private keys), both owner-only in one directory.
///
/// Several VMM processes may open the same store at once: SQLite runs in WAL mode with a busy
/// timeout, and every change (with its audit entry) is one IMMEDIATE transaction.
public final class BillboardStore: Sendable {
    /// The store directory.
    public let directory: String
    /// The name of this host, fixed at `initialize`.
    public let hostName: String
    let keys: HostKeys
    let db: DatabaseQueue

    public static let databaseFileName = "billboard.sqlite"
    public static let keyFileName = "host.key"

    /// `~/.local/share/swift-vmm/billboard/` (respecting `XDG_DATA_HOME`).
    public static var defaultDirectory: String {
        let env = ProcessInfo.processInfo.environment
        if let xdg = env["XDG_DATA_HOME"], !xdg.isEmpty { return xdg + "/swift-vmm/billboard" }
        let home = env["HOME"] ?? NSHomeDirectory()
        return home + "/.local/share/swift-vmm/billboard"
    }

    var databasePath: String { directory + "/" + Self.databaseFileName }
    var keyPath: String { directory + "/" + Self.keyFileName }

    // MARK: - Creating and opening

    /// Creates a new store: directory 0700, fresh host keys in `host.key` (0600), an empty
    /// database (0600) holding the public keys and a canary sealed with the at-rest key.
    /// `firstAdmin`, if given, is enrolled as the bootstrap administrator.
    @discardableResult
    public static func initialize(directory: String, hostName: String, firstAdmin: AdminKey? = nil) throws -> BillboardStore {
        try validateName(hostName)
        let dir = normalize(directory)
        let dbPath = dir + "/" + databaseFileName
        let keyPath = dir + "/" + keyFileName
        if SecureFile.exists(dbPath) || SecureFile.exists(keyPath) {
            throw BillboardError.alreadyInitialized(directory: dir)
        }
        try makePrivateDirectory(dir)

        let keys = HostKeys.generate(hostName: hostName)
        try SecureFile.write(try keys.encoded(), to: keyPath)
        do {
            // Created here with 0600 so SQLite (and its -wal/-shm, which copy the mode) never widen it.
            try SecureFile.write(Data(), to: dbPath)
            let store = try BillboardStore(directory: dir, keys: keys)
            try store.db.write { db in
                let canary = try ChaChaPoly.seal(Data(canaryPlaintext.utf8), using: keys.sealKey,
                                                 authenticating: Data(canaryAAD.utf8)).combined
                try db.execute(sql: "INSERT INTO meta(key, value) VALUES (?, ?), (?, ?), (?, ?), (?, ?)", arguments: [
                    "host_name", Data(hostName.utf8),
                    "host_signing_key", keys.signing.publicKey.rawRepresentation,
                    "host_agreement_key", keys.agreement.publicKey.rawRepresentation,
                    "canary", canary,
                ])
                try db.execute(sql: "INSERT INTO meta(key, value) VALUES ('origin', ?)",
                               arguments: [store.rowMAC(Self.originState(Self.realPath(dir)))])
                try store.appendAudit(db, actor: "host:\(hostName)", event: "store.init", guest: nil, details: [
                    "host": .string(hostName),
                    "signingKey": .string(keys.signing.publicKey.rawRepresentation.hex),
                ])
            }
            if let firstAdmin { try store.bootstrapAdmin(firstAdmin) }
            return store
        } catch {
            // A half-made store would later be refused as "already initialized"; leave nothing behind.
            for suffix in ["", "-wal", "-shm"] { unlink(dbPath + suffix) }
            unlink(keyPath)
            throw error
        }
    }

    /// Opens an existing store, refusing one that is missing, readable by group or others,
    /// or whose key file belongs to a different store.
    public convenience init(directory: String) throws {
        let dir = Self.normalize(directory)
        let dbPath = dir + "/" + Self.databaseFileName
        let keyPath = dir + "/" + Self.keyFileName
        guard SecureFile.exists(dbPath) else { throw BillboardError.notInitialized(directory: dir) }
        guard SecureFile.exists(keyPath) else { throw BillboardError.keyFileMissing(path: keyPath) }
        // Checked before SQLite touches anything, so a refused store is left exactly as found.
        try SecureFile.checkPrivate(dir, directory: true)
        for path in [dbPath, keyPath, dbPath + "-wal", dbPath + "-shm"] where SecureFile.exists(path) {
            try SecureFile.checkPrivate(path, directory: false)
        }
        let keys = try HostKeys.load(path: keyPath)
        try self.init(directory: dir, keys: keys)
        try checkKeyMatchesDatabase()
    }

    private init(directory: String, keys: HostKeys) throws {
        self.directory = directory
        self.keys = keys
        self.hostName = keys.hostName
        var config = Configuration()
        config.journalMode = .wal
        config.busyMode = .timeout(10)
        config.foreignKeysEnabled = true
        self.db = try DatabaseQueue(path: directory + "/" + Self.databaseFileName, configuration: config)
        try Self.migrator.migrate(db)
    }

    /// The canary proves the at-rest key (hence host.key) belongs to this database.
    private func checkKeyMatchesDatabase() throws {
        let (canary, signingKey) = try db.read { db -> (Data?, Data?) in
            (try Data.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'canary'"),
             try Data.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'host_signing_key'"))
        }
        guard let canary, let box = try? ChaChaPoly.SealedBox(combined: canary),
              let plain = try? ChaChaPoly.open(box, using: keys.sealKey, authenticating: Data(Self.canaryAAD.utf8)),
              plain == Data(Self.canaryPlaintext.utf8),
              signingKey == keys.signing.publicKey.rawRepresentation
        else { throw BillboardError.keyFileMismatch(path: keyPath) }
    }

    private static let canaryPlaintext = "swift-vmm billboard canary v1"
    private static let canaryAAD = "swift-vmm billboard canary"

    private static func normalize(_ path: String) -> String {
        var p = (path as NSString).expandingTildeInPath
        while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
        return p
    }

    private static func makePrivateDirectory(_ dir: String) throws {
        let parent = (dir as NSString).deletingLastPathComponent
        if !parent.isEmpty && !SecureFile.exists(parent) {
            try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
        }
        if mkdir(dir, 0o700) != 0 && errno != EEXIST { throw BillboardError.io(path: dir, errno: errno) }
        // An existing (empty) directory is taken over, but only if it is ours; then made private.
        var st = stat()
        guard stat(dir, &st) == 0 else { throw BillboardError.io(path: dir, errno: errno) }
        guard st.st_uid == geteuid() else { throw BillboardError.wrongOwner(path: dir, owner: st.st_uid) }
        guard chmod(dir, 0o700) == 0 else { throw BillboardError.io(path: dir, errno: errno) }
    }

    /// Creates an administrator key and writes it to `path` (0600, never overwriting).
    @discardableResult
    public static func createAdminKey(name: String, path: String) throws -> AdminKey {
        let key = try AdminKey(name: name)
        try key.write(to: path)
        return key
    }

    /// This host's public signing key (give it to peers' `addHost`).
    public var hostSigningKey: Curve25519.Signing.PublicKey { keys.signing.publicKey }
    /// This host's public key-agreement key (give it to peers' `addHost`).
    public var hostAgreementKey: Curve25519.KeyAgreement.PublicKey { keys.agreement.publicKey }

    // MARK: - Schema

    private static var migrator: DatabaseMigrator {
        var m = DatabaseMigrator()
        m.registerMigration("v1") { db in
            try db.execute(sql: """
                CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
                CREATE TABLE admins (
                    name TEXT PRIMARY KEY, public_key BLOB NOT NULL UNIQUE,
                    enrolled_at INTEGER NOT NULL, enrolled_by TEXT NOT NULL,
                    request BLOB NOT NULL, signature BLOB NOT NULL,
                    removed INTEGER NOT NULL DEFAULT 0, mac BLOB NOT NULL);
                CREATE TABLE hosts (
                    name TEXT PRIMARY KEY, signing_key BLOB NOT NULL, agreement_key BLOB NOT NULL,
                    added_by TEXT NOT NULL, added_at INTEGER NOT NULL,
                    request BLOB NOT NULL, signature BLOB NOT NULL, mac BLOB NOT NULL);
                CREATE TABLE guests (
                    id TEXT PRIMARY KEY, name TEXT NOT NULL, image_sha256 TEXT NOT NULL,
                    memory_bytes INTEGER NOT NULL, vcpus INTEGER NOT NULL, mode TEXT,
                    allowed_hosts TEXT NOT NULL, beacons TEXT NOT NULL, created_at INTEGER NOT NULL,
                    sealed BLOB NOT NULL, signer_name TEXT NOT NULL, signer_key BLOB NOT NULL,
                    signature BLOB NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, state_mac BLOB NOT NULL);
                -- One live registration per name; revoked ones stay for the record.
                CREATE UNIQUE INDEX guests_live_name ON guests(name) WHERE revoked = 0;
                CREATE INDEX guests_image ON guests(image_sha256);
                CREATE TABLE audit (
                    seq INTEGER PRIMARY KEY, time INTEGER NOT NULL, actor TEXT NOT NULL,
                    event TEXT NOT NULL, guest TEXT, details TEXT NOT NULL,
                    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
                -- Append-only by construction; this only stops accidents (the hash chain stops the rest).
                CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
                CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
                CREATE TABLE audit_head (
                    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL,
                    hash TEXT NOT NULL, signature BLOB NOT NULL);
                CREATE TABLE leases (
                    guest_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER,
                    epoch INTEGER NOT NULL, renewed_at INTEGER NOT NULL, mac BLOB NOT NULL);
                """)
        }
        m.registerMigration("v2") { db in
            try db.execute(sql: """
                -- One row per guest a VMM process holds (or is receiving) on this host.
                CREATE TABLE instances (
                    host TEXT NOT NULL, pid INTEGER NOT NULL, guest_id TEXT NOT NULL, guest_name TEXT NOT NULL,
                    token_mac BLOB NOT NULL, state TEXT NOT NULL, beacons_required INTEGER NOT NULL,
                    started_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
                    last_beacon_at INTEGER, beacon_count INTEGER NOT NULL DEFAULT 0, beacon_counter INTEGER,
                    false_beacon TEXT, stale_since INTEGER, mac BLOB NOT NULL,
                    PRIMARY KEY (host, pid, guest_id));
                CREATE TABLE restore_authorizations (
                    id INTEGER PRIMARY KEY, guest_id TEXT NOT NULL, snapshot_sha256 TEXT NOT NULL,
                    signer_name TEXT NOT NULL, request BLOB NOT NULL, signature BLOB NOT NULL,
                    created_at INTEGER NOT NULL, used_at INTEGER, mac BLOB NOT NULL);
                """)
        }
        return m
    }

    // MARK: - Integrity codes and sealing

    /// HMAC over a canonical description of a row's security-relevant state. Someone who can
    /// write the database but lacks host.key cannot forge one (e.g. to un-revoke a guest or add an admin).
    func rowMAC(_ payload: CanonicalJSON) -> Data {
        Data(HMAC<SHA256>.authenticationCode(for: payload.bytes, using: keys.macKey))
    }

    func checkRowMAC(_ payload: CanonicalJSON, _ mac: Data) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(mac, authenticating: payload.bytes, using: keys.macKey)
    }

    /// Runs `body` in one IMMEDIATE transaction. A refusal rolls back whatever `body` did, then is
    /// itself recorded in the audit log in a second transaction, so refused attempts are never silent.
    func decide<T>(actor: String, event: String, guest: String?, details: [String: CanonicalJSON] = [:],
                   _ body: (Database) throws -> T) throws -> T {
        do {
            return try db.write { try body($0) }
        } catch let refusal as BillboardRefusal {
            var d = details
            d["reason"] = .string(refusal.description)
            try db.write { db in
                try appendAudit(db, actor: actor, event: event + ".refused", guest: guest, details: d)
            }
            throw refusal
        }
    }

    /// Who this process is, in audit entries.
    var processActor: String { "vmm pid \(getpid())@\(hostName)" }
}
