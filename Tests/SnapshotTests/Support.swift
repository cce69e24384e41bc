#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import GuestMemory
@testable import Snapshot

/// Tiny seeded PRNG so every fuzz failure reproduces from its seed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

func environment(_ name: String) -> String? {
    getenv(name).map { String(cString: $0) }
}

/// Fills `pages` of `memory` with a pattern unique to each page, so misplaced pages show.
func fillPages(_ memory: GuestMemory, _ pages: [UInt64]) throws {
    for pfn in pages {
        var rng = SplitMix64(seed: pfn &* 31 &+ 7)
        let bytes = (0..<4096).map { _ in UInt8(truncatingIfNeeded: rng.next() | 1) }
        try memory.write(bytes, at: GuestAddress(pfn * 4096))
    }
}

let machineJSON = Array(#"{"memoryBytes":1048576,"vcpus":1}"#.utf8)
let vcpuJSON = Array(#"[{"rip":4096,"rsp":32768,"rflags":2}]"#.utf8)
let devicesJSON = Array(#"{"uart":{"lcr":3,"ier":0}}"#.utf8)

/// A small valid stream: three JSON sections and one memory section holding
/// `dataPages` with data plus `zeroPages` as markers.
func smallStream(dataPages: [UInt64] = [1, 3], zeroPages: [UInt64] = [2], json: Bool = true) throws -> [UInt8] {
    let memory = try GuestMemory(size: 1 << 20)
    try fillPages(memory, dataPages)
    var writer = try StreamWriter(sink: BufferSink())
    if json {
        try writer.writeSection(.machine, payload: machineJSON)
        try writer.writeSection(.vcpu, payload: vcpuJSON)
        try writer.writeSection(.devices, payload: devicesJSON)
    }
    let frames = (dataPages + zeroPages).sorted()
    if !frames.isEmpty { try writer.writeMemoryPages(frames, from: memory) }
    try writer.finish()
    return writer.sink.bytes
}

/// Where each section of a valid stream sits (end section included).
struct SectionLayout {
    var type: SectionType
    var offset: Int
    var length: Int
    var payloadStart: Int { offset + 16 }
    var checksumStart: Int { offset + 16 + length }
    var end: Int { offset + 16 + length + 32 }
}

func layout(of bytes: [UInt8]) throws -> [SectionLayout] {
    var reader = try StreamReader(source: BufferSource(bytes))
    var result: [SectionLayout] = []
    while let s = try reader.nextSection() {
        result.append(SectionLayout(type: s.type, offset: Int(s.offset), length: s.payload.count))
    }
    return result
}

/// Reads every section and applies memory sections to `memory`.
func decodeFully(_ bytes: [UInt8], into memory: GuestMemory) throws {
    var reader = try StreamReader(source: BufferSource(bytes))
    while let section = try reader.nextSection() {
        if section.type == .memory { _ = try MemorySection.apply(section, to: memory) }
    }
}

func decode(_ bytes: [UInt8]) throws -> [Section] {
    try StreamReader.readAll(from: BufferSource(bytes))
}

// MARK: - Hand-built streams (correct checksums, chosen defects)

func streamHeader(magic: [UInt8] = SnapshotFormat.magic, version: UInt32 = 1, flags: UInt32 = 0) -> [UInt8] {
    var bytes = magic
    bytes.appendLittleEndian(version)
    bytes.appendLittleEndian(flags)
    return bytes
}

/// One framed section with a valid checksum over whatever header it is given.
func frame(type: UInt32, flags: UInt32 = 0, length: UInt64? = nil, payload: [UInt8]) -> [UInt8] {
    let header = encodeSectionHeader(type: type, flags: flags, length: length ?? UInt64(payload.count))
    return header + payload + sha256(header, payload)
}

/// Header, the given framed sections, and a correct end section.
func rawStream(_ sections: [[UInt8]]) -> [UInt8] {
    let body = streamHeader() + sections.joined()
    return body + frame(type: 0xFFFF, payload: sha256(body))
}

/// A stream inside an authenticated channel: header naming that integrity, the sections framed
/// without checksums, and an empty end section.
func rawChannelStream(_ sections: [(type: UInt32, payload: [UInt8])]) -> [UInt8] {
    var bytes = streamHeader(flags: SectionIntegrity.channelAuthenticated.headerFlags)
    for section in sections { bytes += encodeSectionHeader(type: section.type, flags: 0, length: UInt64(section.payload.count)) + section.payload }
    return bytes + encodeSectionHeader(type: SectionType.end.rawValue, flags: 0, length: 0)
}

/// Reads every section of a channel stream, applying memory sections as they are read.
func decodeChannelFully(_ bytes: [UInt8], into memory: GuestMemory) throws {
    var reader = try StreamReader(source: BufferSource(bytes), integrity: .channelAuthenticated)
    while let item = try reader.nextSection(applyingMemoryTo: memory) {
        if case let .section(section) = item, section.type == .memory { _ = try MemorySection.apply(section, to: memory) }
    }
}

/// Reads a channel stream's body the way a migration does: memory applied as it is read.
func readChannelBody(_ bytes: [UInt8], into memory: GuestMemory) throws -> StateBody {
    var reader = try StreamReader(source: BufferSource(bytes), integrity: .channelAuthenticated)
    return try StateSequence.readBody(from: &reader, into: memory)
}

/// A memory payload with the given raw entries; data for each entry without bit 63
/// unless `dataPages` overrides how many pages of data follow.
func memoryPayload(entries: [UInt64], count: UInt32? = nil, reserved: UInt32 = 0, dataPages: Int? = nil) -> [UInt8] {
    var bytes: [UInt8] = []
    bytes.appendLittleEndian(count ?? UInt32(entries.count))
    bytes.appendLittleEndian(reserved)
    for e in entries { bytes.appendLittleEndian(e) }
    let stored = entries.filter { $0 & zeroFlag == 0 }.count
    let n: Int = dataPages ?? stored
    for i in 0..<n { bytes += [UInt8](repeating: UInt8(truncatingIfNeeded: i + 0x41), count: 4096) }
    return bytes
}

let zeroFlag: UInt64 = 1 << 63
