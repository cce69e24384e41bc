#if canImport(Glibc)
import Glibc
#endif
import CKVM

/// One CPUID leaf as KVM reports and takes it.
public struct CPUIDEntry: Sendable, Equatable, Codable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32
    public init(function: UInt32, index: UInt32, flags: UInt32, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }
}

/// The `/dev/kvm` handle: API version, capabilities, and VM creation.
public final class KVMSystem: Sendable {
    public static let defaultPath = "/dev/kvm"
    /// The only KVM API version there has ever been; anything else is refused.
    public static let expectedAPIVersion: Int32 = 12

    let fd: OwnedDescriptor
    public let path: String

    /// Opens the KVM device and checks its API version.
    public init(path: String = KVMSystem.defaultPath) throws(KVMError) {
        let raw = open(path, O_RDWR | O_CLOEXEC)
        guard raw >= 0 else {
            let e = errno
            let hint: String
            switch e {
            case ENOENT: hint = "\(path) does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) or enable virtualization"
            case EACCES, EPERM: hint = "no permission to open \(path): run as root or add your user to the kvm group"
            default: hint = "check that \(path) is the KVM device"
            }
            throw KVMError("open(\(path))", errno: e, hint: hint)
        }
        self.fd = OwnedDescriptor(raw)
        self.path = path
        try Self.checkAPIVersion(try apiVersion())
    }

    /// Refuses any API version but 12.
    public static func checkAPIVersion(_ version: Int32) throws(KVMError) {
        guard version == expectedAPIVersion else {
            throw KVMError("KVM_GET_API_VERSION", errno: EINVAL,
                           hint: "the kernel reports API version \(version), this VMM needs \(expectedAPIVersion)")
        }
    }

    /// `KVM_GET_API_VERSION`.
    public func apiVersion() throws(KVMError) -> Int32 {
        try kvmIoctl(fd.raw, "KVM_GET_API_VERSION", CKVM_GET_API_VERSION)
    }

    /// `KVM_CHECK_EXTENSION`: 0 when absent, otherwise a capability-specific value.
    public func checkExtension(_ capability: Int32) -> Int32 {
        (try? kvmIoctl(fd.raw, "KVM_CHECK_EXTENSION", CKVM_CHECK_EXTENSION, UInt(capability))) ?? 0
    }

    /// `KVM_GET_VCPU_MMAP_SIZE`: the size of each vCPU's shared `kvm_run` area.
    public func vcpuMmapSize() throws(KVMError) -> Int {
        Int(try kvmIoctl(fd.raw, "KVM_GET_VCPU_MMAP_SIZE", CKVM_GET_VCPU_MMAP_SIZE))
    }

    /// `KVM_GET_SUPPORTED_CPUID`: every leaf KVM can offer a guest on this host.
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        try readCPUID(fd: fd.raw, name: "KVM_GET_SUPPORTED_CPUID", request: CKVM_GET_SUPPORTED_CPUID)
    }

    /// `KVM_CREATE_VM` with the default machine type.
    public func createVM() throws(KVMError) -> VirtualMachine {
        let raw = try kvmIoctl(fd.raw, "KVM_CREATE_VM", CKVM_CREATE_VM, 0)
        return try VirtualMachine(system: self, fd: OwnedDescriptor(raw))
    }
}

/// Runs a `kvm_cpuid2`-filling ioctl, growing the buffer while KVM answers E2BIG.
func readCPUID(fd: Int32, name: String, request: UInt) throws(KVMError) -> [CPUIDEntry] {
    var capacity = 128
    while true {
        let bytes = MemoryLayout<kvm_cpuid2>.size + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 16)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        let header = buffer.assumingMemoryBound(to: kvm_cpuid2.self)
        header.pointee.nent = UInt32(capacity)
        do throws(KVMError) {
            _ = try kvmIoctl(fd, name, request, buffer)
        } catch where error.errno == E2BIG && capacity < 4096 {
            capacity *= 2
            continue
        }
        let entries = (buffer + MemoryLayout<kvm_cpuid2>.size).assumingMemoryBound(to: kvm_cpuid_entry2.self)
        return (0..<Int(header.pointee.nent)).map { i in
            let e = entries[i]
            return CPUIDEntry(function: e.function, index: e.index, flags: e.flags,
                              eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
        }
    }
}
