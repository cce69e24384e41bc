#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import SystemCalls

/// Owner-only file helpers. Keys are written 0600 from the start under a temporary name and
/// moved into place only if nothing is at the path (AtomicFileWriter, `replacing: false`), so
/// there is no window in which another user could open them, and no symlink is followed.
enum SecureFile {
    /// Writes a new owner-only file; never replaces one. `what` names it in errors.
    static func write(_ data: Data, to path: String, what: String = "key file") throws {
        try AtomicFileWriter.write([UInt8](data), to: path, what: what, replacing: false)
    }

    /// Refuses a file or directory that group or others can access, or that another user owns.
    static func checkPrivate(_ path: String, directory: Bool) throws {
        var st = stat()
        guard stat(path, &st) == 0 else { throw BillboardError.io(path: path, errno: errno) }
        let mode = UInt16(st.st_mode & 0o7777)
        if mode & 0o077 != 0 {
            let fix = directory ? "chmod 700 \(path)" : "chmod 600 \(path)"
            throw BillboardError.insecurePermissions(path: path, mode: mode, fix: fix)
        }
        if st.st_uid != geteuid() {
            throw BillboardError.wrongOwner(path: path, owner: st.st_uid)
        }
    }

    static func exists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }

    static func read(_ path: String) throws -> Data {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw BillboardError.io(path: path, errno: errno == 0 ? ENOENT : errno)
        }
        return data
    }
}

/// The private material of a host, as stored in `host.key` (versioned JSON, base64 raw keys).
struct HostKeyFile: Codable {
    static let currentVersion = 1
    static let format = "swift-vmm billboard host key"

    var format: String
    var version: Int
    var hostName: String
    var signingKey: String
    var agreementKey: String
    var atRestKey: String
}

/// A host's keys in memory: Ed25519 to sign the audit head, X25519 for peers, and the at-rest key.
struct HostKeys: Sendable {
    let hostName: String
    // Raw bytes rather than swift-crypto key types, which are not Sendable on Linux;
    // each was validated when loaded or generated, so rebuilding the key cannot fail.
    private let signingRaw: Data
    private let agreementRaw: Data
    private let atRestRaw: Data

    init(hostName: String, signing: Curve25519.Signing.PrivateKey, agreement: Curve25519.KeyAgreement.PrivateKey,
         atRest: SymmetricKey) {
        self.hostName = hostName
        self.signingRaw = signing.rawRepresentation
        self.agreementRaw = agreement.rawRepresentation
        self.atRestRaw = atRest.withUnsafeBytes { Data($0) }
    }

    var signing: Curve25519.Signing.PrivateKey { try! .init(rawRepresentation: signingRaw) }
    var agreement: Curve25519.KeyAgreement.PrivateKey { try! .init(rawRepresentation: agreementRaw) }
    var atRest: SymmetricKey { SymmetricKey(data: atRestRaw) }

    /// Separate keys for sealing and for row integrity codes, so neither use can be turned against the other.
    var sealKey: SymmetricKey { derive("swift-vmm billboard seal v1") }
    var macKey: SymmetricKey { derive("swift-vmm billboard row mac v1") }

    private func derive(_ info: String) -> SymmetricKey {
        HKDF<SHA256>.deriveKey(inputKeyMaterial: atRest, info: Data(info.utf8), outputByteCount: 32)
    }

    static func generate(hostName: String) -> HostKeys {
        HostKeys(hostName: hostName, signing: .init(), agreement: .init(), atRest: SymmetricKey(size: .bits256))
    }

    func encoded() throws -> Data {
        let file = HostKeyFile(
            format: HostKeyFile.format, version: HostKeyFile.currentVersion, hostName: hostName,
            signingKey: signing.rawRepresentation.base64EncodedString(),
            agreementKey: agreement.rawRepresentation.base64EncodedString(),
            atRestKey: atRest.withUnsafeBytes { Data($0) }.base64EncodedString())
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return try encoder.encode(file)
    }

    static func load(path: String) throws -> HostKeys {
        try decode(try SecureFile.read(path), path: path)
    }

    /// Parses the contents of a host key file; `path` only names it in errors.
    static func decode(_ data: Data, path: String) throws -> HostKeys {
        let file: HostKeyFile
        do { file = try JSONDecoder().decode(HostKeyFile.self, from: data) } catch {
            throw BillboardError.malformedKeyFile(path: path, reason: "not a host key file")
        }
        guard file.format == HostKeyFile.format else {
            throw BillboardError.malformedKeyFile(path: path, reason: "format '\(file.format)' is not a host key")
        }
        guard file.version == HostKeyFile.currentVersion else {
            throw BillboardError.malformedKeyFile(path: path, reason: "version \(file.version) is not supported")
        }
        guard let s = Data(base64Encoded: file.signingKey), let a = Data(base64Encoded: file.agreementKey),
              let r = Data(base64Encoded: file.atRestKey), r.count == 32,
              let signing = try? Curve25519.Signing.PrivateKey(rawRepresentation: s),
              let agreement = try? Curve25519.KeyAgreement.PrivateKey(rawRepresentation: a)
        else { throw BillboardError.malformedKeyFile(path: path, reason: "a key is not valid") }
        return HostKeys(hostName: file.hostName, signing: signing, agreement: agreement, atRest: SymmetricKey(data: r))
    }
}

/// An administrator's Ed25519 signing key with its name, kept in an owner-only file.
public struct AdminKey: Sendable {
    struct File: Codable {
        static let format = "swift-vmm billboard admin key"
        var format: String
        var version: Int
        var name: String
        var privateKey: String
    }

    /// The name the administrator is (or will be) enrolled under.
    public let name: String
    /// The private key (raw, for Sendable); it never leaves this value except through `sign`.
    private let privateKeyRaw: Data
    var privateKey: Curve25519.Signing.PrivateKey { try! .init(rawRepresentation: privateKeyRaw) }

    /// A fresh key in memory (use `BillboardStore.createAdminKey` to also write it to a file).
    public init(name: String) throws {
        try validateName(name)
        self.name = name
        self.privateKeyRaw = Curve25519.Signing.PrivateKey().rawRepresentation
    }

    /// The public half, which is what gets enrolled.
    public var publicKey: Curve25519.Signing.PublicKey { privateKey.publicKey }

    /// Signs bytes; the billboard only ever passes canonical request encodings here.
    public func sign(_ message: Data) throws -> Data { try privateKey.signature(for: message) }

    /// Loads a key file, refusing one that group or others can read.
    public static func load(path: String) throws -> AdminKey {
        try SecureFile.checkPrivate(path, directory: false)
        let data = try SecureFile.read(path)
        guard let file = try? JSONDecoder().decode(File.self, from: data), file.format == File.format else {
            throw BillboardError.malformedKeyFile(path: path, reason: "not an admin key file")
        }
        guard file.version == 1 else {
            throw BillboardError.malformedKeyFile(path: path, reason: "version \(file.version) is not supported")
        }
        guard let raw = Data(base64Encoded: file.privateKey),
              let key = try? Curve25519.Signing.PrivateKey(rawRepresentation: raw)
        else { throw BillboardError.malformedKeyFile(path: path, reason: "the private key is not valid") }
        return AdminKey(name: file.name, privateKey: key)
    }

    init(name: String, privateKey: Curve25519.Signing.PrivateKey) {
        self.name = name
        self.privateKeyRaw = privateKey.rawRepresentation
    }

    /// Writes the key to a new owner-only file; refuses to overwrite an existing one.
    public func write(to path: String) throws {
        let file = File(format: File.format, version: 1, name: name,
                        privateKey: privateKey.rawRepresentation.base64EncodedString())
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        try SecureFile.write(try encoder.encode(file), to: path)
    }
}
