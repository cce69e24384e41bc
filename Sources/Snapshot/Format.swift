import Crypto

/// Fixed facts of the snapshot stream format, version 1.
///
/// The same framing carries snapshot files and the live-migration stream,
/// so both are validated by one decoder. See docs/snapshot-format.md.
public enum SnapshotFormat {
    /// The 8 ASCII bytes every stream starts with.
    public static let magic: [UInt8] = Array("SVMMSNAP".utf8)
    /// The only version this code writes and reads.
    public static let version: UInt32 = 1
    /// Stream header: magic, version u32, flags u32.
    public static let streamHeaderSize = 16
    /// Section header: type u32, flags u32, payload length u64.
    public static let sectionHeaderSize = 16
    /// SHA-256 trailer after every section payload.
    public static let checksumSize = 32
    /// Guest page size the memory section is defined in.
    public static let pageSize: UInt64 = 4096
    /// Most page entries one memory section may hold.
    public static let maxPagesPerSection: UInt32 = 512
}

/// How each section is protected inside a stream: a parameter of the reader and the writer,
/// and named in the stream header's flags, so a reader never guesses and a stream written one
/// way is never read the other.
public enum SectionIntegrity: Sendable, Equatable, CaseIterable, CustomStringConvertible {
    /// A SHA-256 of header and payload after every section: snapshot files, where the bytes may
    /// be damaged at rest. Header flags 0 (every version 1 stream written before this choice).
    case sha256Checksums
    /// No per-section trailer and no stream digest: for a stream inside a channel that already
    /// authenticates every byte and its order (TLS), where hashing every page again would
    /// only cost CPU. The end section is empty. Header flag bit 0.
    case channelAuthenticated

    /// The stream header's flags for this choice.
    public var headerFlags: UInt32 {
        switch self {
        case .sha256Checksums: 0
        case .channelAuthenticated: 1
        }
    }

    /// Bytes after every section's payload.
    public var trailerSize: Int {
        switch self {
        case .sha256Checksums: SnapshotFormat.checksumSize
        case .channelAuthenticated: 0
        }
    }

    /// Whether a running SHA-256 of the stream is kept and written in the end section (what a
    /// signature section signs).
    public var hasStreamDigest: Bool { self == .sha256Checksums }

    /// The end section's payload size: the stream digest, or nothing.
    public var endPayloadSize: Int { hasStreamDigest ? SnapshotFormat.checksumSize : 0 }

    /// The choice a stream header's flags name, if any.
    public init?(headerFlags: UInt32) {
        guard let match = Self.allCases.first(where: { $0.headerFlags == headerFlags }) else { return nil }
        self = match
    }

    public var description: String {
        switch self {
        case .sha256Checksums: "SHA-256 section checksums"
        case .channelAuthenticated: "no section checksums (inside an authenticated channel)"
        }
    }
}

/// The kind of a section; anything else is refused because this layer
/// cannot know how long or how trusted an unknown section may be.
public enum SectionType: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// Machine configuration, JSON defined by the VMM.
    case machine = 1
    /// vCPU register state, JSON defined by the VMM.
    case vcpu = 2
    /// Device state, JSON defined by the VMM.
    case devices = 3
    /// A page table and the data of its non-zero pages.
    case memory = 4
    /// Migration protocol messages, opaque here.
    case control = 5
    /// The producer's signature over the stream digest of everything before it (opaque here);
    /// when present, the last section before `end`.
    case signature = 6
    /// The running SHA-256 of everything before it; always last.
    case end = 0xFFFF

    /// Largest payload accepted, checked before anything is allocated.
    public var payloadLimit: UInt64 {
        switch self {
        case .machine, .devices: return 1 << 20
        case .vcpu: return 4 << 20
        case .control: return 64 << 10
        case .signature: return 4 << 10
        case .memory:
            let n = UInt64(SnapshotFormat.maxPagesPerSection)
            return 8 + n * 8 + n * SnapshotFormat.pageSize
        case .end: return UInt64(SnapshotFormat.checksumSize)
        }
    }

    public var description: String {
        switch self {
        case .machine: return "machine"
        case .vcpu: return "vcpu"
        case .devices: return "devices"
        case .memory: return "memory"
        case .control: return "control"
        case .signature: return "signature"
        case .end: return "end"
        }
    }
}

/// One verified section as read from a stream.
public struct Section: Sendable, Equatable {
    public var type: SectionType
    public var payload: [UInt8]
    /// Stream offset of the section's header.
    public var offset: UInt64

    public init(type: SectionType, payload: [UInt8], offset: UInt64) {
        self.type = type
        self.payload = payload
        self.offset = offset
    }
}

// MARK: - Little-endian helpers

extension Array where Element == UInt8 {
    mutating func appendLittleEndian<T: FixedWidthInteger>(_ value: T) {
        // Byte by byte so the encoding never depends on host byte order.
        for i in 0..<MemoryLayout<T>.size {
            append(UInt8(truncatingIfNeeded: value >> (8 * i)))
        }
    }

    /// Caller guarantees `offset + size(T) <= count`.
    func loadLittleEndian<T: FixedWidthInteger>(_: T.Type = T.self, at offset: Int) -> T {
        var value: T = 0
        for i in 0..<MemoryLayout<T>.size {
            value |= T(self[offset + i]) << (8 * i)
        }
        return value
    }
}

/// Encodes a section header.
func encodeSectionHeader(type: UInt32, flags: UInt32, length: UInt64) -> [UInt8] {
    var header: [UInt8] = []
    header.reserveCapacity(SnapshotFormat.sectionHeaderSize)
    header.appendLittleEndian(type)
    header.appendLittleEndian(flags)
    header.appendLittleEndian(length)
    return header
}

/// SHA-256 of the concatenation of `parts` (used by tests to craft streams).
func sha256(_ parts: [UInt8]...) -> [UInt8] {
    var hasher = SHA256()
    for part in parts { hasher.update(bytes: part) }
    return hasher.finalize().withUnsafeBytes { Array($0) }
}

extension SHA256 {
    /// Hashes an array without going through Foundation's `DataProtocol`.
    mutating func update(bytes: [UInt8]) {
        bytes.withUnsafeBytes { update(bufferPointer: $0) }
    }
}
