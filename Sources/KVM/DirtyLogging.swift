#if canImport(Glibc)
import Glibc
#endif
import CKVM
import GuestMemory
import SystemCalls

/// The KVM capabilities dirty tracking is built on, for `checkExtension` and
/// `enableCapability`, so that callers need not import <linux/kvm.h>.
public enum DirtyLogCapability {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: fetching the log does not re-protect pages.
    public static let manualProtect = Int32(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    /// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`, the bit of `manualProtect` that turns it on.
    public static let manualProtectEnable = UInt64(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    /// `KVM_CAP_DIRTY_LOG_RING`: per-vCPU rings; `checkExtension` gives their maximum size in bytes.
    public static let ring = Int32(KVM_CAP_DIRTY_LOG_RING)
}

extension VirtualMachine {
    /// `KVM_ENABLE_CAP` on the VM.
    public func enableCapability(_ capability: UInt32, _ args: [UInt64] = []) throws(KVMError) {
        var cap = kvm_enable_cap()
        cap.cap = capability
        withUnsafeMutableBytes(of: &cap.args) { raw in
            let a = raw.bindMemory(to: UInt64.self)
            for (i, v) in args.prefix(4).enumerated() { a[i] = v }
        }
        _ = try kvmIoctl(fd, KVMRequest.enableCapability.detailed("\(capability)"), &cap)
    }

    /// `KVM_GET_DIRTY_LOG` for one slot into `bitmap` (one bit per page of the slot).
    public func dirtyLog(slot: UInt32, into bitmap: UnsafeMutableRawPointer) throws(KVMError) {
        var log = kvm_dirty_log()
        log.slot = slot
        log.dirty_bitmap = bitmap
        _ = try kvmIoctl(fd, .getDirtyLog, &log)
    }

    /// `KVM_CLEAR_DIRTY_LOG`: re-protects the pages whose bits are set in `mask`,
    /// starting at slot-relative page `firstPage` (a multiple of 64).
    public func clearDirtyLog(slot: UInt32, firstPage: UInt64, pageCount: UInt32, mask: UInt64) throws(KVMError) {
        var bits = mask
        var clear = kvm_clear_dirty_log()
        clear.slot = slot
        clear.first_page = firstPage
        clear.num_pages = pageCount
        try withUnsafeMutableBytes(of: &bits) { (p) throws(KVMError) in
            clear.dirty_bitmap = p.baseAddress
            _ = try kvmIoctl(fd, .clearDirtyLog, &clear)
        }
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects every harvested ring entry.
    public func resetDirtyRings() throws(KVMError) {
        _ = try kvmIoctl(fd, .resetDirtyRings)
    }

    /// Switches dirty logging on or off for every slot of `memory` (a flags-only
    /// `KVM_SET_USER_MEMORY_REGION`).
    public func setDirtyLogging(_ on: Bool, for memory: GuestMemory) throws(KVMError) {
        try register(memory, flags: on ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0)
    }
}

/// One dirty page reported in a ring.
public struct DirtyRingEntry: Sendable, Equatable {
    /// The memory slot (the entry's slot field without its address-space half).
    public var slot: UInt32
    /// The page's index within the slot.
    public var offset: UInt64
}

/// A vCPU's dirty ring (`struct kvm_dirty_gfn` entries), mapped from its fd and
/// unmapped when the last user lets go. Only the entry layout and the flag
/// protocol live here; when to harvest is the tracker's business.
public final class DirtyRing: Sendable {
    /// Bytes per entry.
    public static let entrySize = MemoryLayout<kvm_dirty_gfn>.stride
    /// How many entries the ring holds.
    public let entryCount: UInt32
    private let mapping: MemoryMapping

    init(mapping: MemoryMapping) {
        self.mapping = mapping
        entryCount = UInt32(mapping.length / Self.entrySize)
    }

    private func entry(_ index: UInt32) -> UnsafeMutablePointer<kvm_dirty_gfn> {
        // SAFETY: the index is reduced modulo the ring size, so the entry lies inside the mapping.
        (mapping.base + Int(index % entryCount) * Self.entrySize).assumingMemoryBound(to: kvm_dirty_gfn.self)
    }

    /// The entry at `index` (a free-running counter) if KVM has published it as dirty.
    public func dirtyEntry(at index: UInt32) -> DirtyRingEntry? {
        let e = entry(index)
        // x86 keeps loads in order; KVM publishes the entry before setting DIRTY.
        guard e.pointee.flags & CKVM_DIRTY_GFN_F_DIRTY != 0 else { return nil }
        return DirtyRingEntry(slot: e.pointee.slot & 0xFFFF, offset: e.pointee.offset)
    }

    /// Hands the entry at `index` back to KVM; it is recycled by `resetDirtyRings()`.
    public func markHarvested(at index: UInt32) {
        entry(index).pointee.flags = CKVM_DIRTY_GFN_F_RESET
    }
}

extension VCPU {
    /// Maps this vCPU's dirty ring of `bytes` (at `KVM_DIRTY_LOG_PAGE_OFFSET` of the vCPU fd).
    public func mapDirtyRing(bytes: Int) throws(KVMError) -> DirtyRing {
        let offset = off_t(KVM_DIRTY_LOG_PAGE_OFFSET) * off_t(sysconf(Int32(_SC_PAGESIZE)))
        do {
            return DirtyRing(mapping: try MemoryMapping(length: bytes, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED,
                                                        descriptor: fd, offset: offset, call: "mmap(dirty ring)"))
        } catch {
            throw KVMError(error)
        }
    }
}
