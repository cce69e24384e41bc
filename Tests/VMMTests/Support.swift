import Billboard
import Foundation
import Testing
import KVM
import Loader
import MachineCore
import TestSupport
import VMM

/// Two in-process hosts ("src" and "dst"), each a billboard of its own, peers of each other,
/// for the machines tests run inside this process: every one of them is registered and admitted
/// like any other (a machine exists only through `GuestDoors`). Migrations go from `source` to
/// `destination` and back. Scans are off (these tests are about the machine, and the CLI
/// billboard tests cover the scan); leases and beacons work as usual.
// @unchecked: `serial` is read and written only under `lock`; the rest is immutable.
final class LocalHosts: @unchecked Sendable {
    let root: String
    let admin: AdminKey
    let source: BillboardStore
    let destination: BillboardStore
    let settings = BillboardSettings(scanInterval: 3600, beaconIntervalMs: 1000, leaseTimeout: 10)
    private let lock = NSLock()
    private var serial = 0

    static let shared: Result<LocalHosts, any Error> = Result { try LocalHosts() }

    init() throws {
        root = temporaryPath("local-hosts")
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        admin = try AdminKey(name: "tests")
        source = try BillboardStore.initialize(directory: root + "/src", hostName: "src", firstAdmin: admin)
        destination = try BillboardStore.initialize(directory: root + "/dst", hostName: "dst", firstAdmin: admin)
        try source.peerHosts.add(name: "dst", signingKey: destination.hostSigningKey, agreementKey: destination.hostAgreementKey, signedBy: admin)
        try destination.peerHosts.add(name: "src", signingKey: source.hostSigningKey, agreementKey: source.hostAgreementKey, signedBy: admin)
    }

    /// Registers `image` with `configuration` under a fresh name on both hosts (either may run it).
    /// `mac`, `ip`: the network card the registration allows (none by default).
    func register(_ image: [UInt8], _ c: MachineConfiguration, mac: String? = nil, ip: String? = nil) throws -> String {
        let name = lock.withLock { serial += 1; return "local\(serial)" }
        for store in [source, destination] {
            try store.registry.register(GuestRegistration(name: name, imageSHA256: ImageDigest.sha256(Data(image)), memoryBytes: c.memorySize,
                                                 vcpus: c.vcpuCount, mode: c.mode?.rawValue, commandLine: c.commandLine,
                                                 mac: mac, ip: ip, allowedHosts: ["src", "dst"], beacons: .required), signedBy: admin)
        }
        return name
    }

    /// Registers, admits and boots `image` on the source host (not started).
    func boot(_ image: [UInt8], _ c: MachineConfiguration, serialOutput: @escaping (UInt8) -> Void) throws -> AdmittedGuest {
        try GuestDoors.boot(image: image, name: try register(image, c), configuration: c, store: source, settings: settings,
                            log: { _ in }, serialOutput: serialOutput)
    }

    /// Admits an incoming guest on `store` (the migration destination's door).
    func admitIncoming(_ header: StateHeader, source: (host: String, pid: Int32), on store: BillboardStore) throws -> GuestSession {
        try GuestSession.admitIncoming(store: store, header: header, source: source, settings: settings, log: { _ in })
    }
}

func localHosts() throws -> LocalHosts { try LocalHosts.shared.get() }

/// Boots a guest image from GuestImages/build in-process (registered and admitted), not started.
func bootLocal(_ name: String, _ c: MachineConfiguration, serialOutput: @escaping (UInt8) -> Void = { _ in }) throws -> AdmittedGuest {
    try localHosts().boot(try Fixtures.guestBytes(name), c, serialOutput: serialOutput)
}

/// This host's guest TSC rate (KVM_GET_TSC_KHZ on a scratch vCPU), as the dirtier's pacing needs it.
func hostTSCKHz() throws -> UInt32 {
    try KVMSystem().createVM().createVCPU(id: 0).tscKHz()
}

/// Runs the `vmm` binary and returns its status, stdout and stderr.
func runVMM(_ arguments: [String], timeout: Double = 60) throws -> (status: Int32, stdout: String, stderr: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: try Fixtures.vmmBinary())
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    try process.run()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    let errData = err.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self))
}

/// One billboard (this test run's "host") that every guest a test boots through `vmm` is
/// registered in first, as the VMM requires. It is used only through the `vmm billboard` CLI:
/// this test process holds in-process VMs, and if it also had the store open, a VMM's scan would
/// rightly see a process with a VM and the store but no admission record.
// @unchecked: `serial` is read and written only under `lock`; the rest is immutable.
final class TestBillboard: @unchecked Sendable {
    let root: String
    let directory: String
    let adminKey: String
    let host: String
    /// This host's public keys (base64), as `vmm billboard init` printed them.
    let signingKey: String
    let agreementKey: String
    private let lock = NSLock()
    private var serial = 0

    static let shared: Result<TestBillboard, any Error> = Result { try TestBillboard(host: "testhost") }

    init(host: String) throws {
        root = temporaryPath("billboard-\(host)")
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        directory = root + "/store"
        adminKey = root + "/admin.key"
        let r = try runVMM(["billboard", "init", "--billboard", directory, "--host", host, "--admin-key", adminKey])
        try #require(r.status == 0, "vmm billboard init failed: \(r.stderr)")
        self.host = host
        func key(_ label: String) -> String {
            r.stdout.split(separator: "\n").first { $0.hasPrefix(label) }.map { String($0.dropFirst(label.count)).trimmingCharacters(in: .whitespaces) } ?? ""
        }
        signingKey = key("host signing key:")
        agreementKey = key("host agreement key:")
    }

    /// Makes `peer` a host this billboard trusts, as two administrators would: the peer exports
    /// its identity to a file, and this billboard's administrator adds it.
    func addPeer(_ peer: TestBillboard) throws {
        let file = root + "/\(peer.host)-\(UInt32.random(in: 0...UInt32.max)).host"
        let e = try peer.cli(["host", "export", "--output", file])
        try #require(e.status == 0, "vmm billboard host export failed: \(e.stderr)")
        let r = try cli(["host", "add", "--signed-by", adminKey, file])
        try #require(r.status == 0, "vmm billboard host add failed: \(r.stderr)")
    }

    /// Registers `image` with exactly this configuration under a fresh name, and returns the
    /// arguments that make `vmm run`/`restore`/`receive` use it.
    func register(_ image: String, memory: String = "64M", mode: String? = nil, cmdline: String? = nil,
                  beacons: String = "required", allowedHosts: [String] = [], name: String? = nil) throws -> [String] {
        let name = name ?? lock.withLock { serial += 1; return "guest\(serial)-\(UInt16.random(in: 0...UInt16.max))" }
        var args = ["billboard", "register", "--billboard", directory, "--signed-by", adminKey, "--name", name,
                    "--image", image, "--memory", memory, "--beacons", beacons]
        if let mode { args += ["--mode", mode] }
        if let cmdline { args += ["--cmdline", cmdline] }
        for h in allowedHosts { args += ["--allowed-host", h] }
        let r = try runVMM(args)
        try #require(r.status == 0, "registering \(image) failed: \(r.stderr)")
        return ["--billboard", directory, "--name", name]
    }

    /// Arguments that point a VMM at this billboard without naming a guest (restore, receive).
    var storeArguments: [String] { ["--billboard", directory] }

    /// `vmm billboard` with this store.
    func cli(_ args: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        try runVMM(["billboard"] + args + ["--billboard", directory])
    }
}

/// The shared test billboard.
func billboard() throws -> TestBillboard { try TestBillboard.shared.get() }

/// Polls `condition` every 50 ms until it holds or `timeout` seconds pass; returns whether it held.
func waitUntil(_ timeout: Double, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if try condition() { return true }
        usleep(50_000)
    }
    return try condition()
}

extension VMMProcess {
    /// Waits until `vmm receive` says it listens (a fixed sleep is too short on a loaded machine).
    func waitUntilListening(timeout: Double = 60) -> Bool {
        waitUntil(timeout) { errorText.contains("vmm: listening on") || !process.isRunning } && process.isRunning
    }
}
