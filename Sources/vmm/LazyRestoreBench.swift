import ArgumentParser
import Foundation
import KVM
import MachineCore
import PageFaults
import Synchronization
import SystemCalls
import VMM

struct LazyRestoreBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lazy-restore",
        abstract: "Restore start to the guest's first serial byte, lazy (userfaultfd) and eager, for a fully written sealed snapshot.",
        discussion: "One guest is booted, its memory filled with random bytes from 16 MiB up, and snapshotted (sealed); the file is restored lazily, the restored guest snapshotted again once its memory is complete (a new epoch, so no rollback is needed), and that file restored eagerly. Reports the fault server's figures. Goal: lazy under 20 ms to the first serial byte.")

    @Option(help: "The guest (a Multiboot kernel that prints on serial).")
    var image: String = "GuestImages/build/counter.elf"
    @Option(help: "Guest memory size.")
    var memory: String = "2G"
    @Option(help: "Directory for the snapshot files (deleted afterwards).")
    var directory: String = "bench-results/tmp"
    @Option(help: "Where to write the JSON results.")
    var output: String = "bench-results/lazy-restore.json"

    func run() throws {
        let status = try CommandRunner.fail {
            let size = try MemorySize.parse(memory)
            let bytes = try ImageFile.read(image, limit: 64 << 20)
            let kvm = try KVMSystem()
            let billboard = try BenchBillboard()
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let c = MachineConfiguration(memorySize: size, commandLine: "count=0 ticks=20000")
            let source = try billboard.boot(bytes, c, kvm: kvm, serialOutput: { _ in })
            try SnapshotBench().fillMemory(source.memory, from: 16 << 20)
            source.start()
            usleep(200_000)
            source.pause()
            let first = directory + "/lazy-\(getpid()).snap", second = directory + "/eager-\(getpid()).snap"
            defer { unlink(first); unlink(second) }
            let written = try source.snapshot(to: first)
            finish(source)
            print(String(format: "lazy restore vs eager, %@ guest, fully written from 16 MiB, sealed file %.1f MiB", memory,
                         Double(written.bytes) / 1048576))

            let lazy = try restoreToFirstByte(first, lazy: true, billboard: billboard, kvm: kvm)
            let lazyGuest = lazy.guest
            try lazyGuest.awaitCompleteMemory()
            let complete = lazyGuest.lazyRestoreStats
            lazyGuest.pause()
            _ = try lazyGuest.snapshot(to: second)
            finish(lazyGuest)
            unlink(first)
            let eager = try restoreToFirstByte(second, lazy: false, billboard: billboard, kvm: kvm)
            finish(eager.guest)

            print(String(format: "  lazy   first serial byte %9.2f ms  (restore call %.2f ms)", lazy.firstByteMs, lazy.restoreMs))
            print(String(format: "  eager  first serial byte %9.2f ms  (restore call %.2f ms)", eager.firstByteMs, eager.restoreMs))
            if let f = lazy.faultsAtFirstByte {
                print(String(format: "  lazy, at the first byte: %d faults, %d chunks fetched on fault, %d by the filler; fault median %.3f ms, p99 %.3f ms, max %.3f ms, blocked %.2f ms",
                             f.faults, f.unitsOnFault, f.unitsByFiller, f.medianFaultMs, f.p99FaultMs, f.maxFaultMs, f.blockedMs))
            }
            if let f = complete {
                print(String(format: "  lazy, complete: last page after %.1f ms; %d faults (%d on a chunk in flight), %d chunks on fault, %d by the filler; fault median %.3f ms, p99 %.3f ms, blocked %.2f ms",
                             f.completeAfterMs ?? -1, f.faults, f.faultsOnUnitInFlight, f.unitsOnFault, f.unitsByFiller,
                             f.medianFaultMs, f.p99FaultMs, f.blockedMs))
            }
            func encode(_ s: FaultStats?) -> Any {
                guard let s, let data = try? JSONEncoder().encode(s) else { return NSNull() }
                return (try? JSONSerialization.jsonObject(with: data)) ?? NSNull()
            }
            try writeBenchJSON([
                "benchmark": "lazy-restore", "date": ISO8601DateFormatter().string(from: Date()), "host": hostDescription(),
                "memory": memory, "memory_bytes": size, "file_bytes": written.bytes,
                "lazy": ["first_serial_byte_ms": lazy.firstByteMs, "restore_call_ms": lazy.restoreMs,
                         "faults_at_first_byte": encode(lazy.faultsAtFirstByte), "complete": encode(complete)],
                "eager": ["first_serial_byte_ms": eager.firstByteMs, "restore_call_ms": eager.restoreMs],
            ], to: output)
            return 0
        }
        throw ExitCode(status)
    }

    struct Outcome {
        var guest: AdmittedGuest
        var restoreMs: Double
        var firstByteMs: Double
        var faultsAtFirstByte: FaultStats?
    }

    /// Times `vmm restore`'s path: open, verify, admit, build, (read memory if eager), take the
    /// lease, start; until the guest's first serial byte.
    func restoreToFirstByte(_ path: String, lazy: Bool, billboard: BenchBillboard, kvm: KVMSystem) throws -> Outcome {
        let firstByte = Mutex<Double?>(nil)
        let t0 = monotonicMilliseconds()
        let (guest, _) = try GuestDoors.restore(path: path, requestedMemory: nil, store: billboard.store,
                                                settings: BillboardSettings(scanInterval: 3600), lazy: lazy, kvm: kvm, log: { _ in },
                                                serialOutput: { _ in firstByte.withLock { if $0 == nil { $0 = monotonicMilliseconds() } } })
        do { try guest.takeRestoredLease() } catch { guest.end(); throw error }
        let restoreMs = monotonicMilliseconds() - t0
        guest.start()
        let deadline = monotonicMilliseconds() + 120_000
        while firstByte.withLock({ $0 }) == nil && monotonicMilliseconds() < deadline { usleep(100) }
        guard let at = firstByte.withLock({ $0 }) else {
            finish(guest)
            throw CLIError("the restored guest printed nothing in 120 s")
        }
        return Outcome(guest: guest, restoreMs: restoreMs, firstByteMs: at - t0, faultsAtFirstByte: guest.lazyRestoreStats)
    }
}
