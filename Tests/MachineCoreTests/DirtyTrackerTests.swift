import Foundation
import Testing
import TestSupport
import GuestMemory
import KVM
import Loader
import MachineCore

@Suite("Dirty trackers report what was written, and only that", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct DirtyTrackerTests {
    /// 4 MiB + 64 pages in 1 MiB slots: the dirtier's 64-page working set at 4 MiB is
    /// exactly the last slot, ending at the last page of guest memory.
    static let memory: UInt64 = (4 << 20) + 64 * 4096

    @Test("the pages a guest writes are reported, up to the last page of the last slot; others are not",
          arguments: DirtyTrackerKind.allCases)
    func guestWrites(_ tracker: DirtyTrackerKind) throws {
        let machine = try bootMachine("dirtier.elf", MachineConfiguration(memorySize: Self.memory,
                                                                        commandLine: "pages=64 passes=1 mark_us=0",
                                                                        dirtyTracker: tracker, slotSize: 1 << 20))
        #expect(machine.memory.regions.count == 5)
        try machine.dirtyTracker.enable()
        machine.start()
        #expect(machine.waitForExit(timeout: 60) == .exitPort(status: 0))
        let dirty = try machine.dirtyTracker.collect()
        try machine.dirtyTracker.disable()
        let workingSet = UInt64(1024)..<UInt64(1088)
        let missing = workingSet.filter { !dirty.contains($0) }
        let check = {
            #expect(missing.isEmpty, "working-set pages not reported: \(missing.count) of 64")
            #expect(dirty.contains(machine.memory.pageCount - 1), "the last page of the last slot was not reported")
        }
        if tracker == .ring && KVMAvailability.isPVM {
            // kvm_pvm logs the guest's code and stack pages on every write until the ring
            // fills, and after KVM_RESET_DIRTY_RINGS logs nothing more (seen here, also
            // with a plain C test of the ring). Recorded, not hidden: the ring is unreliable on PVM.
            withKnownIssue("kvm_pvm's dirty ring stops logging after the first reset", isIntermittent: true) { check() }
        } else {
            check()
        }
        // Below 1 MiB and between the kernel and the working set, nothing was written, except the
        // beacon block's message slot in page 0 (the guest beacons at start).
        let beaconPage = BootLayout.beaconBlock / 4096
        let stray = dirty.pageFrames.filter { ($0 < 256 && $0 != beaconPage) || (512..<1024).contains($0) }
        #expect(stray.isEmpty, "pages reported that the guest never wrote: \(stray.prefix(10))")
    }

    @Test("a page the VMM writes through guest memory mid-round is reported", arguments: DirtyTrackerKind.allCases)
    func vmmWrites(_ tracker: DirtyTrackerKind) throws {
        let machine = try bootMachine("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=1000000", dirtyTracker: tracker))
        machine.start()
        try machine.dirtyTracker.enable()
        _ = try machine.dirtyTracker.collect()
        let page: UInt64 = 0x2345
        try machine.memory.writeInteger(UInt64(0xFEED), at: GuestAddress(page * 4096 + 8))
        let dirty = try machine.dirtyTracker.collect()
        #expect(dirty.contains(page))
        let again = try machine.dirtyTracker.collect()
        #expect(!again.contains(page), "a page was reported twice without being written again")
        try machine.dirtyTracker.disable()
        machine.requestStop()
        _ = machine.waitForExit()
    }

    @Test("with the bitmap tracker, a page rearmed before sending is reported again when rewritten")
    func rearmReprotects() throws {
        let machine = try bootMachine("dirtier.elf", MachineConfiguration(memorySize: 64 << 20, commandLine: "pages=64 passes=0 mark_us=0"))
        try machine.dirtyTracker.enable()
        machine.start()
        usleep(100_000)
        let first = try machine.dirtyTracker.collect()
        #expect(first.contains(1024))
        // Rearm the working set's 64-page chunk, as the sender does before reading it.
        try machine.dirtyTracker.rearm(firstPage: 1024, mask: first.words[1024 / 64])
        usleep(100_000)
        let second = try machine.dirtyTracker.collect()
        #expect(second.contains(1024), "a rearmed page rewritten by the guest was not reported")
        try machine.dirtyTracker.disable()
        machine.requestStop()
        _ = machine.waitForExit()
    }
}
