import Crypto
import Foundation
import SwiftASN1
import X509

/// What this host presents in mutually authenticated TLS: its certificate and the private key
/// it was made for (the host's Ed25519 signing key). Handed to the TLS layer in the same process;
/// the key itself stays in `host.key` and is never written anywhere else.
public struct HostTLSIdentity: Sendable {
    /// This host's name, the certificate's subject common name and DNS subject alternative name.
    public let hostName: String
    /// The self-signed X.509 certificate, DER.
    public let certificateDER: [UInt8]
    // Raw bytes because swift-crypto's key types are not Sendable on Linux; validated when
    // host.key was loaded, so rebuilding the key cannot fail.
    private let privateKeyRaw: Data

    /// The host's Ed25519 signing key, whose public half is the certificate's subject key.
    public var privateKey: Curve25519.Signing.PrivateKey { try! .init(rawRepresentation: privateKeyRaw) }

    init(hostName: String, certificateDER: [UInt8], privateKey: Curve25519.Signing.PrivateKey) {
        self.hostName = hostName
        self.certificateDER = certificateDER
        self.privateKeyRaw = privateKey.rawRepresentation
    }
}

/// A host's TLS certificate: self-signed with its Billboard signing key, so that the key a peer
/// presents in TLS is the key an administrator enrolled (`PeerHosts.authorizedHost(signingKey:)`).
/// Trust comes from that enrolment, not from a CA or from the certificate's dates.
enum HostCertificate {
    /// RFC 5280's value for "no well-defined expiration date" (99991231235959Z). The certificate
    /// only carries a pinned key: a host stops being trusted when an administrator removes it,
    /// and a new key means a new store, so an expiry would only break migrations on a date.
    static let notValidAfter = Date(timeIntervalSince1970: 253_402_300_799)
    /// Valid from an hour before it was made, so a peer whose clock is a little behind accepts it.
    static let clockSkewAllowance: TimeInterval = 3600

    static func make(hostName: String, key: Curve25519.Signing.PrivateKey, now: Date = Date()) throws -> [UInt8] {
        let name = try subject(hostName)
        let certificate = try Certificate(
            version: .v3,
            serialNumber: Certificate.SerialNumber(),  // 20 random bytes
            publicKey: Certificate.PublicKey(key.publicKey),
            notValidBefore: now.addingTimeInterval(-clockSkewAllowance),
            notValidAfter: notValidAfter,
            issuer: name,
            subject: name,
            signatureAlgorithm: .ed25519,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectAlternativeNames([.dnsName(hostName)])
            },
            issuerPrivateKey: Certificate.PrivateKey(key))
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        return serializer.serializedBytes
    }

    static func subject(_ hostName: String) throws -> DistinguishedName {
        try DistinguishedName { CommonName(hostName) }
    }

    /// Why `certificate` is not `hostName`'s certificate for `signingKey` (nil if it is): it must be
    /// for that key, name that host, and be signed by that same key.
    static func problem(with certificate: Certificate, hostName: String, signingKey: Data) -> String? {
        guard let key = Curve25519.Signing.PublicKey(certificate.publicKey) else {
            return "the certificate's key is not an Ed25519 key"
        }
        guard key.rawRepresentation == signingKey else {
            return "the certificate is for another key than the host's signing key"
        }
        guard let expected = try? subject(hostName), certificate.subject == expected, certificate.issuer == expected else {
            return "the certificate does not name host '\(hostName)' as its subject and issuer"
        }
        guard certificate.publicKey.isValidSignature(certificate.signature, for: certificate) else {
            return "the certificate's self-signature does not verify (it was altered)"
        }
        return nil
    }
}
