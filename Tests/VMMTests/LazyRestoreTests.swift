#if canImport(Glibc)
import Glibc
#endif
import Billboard
import Foundation
import GuestMemory
import MachineCore
import Snapshot
import Synchronization
import SystemCalls
import Testing
import TestSupport
@testable import VMM

/// Flips one byte inside the ciphertext of memory chunk `chunk` of the sealed file at `path`
/// (opened with the source host's key to find it); returns the edited copy's path.
private func editChunk(_ chunk: Int, of path: String) throws -> (path: String, chunks: Int, firstPage: UInt64) {
    let hosts = try localHosts()
    let file = try OwnedFileDescriptor.open(path, O_RDONLY | O_CLOEXEC)
    let reader = try SealedReader(source: try FileRandomAccessSource(file), unwrap: SnapshotFile.unwrapper(for: hosts.source))
    let chunks = reader.memoryChunks
    let entry = chunks[chunk]
    var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
    bytes[Int(entry.offset) + SealedFormat.blockHeaderSize + Int(entry.length) / 2] ^= 0x40
    let edited = temporaryPath("edited-chunk\(chunk).snap")
    try Data(bytes).write(to: URL(fileURLWithPath: edited))
    return (edited, chunks.count, entry.firstPage)
}

@Suite("Lazy restore of sealed snapshots (userfaultfd)", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct LazyRestoreTests {
    @Test("the counter restored with --lazy continues with no gap and no repeat: its vCPU waits in KVM_RUN for each page it touches")
    func counterContinuesLazily() throws {
        let socket = temporaryPath("api") + ".sock"
        let file = snapshotPath("lazy-counter.snap")
        let count = 1500
        let counter = try Fixtures.guest("counter.elf")
        let source = try VMMProcess(["run", counter, "--cmdline", "count=\(count) ticks=600000", "--api-socket", socket] + snapshotDirArguments
                                    + billboard().register(counter, cmdline: "count=\(count) ticks=600000"), socket: socket)
        try source.waitForSocket()
        usleep(UInt32.random(in: 20_000...250_000))
        #expect(try source.call(.PUT, "/vm/pause").status == 200)
        let snap = try source.call(.PUT, "/vm/snapshot", "{\"path\": \"\(file)\"}")
        #expect(snap.status == 200, "\(snap.body)")
        #expect(try source.call(.PUT, "/vm/shutdown").status == 200)
        #expect(source.wait() == 0)
        let before = source.output
        #expect(!before.isEmpty)

        let restored = try runVMM(["restore", file, "--lazy"] + billboard().storeArguments)
        #expect(restored.status == 0, "\(restored.stderr)")
        let whole = String(decoding: before, as: UTF8.self) + restored.stdout
        #expect(whole == counterTranscript(count), "source printed \(before.count) bytes; the joined output is not 1...\(count)")
    }

    @Test("the dirtier restored with --lazy has, page for page, the memory digest it had at snapshot (the digest itself faults pages in)")
    func digestSurvivesLazyRestore() throws {
        let socket = temporaryPath("api") + ".sock"
        let file = snapshotPath("lazy-dirtier.snap")
        let dirtier = try Fixtures.guest("dirtier.elf")
        let cmdline = "pages=4096 passes=0 mark_us=0 pattern=random"
        let source = try VMMProcess(["run", dirtier, "--memory", "128M", "--cmdline", cmdline, "--api-socket", socket] + snapshotDirArguments
                                    + billboard().register(dirtier, memory: "128M", cmdline: cmdline), socket: socket)
        try source.waitForSocket()
        usleep(300_000)
        #expect(try source.call(.PUT, "/vm/pause").status == 200)
        let before = try #require(try source.call(.GET, "/vm/digest").json?["sha256"] as? String)
        #expect(try source.call(.PUT, "/vm/snapshot", "{\"path\": \"\(file)\"}").status == 200)
        #expect(try source.call(.PUT, "/vm/shutdown").status == 200)
        _ = source.wait()

        let socket2 = temporaryPath("api") + ".sock"
        let restored = try VMMProcess(["restore", file, "--lazy", "--paused", "--api-socket", socket2] + billboard().storeArguments, socket: socket2)
        try restored.waitForSocket()
        // The API is up before the vCPUs are started paused; they park moments later.
        #expect(waitUntil(20) { (try? restored.call(.GET, "/vm").json?["state"] as? String) == "paused" },
                "the restored guest never reported paused")
        let after = try #require(try restored.call(.GET, "/vm/digest").json?["sha256"] as? String)
        #expect(after == before)
        #expect(try restored.call(.PUT, "/vm/resume").status == 200)
        usleep(100_000)
        #expect(try restored.call(.PUT, "/vm/pause").status == 200)
        let later = try #require(try restored.call(.GET, "/vm/digest").json?["sha256"] as? String)
        #expect(later != before, "the lazily restored guest did not run after resume")
        #expect(try restored.call(.PUT, "/vm/shutdown").status == 200)
        #expect(restored.wait() == 0)
    }

    @Test("an edited chunk that the restore itself touches (the beacon block's) is refused before the guest's first instruction, and no lease is taken")
    func editedFirstChunkRefusedBeforeRunning() throws {
        let hosts = try localHosts()
        let image = try Fixtures.guestBytes("counter.elf")
        let c = MachineConfiguration(commandLine: "count=0 ticks=400000")
        let output = Mutex<[UInt8]>([])
        let guest = try hosts.boot(image, c, serialOutput: { b in output.withLock { $0.append(b) } })
        guest.start()
        #expect(waitUntil(30) { output.withLock { $0.count } > 20 }, "the counter printed nothing")
        #expect(guest.pause())
        let path = temporaryPath("lazy-first.snap")
        _ = try guest.snapshot(to: path)
        guest.end(with: .shutdown)
        guest.end()

        // Chunk 0 holds page 0, where the beacon block is: reading the boot token faults it in.
        let edited = try editChunk(0, of: path).path
        let printed = Mutex<[UInt8]>([])
        let (restored, _) = try GuestDoors.restore(path: edited, requestedMemory: nil, store: hosts.destination, settings: hosts.settings,
                                                   lazy: true, log: { _ in }, serialOutput: { b in printed.withLock { $0.append(b) } })
        defer { restored.end(with: .shutdown); restored.end() }
        #expect {
            try restored.takeRestoredLease()
        } throws: { error in
            "\(error)".contains("refused before the guest ran") && "\(error)".contains("unit 0") && "\(error)".contains("authentication")
        }
        #expect(!restored.session.holdsLease)
        #expect(restored.state == .finished)
        #expect(printed.withLock { $0.isEmpty })
        #expect(try hosts.destination.audit.entries().contains { $0.event == "state.signature.refused" && $0.details.contains(edited) })
    }

    @Test("an edited chunk met while the guest runs stops it with a fatal exit naming the chunk, and its memory is never reported complete")
    func editedChunkStopsRunningGuest() throws {
        let hosts = try localHosts()
        let image = try Fixtures.guestBytes("dirtier.elf")
        let c = MachineConfiguration(memorySize: 128 << 20, commandLine: "pages=4096 passes=0 mark_us=0 pattern=random")
        let guest = try hosts.boot(image, c, serialOutput: { _ in })
        guest.start()
        usleep(300_000)
        #expect(guest.pause())
        let path = temporaryPath("lazy-running.snap")
        _ = try guest.snapshot(to: path)
        guest.end(with: .shutdown)
        guest.end()

        // A chunk in the middle, among the pages the dirtier writes: the guest starts, then its
        // first fault there stops it.
        let (_, chunks, _) = try editChunk(0, of: path)
        try #require(chunks >= 3, "the dirtier's snapshot has only \(chunks) chunks")
        let bad = chunks / 2
        let (edited, _, badPage) = try editChunk(bad, of: path)
        // No filler: the guest's own writes meet the chunk (the filler would, too, but maybe first).
        let (restored, _) = try GuestDoors.restore(path: edited, requestedMemory: nil, store: hosts.destination, settings: hosts.settings,
                                                   lazy: true, fillLazily: false, log: { _ in }, serialOutput: { _ in })
        defer { restored.end(with: .shutdown); restored.end() }
        try restored.takeRestoredLease()
        restored.start()
        // The guest writes random pages of its working set and will meet the chunk, but when
        // depends on the machine's load; the VMM's own read of a page of that chunk faults like
        // the guest's and meets it now. Either way the running machine must stop there.
        let memory = restored.machine.memory
        Thread.detachNewThread { _ = try? memory.read(at: GuestAddress(badPage * 4096), count: 8) }
        let exit = try #require(restored.waitForExit(timeout: 120), "the guest was not stopped")
        guard case let .fatal(reason, _) = exit else {
            Issue.record("the guest ended with \(exit), not a fatal exit")
            return
        }
        #expect(reason.contains("lazy restore") && reason.contains("unit \(bad)") && reason.contains("authentication"), "\(reason)")
        #expect(restored.lazyRestoreStats?.completeAfterMs == nil)
        #expect(throws: (any Error).self) { try restored.awaitCompleteMemory() }
    }

    @Test("--lazy refuses an unsealed (version 1) file, saying why, before admitting anything")
    func unsealedRefused() throws {
        let hosts = try localHosts()
        let image = try Fixtures.guestBytes("counter.elf")
        let guest = try hosts.boot(image, MachineConfiguration(commandLine: "count=0 ticks=400000"), serialOutput: { _ in })
        guest.startPaused()
        let path = temporaryPath("lazy-unsealed.snap")
        _ = try guest.snapshot(to: path, sealed: false)
        guest.end(with: .shutdown)
        guest.end()
        #expect {
            _ = try GuestDoors.restore(path: path, requestedMemory: nil, store: hosts.source, settings: hosts.settings,
                                       lazy: true, log: { _ in }, serialOutput: { _ in })
        } throws: { error in
            "\(error)".contains("--lazy needs a sealed snapshot")
        }
    }
}
