import Crypto
import Foundation
import Migration
import NIOSSL
import X509

/// This host's TLS identity: a self-signed X.509 certificate whose subject key is the host's
/// Ed25519 signing key, and that key. There is no certificate authority: peers trust a
/// certificate only because its key is enrolled (see `PeerAuthorizer`).
public struct TLSIdentity: Sendable {
    public let hostName: String
    public let certificateDER: [UInt8]
    /// Kept as its 32 raw bytes: swift-crypto does not mark its key types Sendable.
    private let privateKeyRaw: [UInt8]

    public var privateKey: Curve25519.Signing.PrivateKey {
        // Cannot fail: the bytes came from a valid key in `init`.
        try! Curve25519.Signing.PrivateKey(rawRepresentation: privateKeyRaw)
    }

    public init(hostName: String, certificateDER: [UInt8], privateKey: Curve25519.Signing.PrivateKey) {
        self.hostName = hostName
        self.certificateDER = certificateDER
        self.privateKeyRaw = Array(privateKey.rawRepresentation)
    }
}

/// Returns the enrolled host name for a peer certificate's raw 32-byte Ed25519 public key, or
/// nil to refuse the peer. Called on a network thread during the handshake: it must be quick
/// and must not block on the transport it is deciding about.
public typealias PeerAuthorizer = @Sendable (_ ed25519PublicKey: [UInt8]) -> String?

/// The TLS settings both ends share.
///
/// - TLS 1.3 only, as minimum and maximum: no downgrade, no renegotiation, and the handshake
///   encrypts the certificates.
/// - Signature algorithms: Ed25519 only, for signing (our CertificateVerify) and for verifying
///   (the peer's). BoringSSL leaves Ed25519 out of its default verify list, and every host key
///   here is Ed25519, so offering anything else would only widen what a peer could use.
/// - Peer certificates are required on both sides and checked by `PeerCertificateCheck`
///   instead of a chain to a CA; no trust store is loaded and no CA names are sent.
enum SecureChannelConfiguration {
    static func make(identity: TLSIdentity, isServer: Bool) throws -> TLSConfiguration {
        let certificate: NIOSSLCertificate
        let key: NIOSSLPrivateKey
        do {
            let parsed = try Certificate(derEncoded: identity.certificateDER)
            guard let certificateKey = Curve25519.Signing.PublicKey(parsed.publicKey),
                  certificateKey.rawRepresentation == identity.privateKey.publicKey.rawRepresentation else {
                throw MigrationError.connection(
                    "the TLS certificate of \(identity.hostName) is not for its Ed25519 signing key; make the certificate again from this host's key")
            }
            certificate = try NIOSSLCertificate(bytes: identity.certificateDER, format: .der)
            // PKCS#8, the form BoringSSL reads Ed25519 private keys in.
            let pkcs8 = try Certificate.PrivateKey(identity.privateKey).serializeAsPEM().derBytes
            key = try NIOSSLPrivateKey(bytes: pkcs8, format: .der)
        } catch let error as MigrationError {
            throw error
        } catch {
            throw MigrationError.connection("the TLS identity of \(identity.hostName) cannot be used (\(error)); make its certificate again")
        }
        var configuration = isServer
            ? TLSConfiguration.makeServerConfiguration(certificateChain: [.certificate(certificate)], privateKey: .privateKey(key))
            : TLSConfiguration.makeClientConfiguration()
        if !isServer {
            configuration.certificateChain = [.certificate(certificate)]
            configuration.privateKey = .privateKey(key)
        }
        configuration.minimumTLSVersion = .tlsv13
        configuration.maximumTLSVersion = .tlsv13
        configuration.signingSignatureAlgorithms = [.ed25519]
        configuration.verifySignatureAlgorithms = [.ed25519]
        // Requires a peer certificate (a client one too, on the server); the chain is judged
        // by the custom verification callback alone, hostnames play no part.
        configuration.certificateVerification = .noHostnameVerification
        // An empty root set, so no system trust store is read and nothing trusts a CA.
        configuration.trustRoots = .certificates([])
        configuration.sendCANameList = false
        configuration.renegotiationSupport = .none
        return configuration
    }
}

/// Judges a peer's certificate: pinning by key, not by CA.
enum PeerCertificateCheck {
    /// How far a peer's clock may be off before its certificate reads as not yet valid or
    /// expired: hosts keep time by NTP, but a fresh certificate must work at once.
    static let clockSkewSeconds: TimeInterval = 300

    enum Verdict: Equatable {
        case authorized(hostName: String)
        case refused(String)
    }

    /// The leaf must parse, carry an Ed25519 key, be signed by that same key (self-signed),
    /// be within its validity period, and its key must be one `authorize` knows.
    static func evaluate(_ chain: [NIOSSLCertificate], authorize: PeerAuthorizer, now: Date = Date()) -> Verdict {
        guard let leaf = chain.first else { return .refused("it presented no certificate") }
        let certificate: Certificate
        do {
            certificate = try Certificate(derEncoded: leaf.toDERBytes())
        } catch {
            return .refused("its certificate is not valid X.509 (\(error))")
        }
        guard let key = Curve25519.Signing.PublicKey(certificate.publicKey) else {
            return .refused("its certificate's key is not Ed25519; host certificates carry the host's Ed25519 signing key")
        }
        let keyHex = key.rawRepresentation.map { String(format: "%02x", $0) }.joined()
        guard certificate.issuer == certificate.subject,
              certificate.publicKey.isValidSignature(certificate.signature, for: certificate) else {
            return .refused("its certificate (key \(keyHex)) is not self-signed by its own key")
        }
        if now.addingTimeInterval(clockSkewSeconds) < certificate.notValidBefore {
            return .refused("its certificate (key \(keyHex)) is not valid before \(certificate.notValidBefore); check the clocks of both hosts")
        }
        if now.addingTimeInterval(-clockSkewSeconds) > certificate.notValidAfter {
            return .refused("its certificate (key \(keyHex)) expired at \(certificate.notValidAfter); that host must make a new one")
        }
        guard let hostName = authorize(Array(key.rawRepresentation)) else {
            return .refused("its key \(keyHex) is not enrolled here; enroll that host first if it should be trusted")
        }
        return .authorized(hostName: hostName)
    }
}
