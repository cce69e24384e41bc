import Crypto
import GuestMemory

/// Reads and verifies a version 1 snapshot stream, one section at a time.
///
/// Each section's declared length is checked against its type's limit before
/// its payload is allocated, and its checksum before it is returned. After an
/// error the reader is poisoned: every later call throws the same error.
public struct StreamReader<Source: ByteSource> {
    public private(set) var source: Source
    /// Stream bytes consumed so far.
    public private(set) var offset: UInt64 = 0

    private var streamHasher = SHA256()
    /// SHA-256 of every stream byte before the section last returned (what its signature covers).
    public private(set) var digestBeforeLastSection: [UInt8] = []
    private var endReturned = false
    private var exhausted = false
    private var failure: (any Error)?

    /// How each section is protected; the stream header must name the same.
    public let integrity: SectionIntegrity

    /// Reads and validates the stream header, which must name `integrity`.
    public init(source: Source, integrity: SectionIntegrity = .sha256Checksums) throws {
        self.source = source
        self.integrity = integrity
        var header = [UInt8](repeating: 0, count: SnapshotFormat.streamHeaderSize)
        try fill(&header)
        guard Array(header[0..<8]) == SnapshotFormat.magic else { throw SnapshotFormatError.badMagic }
        let version = header.loadLittleEndian(UInt32.self, at: 8)
        // Version before flags: a newer version may define flags, and "newer VMM" is the better message.
        guard version == SnapshotFormat.version else {
            throw SnapshotFormatError.unsupportedVersion(found: version, supported: SnapshotFormat.version)
        }
        let flags = header.loadLittleEndian(UInt32.self, at: 12)
        guard let found = SectionIntegrity(headerFlags: flags) else {
            throw SnapshotFormatError.unsupportedFlags(flags: flags, sectionType: nil, offset: 0)
        }
        // A stream without checksums is read only where a channel authenticated it.
        guard found == integrity else { throw SnapshotFormatError.integrityMismatch(expected: integrity, found: found) }
        if integrity.hasStreamDigest { streamHasher.update(bytes: header) }
    }

    /// Next section, verified (limits, checksum, and memory section structure);
    /// for `.end` also verifies the stream digest. The call after `.end` was
    /// returned checks that no data follows (so it reads once more from the
    /// source) and returns nil; a migration receiver that keeps its connection
    /// open should stop at `.end` instead.
    public mutating func nextSection() throws -> Section? {
        switch try next(applyingMemoryTo: nil) {
        case let .section(section): section
        case .appliedMemory, nil: nil  // not without a memory to apply to
        }
    }

    /// What `nextSection(applyingMemoryTo:)` read.
    public enum Item {
        /// A section, verified as `nextSection()` verifies it.
        case section(Section)
        /// A memory section applied to guest memory as it was read, its pages never held apart.
        case appliedMemory(pages: Int, zeroPages: Int, offset: UInt64)
    }

    /// Like `nextSection()`, but on an authenticated channel (no checksum to verify before the
    /// pages may be used) a memory section's table is checked and its pages are read from the
    /// source straight into `memory`: one copy, no payload array. A failure part way through a
    /// section's pages leaves some of them written, as a failed stream leaves earlier sections.
    /// On a checksummed stream (a file) memory sections come back whole and verified, for the
    /// caller to apply.
    /// `checkFrame` sees every page frame of a section applied in place once its table is
    /// checked and before any page is written; it throws to refuse the section.
    public mutating func nextSection(applyingMemoryTo memory: GuestMemory,
                                     checkFrame: ((UInt64) throws -> Void)? = nil) throws -> Item? {
        try next(applyingMemoryTo: memory, checkFrame: checkFrame)
    }

    private mutating func next(applyingMemoryTo memory: GuestMemory?, checkFrame: ((UInt64) throws -> Void)? = nil) throws -> Item? {
        if let failure { throw failure }
        do {
            return try readSection(applyingMemoryTo: memory, checkFrame: checkFrame)
        } catch {
            failure = error
            throw error
        }
    }

    /// Reads a whole stream and returns its sections in order, without the end
    /// section, after verifying that nothing follows it.
    public static func readAll(from source: Source, integrity: SectionIntegrity = .sha256Checksums) throws -> [Section] {
        var reader = try StreamReader(source: source, integrity: integrity)
        var sections: [Section] = []
        // Runs until the nil after the end section, which proves nothing follows it.
        while let section = try reader.nextSection() {
            if section.type != .end { sections.append(section) }
        }
        return sections
    }

    private mutating func readSection(applyingMemoryTo memory: GuestMemory?, checkFrame: ((UInt64) throws -> Void)?) throws -> Item? {
        if endReturned {
            if !exhausted {
                try expectEndOfInput()
                exhausted = true
            }
            return nil
        }

        let sectionOffset = offset
        let digestBefore = integrity.hasStreamDigest ? streamHasher.finalize().withUnsafeBytes { Array($0) } : []
        var header = [UInt8](repeating: 0, count: SnapshotFormat.sectionHeaderSize)
        do {
            try fill(&header, hashStream: false)
        } catch SnapshotFormatError.truncated(let at, _) where at == sectionOffset {
            throw SnapshotFormatError.missingEnd(offset: sectionOffset)
        }
        let rawType = header.loadLittleEndian(UInt32.self, at: 0)
        let flags = header.loadLittleEndian(UInt32.self, at: 4)
        let length = header.loadLittleEndian(UInt64.self, at: 8)

        guard let type = SectionType(rawValue: rawType) else {
            throw SnapshotFormatError.unknownSectionType(type: rawType, offset: sectionOffset)
        }
        guard flags == 0 else {
            throw SnapshotFormatError.unsupportedFlags(flags: flags, sectionType: type, offset: sectionOffset)
        }
        // The limit check comes before the allocation below, so a hostile length costs nothing.
        guard length <= type.payloadLimit else {
            throw SnapshotFormatError.sectionTooLarge(type: type, length: length, limit: type.payloadLimit, offset: sectionOffset)
        }
        if type == .end, length != UInt64(integrity.endPayloadSize) {
            throw SnapshotFormatError.badEndLength(length: length, offset: sectionOffset)
        }

        // The end digest covers everything before the end section's header; since
        // nothing is hashed after it, the running hasher can be finalized in place.
        var expectedDigest: [UInt8] = []
        if type == .end {
            if integrity.hasStreamDigest { expectedDigest = streamHasher.finalize().withUnsafeBytes { Array($0) } }
        } else if integrity.hasStreamDigest {
            streamHasher.update(bytes: header)
        }
        let hashStream = type != .end && integrity.hasStreamDigest

        if type == .memory, let memory, integrity == .channelAuthenticated {
            let applied = try readMemoryInPlace(length: length, sectionOffset: sectionOffset, into: memory, checkFrame: checkFrame)
            digestBeforeLastSection = digestBefore
            return .appliedMemory(pages: applied.pages, zeroPages: applied.zeroPages, offset: sectionOffset)
        }

        let payload: [UInt8]
        do {
            payload = try readBytes(Int(length), hashStream: hashStream)
        } catch let SnapshotFormatError.truncated(at, needed) {
            // Report the whole shortfall of the section, its checksum included.
            throw SnapshotFormatError.truncated(offset: at, needed: needed + UInt64(integrity.trailerSize))
        }
        if integrity.trailerSize > 0 {
            var checksum = [UInt8](repeating: 0, count: integrity.trailerSize)
            try fill(&checksum, hashStream: hashStream)
            var sectionHasher = SHA256()
            sectionHasher.update(bytes: header)
            sectionHasher.update(bytes: payload)
            guard sectionHasher.finalize().withUnsafeBytes({ Array($0) }) == checksum else {
                throw SnapshotFormatError.checksumMismatch(type: type, offset: sectionOffset)
            }
        }

        switch type {
        case .end:
            guard payload == expectedDigest else { throw SnapshotFormatError.streamDigestMismatch(offset: sectionOffset) }
            endReturned = true
        case .memory:
            do {
                _ = try MemorySection.parse(payload)
            } catch {
                throw SnapshotFormatError.malformedMemorySection(reason: error, offset: sectionOffset)
            }
        default:
            break
        }
        digestBeforeLastSection = digestBefore
        return .section(Section(type: type, payload: payload, offset: sectionOffset))
    }

    /// A memory section's payload on an authenticated channel: its head and table read and
    /// checked, then its pages read straight into `memory` (`MemorySection.apply(_:readingDataWith:to:)`).
    private mutating func readMemoryInPlace(length: UInt64, sectionOffset: UInt64, into memory: GuestMemory,
                                            checkFrame: ((UInt64) throws -> Void)?) throws -> (pages: Int, zeroPages: Int) {
        let payloadStart = offset
        // A shortfall is reported for the rest of the section, as for a payload read whole.
        func sectionShortfall(_ error: any Error) -> any Error {
            guard case let SnapshotFormatError.truncated(at, _) = error else { return error }
            return SnapshotFormatError.truncated(offset: at, needed: length - (at - payloadStart))
        }
        func malformed(_ defect: MemorySectionDefect) -> any Error {
            SnapshotFormatError.malformedMemorySection(reason: defect, offset: sectionOffset)
        }
        guard length >= 8 else { throw malformed(.tooShort(length: length)) }
        var head: [UInt8]
        do { head = try readBytes(8) } catch { throw sectionShortfall(error) }
        // withUnsafeBytes forgets the error type: the defect comes out as a value.
        func checkHead<T>(_ check: (UnsafeRawBufferPointer) throws(MemorySectionDefect) -> T) throws -> T {
            let result = head.withUnsafeBytes { raw in Result { () throws(MemorySectionDefect) in try check(raw) } }
            do { return try result.get() } catch { throw malformed(error) }
        }
        let tableEnd = try checkHead { raw throws(MemorySectionDefect) in try MemorySection.tableLength(first8: raw, payloadLength: length) }
        do { head += try readBytes(tableEnd - 8) } catch { throw sectionShortfall(error) }
        let parsed = try checkHead { raw throws(MemorySectionDefect) in try MemorySection.parseTable(raw, payloadLength: length) }
        if let checkFrame { for entry in parsed.entries { try checkFrame(entry.pfn) } }
        do {
            return try MemorySection.apply(parsed, readingDataWith: { try fill($0) }, to: memory)
        } catch { throw sectionShortfall(error) }
    }

    /// Throws `dataAfterEnd` if the source has another byte.
    private mutating func expectEndOfInput() throws {
        var probe = [UInt8](repeating: 0, count: 1)
        do {
            try fill(&probe, hashStream: false)
        } catch SnapshotFormatError.truncated {
            return
        }
        throw SnapshotFormatError.dataAfterEnd(offset: offset - 1)
    }

    /// Reads exactly `buffer.count` bytes, reporting a shortfall in this stream's offsets.
    private mutating func fill(_ buffer: inout [UInt8], hashStream: Bool = false) throws {
        try buffer.withUnsafeMutableBytes { try fill($0) }
        if hashStream { streamHasher.update(bytes: buffer) }
    }

    /// `count` bytes read into a new array, filled as it is made (not zeroed first).
    private mutating func readBytes(_ count: Int, hashStream: Bool = false) throws -> [UInt8] {
        let bytes = try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            try fill(UnsafeMutableRawBufferPointer(buffer))
            initialized = count
        }
        if hashStream { streamHasher.update(bytes: bytes) }
        return bytes
    }

    /// `fill` into memory held anywhere (guest pages), without hashing.
    private mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) throws {
        let start = offset
        let count = UInt64(buffer.count)
        do {
            try source.readExactly(into: buffer)
        } catch SnapshotFormatError.truncated(_, let needed) {
            let missing = min(max(needed, 1), count)
            throw SnapshotFormatError.truncated(offset: start + (count - missing), needed: missing)
        }
        offset += count
    }
}
