#if canImport(Glibc)
import Glibc
#endif
import CKVM
import GuestMemory
import Synchronization

extension VirtualMachine {
    /// `KVM_ENABLE_CAP` on the VM.
    public func enableCapability(_ capability: UInt32, _ args: [UInt64] = []) throws(KVMError) {
        var cap = kvm_enable_cap()
        cap.cap = capability
        withUnsafeMutableBytes(of: &cap.args) { raw in
            let a = raw.bindMemory(to: UInt64.self)
            for (i, v) in args.prefix(4).enumerated() { a[i] = v }
        }
        _ = try kvmIoctl(fd.raw, "KVM_ENABLE_CAP(\(capability))", CKVM_ENABLE_CAP, &cap)
    }

    /// `KVM_GET_DIRTY_LOG` for one slot into `bitmap` (one bit per page of the slot).
    public func dirtyLog(slot: UInt32, into bitmap: UnsafeMutableRawPointer) throws(KVMError) {
        var log = kvm_dirty_log()
        log.slot = slot
        log.dirty_bitmap = bitmap
        _ = try kvmIoctl(fd.raw, "KVM_GET_DIRTY_LOG", CKVM_GET_DIRTY_LOG, &log)
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
            _ = try kvmIoctl(fd.raw, "KVM_CLEAR_DIRTY_LOG", CKVM_CLEAR_DIRTY_LOG, &clear)
        }
    }

    /// `KVM_RESET_DIRTY_RINGS`: re-protects every harvested ring entry.
    public func resetDirtyRings() throws(KVMError) {
        _ = try kvmIoctl(fd.raw, "KVM_RESET_DIRTY_RINGS", CKVM_RESET_DIRTY_RINGS)
    }

    /// Switches dirty logging on or off for every slot of `memory` (a flags-only
    /// `KVM_SET_USER_MEMORY_REGION`).
    public func setDirtyLogging(_ on: Bool, for memory: GuestMemory) throws(KVMError) {
        try register(memory, flags: on ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0)
    }
}

/// Dirty tracking with `KVM_GET_DIRTY_LOG` bitmaps. With
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, fetching does not re-protect: the sender
/// calls `rearm` (`KVM_CLEAR_DIRTY_LOG`, 64-page chunks) just before reading pages.
public final class DirtyBitmapTracker: DirtyTracker {
    public let name = "bitmap"
    let vm: VirtualMachine
    let memory: GuestMemory
    /// Whether manual protection is on (decided at the first `enable`).
    private let manual = Mutex<Bool?>(nil)

    public init(vm: VirtualMachine, memory: GuestMemory) {
        self.vm = vm
        self.memory = memory
    }

    public func enable() throws {
        let isManual: Bool = try manual.withLock { (m: inout Bool?) throws -> Bool in
            if let m { return m }
            let supported = vm.system.checkExtension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            var on = false
            if supported & Int32(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) != 0 {
                // Not INITIALLY_SET: enabling the log write-protects everything, and the
                // first collect reports only what the guest wrote since.
                try vm.enableCapability(UInt32(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
                                        [UInt64(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)])
                on = true
            }
            m = on
            return on
        }
        _ = isManual
        memory.startLoggingVMMWrites()
        try vm.setDirtyLogging(true, for: memory)
    }

    public func disable() throws {
        try vm.setDirtyLogging(false, for: memory)
        memory.stopLoggingVMMWrites()
    }

    public func collect() throws -> DirtyBitmap {
        var result = DirtyBitmap(pageCount: memory.pageCount)
        for region in memory.regions {
            let pages = region.size / GuestMemory.pageSize
            let words = Int((pages + 63) / 64)
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: words * 8, alignment: 8)
            defer { buffer.deallocate() }
            buffer.initializeMemory(as: UInt8.self, repeating: 0, count: words * 8)
            try vm.dirtyLog(slot: region.slot, into: buffer)
            let base = Int(region.guestBase.raw / GuestMemory.pageSize / 64)
            let w = buffer.assumingMemoryBound(to: UInt64.self)
            for i in 0..<words where w[i] != 0 { result.merge(word: w[i], at: base + i) }
        }
        if let vmm = memory.takeVMMWrites() { result.formUnion(vmm) }
        return result
    }

    public func rearm(firstPage: UInt64, mask: UInt64) throws {
        guard manual.withLock({ $0 }) == true, mask != 0 else { return }
        let address = firstPage * GuestMemory.pageSize
        guard let region = memory.regions.first(where: { address >= $0.guestBase.raw && address < $0.guestBase.raw + $0.size }) else { return }
        let slotPage = (address - region.guestBase.raw) / GuestMemory.pageSize
        let slotPages = region.size / GuestMemory.pageSize
        let count = UInt32(min(64, slotPages - slotPage))
        try vm.clearDirtyLog(slot: region.slot, firstPage: slotPage, pageCount: count, mask: mask)
    }
}

/// Dirty tracking with per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`). The ring
/// must be enabled before any vCPU exists. A vCPU whose ring fills exits with
/// `KVM_EXIT_DIRTY_RING_FULL` and harvests all rings itself before going on.
public final class DirtyRingTracker: DirtyTracker, @unchecked Sendable {
    public let name = "ring"
    public static let defaultEntries: UInt32 = 16384
    static let entrySize = MemoryLayout<kvm_dirty_gfn>.stride

    let vm: VirtualMachine
    let memory: GuestMemory
    let entries: UInt32
    // Guarded by `lock`: each ring's next index to read, the pages harvested but not collected.
    private let lock = Mutex<Void>(())
    private var rings: [(base: UnsafeMutableRawPointer, next: UInt32)] = []
    private var pending: DirtyBitmap
    private var slotBases: [UInt32: UInt64] = [:]

    /// Enables the ring on `vm`; call before creating vCPUs.
    public static func prepare(vm: VirtualMachine, entries: UInt32 = defaultEntries) throws(KVMError) {
        let maxBytes = vm.system.checkExtension(KVM_CAP_DIRTY_LOG_RING)
        guard maxBytes > 0 else {
            throw KVMError("KVM_CAP_DIRTY_LOG_RING", errno: ENOTSUP, hint: "this kernel has no dirty ring; use --dirty-tracker bitmap")
        }
        let bytes = min(UInt64(entries) * UInt64(entrySize), UInt64(maxBytes))
        try vm.enableCapability(UInt32(KVM_CAP_DIRTY_LOG_RING), [bytes])
    }

    /// Maps each vCPU's ring.
    public init(vm: VirtualMachine, vcpus: [VCPU], memory: GuestMemory, entries: UInt32 = defaultEntries) throws(KVMError) {
        self.vm = vm
        self.memory = memory
        let maxBytes = UInt64(vm.system.checkExtension(KVM_CAP_DIRTY_LOG_RING))
        let bytes = min(UInt64(entries) * UInt64(Self.entrySize), maxBytes)
        self.entries = UInt32(bytes / UInt64(Self.entrySize))
        self.pending = DirtyBitmap(pageCount: memory.pageCount)
        for r in memory.regions { slotBases[r.slot] = r.guestBase.raw / GuestMemory.pageSize }
        for vcpu in vcpus {
            rings.append((try vcpu.mapDirtyRing(bytes: Int(bytes)), 0))
        }
    }

    public func enable() throws {
        memory.startLoggingVMMWrites()
        try vm.setDirtyLogging(true, for: memory)
    }

    public func disable() throws {
        try vm.setDirtyLogging(false, for: memory)
        memory.stopLoggingVMMWrites()
        try lock.withLock { _ in
            try harvestLocked()
            pending.removeAll()
        }
    }

    /// Reads every ring's dirty entries into `pending` and resets them.
    private func harvestLocked() throws {
        var any = false
        for i in rings.indices {
            var next = rings[i].next
            while true {
                // SAFETY: index reduced modulo the ring size, inside the mapping.
                let entry = (rings[i].base + Int(next % entries) * Self.entrySize).assumingMemoryBound(to: kvm_dirty_gfn.self)
                // x86 keeps loads in order; KVM publishes the entry before setting DIRTY.
                let flags = entry.pointee.flags
                guard flags & CKVM_DIRTY_GFN_F_DIRTY != 0 else { break }
                let slot = entry.pointee.slot & 0xFFFF
                if let base = slotBases[slot] { pending.set(base + entry.pointee.offset) }
                entry.pointee.flags = CKVM_DIRTY_GFN_F_RESET
                next &+= 1
                any = true
            }
            rings[i].next = next
        }
        if any {
            try vm.resetDirtyRings()
        }
    }

    /// Called by a vCPU thread on `KVM_EXIT_DIRTY_RING_FULL`.
    public func harvestFull() throws {
        try lock.withLock { _ in try harvestLocked() }
    }

    public func collect() throws -> DirtyBitmap {
        try lock.withLock { _ in
            try harvestLocked()
            var out = pending
            pending.removeAll()
            if let vmm = memory.takeVMMWrites() { out.formUnion(vmm) }
            return out
        }
    }

    /// Harvesting already re-protected the pages (`KVM_RESET_DIRTY_RINGS`).
    public func rearm(firstPage: UInt64, mask: UInt64) throws {}
}

extension VCPU {
    /// Maps this vCPU's dirty ring (at `KVM_DIRTY_LOG_PAGE_OFFSET` of the vCPU fd).
    public func mapDirtyRing(bytes: Int) throws(KVMError) -> UnsafeMutableRawPointer {
        let offset = off_t(KVM_DIRTY_LOG_PAGE_OFFSET) * off_t(sysconf(Int32(_SC_PAGESIZE)))
        let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.raw, offset)
        guard let p, p != MAP_FAILED else { throw KVMError("mmap(dirty ring)", errno: errno) }
        return p
    }
}
