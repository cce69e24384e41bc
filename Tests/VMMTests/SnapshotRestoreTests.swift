import Foundation
import Testing
import TestSupport
import ControlAPI
import KVM
import MachineCore
import VMM

/// A `vmm` process running in the background, with its stdout collected.
// @unchecked: the collected output is read and written only under `lock`; the rest is immutable.
final class VMMProcess: @unchecked Sendable {
    let process = Process()
    private let lock = NSLock()
    private var collected: [UInt8] = []
    private var errors: [UInt8] = []
    let socket: String

    init(_ arguments: [String], socket: String) throws {
        self.socket = socket
        process.executableURL = URL(fileURLWithPath: try Fixtures.vmmBinary())
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        out.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            guard let self else { return }
            self.lock.lock(); self.collected.append(contentsOf: d); self.lock.unlock()
        }
        err.fileHandleForReading.readabilityHandler = { [weak self] h in
            let d = h.availableData
            guard let self else { return }
            self.lock.lock(); self.errors.append(contentsOf: d); self.lock.unlock()
        }
        try process.run()
    }

    var output: [UInt8] { lock.lock(); defer { lock.unlock() }; return collected }
    var errorText: String { lock.lock(); defer { lock.unlock() }; return String(decoding: errors, as: UTF8.self) }

    /// Waits until the control socket answers.
    func waitForSocket(timeout: Double = 20) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if (try? ControlClient(socketPath: socket).send(.GET, "/vm", timeout: .seconds(2))) != nil { return }
            guard process.isRunning else { break }
            usleep(20_000)
        }
        Issue.record("the VMM's socket \(socket) never answered; stderr: \(errorText)")
        throw CancellationError()
    }

    func call(_ method: HTTPMethodName, _ path: String, _ body: String? = nil) throws -> ControlClient.Reply {
        try ControlClient(socketPath: socket).send(method.nio, path, body: body)
    }

    /// Waits for the process to end; returns its status.
    func wait(timeout: Double = 60) -> Int32? {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { process.terminate(); return nil }
        usleep(50_000) // let the pipe handlers drain
        return process.terminationStatus
    }

    deinit { if process.isRunning { process.terminate() } }
}

import NIOHTTP1
enum HTTPMethodName { case GET, PUT
    var nio: HTTPMethod { self == .GET ? .GET : .PUT }
}

/// The one directory test VMMs may write API snapshots to (their --snapshot-dir).
let snapshotDirectory: String = {
    let dir = temporaryPath("snapshots")
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}()

/// `--snapshot-dir` for a test VMM that takes snapshots through the API.
var snapshotDirArguments: [String] { ["--snapshot-dir", snapshotDirectory] }

/// A fresh snapshot file path inside `snapshotDirectory`.
func snapshotPath(_ name: String) -> String {
    snapshotDirectory + "/\(name)-\(UInt32.random(in: 0...UInt32.max))"
}

func temporaryPath(_ name: String) -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vmm-tests-\(getpid())")
    try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.appendingPathComponent("\(name)-\(UInt32.random(in: 0...UInt32.max))").path
}

/// The counter's expected output for `count` steps.
func counterTranscript(_ count: Int) -> String {
    "counter start\n" + (1...count).map { "\($0)\n" }.joined()
}

@Suite("Snapshot and restore through the control API", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct SnapshotRestoreTests {
    @Test("the counter snapshotted at a random moment continues in a new process with no gap and no repeat",
          arguments: [1, 2, 3])
    func counterContinues(_ trial: Int) throws {
        let socket = temporaryPath("api") + ".sock"
        let file = snapshotPath("counter.snap")
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

        let restored = try runVMM(["restore", file] + billboard().storeArguments)
        #expect(restored.status == 0, "\(restored.stderr)")
        let whole = String(decoding: before, as: UTF8.self) + restored.stdout
        #expect(whole == counterTranscript(count), "source printed \(before.count) bytes; the joined output is not 1...\(count)")
    }

    @Test("the dirtier's memory digest at restore equals its digest at snapshot, each computed by its own process")
    func digestSurvivesRestore() throws {
        let socket = temporaryPath("api") + ".sock"
        let file = snapshotPath("dirtier.snap")
        let dirtier = try Fixtures.guest("dirtier.elf")
        let source = try VMMProcess(["run", dirtier, "--memory", "128M",
                                     "--cmdline", "pages=4096 passes=0 mark_us=0 pattern=random", "--api-socket", socket] + snapshotDirArguments
                                    + billboard().register(dirtier, memory: "128M", cmdline: "pages=4096 passes=0 mark_us=0 pattern=random"),
                                    socket: socket)
        try source.waitForSocket()
        usleep(300_000)
        #expect(try source.call(.PUT, "/vm/pause").status == 200)
        let before = try #require(try source.call(.GET, "/vm/digest").json?["sha256"] as? String)
        #expect(try source.call(.PUT, "/vm/snapshot", "{\"path\": \"\(file)\"}").status == 200)
        #expect(try source.call(.PUT, "/vm/shutdown").status == 200)
        _ = source.wait()

        let socket2 = temporaryPath("api") + ".sock"
        let restored = try VMMProcess(["restore", file, "--paused", "--api-socket", socket2] + billboard().storeArguments, socket: socket2)
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
        #expect(later != before, "the restored guest did not run after resume")
        #expect(try restored.call(.PUT, "/vm/shutdown").status == 200)
        #expect(restored.wait() == 0)
    }

    @Test("API errors: unknown path 404, bad JSON 400, snapshot or digest while running 409, resume while running 409")
    func apiErrors() throws {
        let socket = temporaryPath("api") + ".sock"
        let counter = try Fixtures.guest("counter.elf")
        let vmm = try VMMProcess(["run", counter, "--cmdline", "count=0 ticks=5000000", "--api-socket", socket] + snapshotDirArguments
                                 + billboard().register(counter, cmdline: "count=0 ticks=5000000"), socket: socket)
        try vmm.waitForSocket()
        let attrs = try FileManager.default.attributesOfItem(atPath: socket)
        #expect((attrs[.posixPermissions] as? Int).map { $0 & 0o077 } == 0, "the socket is not owner-only")

        let unknown = try vmm.call(.GET, "/vm/nonsense")
        #expect(unknown.status == 404)
        #expect((unknown.json?["error"] as? String)?.contains("no such endpoint") == true)
        let badJSON = try vmm.call(.PUT, "/vm/snapshot", "{not json")
        #expect(badJSON.status == 400)
        #expect(badJSON.json?["error"] != nil)
        let noPath = try vmm.call(.PUT, "/vm/snapshot", "{}")
        #expect(noPath.status == 400)
        let never = snapshotPath("never")
        let running = try vmm.call(.PUT, "/vm/snapshot", "{\"path\": \"\(never)\"}")
        #expect(running.status == 409)
        #expect((running.json?["error"] as? String)?.contains("pause it") == true)
        #expect(try vmm.call(.GET, "/vm/digest").status == 409)
        #expect(try vmm.call(.PUT, "/vm/resume").status == 409)
        #expect(!FileManager.default.fileExists(atPath: never))
        #expect(try vmm.call(.PUT, "/vm/pause").status == 200)
        #expect(try vmm.call(.GET, "/vm").json?["state"] as? String == "paused")
        #expect(try vmm.call(.PUT, "/vm/snapshot", "{\"path\": \"/nonexistent-dir/x.snap\"}").status == 403)
        #expect(try vmm.call(.PUT, "/vm/shutdown").status == 200)
        #expect(vmm.wait() == 0)
        #expect(!FileManager.default.fileExists(atPath: socket), "the socket was not removed on exit")
    }

    @Test("pause and resume through the API many times under load lose no step")
    func pauseResumeUnderLoad() throws {
        let socket = temporaryPath("api") + ".sock"
        let count = 3000
        let counter = try Fixtures.guest("counter.elf")
        let vmm = try VMMProcess(["run", counter, "--cmdline", "count=\(count) ticks=300000", "--api-socket", socket]
                                 + billboard().register(counter, cmdline: "count=\(count) ticks=300000"), socket: socket)
        try vmm.waitForSocket()
        for _ in 0..<30 {
            guard try vmm.call(.PUT, "/vm/pause").status == 200 else { break }
            usleep(UInt32.random(in: 0...5_000))
            _ = try vmm.call(.PUT, "/vm/resume")
            usleep(UInt32.random(in: 0...10_000))
        }
        #expect(vmm.wait() == 0)
        #expect(String(decoding: vmm.output, as: UTF8.self) == counterTranscript(count))
    }

    @Test("restore refuses a different memory size, naming both")
    func restoreRefusesOtherMemory() throws {
        let file = try makeCounterSnapshot()
        let r = try runVMM(["restore", file, "--memory", "128M"] + billboard().storeArguments)
        #expect(r.status == 1)
        #expect(r.stderr.contains("64 MiB") && r.stderr.contains("128 MiB"))
    }

    @Test("restore refuses a sealed snapshot with one flipped byte, and one cut short")
    func restoreRefusesDamagedFiles() throws {
        let file = try makeCounterSnapshot()
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: file)))
        let flipped = temporaryPath("flipped.snap")
        bytes[bytes.count / 2] ^= 0x40
        try Data(bytes).write(to: URL(fileURLWithPath: flipped))
        let r = try runVMM(["restore", flipped] + billboard().storeArguments)
        #expect(r.status == 1)
        // Snapshots are sealed: the AEAD of the block holding that byte refuses it.
        #expect(r.stderr.contains("fails authentication") && r.stderr.contains("restore an intact copy"), "\(r.stderr)")

        bytes[bytes.count / 2] ^= 0x40
        let cut = temporaryPath("cut.snap")
        try Data(bytes.prefix(bytes.count - 100)).write(to: URL(fileURLWithPath: cut))
        let t = try runVMM(["restore", cut] + billboard().storeArguments)
        #expect(t.status == 1)
        #expect(t.stderr.contains("the sealed snapshot is truncated"), "\(t.stderr)")

        let missing = try runVMM(["restore", "/nonexistent.snap"] + billboard().storeArguments)
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("cannot open snapshot"))
    }

    @Test("a saved CPUID with a feature this host lacks is reported as missing")
    func cpuCompatibility() throws {
        let kvm = try KVMSystem()
        let vm = try kvm.createVM()
        let vcpu = try vm.createVCPU(id: 0)
        try vcpu.setCPUID(try kvm.supportedCPUID())
        let host = try vcpu.cpuid()
        #expect(CPUCompatibility.missingFeatures(saved: host, host: host).isEmpty)
        var saved = host
        let i = try #require(saved.firstIndex { $0.function == 7 && $0.index == 0 })
        let absent = ~host[i].ecx & (host[i].ecx &+ 1)  // lowest bit the host does not have
        saved[i].ecx |= absent
        let missing = CPUCompatibility.missingFeatures(saved: saved, host: host)
        #expect(missing.count == 1)
        #expect(missing.first?.contains("0x7.0 ecx") == true)
    }

    /// A snapshot of a paused counter, written through the API.
    func makeCounterSnapshot() throws -> String {
        let socket = temporaryPath("api") + ".sock"
        let file = snapshotPath("counter.snap")
        let counter = try Fixtures.guest("counter.elf")
        let vmm = try VMMProcess(["run", counter, "--cmdline", "count=0 ticks=5000000", "--api-socket", socket] + snapshotDirArguments
                                 + billboard().register(counter, cmdline: "count=0 ticks=5000000"), socket: socket)
        try vmm.waitForSocket()
        _ = try vmm.call(.PUT, "/vm/pause")
        #expect(try vmm.call(.PUT, "/vm/snapshot", "{\"path\": \"\(file)\"}").status == 200)
        _ = try vmm.call(.PUT, "/vm/shutdown")
        _ = vmm.wait()
        return file
    }
}
