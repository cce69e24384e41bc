import Crypto
import Foundation

/// Which hosts may open a guest's sealed snapshots, and this host's half of opening one.
/// The file format lives in the Snapshot target; here are only the keys.
public struct StateSealing: Sendable {
    let database: BillboardDatabase
    let peerHosts: PeerHosts

    /// A host a snapshot's data key is wrapped for.
    public struct Recipient: Sendable {
        public let name: String
        /// The host's X25519 key-agreement public key (raw 32 bytes).
        public let agreementKeyBytes: Data

        public var agreementKey: Curve25519.KeyAgreement.PublicKey {
            // Only made from valid keys below.
            try! Curve25519.KeyAgreement.PublicKey(rawRepresentation: agreementKeyBytes)
        }
    }

    /// This host, then every host the registration allows that is an enrolled, not removed peer.
    /// An allowed host that is not a peer gets no key: it is named in `warnings`.
    public func recipients(for registration: GuestRegistration) throws -> (hosts: [Recipient], warnings: [String]) {
        var hosts = [Recipient(name: database.hostName, agreementKeyBytes: database.keys.agreement.publicKey.rawRepresentation)]
        var warnings: [String] = []
        let peers = try peerHosts.list().filter { !$0.removed }
        for allowed in registration.allowedHosts where !allowed.utf8.elementsEqual(database.hostName.utf8) {
            guard let peer = peers.first(where: { $0.name.utf8.elementsEqual(allowed.utf8) }),
                  (try? Curve25519.KeyAgreement.PublicKey(rawRepresentation: peer.agreementKey)) != nil else {
                warnings.append("guest '\(registration.name)' allows host '\(allowed)', which is not an enrolled peer of this host: the snapshot is not sealed for it (enrol it with `vmm billboard host add`)")
                continue
            }
            hosts.append(Recipient(name: peer.name, agreementKeyBytes: peer.agreementKey))
        }
        return (hosts, warnings)
    }

    /// This host's X25519 public key: how it finds its entry among a file's recipients.
    public var agreementKey: Curve25519.KeyAgreement.PublicKey { database.keys.agreement.publicKey }

    /// Opens an HPKE-wrapped key addressed to this host's key-agreement key. The private key
    /// never leaves the store.
    public func openWrappedKey(encapsulatedKey: Data, wrappedKey: Data, info: Data, associatedData: Data,
                               ciphersuite: HPKE.Ciphersuite) throws -> Data {
        var recipient = try HPKE.Recipient(privateKey: database.keys.agreement, ciphersuite: ciphersuite, info: info,
                                           encapsulatedKey: encapsulatedKey)
        return try recipient.open(wrappedKey, authenticating: associatedData)
    }
}
