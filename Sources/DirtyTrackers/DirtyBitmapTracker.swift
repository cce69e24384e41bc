import GuestMemory
import KVM
import Synchronization

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
        try manual.withLock { (m: inout Bool?) throws in
            if m != nil { return }
            let supported = vm.system.checkExtension(DirtyLogCapability.manualProtect)
            var on = false
            if UInt64(truncatingIfNeeded: supported) & DirtyLogCapability.manualProtectEnable != 0 {
                // Not INITIALLY_SET: enabling the log write-protects everything, and the
                // first collect reports only what the guest wrote since.
                try vm.enableCapability(UInt32(DirtyLogCapability.manualProtect), [DirtyLogCapability.manualProtectEnable])
                on = true
            }
            m = on
        }
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
            var bitmap = [UInt64](repeating: 0, count: words)
            try bitmap.withUnsafeMutableBytes { (buffer) throws in
                // SAFETY: one bit per page of the slot, rounded up to whole words, as KVM writes.
                try vm.dirtyLog(slot: region.slot, into: buffer.baseAddress!)
            }
            let base = Int(region.guestBase.raw / GuestMemory.pageSize / 64)
            for i in 0..<words where bitmap[i] != 0 { result.merge(word: bitmap[i], at: base + i) }
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
