#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import GRDB
import X509

/// One host's billboard: `billboard.sqlite` (registrations, administrators, peers, leases, audit)
/// and `host.key` (the private keys), both owner-only in one directory.
///
/// Several VMM processes may open the same store at once: SQLite runs in WAL mode with a busy
/// timeout, and every change (with its audit entry) is one IMMEDIATE transaction.
///
/// This type creates and opens a store and binds it to its directory; the work is done by one
/// part per responsibility, all sharing the one database handle.
public final class BillboardStore: Sendable {
    /// The store directory.
    public let directory: String
    /// The name of this host, fixed at `initialize`.
    public let hostName: String

    /// Signed guest registrations, and the admission check against them.
    public let registry: Registry
    /// Who may run each guest now, and the epochs that order its owners.
    public let leases: Leases
    /// The guests VMM processes on this host hold, and their beacons.
    public let instances: Instances
    /// Migrations' hand-overs, written down before they may happen, and their resolution after a crash.
    public let handoverIntents: HandoverIntents
    /// The hash-chained audit log every change writes to.
    public let audit: AuditLog
    /// The active scan's judgement of the VMs on this host.
    public let scan: Scan
    /// Who may sign for this store.
    public let administrators: Administrators
    /// Other hosts whose signed states this store accepts.
    public let peerHosts: PeerHosts
    /// This host's signatures over the guest states it writes.
    public let stateSignatures: StateSignatures
    /// Who this host seals a guest's snapshots for, and opening the keys sealed for this host.
    public let stateSealing: StateSealing

    let database: BillboardDatabase

    public static let databaseFileName = "billboard.sqlite"
    public static let keyFileName = "host.key"

    /// `~/.local/share/swift-vmm/billboard/` (respecting `XDG_DATA_HOME`).
    public static var defaultDirectory: String {
        let env = ProcessInfo.processInfo.environment
        if let xdg = env["XDG_DATA_HOME"], !xdg.isEmpty { return xdg + "/swift-vmm/billboard" }
        let home = env["HOME"] ?? NSHomeDirectory()
        return home + "/.local/share/swift-vmm/billboard"
    }

    private var keyPath: String { directory + "/" + Self.keyFileName }

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
            try store.database.write { db in
                let canary = try ChaChaPoly.seal(Data(canaryPlaintext.utf8), using: keys.sealKey,
                                                 authenticating: Data(canaryAAD.utf8)).combined
                try db.execute(sql: "INSERT INTO meta(key, value) VALUES (?, ?), (?, ?), (?, ?), (?, ?)", arguments: [
                    "host_name", Data(hostName.utf8),
                    "host_signing_key", keys.signing.publicKey.rawRepresentation,
                    "host_agreement_key", keys.agreement.publicKey.rawRepresentation,
                    "canary", canary,
                ])
                try db.execute(sql: "INSERT INTO meta(key, value) VALUES ('origin', ?)",
                               arguments: [store.database.rowMAC(Self.originState(Self.realPath(dir)))])
                try store.database.appendAudit(db, actor: "host:\(hostName)", event: "store.init", guest: nil, details: [
                    "host": .string(hostName),
                    "signingKey": .string(keys.signing.publicKey.rawRepresentation.hex),
                ])
                try store.makeHostCertificate(db, reason: "new store")
            }
            if let firstAdmin { try store.administrators.bootstrap(firstAdmin) }
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
        try ensureHostCertificate()
    }

    private init(directory: String, keys: HostKeys) throws {
        self.directory = directory
        self.hostName = keys.hostName
        var config = Configuration()
        config.journalMode = .wal
        config.busyMode = .timeout(10)
        config.foreignKeysEnabled = true
        let database = try BillboardDatabase(path: directory + "/" + Self.databaseFileName, keys: keys, configuration: config)
        try Self.migrator.migrate(database.queue)
        self.database = database
        let leaseRecords = LeaseRecords(database: database)
        let administrators = Administrators(database: database)
        let registry = Registry(database: database, administrators: administrators, leaseRecords: leaseRecords)
        let instances = Instances(database: database, leaseRecords: leaseRecords)
        let intents = HandoverIntents(database: database, leaseRecords: leaseRecords, instances: instances)
        let peerHosts = PeerHosts(database: database, administrators: administrators)
        self.registry = registry
        self.leases = Leases(database: database, records: leaseRecords, administrators: administrators,
                             registry: registry, instances: instances, intents: intents)
        self.instances = instances
        self.handoverIntents = intents
        self.audit = AuditLog(database: database)
        self.scan = Scan(database: database, instances: instances, leaseRecords: leaseRecords, intents: intents)
        self.administrators = administrators
        self.peerHosts = peerHosts
        self.stateSignatures = StateSignatures(database: database, peerHosts: peerHosts)
        self.stateSealing = StateSealing(database: database, peerHosts: peerHosts)
    }

    /// The canary proves the at-rest key (hence host.key) belongs to this database.
    private func checkKeyMatchesDatabase() throws {
        let keys = database.keys
        let (canary, signingKey) = try database.read { db -> (Data?, Data?) in
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

    /// This host's public signing key (peers enrol it from `hostIdentity()`).
    public var hostSigningKey: Curve25519.Signing.PublicKey { database.keys.signing.publicKey }
    /// This host's public key-agreement key (peers enrol it from `hostIdentity()`).
    public var hostAgreementKey: Curve25519.KeyAgreement.PublicKey { database.keys.agreement.publicKey }

    // MARK: - TLS identity

    static let certificateMetaKey = "host_certificate"

    /// This host's certificate and private key, for mutually authenticated TLS with its peers.
    /// The certificate is checked (for this host's key, naming this host, self-signed) every time,
    /// so a certificate swapped in the database is never presented.
    public func tlsIdentity() throws -> HostTLSIdentity {
        let der = try database.read { db in try Data.fetchOne(db, sql: "SELECT value FROM meta WHERE key = ?", arguments: [Self.certificateMetaKey]) }
        guard let der else { throw BillboardRefusal.hostCertificateInvalid(reason: "there is none") }
        if let problem = certificateProblem(der) { throw BillboardRefusal.hostCertificateInvalid(reason: problem) }
        return HostTLSIdentity(hostName: hostName, certificateDER: [UInt8](der), privateKey: database.keys.signing)
    }

    /// This host's public identity, for another host's administrator to enrol it
    /// (`HostIdentityDocument.encoded()` makes the file, `PeerHosts.add(_:signedBy:)` enrols it).
    public func hostIdentity() throws -> HostIdentityDocument {
        HostIdentityDocument(hostName: hostName, signingKey: database.keys.signing.publicKey.rawRepresentation,
                             agreementKey: database.keys.agreement.publicKey.rawRepresentation,
                             certificateDER: try tlsIdentity().certificateDER)
    }

    /// Why a stored certificate is not this host's (nil if it is).
    private func certificateProblem(_ der: Data) -> String? {
        guard let certificate = try? Certificate(derEncoded: [UInt8](der)) else { return "it is not a DER X.509 certificate" }
        return HostCertificate.problem(with: certificate, hostName: hostName,
                                       signingKey: database.keys.signing.publicKey.rawRepresentation)
    }

    /// Makes the certificate of a store created before certificates existed, or replaces one that
    /// does not verify; audited. Reads first, so opening a store that has a good one writes nothing.
    private func ensureHostCertificate() throws {
        func problem(_ db: Database) throws -> String? {
            guard let der = try Data.fetchOne(db, sql: "SELECT value FROM meta WHERE key = ?", arguments: [Self.certificateMetaKey]) else {
                return "the store has none (made before host certificates)"
            }
            return certificateProblem(der).map { "the stored one was refused: \($0)" }
        }
        guard try database.read(problem) != nil else { return }
        try database.write { db in
            // Another process opening the store may have made it in between.
            guard let reason = try problem(db) else { return }
            try makeHostCertificate(db, reason: reason)
        }
    }

    private func makeHostCertificate(_ db: Database, reason: String) throws {
        let der = try HostCertificate.make(hostName: hostName, key: database.keys.signing)
        try db.execute(sql: "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", arguments: [Self.certificateMetaKey, Data(der)])
        try database.appendAudit(db, actor: "host:\(hostName)", event: "host.certificate", guest: nil, details: [
            "certificateSHA256": .string(Data(SHA256.hash(data: der)).hex), "reason": .string(reason),
        ])
    }

    // MARK: - Binding to the directory

    static func originState(_ directory: String) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.origin.v1"), "directory": .string(directory)])
    }

    /// A store is bound to the directory it was created in (its real path). A copy elsewhere (with
    /// its host.key) would let a second VMM admit and lease a guest the original already runs: a
    /// ghost. Every command that runs a guest calls this first. A store without the binding is
    /// refused too (deleting the row must not re-bind a copy).
    public func ensureOriginal() throws {
        let stored = try database.read { db in try Data.fetchOne(db, sql: "SELECT value FROM meta WHERE key = 'origin'") }
        guard let stored, database.checkRowMAC(Self.originState(Self.realPath(directory)), stored) else {
            throw BillboardRefusal.copiedStore(directory: directory)
        }
    }

    /// The canonical path (symlinks and relative parts resolved), or the path itself if it cannot be resolved.
    static func realPath(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }

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
        m.registerMigration("v3") { db in
            try db.execute(sql: """
                -- A removed peer stays for the record; its integrity code covers the removed flag.
                ALTER TABLE hosts ADD COLUMN removed INTEGER NOT NULL DEFAULT 0;
                ALTER TABLE hosts ADD COLUMN removed_by TEXT;
                ALTER TABLE hosts ADD COLUMN removed_at INTEGER;
                ALTER TABLE hosts ADD COLUMN removal_request BLOB;
                ALTER TABLE hosts ADD COLUMN removal_signature BLOB;
                -- The TLS verification callback looks peers up by key.
                CREATE INDEX hosts_signing_key ON hosts(signing_key);
                """)
        }
        m.registerMigration("v4") { db in
            try db.execute(sql: """
                -- A migration's hand-over, synced before the pause so the commit inside it need not be
                -- (HandoverIntents); consumed by that commit, withdrawn on failure, resolved after a crash.
                CREATE TABLE handover_intents (
                    guest_id TEXT NOT NULL, role TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
                    peer_host TEXT NOT NULL, peer_pid INTEGER NOT NULL, epoch INTEGER NOT NULL,
                    challenge_sha256 TEXT NOT NULL, boot_id TEXT NOT NULL, created_at INTEGER NOT NULL, mac BLOB NOT NULL,
                    PRIMARY KEY (guest_id, role, host, pid));
                """)
        }
        return m
    }
}
