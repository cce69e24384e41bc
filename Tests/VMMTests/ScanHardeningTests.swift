#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import TestSupport
@testable import KVM
import MachineCore
@testable import VMM
import Billboard
import SystemCalls
import Synchronization

// The scan looks at files other processes chose. These tests plant such files where a scan
// must look (beside a billboard database a VM process holds) and check that no scan can be
// made to read much, block, or cost the guest beside it its lease.

/// A process we start that holds a KVM VM and `file` open, as a ghost would: a `sleep` that
/// inherits a VM made here (fd 3) and the file (fd 4), and nothing else of this process.
final class PlantedVMProcess {
    let pid: pid_t

    init(holding file: OwnedFileDescriptor) throws {
        let vm = try KVMSystem().createVM()
        pid = try spawn(["/bin/sleep", "60"], descriptors: [(vm.fd.raw, 3), (file.raw, 4)])
        // The VM stays alive in the child only.
    }

    /// A ghost that opens `path` itself (fd 4), so that this test process, which holds VMs of
    /// other tests, never has that file open: a scan that stops processes holding a VM and a
    /// copy of its store must find only the child.
    init(opening path: String) throws {
        let vm = try KVMSystem().createVM()
        pid = try spawn(["/bin/sh", "-c", "exec 4<\"$1\" && exec /bin/sleep 60", "sh", path], descriptors: [(vm.fd.raw, 3)])
    }

    /// Alive and not a zombie (a killed child stays one until `deinit` reaps it).
    var isAlive: Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let nameEnd = stat.lastIndex(of: ")") else { return false }
        return stat[stat.index(after: nameEnd)...].first { $0 != " " } != "Z"
    }

    deinit {
        kill(pid, SIGKILL)
        var status: Int32 = 0
        _ = waitpid(pid, &status, 0)
    }
}

/// posix_spawn with exactly `descriptors` (source, target) and, if given, stdout: every other
/// descriptor of this test process (pipes of tests running beside it) stays out of the child.
func spawn(_ argv: [String], descriptors: [(Int32, Int32)], stdout: Int32? = nil) throws -> pid_t {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    if let stdout { posix_spawn_file_actions_adddup2(&actions, stdout, 1) }
    for (source, target) in descriptors { posix_spawn_file_actions_adddup2(&actions, source, target) }
    try #require(closeFrom(&actions, 3 + Int32(descriptors.count)) == 0)
    let cArgs = argv.map { strdup($0) } + [nil]
    defer { cArgs.forEach { free($0) } }
    var pid: pid_t = 0
    let r = posix_spawn(&pid, argv[0], &actions, nil, cArgs, environ)
    try #require(r == 0, "posix_spawn(\(argv[0])): \(String(cString: strerror(r)))")
    return pid
}

/// glibc's `posix_spawn_file_actions_addclosefrom_np`, which Swift does not import from <spawn.h>.
private let closeFrom: @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32 = {
    unsafeBitCast(dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np")!,
                  to: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32).self)
}()

/// /dev/zero's device number, devZero (a macro Swift does not import).
let devZero = dev_t((1 << 8) | 5)

/// The peak resident memory of a live process, in KiB (VmHWM).
func peakMemoryKiB(_ pid: pid_t) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }) else { return nil }
    return Int(line.split(separator: " ").dropFirst().first ?? "")
}

/// `vmm billboard scan --report-only` as a child of its own: its output, how long it took, and
/// its peak memory (KiB), the highest VmHWM read while it ran.
///
/// Not `ru_maxrss` from `wait4`: posix_spawn's child execs from the test runner's own address
/// space (vfork), and the kernel folds that space's high-water mark into the child's maxrss, so
/// the figure was the whole test runner's peak (and grew with whatever ran beside). VmHWM is the
/// scan's own address space; polled every millisecond, only a peak reached in the last
/// millisecond before exit could be missed.
func reportOnlyScan(_ store: TestBillboard) throws -> (status: Int32, output: String, seconds: Double, maxKiB: Int) {
    let outPath = temporaryPath("scan.out")
    let out = try OwnedFileDescriptor.open(outPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC)
    let start = monotonicMilliseconds()
    let pid = try spawn([try Fixtures.vmmBinary(), "billboard", "scan", "--report-only", "--billboard", store.directory],
                        descriptors: [], stdout: out.raw)
    out.close()
    var status: Int32 = 0
    var peakKiB = 0
    // A scan that blocked would loop here: the test's time limit is the guard, and `seconds` the measure.
    while true {
        // Read before the exit check: once reaped, the process has no memory to read.
        if let hwm = peakMemoryKiB(pid) { peakKiB = max(peakKiB, hwm) }
        let reaped = waitpid(pid, &status, WNOHANG)
        if reaped == pid { break }
        if reaped < 0 && errno != EINTR { break }
        usleep(1_000)
    }
    let seconds = (monotonicMilliseconds() - start) / 1000
    let output = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
    return ((status >> 8) & 0xFF, output, seconds, peakKiB)
}

@Suite("A scan cannot be turned against its host", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .serialized)
struct ScanHardeningTests {
    /// What a ghost plants beside (or as) the billboard database it holds open.
    enum Plant: String, CaseIterable {
        case sparseKey = "a 4 GiB sparse host.key"
        case fifoKey = "a FIFO as host.key"
        case deviceKey = "/dev/zero (a device node) as host.key"
        case symlinkLoopKey = "a symbolic link loop as host.key"
        case fifoDatabase = "a FIFO as the database"
        case deviceDatabase = "/dev/zero (a device node) as the database"

        /// Words the finding's evidence must contain.
        var evidence: String {
            switch self {
            case .sparseKey: "more than the 4096 allowed"
            case .fifoKey, .fifoDatabase: "a FIFO"
            case .deviceKey, .deviceDatabase: "a character device"
            case .symlinkLoopKey: "ELOOP"
            }
        }

        /// Makes the planted directory and opens the database the ghost holds.
        func make(in dir: String) throws -> OwnedFileDescriptor {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let database = dir + "/" + BillboardStore.databaseFileName, key = dir + "/" + BillboardStore.keyFileName
            switch self {
            case .fifoDatabase: try #require(mkfifo(database, 0o600) == 0)
            case .deviceDatabase: #expect(mknod(database, S_IFCHR | 0o600, devZero) == 0)
            default: try Data("SQLite format 3\0".utf8).write(to: URL(fileURLWithPath: database))
            }
            switch self {
            case .sparseKey:
                let file = try OwnedFileDescriptor.open(key, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC)
                try #require(ftruncate(file.raw, 4 << 30) == 0)
            case .fifoKey: try #require(mkfifo(key, 0o600) == 0)
            case .deviceKey: #expect(mknod(key, S_IFCHR | 0o600, devZero) == 0)
            case .symlinkLoopKey:
                try #require(symlink(key + ".loop", key) == 0 && symlink(key, key + ".loop") == 0)
            case .fifoDatabase, .deviceDatabase:
                // The database is the trap here; a host.key a bounded read would accept sits beside it.
                try Data("{}".utf8).write(to: URL(fileURLWithPath: key))
            }
            // O_NONBLOCK: the FIFO opens without a writer (as the ghost's own open could).
            return try OwnedFileDescriptor.open(database, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        }
    }

    @Test("ghosts holding a sparse 4 GiB key, a FIFO, /dev/zero or a symlink loop where a scan looks: each scan ends at once with little memory, reports the ghost as foreign-store naming the trap, and the guest beside it keeps running with its lease")
    func plantedTraps() throws {
        let store = try TestBillboard(host: "traps")
        let original = try runCounter(store, extra: ["--scan-interval", "0.5"])
        defer { _ = try? original.call(.PUT, "/vm/shutdown"); _ = original.wait() }
        let baseline = try reportOnlyScan(store)
        #expect(baseline.status == 0, "\(baseline.output)")
        #expect(baseline.maxKiB > 0, "the scan's memory was never read: it exited before the first look")
        let originalPeak = try #require(peakMemoryKiB(original.process.processIdentifier))

        for plant in Plant.allCases {
            let dir = temporaryPath("trap")
            let ghost = try PlantedVMProcess(holding: try plant.make(in: dir))
            defer { try? FileManager.default.removeItem(atPath: dir) }
            #expect(waitUntil(10) { hasVM(ghost.pid) }, "\(plant.rawValue): the planted process has no VM")
            // Several of the original's own scans, which must neither stop the ghost nor cost the original anything.
            usleep(1_500_000)
            let scan = try reportOnlyScan(store)
            #expect(scan.status == 0, "\(plant.rawValue): \(scan.output)")
            #expect(scan.seconds < 20, "\(plant.rawValue): the scan took \(scan.seconds) s")
            #expect(scan.maxKiB - baseline.maxKiB < 32 << 10,
                    "\(plant.rawValue): the scan peaked at \(scan.maxKiB) KiB, \(baseline.maxKiB) KiB without the trap")
            let finding = scan.output.split(separator: "\n").first { $0.contains("pid \(ghost.pid)") }.map(String.init)
            #expect(finding?.hasPrefix("scan: foreign-store:") == true && finding?.contains(plant.evidence) == true,
                    "\(plant.rawValue): \(finding ?? "no finding about the ghost in: \(scan.output)")")
            #expect(ghost.isAlive, "\(plant.rawValue): a foreign store is reported, its process left alone")
            #expect(stillRunning(original), "\(plant.rawValue): \(original.errorText)")
            let peak = try #require(peakMemoryKiB(original.process.processIdentifier))
            #expect(peak - originalPeak < 32 << 10, "\(plant.rawValue): the original VMM peaked at \(peak) KiB, \(originalPeak) KiB before")
            let instances = try store.cli(["instances"]).stdout
            #expect(instances.contains("\trunning\tlease epoch 1"), "\(plant.rawValue): \(instances)")
        }
    }

    @Test("a VM process holding a copy of the store (with its host.key beside it) is still found as copied-store and stopped")
    func copiedStoreStillStopped() throws {
        let store = try TestBillboard(host: "copied")
        let original = try runCounter(store, extra: ["--scan-interval", "0.5"])
        defer { _ = try? original.call(.PUT, "/vm/shutdown"); _ = original.wait() }
        let copy = temporaryPath("stolen-store")
        try FileManager.default.copyItem(atPath: store.directory, toPath: copy)
        let ghost = try PlantedVMProcess(opening: copy + "/" + BillboardStore.databaseFileName)
        #expect(waitUntil(30) { !ghost.isAlive }, "the ghost on a copied store is still running")
        #expect(try auditText(store).contains("copied-store"))
        #expect(stillRunning(original))
    }

    @Test("a scan that hangs delays neither lease renewal nor beacon records")
    func slowScanDoesNotDelayHousekeeping() throws {
        let root = temporaryPath("slow-scan")
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: root) }
        let admin = try AdminKey(name: "admin")
        let store = try BillboardStore.initialize(directory: root + "/store", hostName: "slow", firstAdmin: admin)
        let image = try Fixtures.guestBytes("counter.elf")
        let config = MachineConfiguration(commandLine: "count=0 ticks=4000000")
        try store.registry.register(GuestRegistration(name: "slow", imageSHA256: ImageDigest.sha256(Data(image)), memoryBytes: config.memorySize,
                                                      vcpus: config.vcpuCount, commandLine: config.commandLine), signedBy: admin)
        // Renewal every second (a third of the lease timeout); a scan due every 0.2 s.
        let settings = BillboardSettings(scanInterval: 0.2, beaconIntervalMs: 200, leaseTimeout: 3)
        let guest = try GuestDoors.boot(image: image, name: "slow", configuration: config, store: store, settings: settings,
                                        log: { _ in }, serialOutput: { _ in })
        // The first scan hangs until the test lets it go: were the scan on the housekeeping
        // thread, no renewal and no beacon record could happen meanwhile, however fast the machine.
        let scanning = Mutex(0)
        let release = DispatchSemaphore(value: 0)
        guest.beforePeriodicScan {
            scanning.withLock { $0 += 1 }
            release.wait()
            release.signal()
        }
        guest.start()
        defer { release.signal(); guest.requestStop(); _ = guest.waitForExit(); guest.end() }
        #expect(waitUntil(20) { scanning.withLock { $0 } >= 1 }, "no scan ran")

        // Watch the lease and the beacons while the scan hangs, until three renewals were seen.
        var renewals: [Date] = []
        var beaconCounts: Set<Int> = []
        let id = guest.session.registration.id
        let sawEnough = try waitUntil(30) {
            if let renewed = try store.leases.current(guestID: id)?.renewedAt, renewed != renewals.last { renewals.append(renewed) }
            let record = try store.instances.list().first { $0.pid == getpid() && $0.guestName == "slow" }
            beaconCounts.insert(record.map { Int($0.beaconCount) } ?? 0)
            return renewals.count >= 4 && beaconCounts.count >= 4
        }
        #expect(sawEnough, "renewals seen \(renewals.count), beacon counts \(beaconCounts.sorted())")
        #expect(scanning.withLock { $0 } == 1, "the hanging scan ended or another began")
        #expect(guest.session.holdsLease && guest.state == .running)
    }
}
