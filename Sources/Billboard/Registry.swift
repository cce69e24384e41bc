#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import GRDB
import SystemCalls

/// A registration row as stored: the decoded registration plus who signed it and the signature.
struct StoredRegistration {
    var registration: GuestRegistration
    var signerName: String
    var signerKey: Data
    var signature: Data
}

/// The signed guest registry: what each guest is (image, memory, vCPUs, mode, command line,
/// hosts), as an administrator signed it, and the admission check that compares a guest about
/// to start with it.
public struct Registry: Sendable {
    let database: BillboardDatabase
    let administrators: Administrators
    let leaseRecords: LeaseRecords

    // MARK: - Registering

    /// Stores a registration signed by an enrolled administrator. mac, ip, os and the command line
    /// are sealed with the at-rest key (ChaChaPoly, guest id as associated data).
    @discardableResult
    public func register(_ registration: GuestRegistration, signedBy signer: AdminKey) throws -> GuestRegistration {
        var r = registration
        r.revoked = false
        try r.validate()
        let payload = r.signingPayload
        return try database.decide(actor: "admin:\(signer.name)", event: "guest.register", guest: r.name,
                                   details: ["id": .string(r.id.uuidString.lowercased())]) { db in
            let (admin, signature) = try administrators.authorize(db, key: signer, payload: payload, guest: r.name)
            let live = try Bool.fetchOne(db, sql: "SELECT EXISTS(SELECT 1 FROM guests WHERE name = ? AND revoked = 0)",
                                         arguments: [r.name]) ?? false
            guard !live else { throw BillboardRefusal.alreadyRegistered(guest: r.name) }
            let secrets = SealedFields(mac: r.mac, ip: r.ip, os: r.os, commandLine: r.commandLine)
            let sealed = try ChaChaPoly.seal(try JSONEncoder().encode(secrets), using: database.keys.sealKey,
                                             authenticating: Self.sealAAD(r.id)).combined
            let hosts = String(decoding: try JSONEncoder().encode(r.allowedHosts), as: UTF8.self)
            try db.execute(sql: """
                INSERT INTO guests(id, name, image_sha256, memory_bytes, vcpus, mode, allowed_hosts, beacons,
                                   created_at, sealed, signer_name, signer_key, signature, revoked, state_mac)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)
                """, arguments: [
                    guestIDText(r.id), r.name, r.imageSHA256, Int64(bitPattern: r.memoryBytes), r.vcpus, r.mode,
                    hosts, r.beacons.rawValue, r.createdAt.milliseconds, sealed, admin,
                    signer.publicKey.rawRepresentation, signature, database.rowMAC(Self.guestState(r.id, revoked: false)),
                ])
            // A name registered again inherits its predecessor's lease (holder and epoch): a new
            // registration must neither reset the epoch (re-admitting old snapshots) nor let a
            // second copy start beside one still running under the old registration.
            let predecessors = try String.fetchAll(db, sql: "SELECT id FROM guests WHERE name = ? AND id != ?",
                                                   arguments: [r.name, guestIDText(r.id)])
            var inherited: LeaseRow?
            for old in predecessors.compactMap(UUID.init(uuidString:)) {
                if let lease = try leaseRecords.row(db, old), lease.epoch > (inherited?.epoch ?? 0) { inherited = lease }
            }
            if let inherited {
                try leaseRecords.write(db, r.id, host: inherited.host, pid: inherited.pid, epoch: inherited.epoch,
                                       now: inherited.renewedAt)
            }
            try database.appendAudit(db, actor: "admin:\(admin)", event: "guest.register", guest: r.name, details: [
                "id": .string(guestIDText(r.id)), "imageSHA256": .string(r.imageSHA256),
                "memoryBytes": .uint(r.memoryBytes), "vcpus": .int(Int64(r.vcpus)), "mode": .optional(r.mode),
                "allowedHosts": .array(r.allowedHosts.map(CanonicalJSON.string)), "signature": .string(signature.hex),
            ])
            return r
        }
    }

    /// Marks the live registration of `name` revoked (signed, audited). It stays in the store for the record.
    public func revoke(name: String, signedBy signer: AdminKey) throws {
        try database.decide(actor: "admin:\(signer.name)", event: "guest.revoke", guest: name) { db in
            guard let id = try String.fetchOne(db, sql: "SELECT id FROM guests WHERE name = ? AND revoked = 0",
                                               arguments: [name]) else {
                throw BillboardRefusal.notRegistered(guest: name)
            }
            let payload = administrators.request("revoke", ["id": .string(id), "name": .string(name)])
            let (admin, signature) = try administrators.authorize(db, key: signer, payload: payload, guest: name)
            guard let uuid = UUID(uuidString: id) else { throw BillboardRefusal.recordTampered(what: "guest '\(name)'") }
            try db.execute(sql: "UPDATE guests SET revoked = 1, state_mac = ? WHERE id = ?",
                           arguments: [database.rowMAC(Self.guestState(uuid, revoked: true)), id])
            try database.appendAudit(db, actor: "admin:\(admin)", event: "guest.revoke", guest: name, details: [
                "id": .string(id), "signature": .string(signature.hex),
            ])
        }
    }

    // MARK: - Reading

    /// All registrations (live and revoked), decrypted. Throws if any row's sealed fields or
    /// revocation state fail authentication.
    public func list() throws -> [GuestRegistration] {
        try database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM guests ORDER BY name, created_at").map { try decode($0).registration }
        }
    }

    /// The live registration named `name`, else its latest revoked one, else nil.
    public func show(name: String) throws -> GuestRegistration? {
        try database.read { db in try findByName(db, name)?.registration }
    }

    func findByName(_ db: Database, _ name: String) throws -> StoredRegistration? {
        try Row.fetchOne(db, sql: "SELECT * FROM guests WHERE name = ? ORDER BY revoked ASC, created_at DESC LIMIT 1",
                         arguments: [name]).map(decode)
    }

    static func sealAAD(_ id: UUID) -> Data { Data("swift-vmm.billboard.guest.v1:\(guestIDText(id))".utf8) }

    static func guestState(_ id: UUID, revoked: Bool) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.guest-state.v1"), "id": .string(guestIDText(id)), "revoked": .bool(revoked)])
    }

    /// Decrypts and checks the row's own integrity (sealed fields, revocation state);
    /// the administrator's signature is checked separately, by `verifySignature`.
    func decode(_ row: Row) throws -> StoredRegistration {
        let name: String = row["name"]
        let idText: String = row["id"]
        guard let id = UUID(uuidString: idText) else { throw BillboardRefusal.recordTampered(what: "guest '\(name)'") }
        let revoked: Bool = row["revoked"]
        guard database.checkRowMAC(Self.guestState(id, revoked: revoked), row["state_mac"]) else {
            throw BillboardRefusal.recordTampered(what: "revocation state of guest '\(name)'")
        }
        let sealed: Data = row["sealed"]
        guard let box = try? ChaChaPoly.SealedBox(combined: sealed),
              let plain = try? ChaChaPoly.open(box, using: database.keys.sealKey, authenticating: Self.sealAAD(id)),
              let secrets = try? JSONDecoder().decode(SealedFields.self, from: plain)
        else { throw BillboardRefusal.sealedFieldsTampered(guest: name) }
        let hostsText: String = row["allowed_hosts"]
        let beaconsText: String = row["beacons"]
        guard let hosts = try? JSONDecoder().decode([String].self, from: Data(hostsText.utf8)),
              let beacons = BeaconPolicy(rawValue: beaconsText)
        else { throw BillboardRefusal.badSignature(guest: name) }
        let memory: Int64 = row["memory_bytes"]
        let createdAt: Int64 = row["created_at"]
        // Built field by field (not through init) so nothing is normalised: the signature must see the stored bytes.
        var r = GuestRegistration(id: id, name: name, imageSHA256: "", memoryBytes: UInt64(bitPattern: memory),
                                  vcpus: row["vcpus"], createdAt: Date(milliseconds: createdAt), revoked: revoked)
        r.imageSHA256 = row["image_sha256"]
        r.mode = row["mode"]
        r.commandLine = secrets.commandLine
        r.mac = secrets.mac
        r.ip = secrets.ip
        r.os = secrets.os
        r.allowedHosts = hosts
        r.beacons = beacons
        return StoredRegistration(registration: r, signerName: row["signer_name"], signerKey: row["signer_key"],
                                  signature: row["signature"])
    }

    /// Re-verifies a stored registration against the enrolled (non-removed) key that signed it.
    func verifySignature(_ db: Database, _ stored: StoredRegistration) throws {
        let name = stored.registration.name
        guard let admin = try administrators.activeAdmin(db, publicKey: stored.signerKey) else {
            throw BillboardRefusal.signerNotAdministrator(guest: name, signer: stored.signerName)
        }
        guard !admin.removed else { throw BillboardRefusal.signerRemoved(guest: name, signer: admin.name) }
        guard let key = try? Curve25519.Signing.PublicKey(rawRepresentation: stored.signerKey),
              key.isValidSignature(stored.signature, for: stored.registration.signingPayload)
        else { throw BillboardRefusal.badSignature(guest: name) }
    }

    // MARK: - Admission

    /// Decides whether a guest may start here, before any VM exists. Finds the registration (by name,
    /// or by image digest when `name` is nil and exactly one live registration has it), re-verifies
    /// the administrator's signature, then compares everything the VMM is about to run with what was
    /// signed. Throws `BillboardRefusal` on any difference; audits accept and refuse alike.
    @discardableResult
    public func admit(name: String?, imageSHA256: String, memoryBytes: UInt64, vcpus: Int,
                      mode: String?, commandLine: String?, host: String) throws -> GuestRegistration {
        let digest = imageSHA256.lowercased()
        let mode = mode.flatMap { $0.isEmpty ? nil : $0 }
        let commandLine = commandLine.flatMap { $0.isEmpty ? nil : $0 }
        let request: [String: CanonicalJSON] = [
            "imageSHA256": .string(digest), "memoryBytes": .uint(memoryBytes), "vcpus": .int(Int64(vcpus)),
            "mode": .optional(mode), "host": .string(host), "pid": .int(Int64(getpid())),
        ]
        return try database.decide(actor: database.processActor, event: "admit", guest: name, details: request) { db in
            // Found by name or digest in SQL, which compares bytes (BINARY collation); every
            // comparison below does too (`sameBytes`), never Swift's canonical-equivalence `==`.
            let stored = try find(db, name: name, digest: digest)
            let r = stored.registration
            try verifySignature(db, stored)
            guard !r.revoked else { throw BillboardRefusal.revoked(guest: r.name) }
            guard sameBytes(digest, r.imageSHA256) else {
                throw BillboardRefusal.imageChanged(guest: r.name, actual: digest, registered: r.imageSHA256)
            }
            func changed(_ field: String, _ actual: String, _ registered: String) -> BillboardRefusal {
                .configurationChanged(guest: r.name, field: field, actual: actual, registered: registered)
            }
            guard memoryBytes == r.memoryBytes else {
                throw changed("memory", formatMemory(memoryBytes), formatMemory(r.memoryBytes))
            }
            guard vcpus == r.vcpus else { throw changed("vcpus", "\(vcpus)", "\(r.vcpus)") }
            guard sameBytes(mode, r.mode) else { throw changed("mode", quoted(mode), quoted(r.mode)) }
            guard sameBytes(commandLine, r.commandLine) else {
                throw changed("command line", quoted(commandLine), quoted(r.commandLine))
            }
            let allowed = r.allowedHosts.isEmpty ? [database.hostName] : r.allowedHosts
            guard allowed.containsSameBytes(as: host) else {
                throw BillboardRefusal.hostNotAllowed(guest: r.name, host: host, allowed: allowed)
            }
            var details = request
            details["id"] = .string(guestIDText(r.id))
            try database.appendAudit(db, actor: database.processActor, event: "admit.accepted", guest: r.name, details: details)
            return r
        }
    }

    private func find(_ db: Database, name: String?, digest: String) throws -> StoredRegistration {
        if let name {
            guard let found = try findByName(db, name) else { throw BillboardRefusal.notRegistered(guest: name) }
            return found
        }
        let rows = try Row.fetchAll(db, sql: "SELECT * FROM guests WHERE image_sha256 = ? ORDER BY created_at DESC",
                                    arguments: [digest])
        guard !rows.isEmpty else { throw BillboardRefusal.imageNotRegistered(sha256: digest) }
        let live = rows.filter { ($0["revoked"] as Bool) == false }
        if live.count == 1 { return try decode(live[0]) }
        if live.isEmpty { return try decode(rows[0]) }  // only revoked ones: refused below as revoked
        throw BillboardRefusal.ambiguousImage(sha256: digest, guests: live.map { $0["name"] as String })
    }
}

/// Quoted with non-ASCII written as \u{…}: a refusal of look-alike text must show the difference.
private func quoted(_ s: String?) -> String { s.map { "'\(visibleBytes($0))'" } ?? "(none)" }
