import Crypto
import Foundation
import SwiftASN1
import X509

/// A host's public identity as one administrator hands it to another's store: its name, its
/// public signing and key-agreement keys, and its TLS certificate. Made by
/// `BillboardStore.hostIdentity()`; read back only through `decode`/`load`, which check it, so
/// a value of this type has always passed those checks.
///
/// The file is JSON: `{"format": "swift-vmm billboard host identity", "version": 1, "hostName",
/// "signingKey", "agreementKey" (base64 raw 32 bytes), "certificate" (PEM)}`.
public struct HostIdentityDocument: Sendable, Equatable {
    public static let format = "swift-vmm billboard host identity"
    public static let currentVersion = 1
    /// A real document is about 1.5 KiB; anything far larger is not one, and is refused before it is parsed.
    public static let maximumSize = 16 * 1024
    /// A certificate made by `HostCertificate.make` is well under 1 KiB of PEM.
    static let maximumCertificatePEMSize = 8 * 1024

    public let hostName: String
    /// Ed25519 public key, raw 32 bytes.
    public let signingKey: Data
    /// X25519 public key, raw 32 bytes.
    public let agreementKey: Data
    /// The host's self-signed TLS certificate, DER.
    public let certificateDER: [UInt8]

    init(hostName: String, signingKey: Data, agreementKey: Data, certificateDER: [UInt8]) {
        self.hostName = hostName
        self.signingKey = signingKey
        self.agreementKey = agreementKey
        self.certificateDER = certificateDER
    }

    /// SHA-256 of the certificate, hex: what the administrator's signature and the audit entry name.
    public var certificateSHA256: String { Data(SHA256.hash(data: certificateDER)).hex }

    struct File: Codable {
        var format: String
        var version: Int
        var hostName: String
        var signingKey: String
        var agreementKey: String
        var certificate: String
    }

    /// The document as a file (pretty-printed JSON, keys sorted, trailing newline).
    public func encoded() throws -> Data {
        let certificate = try Certificate(derEncoded: certificateDER)
        let file = File(format: Self.format, version: Self.currentVersion, hostName: hostName,
                        signingKey: signingKey.base64EncodedString(), agreementKey: agreementKey.base64EncodedString(),
                        certificate: try certificate.serializeAsPEM().pemString + "\n")
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        return try encoder.encode(file) + Data("\n".utf8)
    }

    /// Reads a document from a file, refusing one larger than `maximumSize` before reading it whole.
    public static func load(path: String) throws -> HostIdentityDocument {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw BillboardError.io(path: path, errno: errno == 0 ? ENOENT : errno)
        }
        defer { try? handle.close() }
        // One byte past the limit tells "too large" from "exactly the limit" without reading more.
        let data = try handle.read(upToCount: maximumSize + 1) ?? Data()
        return try decode(data)
    }

    /// Parses and checks a document: its format and version, sizes before anything is decoded,
    /// the name, both keys, and that the certificate is the host's own (for its signing key,
    /// naming it, and self-signed with that key).
    public static func decode(_ data: Data) throws -> HostIdentityDocument {
        func refuse(_ reason: String) -> BillboardRefusal { .invalidHostIdentity(reason: reason) }
        guard !data.isEmpty else { throw refuse("it is empty") }
        guard data.count <= maximumSize else { throw refuse("it is larger than \(maximumSize) bytes") }
        let file: File
        do { file = try JSONDecoder().decode(File.self, from: data) } catch {
            throw refuse("it is not a host identity document (JSON with format, version, hostName, signingKey, agreementKey, certificate)")
        }
        guard file.format == format else { throw refuse("its format is '\(file.format.prefix(64))', not '\(format)'") }
        guard file.version == currentVersion else { throw refuse("its version \(file.version) is not supported (only \(currentVersion))") }
        do { try validateName(file.hostName) } catch {
            throw refuse("its host name is not valid: use 1-64 characters from A-Z a-z 0-9 . _ -")
        }
        // Base64 of 32 bytes is 44 characters; checked before decoding.
        guard file.signingKey.utf8.count == 44, let signingKey = Data(base64Encoded: file.signingKey), signingKey.count == 32,
              (try? Curve25519.Signing.PublicKey(rawRepresentation: signingKey)) != nil else {
            throw refuse("its signing key is not a base64 Ed25519 public key (32 bytes)")
        }
        guard file.agreementKey.utf8.count == 44, let agreementKey = Data(base64Encoded: file.agreementKey), agreementKey.count == 32,
              (try? Curve25519.KeyAgreement.PublicKey(rawRepresentation: agreementKey)) != nil else {
            throw refuse("its agreement key is not a base64 X25519 public key (32 bytes)")
        }
        guard file.certificate.utf8.count <= maximumCertificatePEMSize else {
            throw refuse("its certificate is larger than \(maximumCertificatePEMSize) bytes")
        }
        let certificate: Certificate
        do { certificate = try Certificate(pemEncoded: file.certificate) } catch {
            throw refuse("its certificate is not a PEM X.509 certificate")
        }
        if let problem = HostCertificate.problem(with: certificate, hostName: file.hostName, signingKey: signingKey) {
            throw refuse(problem)
        }
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        return HostIdentityDocument(hostName: file.hostName, signingKey: signingKey, agreementKey: agreementKey,
                                    certificateDER: serializer.serializedBytes)
    }
}
