import Crypto
import Foundation

/// Fixed facts of the sealed snapshot file, version 2 (docs/snapshot-format.md, "Sealed files").
///
///     file header   24 bytes   magic SVMMSEAL, version 2, flags 0, envelope length, reserved
///     envelope      JSON       file id, writer, and the data key wrapped for each host (HPKE)
///     blocks        ...        description, memory chunks, vcpu, devices: each AES-256-GCM sealed
///     index block              every block's place, length and tag (sealed too)
///     signature     JSON       the writer host's Ed25519 signature over header, envelope and index
///     trailer       32 bytes   index offset, signature offset and length, magic SVMMSEND
///
/// Everything after the envelope is readable only with the data key. The signature covers the
/// index, and the index names every block's AEAD tag, so a reader can check any one block
/// without reading the others: the layout is for random access (a lazy restore that decrypts
/// one chunk on a page fault), and a full restore reads it front to back.
public enum SealedFormat {
    public static let magic: [UInt8] = Array("SVMMSEAL".utf8)
    public static let trailerMagic: [UInt8] = Array("SVMMSEND".utf8)
    public static let version: UInt32 = 2
    public static let fileHeaderSize = 24
    public static let blockHeaderSize = 16
    public static let trailerSize = 32
    public static let tagSize = 16
    public static let fileIDSize = 16
    /// The envelope is plaintext JSON read before anything else: bounded small.
    public static let maxEnvelope = 64 << 10
    public static let maxSignature = 4 << 10
    /// Bytes of one index entry.
    public static let indexEntrySize = 48
    /// The most blocks one file may have: 2 TiB of memory in chunks of 512 pages.
    public static let maxBlocks = 1 << 20
    /// The key wrapping: HPKE base mode to a host's X25519 key-agreement key (RFC 9180).
    public static var keyWrapSuite: HPKE.Ciphersuite { .Curve25519_SHA256_ChachaPoly }
    public static let keyWrapName = "HPKE DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305"
    public static let cipherName = "AES-256-GCM"
    /// Domain of the digest the writer host signs.
    static let signatureDomain = Array("swift-vmm.sealed-snapshot.v2".utf8)
}

/// What a block of a sealed file holds. Its plaintext is what the same section holds in a
/// version 1 stream: the description is the `machine` section's JSON, a memory chunk a memory
/// section's payload (up to 512 pages), vcpu and devices their JSON.
public enum SealedBlockKind: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case description = 1
    case vcpu = 2
    case devices = 3
    case memory = 4
    case index = 5

    /// The largest plaintext accepted, checked before anything is allocated.
    public var plaintextLimit: UInt64 {
        switch self {
        case .description: SectionType.machine.payloadLimit
        case .vcpu: SectionType.vcpu.payloadLimit
        case .devices: SectionType.devices.payloadLimit
        case .memory: SectionType.memory.payloadLimit
        case .index: UInt64(8 + SealedFormat.maxBlocks * SealedFormat.indexEntrySize)
        }
    }

    public var description: String {
        switch self {
        case .description: "description"
        case .vcpu: "vcpu"
        case .devices: "devices"
        case .memory: "memory"
        case .index: "index"
        }
    }
}

/// One block's place in the file, as the (signed) index records it.
public struct SealedIndexEntry: Sendable, Equatable {
    public var kind: SealedBlockKind
    /// The block's position among the file's blocks, from 0; also its nonce.
    public var ordinal: UInt32
    /// File offset of the block's header.
    public var offset: UInt64
    /// Sealed length (ciphertext and tag) after the header.
    public var length: UInt64
    /// For a memory chunk, the first and last page frame it holds; 0 otherwise.
    public var firstPage: UInt64
    public var lastPage: UInt64
    /// The block's AES-GCM tag: what the signature, through the index, vouches for.
    public var tag: [UInt8]

    public init(kind: SealedBlockKind, ordinal: UInt32, offset: UInt64, length: UInt64,
                firstPage: UInt64 = 0, lastPage: UInt64 = 0, tag: [UInt8]) {
        self.kind = kind
        self.ordinal = ordinal
        self.offset = offset
        self.length = length
        self.firstPage = firstPage
        self.lastPage = lastPage
        self.tag = tag
    }
}

/// The index: every block before it, in file order. `count u32, reserved u32`, then one
/// 48-byte entry per block.
enum SealedIndex {
    /// Layout of one entry (48 bytes): kind u32, ordinal u32, offset u64, length u32,
    /// first page u32, last page u32, reserved u32 (0), tag 16 bytes. Lengths fit 32 bits (the
    /// largest block is 2 MiB plus a tag) and page frames 32 bits (16 TiB of guest memory).
    static func encode(_ entries: [SealedIndexEntry]) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(8 + entries.count * SealedFormat.indexEntrySize)
        bytes.appendLittleEndian(UInt32(entries.count))
        bytes.appendLittleEndian(UInt32(0))
        for entry in entries {
            bytes.appendLittleEndian(entry.kind.rawValue)
            bytes.appendLittleEndian(entry.ordinal)
            bytes.appendLittleEndian(entry.offset)
            bytes.appendLittleEndian(UInt32(entry.length))
            bytes.appendLittleEndian(UInt32(entry.firstPage))
            bytes.appendLittleEndian(UInt32(entry.lastPage))
            bytes.appendLittleEndian(UInt32(0))
            bytes.append(contentsOf: entry.tag)
        }
        return bytes
    }

    static func decode(_ bytes: [UInt8]) throws(SealedFileError) -> [SealedIndexEntry] {
        guard bytes.count >= 8 else { throw .malformed("the index is \(bytes.count) bytes, shorter than its count") }
        let count = Int(bytes.loadLittleEndian(UInt32.self, at: 0))
        guard bytes.loadLittleEndian(UInt32.self, at: 4) == 0 else { throw .malformed("the index's reserved field is not 0") }
        guard count <= SealedFormat.maxBlocks, bytes.count == 8 + count * SealedFormat.indexEntrySize else {
            throw .malformed("the index is \(bytes.count) bytes but says it holds \(count) entries")
        }
        var entries: [SealedIndexEntry] = []
        entries.reserveCapacity(count)
        for i in 0..<count {
            let at = 8 + i * SealedFormat.indexEntrySize
            let rawKind = bytes.loadLittleEndian(UInt32.self, at: at)
            guard let kind = SealedBlockKind(rawValue: rawKind), kind != .index else {
                throw .malformed("index entry \(i) names an unknown block kind \(rawKind)")
            }
            guard bytes.loadLittleEndian(UInt32.self, at: at + 28) == 0 else {
                throw .malformed("index entry \(i) has a non-zero reserved field")
            }
            entries.append(SealedIndexEntry(
                kind: kind, ordinal: bytes.loadLittleEndian(UInt32.self, at: at + 4),
                offset: bytes.loadLittleEndian(UInt64.self, at: at + 8),
                length: UInt64(bytes.loadLittleEndian(UInt32.self, at: at + 16)),
                firstPage: UInt64(bytes.loadLittleEndian(UInt32.self, at: at + 20)),
                lastPage: UInt64(bytes.loadLittleEndian(UInt32.self, at: at + 24)),
                tag: Array(bytes[(at + 32)..<(at + 48)])))
        }
        return entries
    }
}

/// The plaintext part of a sealed file after its header: who wrote it and, for each host that
/// may open it, the file's data key wrapped to that host's key-agreement key.
public struct SealedEnvelope: Sendable, Codable, Equatable {
    /// One host that can unwrap the data key.
    public struct Recipient: Sendable, Codable, Equatable {
        public var host: String
        /// The host's X25519 key-agreement public key (raw 32 bytes, base64): how a host finds its entry.
        public var agreementKey: Data
        /// HPKE's encapsulated key and the wrapped 32-byte data key.
        public var encapsulatedKey: Data
        public var wrappedKey: Data
    }

    public var version: UInt32
    /// 16 random bytes naming this file: in the HPKE info and in every block's associated data.
    public var fileID: Data
    public var cipher: String
    public var keyWrap: String
    /// The host that wrote the file (its signature says so with authority; this is a label).
    public var writer: String
    public var recipients: [Recipient]

    /// Makes an envelope for a fresh file: wraps `dataKey` to each of `hosts`.
    public static func seal(dataKey: SymmetricKey, fileID: Data, writer: String,
                            for hosts: [(name: String, agreementKey: Curve25519.KeyAgreement.PublicKey)]) throws -> SealedEnvelope {
        var recipients: [Recipient] = []
        for host in hosts {
            var sender = try HPKE.Sender(recipientKey: host.agreementKey, ciphersuite: SealedFormat.keyWrapSuite,
                                         info: keyWrapInfo(fileID: fileID))
            let wrapped = try dataKey.withUnsafeBytes { try sender.seal(Data($0), authenticating: Data(host.name.utf8)) }
            recipients.append(Recipient(host: host.name, agreementKey: host.agreementKey.rawRepresentation,
                                        encapsulatedKey: sender.encapsulatedKey, wrappedKey: wrapped))
        }
        return SealedEnvelope(version: SealedFormat.version, fileID: fileID, cipher: SealedFormat.cipherName,
                              keyWrap: SealedFormat.keyWrapName, writer: writer, recipients: recipients)
    }

    /// The HPKE info: binds a wrapped key to this file, so it cannot be moved to another.
    public static func keyWrapInfo(fileID: Data) -> Data { Data("swift-vmm.sealed-snapshot.v2 key for ".utf8) + fileID }

    /// The data key, unwrapped from the entry for the host whose key-agreement key is
    /// `agreementKey` by `open` (HPKE open with that host's private key: encapsulated key,
    /// wrapped key, info, associated data), which the host's key store does.
    public func dataKey(thisHost: String, agreementKey: Curve25519.KeyAgreement.PublicKey,
                        open: (Data, Data, Data, Data) throws -> Data) throws -> SymmetricKey {
        guard let mine = recipients.first(where: { $0.agreementKey == agreementKey.rawRepresentation }) else {
            throw SealedFileError.notARecipient(thisHost: thisHost, recipients: recipients.map(\.host))
        }
        let key: Data
        do {
            key = try open(mine.encapsulatedKey, mine.wrappedKey, Self.keyWrapInfo(fileID: fileID), Data(mine.host.utf8))
        } catch {
            throw SealedFileError.authenticationFailed("the data key wrapped for this host does not open")
        }
        guard key.count == 32 else { throw SealedFileError.malformed("the unwrapped data key is \(key.count) bytes, not 32") }
        return SymmetricKey(data: key)
    }

    /// Checks what a reader relies on before trusting anything else in the envelope.
    func validate() throws(SealedFileError) {
        guard version == SealedFormat.version else { throw .malformed("the envelope says version \(version), the file header \(SealedFormat.version)") }
        guard fileID.count == SealedFormat.fileIDSize else { throw .malformed("the file id is \(fileID.count) bytes, not \(SealedFormat.fileIDSize)") }
        guard cipher == SealedFormat.cipherName else { throw .malformed("the cipher '\(cipher)' is not \(SealedFormat.cipherName)") }
        guard keyWrap == SealedFormat.keyWrapName else { throw .malformed("the key wrapping '\(keyWrap)' is not the one this version uses") }
        guard !recipients.isEmpty else { throw .malformed("the envelope names no host that can open the file") }
    }
}

/// Why a sealed file was refused.
public enum SealedFileError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The structure is wrong (lengths, offsets, counts, kinds): damaged or not written by this VMM.
    case malformed(String)
    /// The file ends before what its header, trailer or index says is there.
    case truncated(String)
    /// No recipient in the envelope is this host.
    case notARecipient(thisHost: String, recipients: [String])
    /// A block, the index or a wrapped key failed authentication: the file was edited or damaged.
    case authenticationFailed(String)

    public var description: String {
        switch self {
        case let .malformed(what):
            return "the sealed snapshot is malformed: \(what)"
        case let .truncated(what):
            return "the sealed snapshot is truncated: \(what)"
        case let .notARecipient(host, recipients):
            let names = recipients.map { "'\($0)'" }.joined(separator: ", ")
            return "the snapshot is sealed for \(names); this host '\(host)' holds none of their keys, so it cannot read it — restore it on one of those hosts, or have it written with '\(host)' among the guest's allowed hosts and enrolled as a peer on the writing host"
        case let .authenticationFailed(what):
            return "the sealed snapshot fails authentication (\(what)): it was edited or damaged after it was written; restore an intact copy"
        }
    }
}

// MARK: - Shared by the writer and the reader

extension SealedFormat {
    /// The 24-byte file header.
    static func fileHeader(envelopeLength: Int) -> [UInt8] {
        var header = magic
        header.appendLittleEndian(version)
        header.appendLittleEndian(UInt32(0))
        header.appendLittleEndian(UInt32(envelopeLength))
        header.appendLittleEndian(UInt32(0))
        return header
    }

    /// A block's 16-byte header: kind u32, ordinal u32, sealed length u64.
    static func blockHeader(kind: SealedBlockKind, ordinal: UInt32, length: UInt64) -> [UInt8] {
        var header: [UInt8] = []
        header.reserveCapacity(blockHeaderSize)
        header.appendLittleEndian(kind.rawValue)
        header.appendLittleEndian(ordinal)
        header.appendLittleEndian(length)
        return header
    }

    /// A block's nonce: its ordinal. The data key is fresh for every file, so an ordinal never
    /// repeats under one key.
    static func nonce(ordinal: UInt32) -> AES.GCM.Nonce {
        var bytes = [UInt8](repeating: 0, count: 12)
        for i in 0..<4 { bytes[8 + i] = UInt8(truncatingIfNeeded: ordinal >> (8 * i)) }
        return try! AES.GCM.Nonce(data: bytes)
    }

    /// A block's associated data: the file id and the block header, so a block is bound to its
    /// file, kind, position and length.
    static func associatedData(fileID: Data, header: [UInt8]) -> Data { fileID + Data(header) }

    /// The digest the writer host signs: domain, file header, envelope bytes, index plaintext.
    static func signedDigest(fileHeader: [UInt8], envelope: [UInt8], index: [UInt8]) -> [UInt8] {
        var hasher = SHA256()
        hasher.update(bytes: signatureDomain)
        hasher.update(bytes: fileHeader)
        hasher.update(bytes: envelope)
        hasher.update(bytes: index)
        return hasher.finalize().withUnsafeBytes { Array($0) }
    }

    /// The 32-byte trailer.
    static func trailer(indexOffset: UInt64, signatureOffset: UInt64, signatureLength: Int) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.appendLittleEndian(indexOffset)
        bytes.appendLittleEndian(signatureOffset)
        bytes.appendLittleEndian(UInt32(signatureLength))
        bytes.appendLittleEndian(UInt32(0))
        bytes.append(contentsOf: trailerMagic)
        return bytes
    }
}
