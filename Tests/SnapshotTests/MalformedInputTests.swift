import Testing
import GuestMemory
@testable import Snapshot

@Suite("Malformed streams are refused with the specific error")
struct MalformedInputTests {
    // MARK: Truncation and bit flips over a real stream

    @Test("every proper prefix of a valid stream is refused as truncated, or as missing its end at a section boundary")
    func truncatedAtEveryOffset() throws {
        let bytes = try smallStream()
        let sections = try layout(of: bytes)
        for n in 0..<bytes.count {
            let expected: SnapshotFormatError
            if n < 16 {
                expected = .truncated(offset: UInt64(n), needed: UInt64(16 - n))
            } else if n == 16 || sections.contains(where: { $0.offset == n }) {
                expected = .missingEnd(offset: UInt64(n))
            } else {
                let s = try #require(sections.last { $0.offset < n })
                // Within the header only the header is known to be missing; after it, the whole section.
                let readEnd = n < s.payloadStart ? s.payloadStart : s.end
                expected = .truncated(offset: UInt64(n), needed: UInt64(readEnd - n))
            }
            #expect(throws: expected, "prefix of \(n) bytes") { try decode(Array(bytes[0..<n])) }
        }
        #expect(try decode(bytes).count == 4)
    }

    @Test("a flipped bit in the stream header is refused as bad magic, unsupported version, another integrity or unsupported flags")
    func flippedStreamHeaderBits() throws {
        let bytes = try smallStream()
        for byte in 0..<16 {
            for bit in 0..<8 {
                var m = bytes
                m[byte] ^= 1 << bit
                let expected: SnapshotFormatError = switch byte {
                case 0..<8: .badMagic
                case 8..<12: .unsupportedVersion(found: 1 ^ (1 << UInt32(8 * (byte - 8) + bit)), supported: 1)
                // Flag bit 0 names the checksum-less integrity, which a file reader never accepts.
                case 12 where bit == 0: .integrityMismatch(expected: .sha256Checksums, found: .channelAuthenticated)
                default: .unsupportedFlags(flags: 1 << UInt32(8 * (byte - 12) + bit), sectionType: nil, offset: 0)
                }
                #expect(throws: expected, "byte \(byte) bit \(bit)") { try decode(m) }
            }
        }
    }

    /// What the reader must say about a section whose header now reads (`rawType`, `length`).
    private func expectedError(rawType: UInt32, length: UInt64, at s: SectionLayout, total: Int) -> SnapshotFormatError {
        let offset = UInt64(s.offset)
        guard let type = SectionType(rawValue: rawType) else { return .unknownSectionType(type: rawType, offset: offset) }
        if length > type.payloadLimit {
            return .sectionTooLarge(type: type, length: length, limit: type.payloadLimit, offset: offset)
        }
        if type == .end, length != 32 { return .badEndLength(length: length, offset: offset) }
        let readEnd = UInt64(s.offset) + 16 + length + 32
        if readEnd > UInt64(total) { return .truncated(offset: UInt64(total), needed: readEnd - UInt64(total)) }
        return .checksumMismatch(type: type, offset: offset)
    }

    @Test("a flipped bit in any section's type, flags, length, payload or checksum is refused with the error for that field")
    func flippedSectionBits() throws {
        let bytes = try smallStream()
        let sections = try layout(of: bytes)
        #expect(sections.map(\.type) == [.machine, .vcpu, .devices, .memory, .end])
        for s in sections {
            let offset = UInt64(s.offset)
            let rawType = s.type.rawValue
            // Memory payloads are large; every 7th byte still hits table and data.
            let payloadStride = s.type == .memory ? 7 : 1
            let payloadBytes = Array(stride(from: s.payloadStart, to: s.checksumStart, by: payloadStride))
            for byte in Array(s.offset..<s.payloadStart) + payloadBytes + Array(s.checksumStart..<s.end) {
                for bit in 0..<8 {
                    var m = bytes
                    m[byte] ^= 1 << bit
                    let field = byte - s.offset
                    let expected: SnapshotFormatError
                    switch field {
                    case 0..<4:
                        expected = expectedError(rawType: rawType ^ (1 << UInt32(8 * field + bit)), length: UInt64(s.length), at: s, total: bytes.count)
                    case 4..<8:
                        expected = .unsupportedFlags(flags: 1 << UInt32(8 * (field - 4) + bit), sectionType: s.type, offset: offset)
                    case 8..<16:
                        expected = expectedError(rawType: rawType, length: UInt64(s.length) ^ (1 << UInt64(8 * (field - 8) + bit)), at: s, total: bytes.count)
                    default:
                        expected = .checksumMismatch(type: s.type, offset: offset)
                    }
                    #expect(throws: expected, "\(s.type) section, byte \(field) bit \(bit)") { try decode(m) }
                }
            }
        }
    }

    // MARK: Stream header

    @Test("wrong magic, or a file that is not a snapshot at all, is refused as bad magic")
    func wrongMagic() throws {
        var bytes = try smallStream()
        bytes[7] = UInt8(ascii: "Q")
        #expect(throws: SnapshotFormatError.badMagic) { try decode(bytes) }
        let elf: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1, 0] + [UInt8](repeating: 0, count: 56)
        #expect(throws: SnapshotFormatError.badMagic) { try decode(elf) }
        #expect(throws: SnapshotFormatError.truncated(offset: 0, needed: 16)) { try decode([]) }
        #expect(SnapshotFormatError.badMagic.description.contains("not a snapshot"))
    }

    @Test("a future version is refused and the message points at a newer VMM")
    func futureVersion() throws {
        let error = SnapshotFormatError.unsupportedVersion(found: 2, supported: 1)
        #expect(throws: error) { try decode(streamHeader(version: 2)) }
        #expect(error.description.contains("newer VMM"))
        #expect(throws: SnapshotFormatError.unsupportedVersion(found: 0, supported: 1)) { try decode(streamHeader(version: 0)) }
    }

    @Test("stream flags other than the reader's integrity are refused")
    func streamFlags() throws {
        #expect(throws: SnapshotFormatError.integrityMismatch(expected: .sha256Checksums, found: .channelAuthenticated)) {
            try decode(streamHeader(flags: 1))
        }
        #expect(throws: SnapshotFormatError.unsupportedFlags(flags: 2, sectionType: nil, offset: 0)) {
            try decode(streamHeader(flags: 2))
        }
    }

    // MARK: Section framing

    @Test("lengths near 2^64 are refused as too large before anything is allocated", arguments: [
        UInt64.max, UInt64.max - 15, UInt64.max - 47, 1 << 63, 1 << 32,
    ])
    func hugeLengths(length: UInt64) throws {
        for type in SectionType.allCases {
            let bytes = streamHeader() + encodeSectionHeader(type: type.rawValue, flags: 0, length: length)
            #expect(throws: SnapshotFormatError.sectionTooLarge(type: type, length: length, limit: type.payloadLimit, offset: 16)) {
                try decode(bytes)
            }
        }
    }

    @Test("a length one above each type's limit is refused; the limit itself is read")
    func lengthLimits() throws {
        for type in SectionType.allCases {
            let over = streamHeader() + encodeSectionHeader(type: type.rawValue, flags: 0, length: type.payloadLimit + 1)
            #expect(throws: SnapshotFormatError.sectionTooLarge(type: type, length: type.payloadLimit + 1, limit: type.payloadLimit, offset: 16)) {
                try decode(over)
            }
            guard type != .memory, type != .end else { continue }
            let atLimit = rawStream([frame(type: type.rawValue, payload: [UInt8](repeating: 0x20, count: Int(type.payloadLimit)))])
            #expect(try decode(atLimit).first?.payload.count == Int(type.payloadLimit))
        }
    }

    @Test("an unknown section type is refused and the message mentions a newer VMM", arguments: [UInt32(0), 7, 0xFFFE, 0x1_0000, .max])
    func unknownType(type: UInt32) throws {
        let bytes = rawStream([frame(type: type, payload: [1, 2, 3])])
        let error = SnapshotFormatError.unknownSectionType(type: type, offset: 16)
        #expect(throws: error) { try decode(bytes) }
        #expect(error.description.contains("newer VMM"))
    }

    @Test("nonzero section flags are refused even with a valid checksum")
    func sectionFlags() throws {
        let bytes = rawStream([frame(type: 1, flags: 0x8000_0000, payload: machineJSON)])
        #expect(throws: SnapshotFormatError.unsupportedFlags(flags: 0x8000_0000, sectionType: .machine, offset: 16)) {
            try decode(bytes)
        }
    }

    // MARK: End section

    @Test("bytes after the end section are refused")
    func dataAfterEnd() throws {
        let bytes = try smallStream()
        #expect(throws: SnapshotFormatError.dataAfterEnd(offset: UInt64(bytes.count))) { try decode(bytes + [0]) }
        let extra = frame(type: 1, payload: machineJSON)
        #expect(throws: SnapshotFormatError.dataAfterEnd(offset: UInt64(bytes.count))) { try decode(bytes + extra) }
    }

    @Test("an end digest that does not match the stream is refused, even when every section checksum is valid")
    func endDigestMismatch() throws {
        // Change a JSON byte and repair that section's checksum: only the stream digest can tell.
        var bytes = try smallStream()
        let machine = try layout(of: bytes)[0]
        bytes[machine.payloadStart] ^= 0x01
        let header = Array(bytes[machine.offset..<machine.payloadStart])
        let payload = Array(bytes[machine.payloadStart..<machine.checksumStart])
        bytes.replaceSubrange(machine.checksumStart..<machine.end, with: sha256(header, payload))
        let endOffset = UInt64(try #require(layout(of: try smallStream()).last).offset)
        #expect(throws: SnapshotFormatError.streamDigestMismatch(offset: endOffset)) { try decode(bytes) }

        let forged = streamHeader() + frame(type: 0xFFFF, payload: [UInt8](repeating: 0xAB, count: 32))
        #expect(throws: SnapshotFormatError.streamDigestMismatch(offset: 16)) { try decode(forged) }
    }

    @Test("an end section whose length is not 32 is refused", arguments: [UInt64(0), 31, 33])
    func endLength(length: UInt64) throws {
        let bytes = streamHeader() + frame(type: 0xFFFF, payload: [UInt8](repeating: 0, count: Int(length)))
        let expected: SnapshotFormatError = length > 32
            ? .sectionTooLarge(type: .end, length: length, limit: 32, offset: 16)
            : .badEndLength(length: length, offset: 16)
        #expect(throws: expected) { try decode(bytes) }
    }

    @Test("a stream without an end section is refused as missing its end")
    func missingEnd() throws {
        #expect(throws: SnapshotFormatError.missingEnd(offset: 16)) { try decode(streamHeader()) }
        let oneSection = streamHeader() + frame(type: 1, payload: machineJSON)
        #expect(throws: SnapshotFormatError.missingEnd(offset: UInt64(oneSection.count))) { try decode(oneSection) }
    }

    @Test("after an error the reader keeps refusing with the same error")
    func poisonedReader() throws {
        let bytes = rawStream([frame(type: 9, payload: [])]) + streamHeader()
        var reader = try StreamReader(source: BufferSource(bytes))
        #expect(throws: SnapshotFormatError.unknownSectionType(type: 9, offset: 16)) { try reader.nextSection() }
        #expect(throws: SnapshotFormatError.unknownSectionType(type: 9, offset: 16)) { try reader.nextSection() }
    }

    // MARK: Memory section structure

    /// Checks that a memory payload is refused with `defect` both by the reader
    /// (checksum valid, so structure is what fails) and by `apply`, which writes nothing.
    private func expectDefect(_ defect: MemorySectionDefect, _ payload: [UInt8],
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let bytes = rawStream([frame(type: SectionType.memory.rawValue, payload: payload)])
        #expect(throws: SnapshotFormatError.malformedMemorySection(reason: defect, offset: 16), sourceLocation: sourceLocation) {
            try decode(bytes)
        }
        let memory = try GuestMemory(size: 1 << 20)
        try fillPages(memory, [0])
        let before = try memory.read(at: GuestAddress(0), count: 4096)
        #expect(throws: SnapshotFormatError.malformedMemorySection(reason: defect, offset: nil), sourceLocation: sourceLocation) {
            try MemorySection.apply(payload, to: memory)
        }
        #expect(try memory.read(at: GuestAddress(0), count: 4096) == before, sourceLocation: sourceLocation)
    }

    @Test("memory page counts of 0, above 512, or large enough to overflow count*8 are refused",
          arguments: [UInt32(0), 513, 0x2000_0000, 0x2000_0001, 0xFFFF_FFFF])
    func badCounts(count: UInt32) throws {
        try expectDefect(.countOutOfRange(count: count), memoryPayload(entries: [0 | zeroFlag], count: count))
    }

    @Test("a memory payload too short for its header or its table is refused")
    func shortTable() throws {
        try expectDefect(.tooShort(length: 0), [])
        try expectDefect(.tooShort(length: 7), [1, 0, 0, 0, 0, 0, 0])
        try expectDefect(.tableTruncated(count: 4, length: 16), memoryPayload(entries: [zeroFlag], count: 4))
    }

    @Test("a memory payload whose length disagrees with its data pages is refused")
    func lengthMismatch() throws {
        try expectDefect(.lengthMismatch(expected: 16 + 4096, actual: 16), memoryPayload(entries: [3], dataPages: 0))
        try expectDefect(.lengthMismatch(expected: 16, actual: 16 + 4096), memoryPayload(entries: [3 | zeroFlag], dataPages: 1))
        try expectDefect(.lengthMismatch(expected: 24 + 8192, actual: 25 + 8192), memoryPayload(entries: [1, 2]) + [0])
    }

    @Test("page frame numbers that repeat or go backwards are refused")
    func nonIncreasing() throws {
        try expectDefect(.notIncreasing(index: 1, pfn: 5, previous: 5), memoryPayload(entries: [5, 5 | zeroFlag]))
        try expectDefect(.notIncreasing(index: 2, pfn: 3, previous: 9), memoryPayload(entries: [1, 9 | zeroFlag, 3]))
    }

    @Test("reserved entry bits 52..62 or a nonzero reserved field are refused")
    func reservedBits() throws {
        for bit in 52...62 {
            let entry = (UInt64(1) << UInt64(bit)) | 3 | zeroFlag
            try expectDefect(.reservedEntryBits(index: 0, entry: entry), memoryPayload(entries: [entry]))
        }
        try expectDefect(.reservedFieldNonZero(value: 1), memoryPayload(entries: [zeroFlag], reserved: 1))
    }

    @Test("a page beyond guest memory is refused by apply, and nothing before it is written")
    func pageOutOfRange() throws {
        let memory = try GuestMemory(size: 1 << 20)
        let maxPFN = (UInt64(1) << 52) - 1
        for pfn in [256, 257, maxPFN] {
            let payload = memoryPayload(entries: [0, 1 | zeroFlag, pfn])
            // Structurally valid: the reader accepts it; only apply knows the memory size.
            #expect(try decode(rawStream([frame(type: 4, payload: payload)])).count == 1)
            #expect(throws: SnapshotFormatError.pageOutOfRange(pfn: pfn, memorySize: 1 << 20)) {
                try MemorySection.apply(payload, to: memory)
            }
            #expect(try memory.isZeroPage(GuestAddress(0)))
        }
        // The last page that fits is accepted.
        _ = try MemorySection.apply(memoryPayload(entries: [255]), to: memory)
        #expect(try memory.read(at: GuestAddress(255 * 4096), count: 1) == [0x41])
    }

    @Test("apply is given a section of the wrong type: refused")
    func applyWrongType() throws {
        let memory = try GuestMemory(size: 1 << 20)
        #expect(throws: SnapshotFormatError.self) {
            try MemorySection.apply(Section(type: .machine, payload: machineJSON, offset: 16), to: memory)
        }
    }

    // MARK: Messages

    @Test("every error message names the problem and where it is")
    func descriptions() {
        let checks: [(SnapshotFormatError, [String])] = [
            (.checksumMismatch(type: .vcpu, offset: 123), ["vcpu", "123", "damaged"]),
            (.truncated(offset: 77, needed: 5), ["77", "5", "incomplete"]),
            (.sectionTooLarge(type: .memory, length: .max, limit: 2_101_256, offset: 16), ["memory", "16", "2101256"]),
            (.malformedMemorySection(reason: .countOutOfRange(count: 513), offset: 4096), ["4096", "513"]),
            (.pageOutOfRange(pfn: 0x100, memorySize: 1 << 20), ["0x100", "1048576", "memory"]),
            (.dataAfterEnd(offset: 99), ["99", "end section"]),
            (.unsupportedFlags(flags: 2, sectionType: .devices, offset: 40), ["devices", "40", "0x2"]),
            (.missingEnd(offset: 16), ["16", "end section"]),
        ]
        for (error, words) in checks {
            for word in words { #expect(error.description.contains(word), "\(error.description) lacks \(word)") }
        }
    }
}
