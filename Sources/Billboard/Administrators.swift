import Crypto
import Foundation
import GRDB

/// Who may sign for this store: enrolling and removing administrators, and checking that a
/// request is signed by one who is enrolled (every signed change of the other parts goes through here).
public struct Administrators: Sendable {
    let database: BillboardDatabase

    // MARK: - Authorisation

    /// The enrolled, non-removed administrator whose key is `publicKey`, with its integrity code checked.
    /// nil if there is none (or it was removed); a forged row is a refusal, not "none".
    func activeAdmin(_ db: Database, publicKey: Data) throws -> (name: String, removed: Bool)? {
        guard let row = try Row.fetchOne(db, sql: "SELECT * FROM admins WHERE public_key = ?", arguments: [publicKey]) else {
            return nil
        }
        let name: String = row["name"]
        let removed: Bool = row["removed"]
        guard database.checkRowMAC(Self.adminState(name: name, publicKey: publicKey, removed: removed), row["mac"]) else {
            throw BillboardRefusal.recordTampered(what: "administrator '\(name)'")
        }
        return (name, removed)
    }

    static func adminState(name: String, publicKey: Data, removed: Bool) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.admin-state.v1"), "name": .string(name),
                 "publicKey": .string(publicKey.hex), "removed": .bool(removed)])
    }

    /// Signs `payload` with `key` and verifies the signature against the enrolled copy of the key,
    /// exactly as a remotely produced signature would be checked. Returns the enrolled name.
    func authorize(_ db: Database, key: AdminKey, payload: Data, guest: String?) throws -> (admin: String, signature: Data) {
        let publicKey = key.publicKey.rawRepresentation
        guard let admin = try activeAdmin(db, publicKey: publicKey), !admin.removed else {
            throw BillboardRefusal.signerNotAdministrator(guest: guest, signer: key.name)
        }
        let signature = try key.sign(payload)
        guard let enrolled = try? Curve25519.Signing.PublicKey(rawRepresentation: publicKey),
              enrolled.isValidSignature(signature, for: payload)
        else { throw BillboardRefusal.signerNotAdministrator(guest: guest, signer: key.name) }
        return (admin.name, signature)
    }

    /// A signed administrative request: what it does, to what, on which store, when.
    /// The host name binds the signature to this store; the time makes each request distinct.
    func request(_ kind: String, _ fields: [String: CanonicalJSON]) -> Data {
        var f = fields
        f["kind"] = .string("swift-vmm.billboard.\(kind).v1")
        f["host"] = .string(database.hostName)
        f["time"] = .int(Date().milliseconds)
        return CanonicalJSON.object(f).bytes
    }

    // MARK: - Enrolling and removing

    /// Enrolls the first administrator, self-signed (proof that its holder has the private key).
    /// Refused once any administrator exists; audited as `admin.bootstrap`.
    public func bootstrap(_ key: AdminKey) throws {
        let publicKey = key.publicKey.rawRepresentation
        let payload = request("enroll-admin", ["name": .string(key.name), "publicKey": .string(publicKey.hex)])
        try database.decide(actor: "admin:\(key.name)", event: "admin.bootstrap", guest: nil) { db in
            let count = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM admins") ?? 0
            guard count == 0 else { throw BillboardRefusal.bootstrapNotAllowed }
            let signature = try key.sign(payload)
            try insertAdmin(db, name: key.name, publicKey: publicKey, by: key.name, payload: payload, signature: signature)
            try database.appendAudit(db, actor: "admin:\(key.name)", event: "admin.bootstrap", guest: nil, details: [
                "name": .string(key.name), "publicKey": .string(publicKey.hex), "signature": .string(signature.hex),
            ])
        }
    }

    /// Enrolls another administrator; the request must be signed by an enrolled one.
    public func enroll(publicKey: Curve25519.Signing.PublicKey, name: String, signedBy signer: AdminKey) throws {
        try validateName(name)
        let raw = publicKey.rawRepresentation
        let payload = request("enroll-admin", ["name": .string(name), "publicKey": .string(raw.hex)])
        try database.decide(actor: "admin:\(signer.name)", event: "admin.enroll", guest: nil, details: ["name": .string(name)]) { db in
            let (admin, signature) = try authorize(db, key: signer, payload: payload, guest: nil)
            try insertAdmin(db, name: name, publicKey: raw, by: admin, payload: payload, signature: signature)
            try database.appendAudit(db, actor: "admin:\(admin)", event: "admin.enroll", guest: nil, details: [
                "name": .string(name), "publicKey": .string(raw.hex), "signature": .string(signature.hex),
            ])
        }
    }

    private func insertAdmin(_ db: Database, name: String, publicKey: Data, by: String, payload: Data, signature: Data) throws {
        try validateName(name)
        let exists = try Bool.fetchOne(db, sql: "SELECT EXISTS(SELECT 1 FROM admins WHERE name = ? OR public_key = ?)",
                                       arguments: [name, publicKey]) ?? false
        guard !exists else { throw BillboardError.administratorExists(name) }
        try db.execute(sql: """
            INSERT INTO admins(name, public_key, enrolled_at, enrolled_by, request, signature, removed, mac)
            VALUES (?, ?, ?, ?, ?, ?, 0, ?)
            """, arguments: [name, publicKey, Date().milliseconds, by, payload, signature,
                             database.rowMAC(Self.adminState(name: name, publicKey: publicKey, removed: false))])
    }

    /// Removes an administrator (signed by an enrolled one). Registrations it signed stop being admitted.
    public func remove(name: String, signedBy signer: AdminKey) throws {
        let payload = request("remove-admin", ["name": .string(name)])
        try database.decide(actor: "admin:\(signer.name)", event: "admin.remove", guest: nil, details: ["name": .string(name)]) { db in
            let (admin, signature) = try authorize(db, key: signer, payload: payload, guest: nil)
            guard let row = try Row.fetchOne(db, sql: "SELECT public_key FROM admins WHERE name = ? AND removed = 0",
                                             arguments: [name]) else { throw BillboardError.unknownAdministrator(name) }
            let active = try Int.fetchOne(db, sql: "SELECT COUNT(*) FROM admins WHERE removed = 0") ?? 0
            guard active > 1 else { throw BillboardError.lastAdministrator(name) }
            let publicKey: Data = row["public_key"]
            try db.execute(sql: "UPDATE admins SET removed = 1, mac = ? WHERE name = ?", arguments: [
                database.rowMAC(Self.adminState(name: name, publicKey: publicKey, removed: true)), name,
            ])
            try database.appendAudit(db, actor: "admin:\(admin)", event: "admin.remove", guest: nil, details: [
                "name": .string(name), "signature": .string(signature.hex),
            ])
        }
    }

    /// Every administrator ever enrolled, removed ones included.
    public func list() throws -> [Administrator] {
        try database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM admins ORDER BY enrolled_at, name").map { row in
                Administrator(name: row["name"], publicKey: row["public_key"],
                              enrolledAt: Date(milliseconds: row["enrolled_at"]), enrolledBy: row["enrolled_by"],
                              removed: row["removed"])
            }
        }
    }
}
