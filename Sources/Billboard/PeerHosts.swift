import Crypto
import Foundation
import GRDB

/// The other hosts this store trusts (to sign snapshots and migration streams it accepts),
/// each added by an administrator.
public struct PeerHosts: Sendable {
    let database: BillboardDatabase
    let administrators: Administrators

    /// Records a peer host and its public keys; signed by an enrolled administrator.
    public func add(name: String, signingKey: Curve25519.Signing.PublicKey,
                    agreementKey: Curve25519.KeyAgreement.PublicKey, signedBy signer: AdminKey) throws {
        try validateName(name)
        let s = signingKey.rawRepresentation, a = agreementKey.rawRepresentation
        let payload = administrators.request("add-host", ["name": .string(name), "signingKey": .string(s.hex),
                                                          "agreementKey": .string(a.hex)])
        try database.decide(actor: "admin:\(signer.name)", event: "host.add", guest: nil, details: ["name": .string(name)]) { db in
            let (admin, signature) = try administrators.authorize(db, key: signer, payload: payload, guest: nil)
            let exists = try Bool.fetchOne(db, sql: "SELECT EXISTS(SELECT 1 FROM hosts WHERE name = ?)", arguments: [name]) ?? false
            guard !exists, name != database.hostName else { throw BillboardError.hostExists(name) }
            try db.execute(sql: """
                INSERT INTO hosts(name, signing_key, agreement_key, added_by, added_at, request, signature, mac)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """, arguments: [name, s, a, admin, Date().milliseconds, payload, signature,
                                 database.rowMAC(Self.hostState(name: name, signingKey: s, agreementKey: a))])
            try database.appendAudit(db, actor: "admin:\(admin)", event: "host.add", guest: nil, details: [
                "name": .string(name), "signingKey": .string(s.hex), "agreementKey": .string(a.hex),
                "signature": .string(signature.hex),
            ])
        }
    }

    static func hostState(name: String, signingKey: Data, agreementKey: Data) -> CanonicalJSON {
        .object(["kind": .string("swift-vmm.billboard.host-state.v1"), "name": .string(name),
                 "signingKey": .string(signingKey.hex), "agreementKey": .string(agreementKey.hex)])
    }

    /// Known peer hosts; a row whose integrity code fails is refused rather than returned.
    public func list() throws -> [PeerHost] {
        try database.read { db in
            try Row.fetchAll(db, sql: "SELECT * FROM hosts ORDER BY name").map { row in
                let name: String = row["name"], s: Data = row["signing_key"], a: Data = row["agreement_key"]
                guard database.checkRowMAC(Self.hostState(name: name, signingKey: s, agreementKey: a), row["mac"]) else {
                    throw BillboardRefusal.recordTampered(what: "peer host '\(name)'")
                }
                return PeerHost(name: name, signingKey: s, agreementKey: a, addedBy: row["added_by"],
                                addedAt: Date(milliseconds: row["added_at"]))
            }
        }
    }
}
