#if canImport(Glibc)
import Glibc
#endif
import CKVM
import SystemCalls

/// One KVM ioctl: its name (for errors) and its request number, kept together so
/// no call site can pair a name with the wrong number.
struct KVMRequest: Sendable, Equatable {
    let name: String
    let number: UInt

    /// The same request, named with a detail in errors, e.g. `KVM_ENABLE_CAP(192)`.
    func detailed(_ detail: String) -> KVMRequest { KVMRequest(name: "\(name)(\(detail))", number: number) }

    // System ioctls (on the /dev/kvm fd).
    static let getAPIVersion = KVMRequest(name: "KVM_GET_API_VERSION", number: CKVM_GET_API_VERSION)
    static let createVM = KVMRequest(name: "KVM_CREATE_VM", number: CKVM_CREATE_VM)
    static let checkExtension = KVMRequest(name: "KVM_CHECK_EXTENSION", number: CKVM_CHECK_EXTENSION)
    static let getVCPUMmapSize = KVMRequest(name: "KVM_GET_VCPU_MMAP_SIZE", number: CKVM_GET_VCPU_MMAP_SIZE)
    static let getSupportedCPUID = KVMRequest(name: "KVM_GET_SUPPORTED_CPUID", number: CKVM_GET_SUPPORTED_CPUID)
    static let getMSRIndexList = KVMRequest(name: "KVM_GET_MSR_INDEX_LIST", number: CKVM_GET_MSR_INDEX_LIST)

    // VM ioctls.
    static let createVCPU = KVMRequest(name: "KVM_CREATE_VCPU", number: CKVM_CREATE_VCPU)
    static let setUserMemoryRegion = KVMRequest(name: "KVM_SET_USER_MEMORY_REGION", number: CKVM_SET_USER_MEMORY_REGION)
    static let setTSSAddress = KVMRequest(name: "KVM_SET_TSS_ADDR", number: CKVM_SET_TSS_ADDR)
    static let getDirtyLog = KVMRequest(name: "KVM_GET_DIRTY_LOG", number: CKVM_GET_DIRTY_LOG)
    static let clearDirtyLog = KVMRequest(name: "KVM_CLEAR_DIRTY_LOG", number: CKVM_CLEAR_DIRTY_LOG)
    static let enableCapability = KVMRequest(name: "KVM_ENABLE_CAP", number: CKVM_ENABLE_CAP)
    static let resetDirtyRings = KVMRequest(name: "KVM_RESET_DIRTY_RINGS", number: CKVM_RESET_DIRTY_RINGS)

    // vCPU ioctls.
    static let run = KVMRequest(name: "KVM_RUN", number: CKVM_RUN)
    static let getRegisters = KVMRequest(name: "KVM_GET_REGS", number: CKVM_GET_REGS)
    static let setRegisters = KVMRequest(name: "KVM_SET_REGS", number: CKVM_SET_REGS)
    static let getSpecialRegisters = KVMRequest(name: "KVM_GET_SREGS", number: CKVM_GET_SREGS)
    static let setSpecialRegisters = KVMRequest(name: "KVM_SET_SREGS", number: CKVM_SET_SREGS)
    static let getCPUID = KVMRequest(name: "KVM_GET_CPUID2", number: CKVM_GET_CPUID2)
    static let setCPUID = KVMRequest(name: "KVM_SET_CPUID2", number: CKVM_SET_CPUID2)
    static let getXsave = KVMRequest(name: "KVM_GET_XSAVE", number: CKVM_GET_XSAVE)
    static let getXsave2 = KVMRequest(name: "KVM_GET_XSAVE2", number: CKVM_GET_XSAVE2)
    static let setXsave = KVMRequest(name: "KVM_SET_XSAVE", number: CKVM_SET_XSAVE)
    static let getXCRs = KVMRequest(name: "KVM_GET_XCRS", number: CKVM_GET_XCRS)
    static let setXCRs = KVMRequest(name: "KVM_SET_XCRS", number: CKVM_SET_XCRS)
    static let getDebugRegisters = KVMRequest(name: "KVM_GET_DEBUGREGS", number: CKVM_GET_DEBUGREGS)
    static let setDebugRegisters = KVMRequest(name: "KVM_SET_DEBUGREGS", number: CKVM_SET_DEBUGREGS)
    static let getMSRs = KVMRequest(name: "KVM_GET_MSRS", number: CKVM_GET_MSRS)
    static let setMSRs = KVMRequest(name: "KVM_SET_MSRS", number: CKVM_SET_MSRS)
    static let getVCPUEvents = KVMRequest(name: "KVM_GET_VCPU_EVENTS", number: CKVM_GET_VCPU_EVENTS)
    static let setVCPUEvents = KVMRequest(name: "KVM_SET_VCPU_EVENTS", number: CKVM_SET_VCPU_EVENTS)
    static let getMPState = KVMRequest(name: "KVM_GET_MP_STATE", number: CKVM_GET_MP_STATE)
    static let setMPState = KVMRequest(name: "KVM_SET_MP_STATE", number: CKVM_SET_MP_STATE)
    static let getTSCKHz = KVMRequest(name: "KVM_GET_TSC_KHZ", number: CKVM_GET_TSC_KHZ)
    static let setTSCKHz = KVMRequest(name: "KVM_SET_TSC_KHZ", number: CKVM_SET_TSC_KHZ)
}

/// The single place that calls `ioctl` with an integer argument: retries on `EINTR`
/// unless asked not to, and turns `-errno` into `KVMError` naming the request.
@inline(__always)
func kvmIoctl(_ fd: OwnedFileDescriptor, _ request: KVMRequest, _ arg: UInt = 0,
              retryOnInterrupt: Bool = true) throws(KVMError) -> Int32 {
    while true {
        let r = ckvm_ioctl_value(fd.raw, request.number, arg)
        if r >= 0 { return r }
        if -r == EINTR && retryOnInterrupt { continue }
        throw KVMError(request.name, errno: -r)
    }
}

/// As above, with a pointer argument (the struct the ioctl reads or fills).
@inline(__always)
func kvmIoctl(_ fd: OwnedFileDescriptor, _ request: KVMRequest, _ pointer: UnsafeMutableRawPointer?,
              retryOnInterrupt: Bool = true) throws(KVMError) -> Int32 {
    while true {
        let r = ckvm_ioctl_pointer(fd.raw, request.number, pointer)
        if r >= 0 { return r }
        if -r == EINTR && retryOnInterrupt { continue }
        throw KVMError(request.name, errno: -r)
    }
}

/// A KVM struct of a header with an entry count followed by a flexible array of
/// entries (`kvm_cpuid2`, `kvm_msrs`, `kvm_msr_list`): one zeroed heap buffer, freed
/// when this goes away. Every such ioctl is built through this, so the size and
/// offset arithmetic exists once.
struct VariableLengthStruct<Header, Entry>: ~Copyable {
    /// The header's entry-count field (`nent`, `nmsrs`).
    private let countField: WritableKeyPath<Header, UInt32>
    private let buffer: UnsafeMutableRawPointer
    /// How many entries the buffer holds.
    let capacity: Int

    /// Where the entries start: after the header, at the entries' alignment (the C
    /// flexible array member's offset).
    private static var entriesOffset: Int {
        let a = MemoryLayout<Entry>.alignment
        return (MemoryLayout<Header>.size + a - 1) / a * a
    }

    /// A zeroed struct with room for `capacity` entries and its count set to that.
    init(count countField: WritableKeyPath<Header, UInt32>, capacity: Int) {
        self.countField = countField
        self.capacity = capacity
        let bytes = Self.entriesOffset + capacity * MemoryLayout<Entry>.stride
        let alignment = max(MemoryLayout<Header>.alignment, MemoryLayout<Entry>.alignment, 16)
        buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: alignment)
        // SAFETY: the whole allocation is zeroed before being viewed as Header/Entry,
        // both plain C structs for which all-zero bytes are a valid value.
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        buffer.assumingMemoryBound(to: Header.self).pointee[keyPath: countField] = UInt32(capacity)
    }

    deinit { buffer.deallocate() }

    /// The struct, for the ioctl.
    var pointer: UnsafeMutableRawPointer { buffer }

    /// The header's entry count (what KVM wrote back, after a call that fills it).
    var count: Int { Int(buffer.assumingMemoryBound(to: Header.self).pointee[keyPath: countField]) }

    /// The entries: `count` of them, never more than there is room for.
    var entries: UnsafeMutableBufferPointer<Entry> {
        // SAFETY: inside the allocation: `capacity` entries start at `entriesOffset`.
        UnsafeMutableBufferPointer(start: (buffer + Self.entriesOffset).assumingMemoryBound(to: Entry.self),
                                   count: min(count, capacity))
    }
}

extension VariableLengthStruct {
    /// Runs an ioctl that fills the struct, growing the buffer while KVM answers
    /// `E2BIG` (to at least the count it reports, up to `maximum` entries), and
    /// returns the entries it filled, converted.
    static func filling<T>(count countField: WritableKeyPath<Header, UInt32>, capacity: Int, maximum: Int,
                           _ call: (UnsafeMutableRawPointer) throws(KVMError) -> Void,
                           convert: (Entry) -> T) throws(KVMError) -> [T] {
        var capacity = capacity
        while true {
            let s = VariableLengthStruct(count: countField, capacity: capacity)
            do throws(KVMError) {
                try call(s.pointer)
            } catch where error.errno == E2BIG && capacity < maximum {
                capacity = max(capacity * 2, s.count)
                continue
            }
            return s.entries.map(convert)
        }
    }

    /// A struct holding `values`, converted, with its count set to how many there are.
    init<T>(count countField: WritableKeyPath<Header, UInt32>, _ values: [T], convert: (T, inout Entry) -> Void) {
        self.init(count: countField, capacity: values.count)
        let out = entries
        for (i, v) in values.enumerated() { convert(v, &out[i]) }
    }
}
