import Crypto
import Foundation

/// The audit chain and its signed head as a file anyone can check with the host's public
/// identity alone (`HostIdentityDocument`): no host.key, no store. Written by `AuditLog.export()`.
///
/// JSON, keys sorted: `{"format": "swift-vmm billboard audit export", "version": 1, "host",
/// "entries": [{"seq", "time" (ms), "actor", "event", "guest" (absent if none), "details"
/// (canonical JSON text, as hashed), "prevHash", "hash"}, ...], "head": {"seq", "hash",
/// "signature" (base64 Ed25519 over the audit-head payload)}}`.
public enum AuditExport {
    public static let format = "swift-vmm billboard audit export"
    public static let currentVersion = 1
    /// A file larger than this is refused before it is read whole (and the export refuses to
    /// write one): about 200,000 entries, years of a busy host.
    public static let maximumSize = 64 << 20

    struct File: Codable {
        var format: String
        var version: Int
        var host: String
        var entries: [Entry]
        var head: Head
    }

    struct Entry: Codable {
        var seq: Int64
        var time: Int64
        var actor: String
        var event: String
        var guest: String?
        var details: String
        var prevHash: String
        var hash: String
    }

    struct Head: Codable {
        var seq: Int64
        var hash: String
        var signature: String
    }

    static func encode(host: String, entries: [AuditEntry], head: AuditHead) throws -> Data {
        let file = File(format: format, version: currentVersion, host: host, entries: entries.map {
            Entry(seq: $0.seq, time: $0.time.milliseconds, actor: $0.actor, event: $0.event, guest: $0.guest,
                  details: $0.details, prevHash: $0.prevHash, hash: $0.hash)
        }, head: Head(seq: head.seq, hash: head.hash, signature: head.signature.base64EncodedString()))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let data = try encoder.encode(file) + Data("\n".utf8)
        guard data.count <= maximumSize else {
            throw BillboardRefusal.invalidAuditExport(reason: "it would be \(data.count) bytes, more than the \(maximumSize) a verifier accepts")
        }
        return data
    }

    /// Writes an export to a new owner-only file; never overwrites one.
    public static func write(_ export: Data, to path: String) throws {
        try SecureFile.write(export, to: path, what: "audit export")
    }

    /// Reads an export, refusing a file larger than `maximumSize` before reading it whole.
    public static func load(path: String) throws -> Data {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw BillboardError.io(path: path, errno: errno == 0 ? ENOENT : errno)
        }
        defer { try? handle.close() }
        // One byte past the limit tells "too large" from "exactly the limit" without reading more.
        let data = try handle.read(upToCount: maximumSize + 1) ?? Data()
        guard data.count <= maximumSize else {
            throw BillboardRefusal.invalidAuditExport(reason: "it is larger than \(maximumSize) bytes")
        }
        return data
    }

    /// Checks an export against a host's public identity: the file's form, that it is that
    /// host's, every entry in order and linked, and the head signed by the identity's key and
    /// naming the last entry. Throws `invalidAuditExport` for a file that is not a well-formed
    /// export of that host; returns `.broken` (first bad entry, why) for a chain that was altered.
    public static func verify(_ data: Data, identity: HostIdentityDocument) throws -> AuditVerification {
        func refuse(_ reason: String) -> BillboardRefusal { .invalidAuditExport(reason: reason) }
        guard !data.isEmpty else { throw refuse("it is empty") }
        guard data.count <= maximumSize else { throw refuse("it is larger than \(maximumSize) bytes") }
        let file: File
        do { file = try JSONDecoder().decode(File.self, from: data) } catch {
            throw refuse("it is not a complete audit export (JSON with format, version, host, entries, head): truncated or damaged")
        }
        guard file.format == format else { throw refuse("its format is '\(file.format.prefix(64))', not '\(format)'") }
        guard file.version == currentVersion else { throw refuse("its version \(file.version) is not supported (only \(currentVersion))") }
        guard file.host == identity.hostName else {
            throw refuse("it is the audit log of host '\(file.host.prefix(64))', but the identity is of host '\(identity.hostName)'")
        }
        // Ed25519 signatures are 64 bytes, 88 characters of base64; checked before decoding.
        guard file.head.signature.utf8.count == 88, let signature = Data(base64Encoded: file.head.signature), signature.count == 64 else {
            throw refuse("its head signature is not a base64 Ed25519 signature (64 bytes)")
        }
        guard let key = try? Curve25519.Signing.PublicKey(rawRepresentation: identity.signingKey) else {
            throw refuse("the identity's signing key is not an Ed25519 public key")
        }
        var walk = AuditChainWalk()
        for e in file.entries {
            let entry = AuditEntry(seq: e.seq, time: Date(milliseconds: e.time), actor: e.actor, event: e.event, guest: e.guest,
                                   details: e.details, prevHash: e.prevHash, hash: e.hash)
            if let broken = walk.next(entry) { return broken }
        }
        return walk.finish(head: AuditHead(seq: file.head.seq, hash: file.head.hash, signature: signature), host: file.host,
                           signingKey: key, keyOwner: "host '\(identity.hostName)''s signing key")
    }
}
