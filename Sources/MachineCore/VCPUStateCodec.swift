import Foundation
import KVM
import Snapshot

/// The vcpu section's payload in binary (docs/snapshot-format.md, "The vcpu section"): what a
/// migration sends inside its pause and a snapshot file keeps. JSON took 1-1.5 ms each way for
/// one vCPU (14 KB, most of it the XSAVE area in base64); this is a copy of the bytes.
///
///     magic "VCPUSTAT" (8) | version u32 = 2 | count u32 | count × vCPU
///     vCPU: id u32 | cpuid count u32, 7 × u32 each (function, index, flags, eax..edx)
///           | 18 × u64 registers (rax..r15, rip, rflags)
///           | 8 segments (cs ds es fs gs ss tr ldt): base u64, limit u32, selector u16,
///             type present dpl db s l g avl unusable (9 × u8), 1 byte 0
///           | gdt, idt: base u64, limit u16 | cr0 cr2 cr3 cr4 cr8 efer apic_base (7 × u64)
///           | interrupt bitmap count u32, u64 each
///           | xsave length u32, bytes | xcr count u32, (index u32, value u64) each
///           | debug registers length u32, bytes | msr count u32, (index u32, value u64) each
///           | mp_state u32 | events length u32, bytes
///
/// Little-endian. Every count and length is checked against its limit and against the bytes
/// left before anything is allocated; padding must be 0 and nothing may follow the last vCPU,
/// so one state has exactly one encoding. Version 1 is the JSON
/// array earlier VMMs wrote (it starts with `[`), still read.
public enum VCPUStateCodec {
    public static let magic = Array("VCPUSTAT".utf8)
    public static let version: UInt32 = 2

    /// Limits, well above what KVM has (64 vCPUs here, 256 CPUID entries, 16 XCRs).
    static let maxVCPUs = 1024
    static let maxCPUIDEntries = 4096
    static let maxInterruptWords = 64
    static let maxXsaveBytes = 1 << 20
    static let maxXCRs = 16
    static let maxRawBytes = 4096
    static let maxMSRs = 16384

    /// Whether `payload` is in this format (else it is read as the JSON of version 1).
    public static func isBinary(_ payload: [UInt8]) -> Bool {
        payload.count >= magic.count && payload[0..<magic.count].elementsEqual(magic)
    }

    public static func encode(_ vcpus: [VCPUState]) -> [UInt8] {
        var w = ByteWriter()
        w.bytes.reserveCapacity(256 + vcpus.reduce(0) { $0 + 1024 + $1.xsave.count + 28 * $1.cpuid.count + 12 * $1.msrs.count })
        w.bytes += magic
        w.u32(version)
        w.u32(UInt32(vcpus.count))
        for v in vcpus {
            w.u32(v.id)
            w.u32(UInt32(v.cpuid.count))
            for e in v.cpuid {
                for x in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] { w.u32(x) }
            }
            let r = v.registers
            for x in [r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
                      r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags] { w.u64(x) }
            let s = v.specialRegisters
            for g in [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt] {
                w.u64(g.base); w.u32(g.limit); w.u16(g.selector)
                w.bytes += [g.type, g.present, g.dpl, g.db, g.s, g.l, g.g, g.avl, g.unusable, 0]
            }
            for t in [s.gdt, s.idt] { w.u64(t.base); w.u16(t.limit) }
            for x in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apicBase] { w.u64(x) }
            w.u32(UInt32(s.interruptBitmap.count))
            for x in s.interruptBitmap { w.u64(x) }
            w.data(v.xsave)
            w.u32(UInt32(v.xcrs.count))
            for x in v.xcrs { w.u32(x.index); w.u64(x.value) }
            w.data(v.debugRegisters)
            w.u32(UInt32(v.msrs.count))
            for m in v.msrs { w.u32(m.index); w.u64(m.value) }
            w.u32(v.mpState)
            w.data(v.events)
        }
        return w.bytes
    }

    public static func decode(_ payload: [UInt8]) throws -> [VCPUState] {
        var r = ByteReader(payload)
        guard r.take(magic.count)?.elementsEqual(magic) == true else { throw r.fail("it does not start with VCPUSTAT") }
        let version = try r.u32("the version")
        guard version == Self.version else {
            throw r.fail(version > Self.version ? "version \(version) was written by a newer VMM; this one reads versions 1 and 2"
                                                : "version \(version) is not a binary version")
        }
        let count = try r.count("the vCPU count", max: maxVCPUs, each: 4)
        var vcpus: [VCPUState] = []
        vcpus.reserveCapacity(count)
        for _ in 0..<count {
            let id = try r.u32("a vCPU id")
            let nCPUID = try r.count("the CPUID entry count", max: maxCPUIDEntries, each: 28)
            var cpuid: [CPUIDEntry] = []
            cpuid.reserveCapacity(nCPUID)
            for _ in 0..<nCPUID {
                let f = try (0..<7).map { _ in try r.u32("a CPUID entry") }
                cpuid.append(CPUIDEntry(function: f[0], index: f[1], flags: f[2], eax: f[3], ebx: f[4], ecx: f[5], edx: f[6]))
            }
            var g = Registers()
            let x = try (0..<18).map { _ in try r.u64("the registers") }
            g.rax = x[0]; g.rbx = x[1]; g.rcx = x[2]; g.rdx = x[3]; g.rsi = x[4]; g.rdi = x[5]; g.rsp = x[6]; g.rbp = x[7]
            g.r8 = x[8]; g.r9 = x[9]; g.r10 = x[10]; g.r11 = x[11]; g.r12 = x[12]; g.r13 = x[13]; g.r14 = x[14]; g.r15 = x[15]
            g.rip = x[16]; g.rflags = x[17]
            var s = SpecialRegisters()
            var segments: [Segment] = []
            for _ in 0..<8 {
                var seg = Segment()
                seg.base = try r.u64("a segment"); seg.limit = try r.u32("a segment"); seg.selector = try r.u16("a segment")
                guard let slice = r.take(10) else { throw r.fail("a segment is cut short") }
                let b = Array(slice)
                guard b.last == 0 else { throw r.fail("a segment's padding byte is not 0") }
                seg.type = b[0]; seg.present = b[1]; seg.dpl = b[2]; seg.db = b[3]; seg.s = b[4]
                seg.l = b[5]; seg.g = b[6]; seg.avl = b[7]; seg.unusable = b[8]
                segments.append(seg)
            }
            s.cs = segments[0]; s.ds = segments[1]; s.es = segments[2]; s.fs = segments[3]
            s.gs = segments[4]; s.ss = segments[5]; s.tr = segments[6]; s.ldt = segments[7]
            s.gdt = DescriptorTable(base: try r.u64("the GDT"), limit: try r.u16("the GDT"))
            s.idt = DescriptorTable(base: try r.u64("the IDT"), limit: try r.u16("the IDT"))
            let c = try (0..<7).map { _ in try r.u64("the control registers") }
            s.cr0 = c[0]; s.cr2 = c[1]; s.cr3 = c[2]; s.cr4 = c[3]; s.cr8 = c[4]; s.efer = c[5]; s.apicBase = c[6]
            let nBitmap = try r.count("the interrupt bitmap length", max: maxInterruptWords, each: 8)
            s.interruptBitmap = try (0..<nBitmap).map { _ in try r.u64("the interrupt bitmap") }
            let xsave = try r.data("the XSAVE area", max: maxXsaveBytes)
            let nXCR = try r.count("the XCR count", max: maxXCRs, each: 12)
            let xcrs = try (0..<nXCR).map { _ in
                XCREntry(index: try r.u32("an XCR"), value: try r.u64("an XCR"))
            }
            let debug = try r.data("the debug registers", max: maxRawBytes)
            let nMSR = try r.count("the MSR count", max: maxMSRs, each: 12)
            var msrs: [MSREntry] = []
            msrs.reserveCapacity(nMSR)
            for _ in 0..<nMSR { msrs.append(MSREntry(index: try r.u32("an MSR"), value: try r.u64("an MSR"))) }
            let mpState = try r.u32("the MP state")
            let events = try r.data("the vCPU events", max: maxRawBytes)
            vcpus.append(VCPUState(id: id, cpuid: cpuid, registers: g, specialRegisters: s, xsave: xsave, xcrs: xcrs,
                                   debugRegisters: debug, msrs: msrs, mpState: mpState, events: events))
        }
        guard r.remaining == 0 else { throw r.fail("\(r.remaining) bytes follow the last vCPU") }
        return vcpus
    }

    private struct ByteWriter {
        var bytes: [UInt8] = []
        mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
        mutating func data(_ d: Data) { u32(UInt32(d.count)); bytes += d }
    }

    private struct ByteReader {
        let bytes: [UInt8]
        var offset = 0
        init(_ bytes: [UInt8]) { self.bytes = bytes }
        var remaining: Int { bytes.count - offset }

        func fail(_ reason: String) -> SnapshotFormatError {
            .malformedPayload(what: "vCPU section", reason: "\(reason) (at byte \(offset) of \(bytes.count))")
        }

        mutating func take(_ n: Int) -> ArraySlice<UInt8>? {
            guard n >= 0, n <= remaining else { return nil }
            defer { offset += n }
            return bytes[offset..<offset + n]
        }

        mutating func integer<T: FixedWidthInteger>(_ type: T.Type, _ what: String) throws -> T {
            let size = MemoryLayout<T>.size
            guard size <= remaining else { throw fail("\(what) is cut short") }
            var value = T.zero
            for i in 0..<size { value |= T(bytes[offset + i]) << (8 * i) }
            offset += size
            return value
        }
        mutating func u16(_ what: String) throws -> UInt16 { try integer(UInt16.self, what) }
        mutating func u32(_ what: String) throws -> UInt32 { try integer(UInt32.self, what) }
        mutating func u64(_ what: String) throws -> UInt64 { try integer(UInt64.self, what) }

        /// A count of items at least `each` bytes long: within `max`, and no more than the bytes
        /// left could hold (checked before the caller allocates for them).
        mutating func count(_ what: String, max: Int, each: Int) throws -> Int {
            let n = Int(try u32(what))
            guard n <= max else { throw fail("\(what) is \(n), more than \(max)") }
            guard n * each <= remaining else { throw fail("\(what) is \(n), but only \(remaining) bytes are left") }
            return n
        }

        mutating func data(_ what: String, max: Int) throws -> Data {
            let n = Int(try u32("the length of \(what)"))
            guard n <= max else { throw fail("\(what) is \(n) bytes, more than \(max)") }
            guard let b = take(n) else { throw fail("\(what) is \(n) bytes, but only \(remaining) are left") }
            return Data(b)
        }
    }
}
