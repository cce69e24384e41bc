import Crypto
import Foundation
import GRDB
import SystemCalls

/// The other hosts this store trusts (to sign snapshots and migration streams it accepts, and to
/// authenticate in TLS with their certificates), each added and removed by an administrator.
public struct PeerHosts: Sendable {
    let database: BillboardDatabase
    let administrators: Administrators

    /// Enrols the host an identity document describes (see `BillboardStore.hostIdentity()`);
    /// signed by an enrolled administrator. The document was checked when it was decoded.
    public func add(_ identity: HostIdentityDocument, signedBy signer: AdminKey) throws {
        try add(name: identity.hostName, signingKey: identity.signingKey, agreementKey: identity.agreementKey,
                certificateSHA256: identity.certificateSHA256, signedBy: signer)
    }

    /// Records a peer host and its public keys; signed by an enrolled administrator. For hosts
    /// in one process (tests); between machines, an identity document carries the keys.
    public func add(name: String, signingKey: Curve25519.Signing.PublicKey,
                    agreementKey: Curve25519.KeyAgreement.PublicKey, signedBy signer: AdminKey) throws {
        try add(name: name, signingKey: signingKey.rawRepresentation, agreementKey: agreementKey.rawRepresentation,
                certificateSHA256: nil, signedBy: signer)
    }

    private func add(name: String, signingKey s: Data, agreementKey a: Data, certificateSHA256: String?,
                     signedBy signer: AdminKey) throws {
        try validateName(name)
        var fields: [String: CanonicalJSON] = ["name": .string(name), "signingKey": .string(s.hex), "agreementKey": .string(a.hex)]
        if let certificateSHA256 { fields["certificateSHA256"] = .string(certificateSHA256) }
        let payload = administrators.request("add-host", fields)
        try database.decide(actor: "admin:\(signer.name)", event: "host.add", guest: nil, details: ["name": .string(name)]) { db in
            let (admin, signature) = try administrators.authorize(db, key: signer, payload: payload, guest: nil)
            guard !sameBytes(name, database.hostName) else { throw BillboardError.hostExists(name) }
            let existing = try Row.fetchOne(db, sql: "SELECT removed FROM hosts WHERE name = ?", arguments: [name])
                .map { $0["removed"] as Bool }
            guard existing != false else { throw BillboardError.hostExists(name) }
            guard s != database.keys.signing.publicKey.rawRepresentation else {
                throw BillboardError.hostKeyInUse(key: s.hex, by: database.hostName)
            }
            if let holder = try activePeer(db, signingKey: s) { throw BillboardError.hostKeyInUse(key: s.hex, by: holder) }
            let mac = database.rowMAC(Self.hostState(name: name, signingKey: s, agreementKey: a, removed: false))
            if existing == nil {
                try db.execute(sql: """
                    INSERT INTO hosts(name, signing_key, agreement_key, added_by, added_at, request, signature, removed, mac)
                    VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)
                    """, arguments: [name, s, a, admin, Date().milliseconds, payload, signature, mac])
            } else {
                // A new enrolment of a removed name: the row becomes the new one; the audit log keeps the history.
                try db.execute(sql: """
                    UPDATE hosts SET signing_key = ?, agreement_key = ?, added_by = ?, added_at = ?, request = ?, signature = ?,
                        removed = 0, removed_by = NULL, removed_at = NULL, removal_request = NULL, removal_signature = NULL, mac = ?
                    WHERE name = ?
                    """, arguments: [s, a, admin, Date().milliseconds, payload, signature, mac, name])
            }
            var details: [String: CanonicalJSON] = [
                "name": .string(name), "signingKey": .string(s.hex), "agreementKey": .string(a.hex),
                "signature": .string(signature.hex),
            ]
            if let certificateSHA256 { details["certificateSHA256"] = .string(certificateSHA256) }
            if existing != nil { details["reenrolment"] = .bool(true) }
            try database.appendAudit(db, actor: "admin:\(admin)", event: "host.add", guest: nil, details: details)
        }
    }

    /// Marks a peer host removed (signed by an enrolled administrator): from then on its TLS
    /// certificate and the states it signed are refused. Leases it holds stay until an
    /// administrator releases them; the row stays for the record.
    public func remove(name: String, signedBy signer: AdminKey) throws {
        let payload = administrators.request("remove-host", ["name": .string(name)])
        try database.decide(actor: "admin:\(signer.name)", event: "host.remove", guest: nil, details: ["name": .string(name)]) { db in
            let (admin, signature) = try administrators.authorize(db, key: signer, payload: payload, guest: nil)
            guard let row = try Row.fetchOne(db, sql: "SELECT * FROM hosts WHERE name = ? AND removed = 0", arguments: [name]) else {
                throw BillboardError.unknownHost(name)
            }
            let peer = try Self.peer(row, database: database)
            try db.execute(sql: """
                UPDATE hosts SET removed = 1, removed_by = ?, removed_at = ?, removal_request = ?, removal_signature = ?, mac = ?
                WHERE name = ?
                """, arguments: [admin, Date().milliseconds, payload, signature,
                                 database.rowMAC(Self.hostState(name: name, signingKey: peer.signingKey,
                                                                agreementKey: peer.agreementKey, removed: true)), name])
            try database.appendAudit(db, actor: "admin:\(admin)", event: "host.remove", guest: nil, details: [
                "name": .string(name), "signingKey": .string(peer.signingKey.hex), "signature": .string(signature.hex),
            ])
        }
    }

    /// The name of the host whose Ed25519 signing public key (raw 32 bytes) this is, if it is this
    /// host or an enrolled, not removed peer; nil otherwise, and nil too if the store cannot be
    /// read or the peer's row was tampered with (a TLS verification callback must fail closed).
    public func authorizedHost(signingKey: [UInt8]) -> String? {
        let key = Data(signingKey)
        if key == database.keys.signing.publicKey.rawRepresentation { return database.hostName }
        return try? database.read { db in try activePeer(db, signingKey: key) }
    }

    /// The enrolled, not removed peer with this signing key, its integrity code checked;
    /// a forged row is a refusal, not "none".
    func activePeer(_ db: Database, signingKey: Data) throws -> String? {
        try Row.fetchAll(db, sql: "SELECT * FROM hosts WHERE signing_key = ? AND removed = 0", arguments: [signingKey])
            .map { try Self.peer($0, database: database) }.first?.name
    }

    /// A removed peer with this signing key, if any (to say why its signature is refused).
    func removedPeer(_ db: Database, signingKey: Data) throws -> String? {
        try Row.fetchAll(db, sql: "SELECT * FROM hosts WHERE signing_key = ? AND removed = 1", arguments: [signingKey])
            .map { try Self.peer($0, database: database) }.first?.name
    }

    /// The integrity code's payload: the keys and whether the host is removed, so that neither a
    /// peer's keys can be swapped nor a removed peer restored by someone without host.key.
    static func hostState(name: String, signingKey: Data, agreementKey: Data, removed: Bool) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.host-state.v2"), "name": .string(name),
                 "signingKey": .string(signingKey.hex), "agreementKey": .string(agreementKey.hex), "removed": .bool(removed)])
    }

    /// The payload of rows enrolled before peers could be removed; it covers everything but `removed`.
    static func legacyHostState(name: String, signingKey: Data, agreementKey: Data) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.host-state.v1"), "name": .string(name),
                 "signingKey": .string(signingKey.hex), "agreementKey": .string(agreementKey.hex)])
    }

    static func peer(_ row: Row, database: BillboardDatabase) throws -> PeerHost {
        let name: String = row["name"], s: Data = row["signing_key"], a: Data = row["agreement_key"]
        let removed: Bool = row["removed"], mac: Data = row["mac"]
        // A legacy code is accepted only on a row that says it is active: every removal writes a v2 code.
        guard database.checkRowMAC(hostState(name: name, signingKey: s, agreementKey: a, removed: removed), mac)
            || (!removed && database.checkRowMAC(legacyHostState(name: name, signingKey: s, agreementKey: a), mac))
        else { throw BillboardRefusal.recordTampered(what: "peer host '\(name)'") }
        return PeerHost(name: name, signingKey: s, agreementKey: a, addedBy: row["added_by"],
                        addedAt: Date(milliseconds: row["added_at"]), removed: removed, removedBy: row["removed_by"],
                        removedAt: (row["removed_at"] as Int64?).map(Date.init(milliseconds:)))
    }

    /// Every peer host ever enrolled, removed ones included (`removed` says which); a row whose
    /// integrity code fails is refused rather than returned.
    public func list() throws -> [PeerHost] {
        try database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM hosts ORDER BY name").map { try Self.peer($0, database: database) }
        }
    }
}
