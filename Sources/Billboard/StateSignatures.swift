import Crypto
import Foundation
import GRDB

/// A host's signature over a saved guest state (a snapshot file's stream digest), so that a
/// snapshot edited after it was written (even with every checksum recomputed) is refused.
public struct StateSignature: Sendable, Codable, Equatable {
    /// The signing host's name.
    public var host: String
    /// Its Ed25519 public key, base64.
    public var publicKey: String
    /// Ed25519 over `payload(digest)`, base64.
    public var signature: String

    static func payload(_ digest: [UInt8]) -> Data {
        Data("swift-vmm.snapshot-signature.v1:".utf8) + Data(digest)
    }
}

/// Signing the guest states this host writes, and accepting only states signed by this host or a peer.
public struct StateSignatures: Sendable {
    let database: BillboardDatabase
    let peerHosts: PeerHosts

    /// Signs the digest of a state stream with this host's key.
    public func sign(digest: [UInt8]) throws -> StateSignature {
        let keys = database.keys
        let signature = try keys.signing.signature(for: StateSignature.payload(digest))
        return StateSignature(host: database.hostName, publicKey: keys.signing.publicKey.rawRepresentation.base64EncodedString(),
                              signature: signature.base64EncodedString())
    }

    /// Records a refused state (an unsigned or badly signed snapshot or migration stream) in the audit log.
    public func auditRefused(guest: String?, reason: String) {
        try? database.write { db in
            try database.appendAudit(db, actor: database.processActor, event: "state.signature.refused", guest: guest,
                                     details: ["reason": .string(reason)])
        }
    }

    /// Accepts a signature by this host or by a peer host an administrator added and has not
    /// removed; refuses anything else. Returns the signing host's name as this store knows it (the label in the signature is not trusted).
    @discardableResult
    public func verify(_ signature: StateSignature, digest: [UInt8]) throws -> String {
        guard let key = Data(base64Encoded: signature.publicKey), let sig = Data(base64Encoded: signature.signature) else {
            throw BillboardRefusal.badSnapshotSignature(reason: "the signature is not base64")
        }
        let signer: String?
        if key == database.keys.signing.publicKey.rawRepresentation {
            signer = database.hostName
        } else {
            signer = try database.read { db in try peerHosts.activePeer(db, signingKey: key) }
        }
        guard let signer else {
            if let removed = try database.read({ db in try peerHosts.removedPeer(db, signingKey: key) }) {
                throw BillboardRefusal.badSnapshotSignature(reason: "it was signed by '\(removed)', a peer host an administrator removed; a host's states are accepted only while it is a peer")
            }
            throw BillboardRefusal.badSnapshotSignature(reason: "it was signed by '\(signature.host)', whose key is neither this host's nor a peer host's (an administrator adds peer hosts from their exported identity)")
        }
        guard let publicKey = try? Curve25519.Signing.PublicKey(rawRepresentation: key),
              publicKey.isValidSignature(sig, for: StateSignature.payload(digest)) else {
            throw BillboardRefusal.badSnapshotSignature(reason: "the signature does not match the snapshot's contents")
        }
        return signer
    }
}
