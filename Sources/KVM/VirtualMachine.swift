#if canImport(Glibc)
import Glibc
#endif
import CKVM
import GuestMemory
import SystemCalls

/// A KVM virtual machine (the fd from `KVM_CREATE_VM`).
public final class VirtualMachine: Sendable {
    /// Where KVM on Intel keeps the three pages of its real-mode TSS; just below 4 GiB,
    /// above any RAM we map.
    public static let tssAddress: UInt = 0xFFFB_D000

    public let system: KVMSystem
    let fd: OwnedFileDescriptor

    init(system: KVMSystem, fd: OwnedFileDescriptor) throws(KVMError) {
        self.system = system
        self.fd = fd
        try setTSSAddress(Self.tssAddress)
    }

    /// `KVM_SET_TSS_ADDR`: needed on Intel before running real-mode code.
    public func setTSSAddress(_ address: UInt) throws(KVMError) {
        _ = try kvmIoctl(fd, .setTSSAddress, address)
    }

    /// `KVM_SET_USER_MEMORY_REGION`: maps host memory into a guest-physical slot.
    /// With the same slot, base and size, a call changes only the flags.
    public func setUserMemoryRegion(slot: UInt32, flags: UInt32, guestAddress: UInt64,
                                    size: UInt64, hostAddress: UInt) throws(KVMError) {
        var region = kvm_userspace_memory_region(slot: slot, flags: flags, guest_phys_addr: guestAddress,
                                                 memory_size: size, userspace_addr: UInt64(hostAddress))
        _ = try kvmIoctl(fd, .setUserMemoryRegion, &region)
    }

    /// Registers every region of `memory` as a memory slot.
    public func register(_ memory: GuestMemory, flags: UInt32 = 0) throws(KVMError) {
        for r in memory.regions {
            try setUserMemoryRegion(slot: r.slot, flags: flags, guestAddress: r.guestBase.raw,
                                    size: r.size, hostAddress: r.hostAddress)
        }
    }

    /// `KVM_CREATE_VCPU`, then maps its `kvm_run` area.
    public func createVCPU(id: UInt32) throws(KVMError) -> VCPU {
        let raw = try kvmIoctl(fd, .createVCPU, UInt(id))
        let descriptor = OwnedFileDescriptor(taking: raw)
        return try VCPU(vm: self, id: id, fd: descriptor, mmapSize: system.vcpuMmapSize())
    }
}
