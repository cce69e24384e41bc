#if canImport(Glibc)
import Glibc
#endif
import CKVM
import SystemCalls

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

    let fd: OwnedFileDescriptor
    public let path: String

    /// Opens the KVM device and checks its API version.
    public init(path: String = KVMSystem.defaultPath) throws(KVMError) {
        do {
            self.fd = try OwnedFileDescriptor.open(path, O_RDWR | O_CLOEXEC)
        } catch {
            let hint: String
            switch error.errno {
            case ENOENT: hint = "\(path) does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) or enable virtualization"
            case EACCES, EPERM: hint = "no permission to open \(path): run as root or add your user to the kvm group"
            default: hint = "check that \(path) is the KVM device"
            }
            throw KVMError(error, hint: hint)
        }
        self.path = path
        try Self.checkAPIVersion(try apiVersion())
    }

    /// Refuses any API version but 12.
    public static func checkAPIVersion(_ version: Int32) throws(KVMError) {
        guard version == expectedAPIVersion else {
            throw KVMError(KVMRequest.getAPIVersion.name, errno: EINVAL,
                           hint: "the kernel reports API version \(version), this VMM needs \(expectedAPIVersion)")
        }
    }

    /// `KVM_GET_API_VERSION`.
    public func apiVersion() throws(KVMError) -> Int32 {
        try kvmIoctl(fd, .getAPIVersion)
    }

    /// `KVM_CHECK_EXTENSION`: 0 when absent, otherwise a capability-specific value.
    public func checkExtension(_ capability: Int32) -> Int32 {
        (try? kvmIoctl(fd, .checkExtension, UInt(capability))) ?? 0
    }

    /// `KVM_GET_VCPU_MMAP_SIZE`: the size of each vCPU's shared `kvm_run` area.
    public func vcpuMmapSize() throws(KVMError) -> Int {
        Int(try kvmIoctl(fd, .getVCPUMmapSize))
    }

    /// `KVM_GET_SUPPORTED_CPUID`: every leaf KVM can offer a guest on this host.
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        try readCPUID(fd, .getSupportedCPUID)
    }

    /// `KVM_CREATE_VM` with the default machine type.
    public func createVM() throws(KVMError) -> VirtualMachine {
        let raw = try kvmIoctl(fd, .createVM, 0)
        return try VirtualMachine(system: self, fd: OwnedFileDescriptor(taking: raw))
    }
}

/// Runs a `kvm_cpuid2`-filling ioctl, growing the buffer while KVM answers E2BIG.
func readCPUID(_ fd: OwnedFileDescriptor, _ request: KVMRequest) throws(KVMError) -> [CPUIDEntry] {
    try VariableLengthStruct<kvm_cpuid2, kvm_cpuid_entry2>.filling(
        count: \.nent, capacity: 128, maximum: 4096,
        { (p) throws(KVMError) in _ = try kvmIoctl(fd, request, p) },
        convert: { CPUIDEntry(function: $0.function, index: $0.index, flags: $0.flags,
                              eax: $0.eax, ebx: $0.ebx, ecx: $0.ecx, edx: $0.edx) })
}
