#if canImport(Glibc)
import Glibc
#endif
import CKVM
import SystemCalls

/// Why `KVM_RUN` returned, decoded from `kvm_run`.
public enum VCPUExit: Sendable, Equatable {
    /// Port I/O. For `out`, `data` holds `count` items of `size` bytes; for `in`,
    /// answer with `VCPU.completeInput(_:)` before the next run.
    case io(port: UInt16, isWrite: Bool, size: Int, count: Int, data: [UInt8])
    /// Memory-mapped I/O to an address with no RAM. Answer reads with `VCPU.completeMMIORead(_:)`.
    case mmio(address: UInt64, isWrite: Bool, data: [UInt8])
    /// `HLT`; `interruptsEnabled` is RFLAGS.IF at that moment.
    case hlt(interruptsEnabled: Bool)
    /// Triple fault or a shutdown request.
    case shutdown
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest.
    case failEntry(reason: UInt64, cpu: UInt32)
    /// `KVM_EXIT_INTERNAL_ERROR` with its sub-error code.
    case internalError(suberror: UInt32)
    /// The run was interrupted by a signal or `immediate_exit` (EINTR).
    case interrupted
    /// `KVM_EXIT_SYSTEM_EVENT` (reset, shutdown, crash).
    case systemEvent(type: UInt32)
    /// `KVM_EXIT_DIRTY_RING_FULL`.
    case dirtyRingFull
    /// An exit reason this VMM does not expect.
    case unknown(reason: UInt32)
}

/// A virtual CPU: its fd and its mapped `kvm_run` area.
///
/// Thread-safety: `run()` and the register calls are made by the vCPU's own
/// thread; other threads only touch `immediateExit`, which KVM documents as the
/// way to kick a vCPU out of, or keep it from entering, `KVM_RUN`.
public final class VCPU: Sendable {
    public let id: UInt32
    public let vm: VirtualMachine
    let fd: OwnedFileDescriptor
    /// The vCPU's `kvm_run` area, shared with KVM, unmapped with the vCPU.
    private let runMapping: MemoryMapping
    private var mmapSize: Int { runMapping.length }
    private var runArea: UnsafeMutablePointer<kvm_run> { runMapping.base.assumingMemoryBound(to: kvm_run.self) }

    init(vm: VirtualMachine, id: UInt32, fd: OwnedFileDescriptor, mmapSize: Int) throws(KVMError) {
        do {
            runMapping = try MemoryMapping(length: mmapSize, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED,
                                           descriptor: fd, call: "mmap(kvm_run)")
        } catch {
            throw KVMError(error)
        }
        // SAFETY: KVM lays a `struct kvm_run` at the start of the mapping.
        _ = runMapping.base.bindMemory(to: kvm_run.self, capacity: 1)
        self.vm = vm
        self.id = id
        self.fd = fd
    }

    /// `kvm_run->immediate_exit`: when set, `KVM_RUN` completes pending I/O and
    /// returns EINTR without entering the guest.
    public var immediateExit: Bool {
        get { runArea.pointee.immediate_exit != 0 }
        set { runArea.pointee.immediate_exit = newValue ? 1 : 0 }
    }

    /// `KVM_RUN`. An interruption (EINTR) is returned as `.interrupted`, not thrown.
    public func run() throws(KVMError) -> VCPUExit {
        do throws(KVMError) {
            _ = try kvmIoctl(fd, .run, nil, retryOnInterrupt: false)
        } catch where error.errno == EINTR || error.errno == EAGAIN {
            return .interrupted
        }
        return decodeExit()
    }

    private func decodeExit() -> VCPUExit {
        let run = runArea.pointee
        switch Int32(run.exit_reason) {
        case KVM_EXIT_IO:
            let io = run.io
            let size = Int(io.size), count = Int(io.count)
            let isWrite = io.direction == UInt8(KVM_EXIT_IO_OUT)
            var data: [UInt8] = []
            if isWrite {
                // SAFETY: KVM places size*count bytes at data_offset inside the mapping.
                let start = UnsafeRawPointer(runArea) + Int(io.data_offset)
                data = Array(UnsafeRawBufferPointer(start: start, count: min(size * count, mmapSize - Int(io.data_offset))))
            }
            return .io(port: io.port, isWrite: isWrite, size: size, count: count, data: data)
        case KVM_EXIT_MMIO:
            let m = run.mmio
            let length = Int(min(m.len, 8))
            let bytes = withUnsafeBytes(of: m.data) { Array($0.prefix(length)) }
            return .mmio(address: m.phys_addr, isWrite: m.is_write != 0, data: m.is_write != 0 ? bytes : [UInt8](repeating: 0, count: length))
        case KVM_EXIT_HLT:
            return .hlt(interruptsEnabled: run.if_flag != 0)
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(reason: run.fail_entry.hardware_entry_failure_reason, cpu: run.fail_entry.cpu)
        case KVM_EXIT_INTERNAL_ERROR:
            return .internalError(suberror: run.internal.suberror)
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: run.system_event.type)
        case KVM_EXIT_DIRTY_RING_FULL:
            return .dirtyRingFull
        case KVM_EXIT_INTR:
            return .interrupted
        default:
            return .unknown(reason: run.exit_reason)
        }
    }

    /// Answers an `in` exit: the bytes the guest reads (size*count of them).
    public func completeInput(_ bytes: [UInt8]) {
        let io = runArea.pointee.io
        let n = min(bytes.count, Int(io.size) * Int(io.count), mmapSize - Int(io.data_offset))
        // SAFETY: within the mapping, at the offset KVM named.
        let dst = UnsafeMutableRawPointer(runArea) + Int(io.data_offset)
        bytes.withUnsafeBytes { dst.copyMemory(from: $0.baseAddress!, byteCount: n) }
    }

    /// Answers an MMIO read.
    public func completeMMIORead(_ bytes: [UInt8]) {
        withUnsafeMutableBytes(of: &runArea.pointee.mmio.data) { buf in
            for i in 0..<min(bytes.count, buf.count) { buf[i] = bytes[i] }
        }
    }

    /// `KVM_GET_REGS`.
    public func registers() throws(KVMError) -> Registers {
        var r = kvm_regs()
        _ = try kvmIoctl(fd, .getRegisters, &r)
        return Registers(r)
    }

    /// `KVM_SET_REGS`.
    public func setRegisters(_ regs: Registers) throws(KVMError) {
        var r = regs.kvm
        _ = try kvmIoctl(fd, .setRegisters, &r)
    }

    /// `KVM_GET_SREGS`.
    public func specialRegisters() throws(KVMError) -> SpecialRegisters {
        var s = kvm_sregs()
        _ = try kvmIoctl(fd, .getSpecialRegisters, &s)
        return SpecialRegisters(s)
    }

    /// `KVM_SET_SREGS`.
    public func setSpecialRegisters(_ sregs: SpecialRegisters) throws(KVMError) {
        var s = sregs.kvm
        _ = try kvmIoctl(fd, .setSpecialRegisters, &s)
    }

    /// `KVM_SET_CPUID2`.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
        let cpuid = VariableLengthStruct<kvm_cpuid2, kvm_cpuid_entry2>(count: \.nent, entries) { e, out in
            out.function = e.function; out.index = e.index; out.flags = e.flags
            out.eax = e.eax; out.ebx = e.ebx; out.ecx = e.ecx; out.edx = e.edx
        }
        _ = try kvmIoctl(fd, .setCPUID, cpuid.pointer)
    }

    /// `KVM_GET_TSC_KHZ`: the guest TSC frequency.
    public func tscKHz() throws(KVMError) -> UInt32 {
        UInt32(try kvmIoctl(fd, .getTSCKHz))
    }
}
