import Foundation
import Testing
import TestSupport
import KVM
import Snapshot
@testable import MachineCore

/// A reproducible generator, so a failing fuzz case can be replayed.
private struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A vCPU state with every field random (the codec does not care what the values mean).
private func randomState(id: UInt32, _ g: inout SplitMix) -> VCPUState {
    func u8() -> UInt8 { UInt8.random(in: .min ... .max, using: &g) }
    func u32() -> UInt32 { UInt32.random(in: .min ... .max, using: &g) }
    func u64() -> UInt64 { UInt64.random(in: .min ... .max, using: &g) }
    func segment() -> Segment {
        var s = Segment()
        s.base = u64(); s.limit = u32(); s.selector = UInt16.random(in: .min ... .max, using: &g)
        s.type = u8(); s.present = u8(); s.dpl = u8(); s.db = u8(); s.s = u8(); s.l = u8(); s.g = u8(); s.avl = u8(); s.unusable = u8()
        return s
    }
    var r = Registers()
    r.rax = u64(); r.rbx = u64(); r.rcx = u64(); r.rdx = u64(); r.rsi = u64(); r.rdi = u64(); r.rsp = u64(); r.rbp = u64()
    r.r8 = u64(); r.r9 = u64(); r.r10 = u64(); r.r11 = u64(); r.r12 = u64(); r.r13 = u64(); r.r14 = u64(); r.r15 = u64()
    r.rip = u64(); r.rflags = u64()
    var s = SpecialRegisters()
    s.cs = segment(); s.ds = segment(); s.es = segment(); s.fs = segment(); s.gs = segment(); s.ss = segment()
    s.tr = segment(); s.ldt = segment()
    s.gdt = DescriptorTable(base: u64(), limit: UInt16.random(in: .min ... .max, using: &g))
    s.idt = DescriptorTable(base: u64(), limit: UInt16.random(in: .min ... .max, using: &g))
    s.cr0 = u64(); s.cr2 = u64(); s.cr3 = u64(); s.cr4 = u64(); s.cr8 = u64(); s.efer = u64(); s.apicBase = u64()
    s.interruptBitmap = [u64(), u64(), u64(), u64()]
    return VCPUState(id: id,
                     cpuid: (0..<Int.random(in: 0...80, using: &g)).map { _ in
                         CPUIDEntry(function: u32(), index: u32(), flags: u32(), eax: u32(), ebx: u32(), ecx: u32(), edx: u32()) },
                     registers: r, specialRegisters: s,
                     xsave: Data((0..<Int.random(in: 0...5000, using: &g)).map { _ in u8() }),
                     xcrs: (0..<Int.random(in: 0...3, using: &g)).map { _ in XCREntry(index: u32(), value: u64()) },
                     debugRegisters: Data((0..<128).map { _ in u8() }),
                     msrs: (0..<Int.random(in: 0...60, using: &g)).map { _ in MSREntry(index: u32(), value: u64()) },
                     mpState: u32(), events: Data((0..<64).map { _ in u8() }))
}

@Suite("The binary vCPU section (VCPUStateCodec)")
struct VCPUStateCodecTests {
    @Test("random vCPU states survive encoding and decoding unchanged, and old JSON sections still read")
    func roundTrip() throws {
        var g = SplitMix(state: 14)
        for count in [0, 1, 2, 7] {
            let states = (0..<count).map { randomState(id: UInt32($0), &g) }
            let payload = VCPUStateCodec.encode(states)
            #expect(VCPUStateCodec.isBinary(payload))
            #expect(try MachineStateCodec.decodeVCPUs(payload) == states)
            // Version 1: the JSON array earlier VMMs wrote.
            let json = try StateJSON.encode(states)
            #expect(!VCPUStateCodec.isBinary(json))
            #expect(try MachineStateCodec.decodeVCPUs(json) == states)
        }
    }

    @Test("every cut-short payload, a trailing byte, nonzero padding and a newer version are refused by name")
    func malformed() throws {
        var g = SplitMix(state: 3)
        let payload = VCPUStateCodec.encode([randomState(id: 0, &g), randomState(id: 1, &g)])
        for length in 0..<payload.count {
            #expect(throws: SnapshotFormatError.self) { try MachineStateCodec.decodeVCPUs(Array(payload[0..<length])) }
        }
        #expect(throws: SnapshotFormatError.self) { try VCPUStateCodec.decode(payload + [0]) }
        // The first segment's padding byte: magic, version, count, id, CPUID, registers, then base, limit, selector, 9 bytes.
        let cpuidCount = Int(payload[20]) | Int(payload[21]) << 8
        var padded = payload
        padded[24 + 28 * cpuidCount + 18 * 8 + 8 + 4 + 2 + 9] = 1
        let padding = #expect(throws: SnapshotFormatError.self) { try VCPUStateCodec.decode(padded) }
        #expect(padding?.description.contains("padding") == true)
        var newer = payload
        newer[8] = 3
        let version = #expect(throws: SnapshotFormatError.self) { try VCPUStateCodec.decode(newer) }
        #expect(version?.description.contains("newer VMM") == true)
    }

    @Test("a count or length larger than the bytes left is refused before anything is allocated for it")
    func hugeCounts() throws {
        var g = SplitMix(state: 5)
        let payload = VCPUStateCodec.encode([randomState(id: 0, &g)])
        for (offset, what) in [(12, "vCPU count"), (20, "CPUID entry count")] {
            var bad = payload
            bad.replaceSubrange(offset..<offset + 4, with: [0xFF, 0xFF, 0xFF, 0x7F])
            let error = #expect(throws: SnapshotFormatError.self) { try VCPUStateCodec.decode(bad) }
            #expect(error?.description.contains(what) == true, "\(error.map { "\($0)" } ?? "")")
            #expect(error?.description.contains("more than") == true)
        }
        // Within the limit (4096 entries) but more than is there: 4000 CPUID entries are 112,000 bytes.
        var bad = payload
        bad.replaceSubrange(20..<24, with: [0xA0, 0x0F, 0x00, 0x00])
        let error = #expect(throws: SnapshotFormatError.self) { try VCPUStateCodec.decode(bad) }
        #expect(error?.description.contains("bytes are left") == true)
    }

    @Test("random changes to a payload are either refused or decode to a state that encodes back to the same bytes")
    func fuzz() throws {
        var g = SplitMix(state: 99)
        let payload = VCPUStateCodec.encode([randomState(id: 0, &g), randomState(id: 1, &g)])
        var refused = 0
        for _ in 0..<3000 {
            var bytes = payload
            for _ in 0..<Int.random(in: 1...4, using: &g) {
                switch Int.random(in: 0..<3, using: &g) {
                case 0: bytes[Int.random(in: 0..<bytes.count, using: &g)] = UInt8.random(in: .min ... .max, using: &g)
                case 1: bytes.removeLast(Int.random(in: 0..<min(64, bytes.count), using: &g))
                default:
                    // A count or length field made large: the checks before allocation must hold.
                    let at = Int.random(in: 0..<(bytes.count - 4), using: &g)
                    bytes.replaceSubrange(at..<at + 4, with: [0xFF, 0xFF, UInt8.random(in: 0...0xFF, using: &g), 0xFF])
                }
            }
            do {
                let states = try VCPUStateCodec.decode(bytes)
                #expect(VCPUStateCodec.encode(states) == bytes)
            } catch is SnapshotFormatError {
                refused += 1
            }
        }
        #expect(refused > 0)
    }
}

@Suite("A real vCPU's state in the binary section", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct RealVCPUStateCodecTests {
    @Test("a paused guest's saved state encodes and decodes to exactly what was saved, smaller than its JSON")
    func realState() throws {
        let capture = SerialCapture()
        let machine = try bootMachine("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=20000"),
                                      serialOutput: capture.append)
        machine.start()
        defer { machine.requestStop(); _ = machine.waitForExit() }
        let deadline = Date().addingTimeInterval(60)
        while capture.count == 0 && Date() < deadline { usleep(10_000) }
        #expect(machine.pause())
        let state = try machine.saveState()
        let payloads = try MachineStateCodec.encode(state)
        let decoded = try MachineStateCodec.decode(StateBody(vcpus: payloads.vcpus, devices: payloads.devices),
                                                   description: state.description)
        #expect(decoded == state)
        #expect(payloads.vcpus.count < (try StateJSON.encode(state.vcpus)).count)
    }
}

@Suite("vCPU threads made ahead of the start", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct PrestartTests {
    @Test("a machine whose vCPU threads were made ahead stays created, then runs the guest once started")
    func prestartThenStart() throws {
        let capture = SerialCapture()
        let machine = try bootMachine("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=20000"),
                                      serialOutput: capture.append)
        machine.prestartVCPUThreads()
        #expect(machine.state == .created)
        machine.start()
        let deadline = Date().addingTimeInterval(60)
        while capture.count == 0 && Date() < deadline { usleep(10_000) }
        #expect(capture.count > 0, "the guest did not run after start")
        #expect(machine.pause())
        #expect(machine.state == .paused)
        machine.requestStop()
        #expect(machine.waitForExit(timeout: 60) == .stopped(signal: 0))
    }

    @Test("a machine whose vCPU threads were made ahead, ended before it starts, finishes and never runs")
    func prestartThenEnd() throws {
        let capture = SerialCapture()
        let machine = try bootMachine("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=20000"), serialOutput: capture.append)
        machine.prestartVCPUThreads()
        machine.end(with: .stoppedByOwner(reason: "refused"))
        #expect(machine.waitForExit(timeout: 60) == .stoppedByOwner(reason: "refused"))
        #expect(machine.state == .finished)
        machine.start()
        #expect(machine.waitForExit(timeout: 60) == .stoppedByOwner(reason: "refused"))
        #expect(capture.text.isEmpty)
    }
}
