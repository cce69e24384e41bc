import Testing
import GuestMemory
@testable import Snapshot

@Suite("Snapshot streams round-trip")
struct RoundTripTests {
    @Test("JSON sections and memory pages read back identical, and memory restores byte for byte")
    func roundTrip() throws {
        let source = try GuestMemory(size: 1 << 20)
        let dataPages: [UInt64] = [0, 1, 7, 8, 100, 200, 255]
        try fillPages(source, dataPages)
        // A page that is non-zero in one byte only must still count as data.
        try source.write([0x5A], at: GuestAddress(50 * 4096 + 4095))
        let allFrames = Array(UInt64(0)..<256)

        var writer = try StreamWriter(sink: BufferSink())
        try writer.writeSection(.machine, payload: machineJSON)
        try writer.writeSection(.vcpu, payload: vcpuJSON)
        try writer.writeSection(.devices, payload: devicesJSON)
        let stats = try writer.writeMemoryPages(allFrames, from: source)
        try writer.finish()
        let bytes = writer.sink.bytes

        let storedPages = dataPages.count + 1
        #expect(stats.pages == 256)
        #expect(stats.zeroPages == 256 - storedPages)
        #expect(stats.sections == 1)
        #expect(writer.bytesWritten == UInt64(bytes.count))

        // The size proves zero pages carry no data: only the 8 data pages are stored.
        let json = [machineJSON, vcpuJSON, devicesJSON].map { 16 + $0.count + 32 }.reduce(0, +)
        let memory = 16 + 8 + 8 * 256 + 4096 * storedPages + 32
        #expect(stats.bytes == UInt64(memory))
        #expect(bytes.count == 16 + json + memory + (16 + 32 + 32))

        let sections = try decode(bytes)
        #expect(sections.map(\.type) == [.machine, .vcpu, .devices, .memory])
        #expect(sections[0].payload == machineJSON)
        #expect(sections[1].payload == vcpuJSON)
        #expect(sections[2].payload == devicesJSON)
        #expect(sections[0].offset == 16)

        // Dirty the target first so restoring zero pages is proven to zero them.
        let target = try GuestMemory(size: 1 << 20)
        try fillPages(target, [2, 3, 254])
        let applied = try MemorySection.apply(sections[3], to: target)
        #expect(applied.pages == 256)
        #expect(applied.zeroPages == 256 - storedPages)
        #expect(try target.read(at: GuestAddress(0), count: 1 << 20) == source.read(at: GuestAddress(0), count: 1 << 20))
    }

    @Test("more than 512 pages are split into several memory sections that all restore")
    func splitsLargePageLists() throws {
        let source = try GuestMemory(size: 4 << 20)
        let frames = Array(UInt64(0)..<1000)
        try fillPages(source, [0, 511, 512, 999])
        var writer = try StreamWriter(sink: BufferSink())
        let stats = try writer.writeMemoryPages(frames, from: source)
        try writer.finish()
        #expect(stats.sections == 2)
        #expect(stats.pages == 1000)
        #expect(stats.zeroPages == 996)

        let sections = try decode(writer.sink.bytes)
        #expect(sections.map { $0.payload.loadLittleEndian(UInt32.self, at: 0) } == [512, 488])
        let target = try GuestMemory(size: 4 << 20)
        for s in sections { _ = try MemorySection.apply(s, to: target) }
        #expect(try target.read(at: GuestAddress(0), count: 4 << 20) == source.read(at: GuestAddress(0), count: 4 << 20))
    }

    @Test("an empty page list writes nothing, and a stream with only the end section is valid")
    func emptyStream() throws {
        let memory = try GuestMemory(size: 1 << 20)
        var writer = try StreamWriter(sink: BufferSink())
        let stats = try writer.writeMemoryPages([], from: memory)
        #expect(stats == MemoryWriteStats())
        try writer.finish()
        #expect(writer.sink.bytes.count == 16 + 16 + 32 + 32)
        #expect(try decode(writer.sink.bytes).isEmpty)
    }

    @Test("the reader returns the end section once, then nil")
    func endThenNil() throws {
        var reader = try StreamReader(source: BufferSource(try smallStream()))
        var types: [SectionType] = []
        while let s = try reader.nextSection() { types.append(s.type) }
        #expect(types == [.machine, .vcpu, .devices, .memory, .end])
        #expect(try reader.nextSection() == nil)
    }

    @Test("the writer refuses what would make an invalid stream, before writing anything")
    func writerRefusesMisuse() throws {
        let memory = try GuestMemory(size: 1 << 20)
        var writer = try StreamWriter(sink: BufferSink())
        let tooBig = [UInt8](repeating: 0x20, count: (64 << 10) + 1)
        #expect(throws: SnapshotFormatError.sectionTooLarge(type: .control, length: (64 << 10) + 1, limit: 64 << 10, offset: 16)) {
            try writer.writeSection(.control, payload: tooBig)
        }
        #expect(throws: SnapshotFormatError.self) { try writer.writeSection(.end, payload: []) }
        #expect(throws: SnapshotFormatError.self) { try writer.writeMemoryPages([3, 2], from: memory) }
        #expect(throws: SnapshotFormatError.pageOutOfRange(pfn: 256, memorySize: 1 << 20)) {
            try writer.writeMemoryPages([1, 256], from: memory)
        }
        #expect(throws: SnapshotFormatError.malformedMemorySection(reason: .countOutOfRange(count: 0), offset: 16)) {
            try writer.writeSection(.memory, payload: memoryPayload(entries: []))
        }
        #expect(writer.bytesWritten == 16)
        try writer.finish()
        #expect(throws: SnapshotFormatError.self) { try writer.writeSection(.machine, payload: []) }
        #expect(throws: SnapshotFormatError.self) { try writer.finish() }
        #expect(try decode(writer.sink.bytes).isEmpty)
    }

    @Test("a hand-encoded memory payload written with writeSection is accepted")
    func handEncodedMemory() throws {
        let payload = memoryPayload(entries: [2, 5 | zeroFlag, 9])
        var writer = try StreamWriter(sink: BufferSink())
        try writer.writeSection(.memory, payload: payload)
        try writer.finish()
        let sections = try decode(writer.sink.bytes)
        #expect(sections == [Section(type: .memory, payload: payload, offset: 16)])
        let target = try GuestMemory(size: 1 << 20)
        let applied = try MemorySection.apply(payload, to: target)
        #expect(applied.pages == 3 && applied.zeroPages == 1)
        #expect(try target.read(at: GuestAddress(9 * 4096), count: 2) == [0x42, 0x42])
    }
}
