#if canImport(Glibc)
import Glibc
#endif
import CKVM
import Foundation

/// One model-specific register.
public struct MSREntry: Sendable, Equatable, Codable {
    public var index: UInt32
    public var value: UInt64
    public init(index: UInt32, value: UInt64) { self.index = index; self.value = value }
}

/// One extended control register (XCR0, ...).
public struct XCREntry: Sendable, Equatable, Codable {
    public var index: UInt32
    public var value: UInt64
    public init(index: UInt32, value: UInt64) { self.index = index; self.value = value }
}

/// Everything that defines a vCPU, as saved for a snapshot or migration.
/// Fixed-size KVM structs are kept as their raw bytes, so nothing is lost in
/// translation; their sizes are checked on restore.
public struct VCPUState: Sendable, Equatable, Codable {
    public var id: UInt32
    public var cpuid: [CPUIDEntry]
    public var registers: Registers
    public var specialRegisters: SpecialRegisters
    /// `KVM_GET_XSAVE2` area (includes the legacy FPU/SSE state).
    public var xsave: Data
    public var xcrs: [XCREntry]
    /// Raw `struct kvm_debugregs`.
    public var debugRegisters: Data
    public var msrs: [MSREntry]
    public var mpState: UInt32
    /// Raw `struct kvm_vcpu_events`.
    public var events: Data

    public init(id: UInt32, cpuid: [CPUIDEntry], registers: Registers, specialRegisters: SpecialRegisters, xsave: Data,
                xcrs: [XCREntry], debugRegisters: Data, msrs: [MSREntry], mpState: UInt32, events: Data) {
        self.id = id; self.cpuid = cpuid; self.registers = registers; self.specialRegisters = specialRegisters
        self.xsave = xsave; self.xcrs = xcrs; self.debugRegisters = debugRegisters; self.msrs = msrs
        self.mpState = mpState; self.events = events
    }
}

extension VCPU {
    /// `KVM_GET_XSAVE2` (or `KVM_GET_XSAVE` when the kernel lacks XSAVE2).
    public func xsave() throws(KVMError) -> Data {
        let size = max(Int(vm.system.checkExtension(KVM_CAP_XSAVE2)), MemoryLayout<kvm_xsave>.size)
        let request: KVMRequest = vm.system.checkExtension(KVM_CAP_XSAVE2) > 0 ? .getXsave2 : .getXsave
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        _ = try kvmIoctl(fd, request, buffer)
        return Data(bytes: buffer, count: size)
    }

    /// `KVM_SET_XSAVE` with an area of the size this kernel uses.
    public func setXsave(_ area: Data) throws(KVMError) {
        let size = max(Int(vm.system.checkExtension(KVM_CAP_XSAVE2)), MemoryLayout<kvm_xsave>.size)
        guard area.count == size else {
            throw KVMError(KVMRequest.setXsave.name, errno: EINVAL, hint: "the saved XSAVE area is \(area.count) bytes, this host uses \(size)")
        }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
        defer { buffer.deallocate() }
        area.copyBytes(to: buffer.assumingMemoryBound(to: UInt8.self), count: size)
        _ = try kvmIoctl(fd, .setXsave, buffer)
    }

    /// `KVM_GET_XCRS`.
    public func xcrs() throws(KVMError) -> [XCREntry] {
        var x = kvm_xcrs()
        _ = try kvmIoctl(fd, .getXCRs, &x)
        let n = Int(min(x.nr_xcrs, 16))
        return withUnsafeBytes(of: x.xcrs) { raw in
            let entries = raw.bindMemory(to: kvm_xcr.self)
            return (0..<n).map { XCREntry(index: entries[$0].xcr, value: entries[$0].value) }
        }
    }

    /// `KVM_SET_XCRS`.
    public func setXcrs(_ list: [XCREntry]) throws(KVMError) {
        guard list.count <= 16 else { throw KVMError(KVMRequest.setXCRs.name, errno: E2BIG, hint: "at most 16 XCRs") }
        var x = kvm_xcrs()
        x.nr_xcrs = UInt32(list.count)
        withUnsafeMutableBytes(of: &x.xcrs) { raw in
            let entries = raw.bindMemory(to: kvm_xcr.self)
            for (i, e) in list.enumerated() { entries[i].xcr = e.index; entries[i].value = e.value }
        }
        _ = try kvmIoctl(fd, .setXCRs, &x)
    }

    /// `KVM_GET_DEBUGREGS`, as raw bytes.
    public func debugRegisters() throws(KVMError) -> Data {
        var d = kvm_debugregs()
        _ = try kvmIoctl(fd, .getDebugRegisters, &d)
        return withUnsafeBytes(of: d) { Data($0) }
    }

    /// `KVM_SET_DEBUGREGS` from raw bytes.
    public func setDebugRegisters(_ raw: Data) throws(KVMError) {
        var d = kvm_debugregs()
        guard raw.count == MemoryLayout<kvm_debugregs>.size else {
            throw KVMError(KVMRequest.setDebugRegisters.name, errno: EINVAL, hint: "saved debug registers have the wrong size")
        }
        withUnsafeMutableBytes(of: &d) { _ = raw.copyBytes(to: $0) }
        _ = try kvmIoctl(fd, .setDebugRegisters, &d)
    }

    /// `KVM_GET_VCPU_EVENTS`, as raw bytes.
    public func events() throws(KVMError) -> Data {
        var e = kvm_vcpu_events()
        _ = try kvmIoctl(fd, .getVCPUEvents, &e)
        return withUnsafeBytes(of: e) { Data($0) }
    }

    /// `KVM_SET_VCPU_EVENTS` from raw bytes; NMI, SIPI and interrupt-shadow state are marked valid.
    public func setEvents(_ raw: Data) throws(KVMError) {
        var e = kvm_vcpu_events()
        guard raw.count == MemoryLayout<kvm_vcpu_events>.size else {
            throw KVMError(KVMRequest.setVCPUEvents.name, errno: EINVAL, hint: "saved vCPU events have the wrong size")
        }
        withUnsafeMutableBytes(of: &e) { _ = raw.copyBytes(to: $0) }
        e.flags |= UInt32(KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR | KVM_VCPUEVENT_VALID_SHADOW)
        _ = try kvmIoctl(fd, .setVCPUEvents, &e)
    }

    /// `KVM_GET_MP_STATE`.
    public func mpState() throws(KVMError) -> UInt32 {
        var m = kvm_mp_state()
        _ = try kvmIoctl(fd, .getMPState, &m)
        return m.mp_state
    }

    /// `KVM_SET_MP_STATE`.
    public func setMPState(_ state: UInt32) throws(KVMError) {
        var m = kvm_mp_state(mp_state: state)
        _ = try kvmIoctl(fd, .setMPState, &m)
    }

    /// `KVM_GET_MSRS` for `indices`. KVM returns how many it read; fewer than asked is
    /// an error naming the first MSR it could not read, never a silent gap.
    public func msrs(_ indices: [UInt32]) throws(KVMError) -> [MSREntry] {
        if indices.isEmpty { return [] }
        let msrs = VariableLengthStruct<kvm_msrs, kvm_msr_entry>(count: \.nmsrs, indices) { index, out in out.index = index }
        let read = Int(try kvmIoctl(fd, .getMSRs, msrs.pointer))
        guard read == indices.count else {
            throw KVMError(KVMRequest.getMSRs.name, errno: EIO,
                           hint: "read \(read) of \(indices.count) MSRs; MSR 0x\(String(indices[read], radix: 16)) could not be read")
        }
        return msrs.entries.prefix(read).map { MSREntry(index: $0.index, value: $0.data) }
    }

    /// `KVM_SET_MSRS`; fewer written than given is an error naming the MSR.
    public func setMSRs(_ list: [MSREntry]) throws(KVMError) {
        if list.isEmpty { return }
        let msrs = VariableLengthStruct<kvm_msrs, kvm_msr_entry>(count: \.nmsrs, list) { e, out in
            out.index = e.index; out.data = e.value
        }
        let written = Int(try kvmIoctl(fd, .setMSRs, msrs.pointer))
        guard written == list.count else {
            throw KVMError(KVMRequest.setMSRs.name, errno: EIO,
                           hint: "wrote \(written) of \(list.count) MSRs; MSR 0x\(String(list[written].index, radix: 16)) was refused")
        }
    }

    /// `KVM_SET_TSC_KHZ` (needs `KVM_CAP_TSC_CONTROL`).
    public func setTscKHz(_ khz: UInt32) throws(KVMError) {
        _ = try kvmIoctl(fd, .setTSCKHz, UInt(khz))
    }

    /// `KVM_GET_CPUID2`: the CPUID this vCPU was given.
    public func cpuid() throws(KVMError) -> [CPUIDEntry] {
        try readCPUID(fd, .getCPUID)
    }

    /// Saves the whole vCPU. Call only while the vCPU is paused (not inside `KVM_RUN`).
    public func saveState(msrIndices: [UInt32]) throws(KVMError) -> VCPUState {
        VCPUState(id: id, cpuid: try cpuid(), registers: try registers(), specialRegisters: try specialRegisters(),
                  xsave: try xsave(), xcrs: try xcrs(), debugRegisters: try debugRegisters(),
                  msrs: try msrs(msrIndices), mpState: try mpState(), events: try events())
    }

    /// Restores a vCPU in the order KVM needs: CPUID, special registers, registers,
    /// XSAVE, XCRs, debug registers, MSRs, MP state, and vCPU events last.
    /// `currentCPUID`: this vCPU's table if the caller has read it. Equal to the saved one (a vCPU
    /// made on the same host), it is not set again: `KVM_SET_CPUID2` is the slowest call here
    /// (about 0.1 ms under nested KVM), and a migration makes it inside the guest's downtime.
    public func restoreState(_ s: VCPUState, currentCPUID: [CPUIDEntry]? = nil) throws(KVMError) {
        if currentCPUID != s.cpuid { try setCPUID(s.cpuid) }
        try setSpecialRegisters(s.specialRegisters)
        try setRegisters(s.registers)
        try setXsave(s.xsave)
        try setXcrs(s.xcrs)
        try setDebugRegisters(s.debugRegisters)
        try setMSRs(s.msrs)
        try setMPState(s.mpState)
        try setEvents(s.events)
    }
}

extension KVMSystem {
    /// `KVM_GET_MSR_INDEX_LIST`: the MSRs KVM says can be saved and restored.
    public func msrIndexList() throws(KVMError) -> [UInt32] {
        try VariableLengthStruct<kvm_msr_list, UInt32>.filling(
            count: \.nmsrs, capacity: 512, maximum: 16384,
            { (p) throws(KVMError) in _ = try kvmIoctl(fd, .getMSRIndexList, p) },
            convert: { $0 })
    }
}
