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
        // Five sections (machine, memory, vcpu, devices, end), each without its 32-byte trailer.
        #expect(checksummed.count - channel.count == 5 * SnapshotFormat.checksumSize)
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

    @Test("without checksums the stream digest still catches a changed byte at the end section")
    func channelStreamDigestCatchesEdits() throws {
        let memory = try GuestMemory(size: 1 << 20)
        var edited = try write(.channelAuthenticated, memory: memory)
        // A byte of the machine section's payload (after the 16-byte stream and section headers).
        edited[16 + 16 + 2] ^= 0x01
        #expect(throws: SnapshotFormatError.self) {
            _ = try StreamReader.readAll(from: BufferSource(edited), integrity: .channelAuthenticated)
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
