#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What is wrong with the structure of a memory section payload.
public enum MemorySectionDefect: Error, Equatable, Sendable, CustomStringConvertible {
    /// The payload cannot even hold the 8-byte count and reserved fields.
    case tooShort(length: UInt64)
    /// The entry count is 0 or above 512.
    case countOutOfRange(count: UInt32)
    /// The reserved u32 after the count is not 0.
    case reservedFieldNonZero(value: UInt32)
    /// The payload ends inside the page table.
    case tableTruncated(count: UInt32, length: UInt64)
    /// An entry has any of bits 52..62 set.
    case reservedEntryBits(index: Int, entry: UInt64)
    /// Page frame numbers are not strictly increasing.
    case notIncreasing(index: Int, pfn: UInt64, previous: UInt64)
    /// The payload length disagrees with the number of data pages in the table.
    case lengthMismatch(expected: UInt64, actual: UInt64)

    public var description: String {
        switch self {
        case let .tooShort(length):
            return "payload of \(length) bytes is shorter than the 8-byte count and reserved fields"
        case let .countOutOfRange(count):
            return "page count \(count) is outside 1...\(SnapshotFormat.maxPagesPerSection)"
        case let .reservedFieldNonZero(value):
            return "reserved field is 0x\(hex(value)), must be 0"
        case let .tableTruncated(count, length):
            return "payload of \(length) bytes cannot hold a table of \(count) entries"
        case let .reservedEntryBits(index, entry):
            return "entry \(index) (0x\(hex(entry))) has reserved bits 52..62 set"
        case let .notIncreasing(index, pfn, previous):
            return "entry \(index): page frame 0x\(hex(pfn)) does not follow 0x\(hex(previous)) in increasing order"
        case let .lengthMismatch(expected, actual):
            return "payload is \(actual) bytes but its table describes \(expected)"
        }
    }
}

/// Why a snapshot stream was refused (or could not be written).
///
/// Every case names the place in the stream so a damaged file can be
/// diagnosed without a hex editor.
public enum SnapshotFormatError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The first 8 bytes are not `SVMMSNAP`.
    case badMagic
    /// The stream header carries a version this code does not read.
    case unsupportedVersion(found: UInt32, supported: UInt32)
    /// Nonzero flags in the stream header (`sectionType` nil) or a section header.
    case unsupportedFlags(flags: UInt32, sectionType: SectionType?, offset: UInt64)
    /// The stream ended at `offset` while `needed` more bytes were expected.
    case truncated(offset: UInt64, needed: UInt64)
    /// The stream ended cleanly between sections, before the end section.
    case missingEnd(offset: UInt64)
    /// A section type this version does not define.
    case unknownSectionType(type: UInt32, offset: UInt64)
    /// A section's declared length exceeds its type's limit.
    case sectionTooLarge(type: SectionType, length: UInt64, limit: UInt64, offset: UInt64)
    /// The end section's payload is not exactly one 32-byte digest.
    case badEndLength(length: UInt64, offset: UInt64)
    /// A section's SHA-256 does not match its header and payload.
    case checksumMismatch(type: SectionType, offset: UInt64)
    /// The end section's digest does not match the bytes before it.
    case streamDigestMismatch(offset: UInt64)
    /// A memory section is structurally invalid (`offset` nil when applied from a bare payload).
    case malformedMemorySection(reason: MemorySectionDefect, offset: UInt64?)
    /// A memory section names a page outside guest RAM.
    case pageOutOfRange(pfn: UInt64, memorySize: UInt64)
    /// Bytes follow the end section.
    case dataAfterEnd(offset: UInt64)
    /// The writer was used in a way that would produce an invalid stream.
    case writerMisuse(String)
    /// The stream header names another section integrity than the reader was made for.
    case integrityMismatch(expected: SectionIntegrity, found: SectionIntegrity)
    /// Sections in an order the state sequence does not allow (`StateSequence`).
    case sectionOrder(String)
    /// A JSON payload (machine description, vCPU or device state, signature) that does not decode.
    case malformedPayload(what: String, reason: String)

    private static let damaged = "the file is damaged or not a snapshot"

    public var description: String {
        switch self {
        case .badMagic:
            return "not a snapshot stream: the first 8 bytes are not \"SVMMSNAP\"; \(Self.damaged)"
        case let .unsupportedVersion(found, supported):
            if found > supported {
                return "snapshot format version \(found) is newer than the supported version \(supported): it was written by a newer VMM; restore it with that VMM"
            }
            return "snapshot format version \(found) is not supported (this VMM reads version \(supported)); \(Self.damaged)"
        case let .unsupportedFlags(flags, type, offset):
            let place = type.map { "the \($0) section header at offset \(offset)" } ?? "the stream header"
            return "unsupported flags 0x\(hex(flags)) in \(place): the stream was written by a newer VMM or is damaged"
        case let .truncated(offset, needed):
            return "snapshot stream ends at offset \(offset), \(needed) byte(s) short: the file is incomplete (interrupted write or copy) or damaged"
        case let .missingEnd(offset):
            return "snapshot stream ends at offset \(offset) without an end section: the file is incomplete (interrupted write or copy)"
        case let .unknownSectionType(type, offset):
            return "unknown section type 0x\(hex(type)) at offset \(offset): the stream may come from a newer VMM, or is damaged"
        case let .sectionTooLarge(type, length, limit, offset):
            return "\(type) section at offset \(offset) declares \(length) bytes, above its limit of \(limit): \(Self.damaged)"
        case let .badEndLength(length, offset):
            return "end section at offset \(offset) declares \(length) bytes, not the size its stream's integrity gives it: \(Self.damaged)"
        case let .checksumMismatch(type, offset):
            return "checksum mismatch in the \(type) section at offset \(offset): \(Self.damaged)"
        case let .streamDigestMismatch(offset):
            return "the end section at offset \(offset) does not match the stream before it: \(Self.damaged)"
        case let .malformedMemorySection(reason, offset):
            let place = offset.map { "memory section at offset \($0)" } ?? "memory section"
            return "malformed \(place): \(reason); the snapshot is damaged or was written by a faulty VMM"
        case let .pageOutOfRange(pfn, size):
            return "memory section names page frame 0x\(hex(pfn)) (guest address 0x\(hex(pfn &<< 12))), outside guest RAM of \(size) bytes: restore with at least as much memory as the snapshotted guest"
        case let .dataAfterEnd(offset):
            return "unexpected data at offset \(offset), after the end section: \(Self.damaged)"
        case let .writerMisuse(reason):
            return "snapshot writer misuse: \(reason)"
        case let .integrityMismatch(expected, found):
            return "the stream is written with \(found), but this reader expects \(expected): a snapshot file must carry checksums, and a stream without them is read only inside an authenticated channel"
        case let .sectionOrder(what):
            return "the state's sections are out of order: \(what)"
        case let .malformedPayload(what, reason):
            return "the \(what) is malformed: \(reason)"
        }
    }
}

/// A system call on a snapshot file descriptor failed.
public struct SnapshotIOError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The call that failed, e.g. "write" or "read".
    public var operation: String
    public var errno: Int32

    public init(operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        let message = String(cString: strerror(errno))
        var text = "snapshot \(operation) failed: \(message) (errno \(errno))"
        if errno == ENOSPC { text += "; free disk space and retry" }
        if errno == EPIPE { text += "; the receiving side closed the stream" }
        return text
    }
}

func hex<T: BinaryInteger>(_ value: T) -> String { String(value, radix: 16) }
