import Testing
import GuestMemory
@testable import Snapshot

@Suite("Section integrity is a parameter of the stream, named in its header")
struct IntegrityTests {
    func write(_ integrity: SectionIntegrity, memory: GuestMemory) throws -> [UInt8] {
        var writer = try StreamWriter(sink: BufferSink(), integrity: integrity)
        try writer.writeSection(.machine, payload: machineJSON)
        try writer.writeMemoryPages([1, 2, 9], from: memory)
        try writer.writeSection(.vcpu, payload: vcpuJSON)
        try writer.writeSection(.devices, payload: devicesJSON)
        try writer.finish()
        return writer.sink.bytes
    }

    @Test("a stream without checksums (inside an authenticated channel) reads back the same sections and memory")
    func channelStreamRoundTrips() throws {
        let memory = try GuestMemory(size: 1 << 20)
        try fillPages(memory, [1, 9])
        let channel = try write(.channelAuthenticated, memory: memory)
        let checksummed = try write(.sha256Checksums, memory: memory)
        // Five sections (machine, memory, vcpu, devices, end), each without its 32-byte trailer,
        // and an empty end section instead of the 32-byte stream digest.
        #expect(checksummed.count - channel.count == 6 * SnapshotFormat.checksumSize)
        let a = try StreamReader.readAll(from: BufferSource(channel), integrity: .channelAuthenticated)
        let b = try StreamReader.readAll(from: BufferSource(checksummed))
        #expect(a.map(\.type) == b.map(\.type))
        #expect(a.map(\.payload) == b.map(\.payload))
        let restored = try GuestMemory(size: 1 << 20)
        var reader = try StreamReader(source: BufferSource(channel), integrity: .channelAuthenticated)
        _ = try StateSequence.readDescription(from: &reader)
        _ = try StateSequence.readBody(from: &reader, into: restored)
        for page: UInt64 in [1, 2, 9] {
            #expect(try restored.read(at: GuestAddress(page * 4096), count: 4096) == memory.read(at: GuestAddress(page * 4096), count: 4096))
        }
    }

    @Test("a file reader refuses a stream without checksums, and a channel reader a checksummed one")
    func readersRefuseTheOtherIntegrity() throws {
        let memory = try GuestMemory(size: 1 << 20)
        let channel = try write(.channelAuthenticated, memory: memory)
        let checksummed = try write(.sha256Checksums, memory: memory)
        #expect(throws: SnapshotFormatError.integrityMismatch(expected: .sha256Checksums, found: .channelAuthenticated)) {
            _ = try StreamReader(source: BufferSource(channel))
        }
        #expect(throws: SnapshotFormatError.integrityMismatch(expected: .channelAuthenticated, found: .sha256Checksums)) {
            _ = try StreamReader(source: BufferSource(checksummed), integrity: .channelAuthenticated)
        }
    }

    @Test("without checksums the framing is still checked: a bad length, type or end section is refused")
    func channelStreamFramingChecked() throws {
        let memory = try GuestMemory(size: 1 << 20)
        let bytes = try write(.channelAuthenticated, memory: memory)
        // The machine section's length field (after the 16-byte stream header, at offset 8 of its header).
        var longer = bytes
        longer[16 + 8 + 7] = 0x7F
        #expect(throws: SnapshotFormatError.self) {
            _ = try StreamReader.readAll(from: BufferSource(longer), integrity: .channelAuthenticated)
        }
        var unknown = bytes
        unknown[16] = 0x77
        #expect(throws: SnapshotFormatError.unknownSectionType(type: 0x77, offset: 16)) {
            _ = try StreamReader.readAll(from: BufferSource(unknown), integrity: .channelAuthenticated)
        }
        // An end section that carries a digest is not this integrity's end section.
        let endAt = bytes.count - SnapshotFormat.sectionHeaderSize
        var withDigest = Array(bytes[..<endAt]) + encodeSectionHeader(type: SectionType.end.rawValue, flags: 0, length: 32)
        withDigest += [UInt8](repeating: 0, count: 32)
        #expect(throws: SnapshotFormatError.badEndLength(length: 32, offset: UInt64(endAt))) {
            _ = try StreamReader.readAll(from: BufferSource(withDigest), integrity: .channelAuthenticated)
        }
    }

    @Test("a truncated stream without checksums reports where it ran out")
    func channelStreamTruncated() throws {
        let memory = try GuestMemory(size: 1 << 20)
        let bytes = try write(.channelAuthenticated, memory: memory)
        #expect(throws: SnapshotFormatError.self) {
            _ = try StreamReader.readAll(from: BufferSource(Array(bytes.dropLast(5))), integrity: .channelAuthenticated)
        }
    }
}
