#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import KVM
import Synchronization

/// Dirty tracking with per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`). The ring
/// must be enabled before any vCPU exists. A vCPU whose ring fills exits with
/// `KVM_EXIT_DIRTY_RING_FULL` and harvests all rings itself before going on.
public final class DirtyRingTracker: DirtyTracker {
    public let name = "ring"
    public static let defaultEntries: UInt32 = 16384

    let vm: VirtualMachine
    let memory: GuestMemory
    private let rings: [DirtyRing]
    /// Each slot's first guest page, to turn slot-relative entries into guest pages.
    private let slotBases: [UInt32: UInt64]

    /// What harvesting changes: each ring's next index to read, and the pages
    /// harvested but not yet collected.
    private struct Harvest {
        var next: [UInt32]
        var pending: DirtyBitmap
    }
    private let harvest: Mutex<Harvest>

    /// Enables the ring on `vm`; call before creating vCPUs.
    public static func prepare(vm: VirtualMachine, entries: UInt32 = defaultEntries) throws(KVMError) {
        let maxBytes = vm.system.checkExtension(DirtyLogCapability.ring)
        guard maxBytes > 0 else {
            throw KVMError("KVM_CAP_DIRTY_LOG_RING", errno: ENOTSUP, hint: "this kernel has no dirty ring; use the bitmap dirty tracker")
        }
        let bytes = min(UInt64(entries) * UInt64(DirtyRing.entrySize), UInt64(maxBytes))
        try vm.enableCapability(UInt32(DirtyLogCapability.ring), [bytes])
    }

    /// Maps each vCPU's ring.
    public init(vm: VirtualMachine, vcpus: [VCPU], memory: GuestMemory, entries: UInt32 = defaultEntries) throws(KVMError) {
        self.vm = vm
        self.memory = memory
        let maxBytes = UInt64(vm.system.checkExtension(DirtyLogCapability.ring))
        let bytes = min(UInt64(entries) * UInt64(DirtyRing.entrySize), maxBytes)
        var slotBases: [UInt32: UInt64] = [:]
        for r in memory.regions { slotBases[r.slot] = r.guestBase.raw / GuestMemory.pageSize }
        self.slotBases = slotBases
        var rings: [DirtyRing] = []
        for vcpu in vcpus { rings.append(try vcpu.mapDirtyRing(bytes: Int(bytes))) }
        self.rings = rings
        harvest = Mutex(Harvest(next: Array(repeating: 0, count: rings.count), pending: DirtyBitmap(pageCount: memory.pageCount)))
    }

    public func enable() throws {
        memory.startLoggingVMMWrites()
        try vm.setDirtyLogging(true, for: memory)
    }

    public func disable() throws {
        try vm.setDirtyLogging(false, for: memory)
        memory.stopLoggingVMMWrites()
        try harvest.withLock { h in
            try harvestLocked(&h)
            h.pending.removeAll()
        }
    }

    /// Reads every ring's dirty entries into `pending`, hands them back, and has KVM
    /// re-protect them.
    private func harvestLocked(_ h: inout Harvest) throws {
        var any = false
        for (i, ring) in rings.enumerated() {
            var next = h.next[i]
            while let entry = ring.dirtyEntry(at: next) {
                if let base = slotBases[entry.slot] { h.pending.set(base + entry.offset) }
                ring.markHarvested(at: next)
                next &+= 1
                any = true
            }
            h.next[i] = next
        }
        if any {
            try vm.resetDirtyRings()
        }
    }

    /// Called by a vCPU thread on `KVM_EXIT_DIRTY_RING_FULL`.
    public func harvestFull() throws {
        try harvest.withLock { h in try harvestLocked(&h) }
    }

    public func collect() throws -> DirtyBitmap {
        try harvest.withLock { h in
            try harvestLocked(&h)
            var out = h.pending
            h.pending.removeAll()
            if let vmm = memory.takeVMMWrites() { out.formUnion(vmm) }
            return out
        }
    }

    /// Harvesting already re-protected the pages (`KVM_RESET_DIRTY_RINGS`).
    public func rearm(firstPage: UInt64, mask: UInt64) throws {}
}
