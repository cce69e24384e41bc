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
    /// Memory of `size` bytes whose every page holds 0xEE, so any page written shows.
    func marked(size: UInt64 = 1 << 20) throws -> GuestMemory {
        let memory = try GuestMemory(size: size)
        try memory.write([UInt8](repeating: 0xEE, count: Int(size)), at: GuestAddress(0))
        return memory
    }

    @Test("on an authenticated channel a memory section's pages go from the stream straight into guest memory: runs of neighbouring pages, lone pages and zero pages land where a whole-payload apply puts them")
    func channelPagesAppliedInPlace() throws {
        let source = try GuestMemory(size: 1 << 20)
        let data: [UInt64] = [0, 1, 2, 5, 7, 8, 255]
        try fillPages(source, data)
        var writer = try StreamWriter(sink: BufferSink(), integrity: .channelAuthenticated)
        try writer.writeMemoryPages([0, 1, 2, 3, 5, 7, 8, 9, 255], from: source)
        try writer.writeSection(.vcpu, payload: vcpuJSON)
        try writer.writeSection(.devices, payload: devicesJSON)
        try writer.finish()

        let inPlace = try marked()
        let body = try readChannelBody(writer.sink.bytes, into: inPlace)
        #expect(body.pages == 9 && body.zeroPages == 2 && body.memorySections == 1)
        let whole = try marked()
        let sections = try StreamReader.readAll(from: BufferSource(writer.sink.bytes), integrity: .channelAuthenticated)
        for section in sections where section.type == .memory { _ = try MemorySection.apply(section, to: whole) }
        #expect(try inPlace.read(at: GuestAddress(0), count: 1 << 20) == whole.read(at: GuestAddress(0), count: 1 << 20))
        for pfn in data { #expect(try inPlace.read(at: GuestAddress(pfn * 4096), count: 4096) == source.read(at: GuestAddress(pfn * 4096), count: 4096)) }
        #expect(try inPlace.isZeroPage(GuestAddress(3 * 4096)) && inPlace.isZeroPage(GuestAddress(9 * 4096)))
        #expect(try inPlace.read(at: GuestAddress(4 * 4096), count: 4096) == [UInt8](repeating: 0xEE, count: 4096))
    }

    @Test("on an authenticated channel a run of neighbouring pages that crosses from one memory region (KVM slot) into the next is read into both, each page where it belongs")
    func channelRunAcrossRegions() throws {
        // Regions of 8 pages: pages 6...9 straddle the first boundary, 15...16 the second.
        let pages: [UInt64] = [6, 7, 8, 9, 15, 16]
        let source = try GuestMemory(size: 32 * 4096, regionSize: 8 * 4096)
        try fillPages(source, pages)
        var writer = try StreamWriter(sink: BufferSink(), integrity: .channelAuthenticated)
        try writer.writeMemoryPages(pages, from: source)
        try writer.writeSection(.vcpu, payload: vcpuJSON)
        try writer.writeSection(.devices, payload: devicesJSON)
        try writer.finish()
        let target = try GuestMemory(size: 32 * 4096, regionSize: 8 * 4096)
        _ = try readChannelBody(writer.sink.bytes, into: target)
        #expect(target.regions.count == 4)
        #expect(try target.read(at: GuestAddress(0), count: 32 * 4096) == source.read(at: GuestAddress(0), count: 32 * 4096))
    }

    @Test("a frame check (a data channel's: every page on its own channel) sees the table before any page is written; its refusal leaves memory untouched and ends the stream")
    func channelFrameCheckComesFirst() throws {
        struct NotHere: Error, Equatable { var pfn: UInt64 }
        let source = try GuestMemory(size: 1 << 20)
        try fillPages(source, [2, 3, 40])
        var writer = try StreamWriter(sink: BufferSink(), integrity: .channelAuthenticated)
        try writer.writeMemoryPages([2, 3, 40], from: source)
        try writer.finish()
        let memory = try marked()
        var reader = try StreamReader(source: BufferSource(writer.sink.bytes), integrity: .channelAuthenticated)
        var seen: [UInt64] = []
        #expect(throws: NotHere(pfn: 40)) {
            _ = try reader.nextSection(applyingMemoryTo: memory) { pfn in
                seen.append(pfn)
                if pfn >= 32 { throw NotHere(pfn: pfn) }
            }
        }
        #expect(seen == [2, 3, 40])
        #expect(try memory.read(at: GuestAddress(0), count: 1 << 20) == [UInt8](repeating: 0xEE, count: 1 << 20))
        // The reader is poisoned after a refusal: the next call repeats it.
        #expect(throws: NotHere(pfn: 40)) { _ = try reader.nextSection(applyingMemoryTo: memory) }
        // The same stream without the check lands whole.
        var again = try StreamReader(source: BufferSource(writer.sink.bytes), integrity: .channelAuthenticated)
        _ = try again.nextSection(applyingMemoryTo: memory)
        #expect(try memory.read(at: GuestAddress(40 * 4096), count: 4096) == source.read(at: GuestAddress(40 * 4096), count: 4096))
    }

    @Test("on an authenticated channel a hostile memory table (a page outside memory, frames out of order, a short or long payload, reserved bits) is refused before any page of its section is written")
    func channelHostileTableWritesNothing() throws {
        let page = [UInt8](repeating: 0x41, count: 4096)
        func section(_ entries: [UInt64], pages: Int) -> [UInt8] {
            var bytes: [UInt8] = []
            bytes.appendLittleEndian(UInt32(entries.count))
            bytes.appendLittleEndian(UInt32(0))
            for e in entries { bytes.appendLittleEndian(e) }
            for _ in 0..<pages { bytes += page }
            return bytes
        }
        let hostile: [(String, [UInt8])] = [
            ("a page past the end of memory", section([1, 2, 256], pages: 3)),
            ("frames out of order", section([1, 3, 2], pages: 3)),
            ("fewer pages than the table names", section([1, 2, 3], pages: 2)),
            ("more pages than the table names", section([1, 2], pages: 3)),
            ("reserved entry bits", section([1, 2 | (1 << 60)], pages: 2)),
            ("a count past the table", Array(section([1, 2], pages: 0).prefix(8)) + [UInt8](repeating: 0, count: 4)),
        ]
        for (what, payload) in hostile {
            let memory = try marked()
            let stream = rawChannelStream([(SectionType.memory.rawValue, payload), (SectionType.vcpu.rawValue, vcpuJSON),
                                           (SectionType.devices.rawValue, devicesJSON)])
            #expect(throws: SnapshotFormatError.self, "\(what)") { _ = try readChannelBody(stream, into: memory) }
            #expect(try memory.read(at: GuestAddress(0), count: 1 << 20) == [UInt8](repeating: 0xEE, count: 1 << 20), "\(what)")
        }
    }

    @Test("on an authenticated channel a stream cut inside a memory section's pages reports the rest of the section as missing, at the offset where it ran out")
    func channelCutInsidePages() throws {
        let source = try GuestMemory(size: 1 << 20)
        try fillPages(source, [4, 5, 6])
        var writer = try StreamWriter(sink: BufferSink(), integrity: .channelAuthenticated)
        try writer.writeMemoryPages([4, 5, 6], from: source)
        let full = writer.sink.bytes
        // Stream header 16, section header 16, count and table 8 + 24, then three pages: cut 100 bytes into the second.
        let payloadStart = 16 + 16
        let cut = payloadStart + 32 + 4096 + 100
        let memory = try marked()
        #expect(throws: SnapshotFormatError.truncated(offset: UInt64(cut), needed: UInt64(full.count - cut))) {
            _ = try readChannelBody(Array(full.prefix(cut)), into: memory)
        }
        // Whatever of the section's pages arrived is lost with its stream; no other page was touched.
        #expect(try memory.read(at: GuestAddress(0), count: 4 * 4096) == [UInt8](repeating: 0xEE, count: 4 * 4096))
        #expect(try memory.read(at: GuestAddress(7 * 4096), count: 4096) == [UInt8](repeating: 0xEE, count: 4096))
    }
}
