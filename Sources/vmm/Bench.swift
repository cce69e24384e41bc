import ArgumentParser
import Foundation
import KVM
import Loader
import VMM

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks that print figures and write JSON.",
        subcommands: [BootBench.self])
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

            // In-process: KVM_CREATE_VM, memory, load, vCPU setup, run, until the first serial byte.
            var inProcess: [Double] = []
            for _ in 0..<(runs + 2) {
                let first = FirstByteClock()
                let t0 = monotonicMilliseconds()
                let machine = try Machine(image: bytes, configuration: MachineConfiguration(memorySize: 64 << 20, mode: mode),
                                          kvm: kvm, serialOutput: { _ in first.mark() })
                machine.start()
                _ = machine.waitForExit()
                guard let t1 = first.time else { throw CLIError("the guest printed nothing; use a guest that writes to COM1") }
                inProcess.append(t1 - t0)
            }
            inProcess.removeFirst(2) // warm-up: first-touch page faults in the VMM itself

            // Process: spawn `vmm run`, until its first byte reaches our pipe.
            let me = try String(contentsOfFile: "/proc/self/cmdline", encoding: .utf8).split(separator: "\0").first.map(String.init) ?? "vmm"
            let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? me
            var processStart: [Double] = []
            for _ in 0..<(runs + 1) {
                processStart.append(try timeProcess(exe, ["run", image, "--mode", mode.rawValue]))
            }
            processStart.removeFirst() // warm-up: page cache

            let a = Stats(processStart), b = Stats(inProcess)
            print("boot latency of \(image) (\(mode.rawValue) mode), \(runs) runs each")
            print("  process start to first serial byte:   \(a.line)   goal < 20 ms")
            print("  VM creation to first serial byte:     \(b.line)   goal < 2 ms")
            let report: [String: Any] = [
                "benchmark": "boot-latency",
                "date": ISO8601DateFormatter().string(from: Date()),
                "host": hostDescription(),
                "image": image,
                "mode": mode.rawValue,
                "process_start_to_first_byte_ms": toJSON(a),
                "vm_create_to_first_byte_ms": toJSON(b),
                "samples": ["process_start_ms": processStart, "in_process_ms": inProcess],
                "goals_ms": ["process_start": 20, "in_process": 2],
            ]
            let url = URL(fileURLWithPath: output)
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try JSONSerialization.data(withJSONObject: report, options: [.prettyPrinted, .sortedKeys]).write(to: url)
            print("  JSON written to \(output)")
            return 0
        }
        throw ExitCode(status)
    }

    func toJSON(_ s: Stats) -> Any {
        (try? JSONSerialization.jsonObject(with: JSONEncoder().encode(s))) ?? [:]
    }

    /// Spawns the command with its stdout on a pipe; milliseconds until the first byte arrives.
    func timeProcess(_ path: String, _ args: [String]) throws -> Double {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw CLIError("pipe failed: \(String(cString: strerror(errno)))") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO)
        posix_spawn_file_actions_addclose(&actions, fds[0])
        let argv = ([path] + args).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let t0 = monotonicMilliseconds()
        let rc = posix_spawn(&pid, path, &actions, nil, argv, environ)
        close(fds[1])
        guard rc == 0 else { close(fds[0]); throw CLIError("cannot start \(path): \(String(cString: strerror(rc)))") }
        var byte: UInt8 = 0
        let n = read(fds[0], &byte, 1)
        let t1 = monotonicMilliseconds()
        while read(fds[0], &byte, 1) > 0 {}
        close(fds[0])
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        guard n == 1 else { throw CLIError("the spawned vmm printed nothing (wait status \(status))") }
        return t1 - t0
    }
}

/// Records when the first serial byte arrived.
final class FirstByteClock: @unchecked Sendable {
    private let lock = NSLock()
    private var first: Double?
    func mark() {
        lock.lock(); defer { lock.unlock() }
        if first == nil { first = monotonicMilliseconds() }
    }
    var time: Double? { lock.lock(); defer { lock.unlock() }; return first }
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
