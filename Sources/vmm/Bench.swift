import ArgumentParser
import Billboard
import Foundation
import GuestMemory
import KVM
import Loader
import MachineCore
import Synchronization
import VMM
import SystemCalls

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks that print figures and write JSON.",
        subcommands: [BootBench.self, SnapshotBench.self, LazyRestoreBench.self, DirtyLogBench.self, GhostBench.self])
}

/// Summary statistics of a series of timings, in milliseconds.
struct Stats: Codable {
    var runs: Int
    var median: Double
    var min: Double
    var max: Double
    var p90: Double
    var mean: Double
    var stddev: Double

    init(_ samples: [Double]) {
        let s = samples.sorted()
        runs = s.count
        median = s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
        min = s.first ?? 0
        max = s.last ?? 0
        p90 = s[Swift.min(s.count - 1, Int((Double(s.count) * 0.9).rounded(.up)) - 1)]
        mean = s.reduce(0, +) / Double(s.count)
        let m = mean
        stddev = (s.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(s.count)).squareRoot()
    }

    var line: String {
        String(format: "median %.3f ms  min %.3f  p90 %.3f  max %.3f  (n=%d)", median, min, p90, max, runs)
    }
}

/// A throwaway billboard for a benchmark run: the guests a benchmark boots are registered and
/// admitted like any other (the admission is part of what a boot costs, and is reported).
final class BenchBillboard {
    let root: String
    let store: BillboardStore
    let admin: AdminKey
    private var names: [String: String] = [:]

    init() throws {
        var template = Array("/tmp/vmm-bench-billboard-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw CLIError("cannot create a temporary billboard directory in /tmp: \(String(cString: strerror(errno)))")
        }
        root = String(cString: made)
        admin = try AdminKey(name: "bench")
        store = try BillboardStore.initialize(directory: root + "/store", hostName: "bench", firstAdmin: admin)
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    var directory: String { root + "/store" }

    /// The registered name for this image and configuration (registered on first use).
    func name(for image: [UInt8], _ c: MachineConfiguration) throws -> String {
        let digest = ImageDigest.sha256(Data(image))
        let key = "\(digest) \(c.memorySize) \(c.vcpuCount) \(c.mode?.rawValue ?? "") \(c.commandLine ?? "")"
        if let name = names[key] { return name }
        let name = "bench\(names.count + 1)"
        try store.registry.register(GuestRegistration(name: name, imageSHA256: digest, memoryBytes: c.memorySize, vcpus: c.vcpuCount,
                                                      mode: c.mode?.rawValue, commandLine: c.commandLine, beacons: .none),
                                    signedBy: admin)
        names[key] = name
        return name
    }

    /// Admits, then builds and boots the machine (as `vmm run` does).
    func boot(_ image: [UInt8], _ c: MachineConfiguration, kvm: KVMSystem, serialOutput: @escaping (UInt8) -> Void) throws -> AdmittedGuest {
        try GuestDoors.boot(image: image, name: try name(for: image, c), configuration: c, store: store,
                            settings: BillboardSettings(scanInterval: 3600), kvm: kvm, log: { _ in }, serialOutput: serialOutput)
    }

    /// Admits and restores a snapshot file (as `vmm restore` does).
    func restore(_ path: String, kvm: KVMSystem) throws -> (AdmittedGuest, SnapshotStats) {
        let (guest, stats) = try GuestDoors.restore(path: path, requestedMemory: nil, store: store,
                                                    settings: BillboardSettings(scanInterval: 3600), kvm: kvm,
                                                    log: { _ in }, serialOutput: { _ in })
        do { try guest.takeRestoredLease() } catch { guest.end(); throw error }
        return (guest, stats)
    }
}

/// Stops a benchmark guest and gives its lease back.
func finish(_ guest: AdmittedGuest) {
    guest.requestStop()
    _ = guest.waitForExit()
    guest.end()
}

struct BootBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "boot",
        abstract: "Boot latency of a guest: process start and VM creation to its first serial byte.",
        discussion: "Writes JSON with every sample and the summary. Goals: under 20 ms from process start, under 2 ms in-process.")

    @Option(help: "The guest to boot (flat, protected mode).")
    var image: String = "GuestImages/build/hello-protected.bin"

    @Option(help: "Boot mode of the image.")
    var mode: BootMode = .protected

    @Option(help: "Number of runs of each measurement (at least 20 is sensible).")
    var runs: Int = 30

    @Option(help: "Where to write the JSON results.")
    var output: String = "bench-results/boot.json"

    func validate() throws {
        guard runs >= 1 && runs <= 10_000 else { throw ValidationError("--runs must be 1 to 10000") }
    }

    func run() throws {
        let status = try CommandRunner.fail {
            let bytes = try ImageFile.read(image, limit: 64 << 20)
            let kvm = try KVMSystem()
            let billboard = try BenchBillboard()
            let configuration = MachineConfiguration(memorySize: 64 << 20, mode: mode)
            let name = try billboard.name(for: bytes, configuration)

            // In-process: the Billboard's admission (timed apart), then KVM_CREATE_VM, memory, load,
            // vCPU setup, run, until the first serial byte.
            var inProcess: [Double] = [], admission: [Double] = []
            for _ in 0..<(runs + 2) {
                let first = FirstByteClock()
                let a0 = monotonicMilliseconds()
                let session = try GuestSession.admitBoot(store: billboard.store, name: name, image: bytes, configuration: configuration,
                                                         settings: BillboardSettings(scanInterval: 3600), log: { _ in })
                let t0 = monotonicMilliseconds()
                let guest = try GuestDoors.boot(session: session, image: bytes, configuration: configuration, kvm: kvm,
                                                serialOutput: { _ in first.mark() })
                guest.start()
                _ = guest.waitForExit()
                guest.end()
                guard let t1 = first.time else { throw CLIError("the guest printed nothing; use a guest that writes to COM1") }
                inProcess.append(t1 - t0)
                admission.append(t0 - a0)
            }
            inProcess.removeFirst(2) // warm-up: first-touch page faults in the VMM itself
            admission.removeFirst(2)

            // Process: spawn `vmm run`, until its first byte reaches our pipe.
            let me = try String(contentsOfFile: "/proc/self/cmdline", encoding: .utf8).split(separator: "\0").first.map(String.init) ?? "vmm"
            let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? me
            var processStart: [Double] = []
            for _ in 0..<(runs + 1) {
                processStart.append(try timeProcess(exe, ["run", image, "--mode", mode.rawValue,
                                                          "--billboard", billboard.directory, "--name", name]))
            }
            processStart.removeFirst() // warm-up: page cache

            let a = Stats(processStart), b = Stats(inProcess), c = Stats(admission)
            print("boot latency of \(image) (\(mode.rawValue) mode), \(runs) runs each")
            print("  process start to first serial byte:   \(a.line)   goal < 20 ms")
            print("  VM creation to first serial byte:     \(b.line)   goal < 2 ms")
            print("  billboard admission (before the VM):  \(c.line)")
            let report: [String: Any] = [
                "benchmark": "boot-latency",
                "date": ISO8601DateFormatter().string(from: Date()),
                "host": hostDescription(),
                "image": image,
                "mode": mode.rawValue,
                "process_start_to_first_byte_ms": toJSONObject(a),
                "vm_create_to_first_byte_ms": toJSONObject(b),
                "billboard_admission_ms": toJSONObject(c),
                "samples": ["process_start_ms": processStart, "in_process_ms": inProcess, "admission_ms": admission],
                "goals_ms": ["process_start": 20, "in_process": 2],
            ]
            try writeBenchJSON(report, to: output)
            return 0
        }
        throw ExitCode(status)
    }


    /// Spawns the command with its stdout on a pipe; milliseconds until the first byte arrives.
    func timeProcess(_ path: String, _ args: [String]) throws -> Double {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw CLIError("pipe failed: \(String(cString: strerror(errno)))") }
        let readEnd = OwnedFileDescriptor(taking: fds[0]), writeEnd = OwnedFileDescriptor(taking: fds[1])
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, writeEnd.raw, STDOUT_FILENO)
        posix_spawn_file_actions_addclose(&actions, readEnd.raw)
        let argv = ([path] + args).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let t0 = monotonicMilliseconds()
        let rc = posix_spawn(&pid, path, &actions, nil, argv, environ)
        // The child has its copy; ours must go, or the reader below never sees end of file.
        writeEnd.close()
        guard rc == 0 else { throw CLIError("cannot start \(path): \(String(cString: strerror(rc)))") }
        var byte: UInt8 = 0
        let n = read(readEnd.raw, &byte, 1)
        let t1 = monotonicMilliseconds()
        while read(readEnd.raw, &byte, 1) > 0 {}
        readEnd.close()
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        guard n == 1 else { throw CLIError("the spawned vmm printed nothing (wait status \(status))") }
        return t1 - t0
    }
}

/// Records when the first serial byte arrived.
final class FirstByteClock: Sendable {
    private let first = Mutex<Double?>(nil)
    func mark() { first.withLock { if $0 == nil { $0 = monotonicMilliseconds() } } }
    var time: Double? { first.withLock { $0 } }
}

/// Kernel, CPU model and core count, so that figures say where they came from.
func hostDescription() -> [String: String] {
    var u = utsname()
    uname(&u)
    let release = withUnsafeBytes(of: &u.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
    let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
    let model = cpuinfo.split(separator: "\n").first { $0.hasPrefix("model name") }?
        .split(separator: ":", maxSplits: 1).last?.trimmingCharacters(in: .whitespaces) ?? "unknown"
    return ["kernel": release, "cpu": model, "cores": String(ProcessInfo.processInfo.activeProcessorCount)]
}

/// Writes `bench-results/NAME.json` and says so.
func writeBenchJSON(_ report: [String: Any], to output: String) throws {
    let url = URL(fileURLWithPath: output)
    try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
    let json = try JSONSerialization.data(withJSONObject: report, options: [.prettyPrinted, .sortedKeys])
    try AtomicFileWriter.write([UInt8](json), to: output, what: "benchmark report")
    print("  JSON written to \(output)")
}

struct SnapshotBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Snapshot and restore time and file size for 64 MiB, 512 MiB and 2 GiB guests, mostly zero and fully written, sealed and unsealed.")

    @Option(help: "The guest (a Multiboot kernel that runs until stopped).")
    var image: String = "GuestImages/build/counter.elf"
    @Option(help: "Directory for the snapshot files (deleted afterwards).")
    var directory: String = "bench-results/tmp"
    @Option(help: "Runs per case.")
    var runs: Int = 3
    @Option(help: "Comma-separated sizes.")
    var sizes: String = "64M,512M,2G"
    @Option(help: "Where to write the JSON results.")
    var output: String = "bench-results/snapshot.json"

    func run() throws {
        let status = try CommandRunner.fail {
            let bytes = try ImageFile.read(image, limit: 64 << 20)
            let kvm = try KVMSystem()
            let billboard = try BenchBillboard()
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            var rows: [[String: Any]] = []
            print("snapshot and restore, sealed (default) and --unsealed side by side (\(runs) runs each, alternating; file written, fsynced, renamed; restore verifies every block)")
            for sizeText in sizes.split(separator: ",") {
                let size = try MemorySize.parse(String(sizeText))
                for filled in [false, true] {
                    var save: [Bool: [Double]] = [:], load: [Bool: [Double]] = [:], fileBytes: [Bool: UInt64] = [:]
                    for _ in 0..<runs {
                        for sealed in [true, false] {
                            let guest = try billboard.boot(bytes, MachineConfiguration(
                                memorySize: size, commandLine: "count=0 ticks=100000000"), kvm: kvm, serialOutput: { _ in })
                            if filled { try fillMemory(guest.memory, from: 16 << 20) }
                            guest.startPaused()
                            let path = directory + "/bench-\(getpid()).snap"
                            let s = try guest.snapshot(to: path, sealed: sealed)
                            finish(guest)
                            let (restored, r) = try billboard.restore(path, kvm: kvm)
                            restored.end(with: .shutdown)
                            restored.end()
                            save[sealed, default: []].append(s.milliseconds)
                            load[sealed, default: []].append(r.milliseconds)
                            fileBytes[sealed] = s.bytes
                            unlink(path)
                        }
                    }
                    let label = "\(sizeText) \(filled ? "fully written" : "mostly zero ")"
                    var row: [String: Any] = ["memory": String(sizeText), "memory_bytes": size, "content": filled ? "fully-written" : "mostly-zero"]
                    for sealed in [true, false] {
                        let a = Stats(save[sealed] ?? []), b = Stats(load[sealed] ?? [])
                        print(String(format: "  %@  %@  snapshot %8.1f ms (min %.1f max %.1f)  restore %8.1f ms (min %.1f max %.1f)  file %8.1f MiB",
                                     label, sealed ? "sealed  " : "unsealed", a.median, a.min, a.max, b.median, b.min, b.max,
                                     Double(fileBytes[sealed] ?? 0) / 1048576))
                        let key = sealed ? "sealed" : "unsealed"
                        row[key] = ["snapshot_ms": toJSONObject(a), "restore_ms": toJSONObject(b), "file_bytes": fileBytes[sealed] ?? 0]
                    }
                    let ratioSave = Stats(save[true] ?? []).median / Stats(save[false] ?? []).median
                    let ratioLoad = Stats(load[true] ?? []).median / Stats(load[false] ?? []).median
                    print(String(format: "  %@  sealed/unsealed: snapshot %.2fx, restore %.2fx", label, ratioSave, ratioLoad))
                    row["sealed_over_unsealed"] = ["snapshot": ratioSave, "restore": ratioLoad]
                    rows.append(row)
                }
            }
            try writeBenchJSON(["benchmark": "snapshot-restore", "date": ISO8601DateFormatter().string(from: Date()),
                                "host": hostDescription(), "runs": runs, "cases": rows], to: output)
            return 0
        }
        throw ExitCode(status)
    }

    /// Writes pseudo-random bytes to all memory from `start` (the guest's kernel lies below).
    func fillMemory(_ memory: GuestMemory, from start: UInt64) throws {
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        var address = start
        while address < memory.size {
            chunk.withUnsafeMutableBytes { raw in
                let words = raw.bindMemory(to: UInt64.self)
                for i in words.indices { x ^= x << 13; x ^= x >> 7; x ^= x << 17; words[i] = x }
            }
            let n = Int(min(UInt64(chunk.count), memory.size - address))
            try memory.write(chunk.prefix(n), at: GuestAddress(address))
            address += UInt64(n)
        }
    }
}

func toJSONObject(_ s: Stats) -> Any {
    (try? JSONSerialization.jsonObject(with: JSONEncoder().encode(s))) ?? [:]
}

struct DirtyLogBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dirty-log",
        abstract: "Cost of collecting the dirty log once per round, for 512 MiB and 2 GiB guests, with each tracker.")

    @Option(help: "The dirtier guest.")
    var image: String = "GuestImages/build/dirtier.elf"
    @Option(help: "Collections per case.")
    var rounds: Int = 30
    @Option(help: "Milliseconds of guest writing between collections.")
    var intervalMs: Int = 50
    @Option(help: "Where to write the JSON results.")
    var output: String = "bench-results/dirty-log.json"

    func run() throws {
        let status = try CommandRunner.fail {
            let bytes = try ImageFile.read(image, limit: 64 << 20)
            let kvm = try KVMSystem()
            let billboard = try BenchBillboard()
            var rows: [[String: Any]] = []
            print("dirty-log collection cost (\(rounds) rounds, \(intervalMs) ms of unpaced writes over a 256 MiB working set between rounds)")
            for size: UInt64 in [512 << 20, 2 << 30] {
                for tracker in DirtyTrackerKind.allCases {
                    let guest = try billboard.boot(bytes, MachineConfiguration(
                        memorySize: size, commandLine: "pages=65536 rate=0 mark_us=0", dirtyTracker: tracker),
                        kvm: kvm, serialOutput: { _ in })
                    let machine = guest
                    guest.start()
                    try machine.dirtyTracker.enable()
                    _ = try machine.dirtyTracker.collect()
                    var costs: [Double] = [], pages: [Double] = []
                    for _ in 0..<rounds {
                        usleep(UInt32(intervalMs * 1000))
                        let t0 = monotonicMilliseconds()
                        let dirty = try machine.dirtyTracker.collect()
                        // What the sender does next for each dirty chunk: rearm before reading.
                        for (i, w) in dirty.words.enumerated() where w != 0 {
                            try machine.dirtyTracker.rearm(firstPage: UInt64(i) * 64, mask: w)
                        }
                        costs.append(monotonicMilliseconds() - t0)
                        pages.append(Double(dirty.count))
                    }
                    try machine.dirtyTracker.disable()
                    finish(guest)
                    let c = Stats(costs), p = Stats(pages)
                    print(String(format: "  %4d MiB  %@  collect+rearm %7.3f ms (min %.3f max %.3f)  dirty pages/round %.0f",
                                 Int(size >> 20), tracker.rawValue.padding(toLength: 6, withPad: " ", startingAt: 0), c.median, c.min, c.max, p.median))
                    rows.append(["memory_bytes": size, "tracker": tracker.rawValue, "collect_ms": toJSONObject(c),
                                 "dirty_pages_per_round": toJSONObject(p)])
                }
            }
            try writeBenchJSON(["benchmark": "dirty-log-collection", "date": ISO8601DateFormatter().string(from: Date()),
                                "host": hostDescription(), "rounds": rounds, "interval_ms": intervalMs, "cases": rows], to: output)
            return 0
        }
        throw ExitCode(status)
    }
}

/// How long a planted ghost survives next to a guest whose VMM scans every interval.
struct GhostBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ghost",
        abstract: "Detection latency of the active scan: plant false VMs beside a running guest and time until each is stopped.",
        discussion: "The original guest runs in this process with --scan-interval. Ghosts: a `vmm run` whose guest forges its beacon token (false-beacon), and, if QEMU is installed, a QEMU VM holding the store open without admission (unrecorded). Time is measured from the moment the ghost's VM exists (/proc) to the ghost's exit.")

    @Option(help: "The guest (must beacon; the counter).")
    var image: String = "GuestImages/build/counter.elf"
    @Option(help: "Scan interval of the original's VMM, in seconds.")
    var scanInterval: Double = 1
    @Option(help: "Ghosts of each kind.")
    var runs: Int = 10
    @Option(help: "QEMU binary for the unrecorded ghost.")
    var qemu: String = "/usr/bin/qemu-system-x86_64"
    @Option(help: "Where to write the JSON results.")
    var output: String = "bench-results/ghost.json"

    func run() throws {
        let status = try CommandRunner.fail {
            let bytes = try ImageFile.read(image, limit: 64 << 20)
            let kvm = try KVMSystem()
            let billboard = try BenchBillboard()
            let settings = BillboardSettings(scanInterval: scanInterval, beaconIntervalMs: 1000, leaseTimeout: 10)
            let original = MachineConfiguration(commandLine: "count=0 ticks=4000000000")
            let session = try GuestSession.admitBoot(store: billboard.store, name: try billboard.name(for: bytes, original),
                                                     image: bytes, configuration: original, settings: settings, log: { _ in })
            let guest = try GuestDoors.boot(session: session, image: bytes, configuration: original, kvm: kvm, serialOutput: { _ in })
            guest.start()
            defer { finish(guest) }

            let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? "vmm"
            // Each liar is its own registration (a killed one's lease stays live until it expires);
            // the counter ignores the extra key.
            func liar(_ i: Int) throws -> [String] {
                let line = "count=0 ticks=4000000000 beacon_token=12345 ghost=\(i)"
                let name = try billboard.name(for: bytes, MachineConfiguration(commandLine: line))
                return [me, "run", image, "--cmdline", line, "--name", name, "--billboard", billboard.directory, "--scan-interval", "3600"]
            }
            var kinds: [(String, (Int) throws -> [String])] = [("false-beacon", liar)]
            if FileManager.default.isExecutableFile(atPath: qemu) {
                let argv = [qemu, "-enable-kvm", "-m", "16", "-nodefaults", "-display", "none", "-S", "-drive",
                            "file=\(billboard.directory)/billboard.sqlite,format=raw,if=none,id=d0,readonly=on,file.locking=off"]
                kinds.append(("unrecorded", { _ in argv }))
            } else {
                print("  (QEMU not found at \(qemu): only the false-beacon ghost is measured)")
            }
            print("ghost detection: original scanning every \(scanInterval) s, \(runs) ghosts of each kind")
            var rows: [String: Any] = [:]
            for (kind, command) in kinds {
                var samples: [Double] = []
                for i in 0..<runs {
                    let argv = try command(i)
                    let p = Process()
                    p.executableURL = URL(fileURLWithPath: argv[0])
                    p.arguments = Array(argv.dropFirst())
                    p.standardOutput = FileHandle.nullDevice
                    p.standardError = FileHandle.nullDevice
                    try p.run()
                    let pid = p.processIdentifier
                    var appeared: Double?
                    let deadline = monotonicMilliseconds() + 60_000
                    while p.isRunning && monotonicMilliseconds() < deadline {
                        if appeared == nil && HostProcesses.withVMs().contains(where: { $0.pid == pid }) { appeared = monotonicMilliseconds() }
                        usleep(2_000)
                    }
                    if p.isRunning { kill(pid, SIGKILL); throw CLIError("a \(kind) ghost survived 60 s: the scan did not stop it") }
                    let gone = monotonicMilliseconds()
                    p.waitUntilExit()
                    if let appeared { samples.append(gone - appeared) }
                    usleep(UInt32.random(in: 0...UInt32(scanInterval * 1_000_000)))  // plant at a random phase of the scan
                }
                let st = Stats(samples)
                print(String(format: "  %-13@ stopped %@   (interval %.0f ms)", kind as NSString, st.line, scanInterval * 1000))
                rows[kind] = ["survival_ms": toJSONObject(st), "samples_ms": samples]
            }
            try writeBenchJSON(["benchmark": "ghost-detection", "date": ISO8601DateFormatter().string(from: Date()),
                                "host": hostDescription(), "scan_interval_s": scanInterval, "ghosts": rows], to: output)
            return 0
        }
        throw ExitCode(status)
    }
}
