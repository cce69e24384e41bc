import ArgumentParser
import Billboard
import ControlAPI
import Foundation
import Hummingbird
import Migration
import KVM
import Loader
import MachineCore
import NetworkFrames
import SystemCalls
import Synchronization
import VMM

/// The `vmm` command line.
struct VMMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmm",
        abstract: "A small KVM hypervisor: boot tiny guests on /dev/kvm, snapshot and migrate them.",
        subcommands: [Run.self, Restore.self, Receive.self, Ctl.self, BillboardCommand.self, Bench.self]
    )
}

extension BootMode: ExpressibleByArgument {}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Boot an image and run it until it exits.",
        discussion: """
        Flat binaries load at 0x10000 and need --mode real|protected|long. A file with a \
        Multiboot v1 header is booted as Multiboot without --mode. The exit status is the \
        byte the guest wrote to port 0xf4, 0 for HLT with interrupts off, 2 if the guest \
        crashed or hung, 1 for a VMM error, 128+N when stopped by signal N.
        """
    )

    @Argument(help: "The guest image (flat binary or Multiboot kernel).")
    var image: String

    @Option(help: "Guest memory size, e.g. 64M or 1G (1M to 4G).")
    var memory: String = "64M"

    @Option(help: "Boot mode: real, protected, long (flat binaries) or multiboot.")
    var mode: BootMode?

    @Option(help: "Command line for the guest (Multiboot information or parameter block).")
    var cmdline: String?

    @Option(help: "Write the guest's serial output to this file instead of stdout.")
    var serialLog: String?

    @Option(help: "Serve the HTTP/JSON control API on this Unix socket.")
    var apiSocket: String?

    @Option(help: "The only directory PUT /vm/snapshot (vmm ctl snapshot) may write to; without it API snapshots are refused.")
    var snapshotDir: String?

    @Option(help: "Dirty tracker for live migration: bitmap (KVM_GET_DIRTY_LOG) or ring (per-vCPU dirty rings).")
    var dirtyTracker: DirtyTrackerKind = .bitmap

    @Option(help: "Directory for migration reports (JSON).")
    var reportDir: String = "migration-reports"

    @Option(help: "The registered guest name (default: the one registration with this image's digest).")
    var name: String?

    @OptionGroup var net: NetworkOptions

    @OptionGroup var billboard: BillboardOptions

    func validate() throws {
        do { _ = try MemorySize.parse(memory) } catch { throw ValidationError(error.description) }
        try net.validate()
        try validateSnapshotDir(snapshotDir, apiSocket: apiSocket)
        try billboard.validate()
    }

    func run() throws {
        let memorySize = try MemorySize.parse(memory)
        let status = try CommandRunner.fail {
            let snapshots = try snapshotDir.map(SnapshotDirectory.init)
            let bytes = try ImageFile.read(image, limit: memorySize)
            try ImageLoader.precheck(image: bytes, mode: mode, commandLine: cmdline)
            let output = try SerialOutput(path: serialLog)
            warnAboutRing(dirtyTracker)
            let configuration = MachineConfiguration(memorySize: memorySize, mode: mode, commandLine: cmdline, dirtyTracker: dirtyTracker)
            // The Billboard decides before KVM_CREATE_VM; there is no way around it.
            let guest = try GuestDoors.boot(image: bytes, name: name, configuration: configuration, tap: try net.tap(),
                                            store: try billboard.open(),
                                            settings: billboard.settings, log: logLine, serialOutput: output.write)
            return try Host.serve(guest, apiSocket: apiSocket, snapshotDirectory: snapshots, startPaused: false, reportDir: reportDir)
        }
        throw ExitCode(status)
    }
}

struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a new VMM from a snapshot file and resume the guest where it was.",
        discussion: "The snapshot is verified completely (every section's checksum and the stream digest) before the guest runs. A different --memory or a host CPU lacking the guest's features is refused. With --lazy (sealed files only) the index, signature, vCPU and device state are verified before the guest runs and each memory chunk is verified and decrypted on its first page fault (userfaultfd) while the rest is filled in behind; a chunk that fails stops the guest with a fatal error, and it never runs on it."
    )

    @Argument(help: "The snapshot file written by PUT /vm/snapshot or `vmm ctl snapshot`.")
    var file: String

    @Option(help: "Expected guest memory size; refused if the snapshot's differs.")
    var memory: String?

    @Option(help: "Write the guest's serial output to this file instead of stdout.")
    var serialLog: String?

    @Option(help: "Serve the HTTP/JSON control API on this Unix socket.")
    var apiSocket: String?

    @Option(help: "The only directory PUT /vm/snapshot (vmm ctl snapshot) may write to; without it API snapshots are refused.")
    var snapshotDir: String?

    @Flag(help: "Stay paused after restoring (resume with `vmm ctl resume`); needs --api-socket.")
    var paused = false

    @Flag(help: "Start the guest at once and bring its memory in on demand (userfaultfd), each chunk verified on first touch; sealed files only.")
    var lazy = false

    @Option(help: "Directory for migration reports (JSON).")
    var reportDir: String = "migration-reports"

    @OptionGroup var net: NetworkOptions

    @OptionGroup var billboard: BillboardOptions

    func validate() throws {
        try net.validate()
        if let memory { do { _ = try MemorySize.parse(memory) } catch { throw ValidationError(error.description) } }
        if paused && apiSocket == nil { throw ValidationError("--paused needs --api-socket, or nothing could resume the guest") }
        try validateSnapshotDir(snapshotDir, apiSocket: apiSocket)
        try billboard.validate()
    }

    func run() throws {
        let status = try CommandRunner.fail {
            let snapshots = try snapshotDir.map(SnapshotDirectory.init)
            let output = try SerialOutput(path: serialLog)
            let requested = try memory.map { try MemorySize.parse($0) }
            let (guest, _) = try GuestDoors.restore(path: file, requestedMemory: requested, tap: try net.tap(),
                                                    store: try billboard.open(),
                                                    settings: billboard.settings, lazy: lazy, log: logLine, serialOutput: output.write)
            // The lease is taken (and an authorised rollback used) only once nothing else can fail
            // before the guest runs: after the control API is up.
            return try Host.serve(guest, apiSocket: apiSocket, snapshotDirectory: snapshots, startPaused: paused, reportDir: reportDir,
                                  beforeStart: { try guest.takeRestoredLease() })
        }
        throw ExitCode(status)
    }
}

extension DirtyTrackerKind: ExpressibleByArgument {}
extension InjectedFault: ExpressibleByArgument {}

struct Receive: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Wait for one incoming live migration, then run the guest here.",
        discussion: "Only enrolled peer hosts get in: the connection is mutually authenticated TLS 1.3 unless both sides chose --insecure-plaintext. The VM is reserved (memory, vCPUs) once the source's manifest answered this connection's challenge and the Billboard admitted the guest, filled while the source runs, and resumed only after all state is verified and the source says GO. A failure before GO discards the reserved VM (the guest keeps running on the source) and the VMM goes on listening until a migration completes or --listen-timeout passes (exit status 4). After a post-copy switch the guest runs (and the API serves) at once while its last pages arrive; if the link fails then, the guest pauses until `vmm ctl migrate-recover` and the source's `migrate --resume`, or until it is given up (`vmm ctl migrate-cancel`, or --postcopy-recover-timeout): then it is lost and the VMM exits with status 2.")

    @Option(help: "Address to listen on, HOST:PORT (e.g. 127.0.0.1:7000; port 0 picks one and prints it).")
    var listen: String

    @Option(help: "Serve the HTTP/JSON control API on this Unix socket once the guest runs here (post-copy: from the switch on, while its last pages arrive).")
    var apiSocket: String?

    @Option(help: "The only directory PUT /vm/snapshot (vmm ctl snapshot) may write to; without it API snapshots are refused.")
    var snapshotDir: String?

    @Option(help: "Post-copy: seconds a migration paused by a failed link waits for its recovery before the guest is given up as lost; 0 waits for the operator (vmm ctl migrate-cancel).")
    var postcopyRecoverTimeout: Double = 0

    @Option(help: "Dirty tracker for migrating the guest onward: bitmap or ring.")
    var dirtyTracker: DirtyTrackerKind = .bitmap

    @Option(help: "Write the guest's serial output to this file instead of stdout.")
    var serialLog: String?

    @Option(help: "Directory for migration reports (JSON): the arrival report (incoming-*.json, with the announcement, once its last round went out) and those of onward migrations.")
    var reportDir: String = "migration-reports"

    @Option(help: "Seconds to wait for a migration that completes; failed or refused connections do not end the wait. When it passes, the VMM exits with status 4.")
    var listenTimeout: Double = 300

    @Flag(help: "Accept plain TCP instead of mutually authenticated TLS (for benchmarks; the source must consent too). The stream stays signed and checksummed, but anyone on the path can read the guest.")
    var insecurePlaintext = false

    @Option(help: "Rounds of the announcement (a RARP from the guest's MAC and a gratuitous ARP for its registered IP) sent once a guest with a network card runs here, so switches learn its new port; 0 turns it off (as --no-announce). Default: 5, QEMU's.")
    var announceRounds: Int?

    @Flag(help: "Send no announcement (as --announce-rounds 0): the switches keep sending the guest's frames to its old port until it sends something itself.")
    var noAnnounce = false

    @Option(help: "Milliseconds between the first and second rounds.")
    var announceInitialMs: Int = AnnounceSchedule.qemuDefault.initialMs

    @Option(help: "Milliseconds each later gap grows by.")
    var announceStepMs: Int = AnnounceSchedule.qemuDefault.stepMs

    @Option(help: "The longest gap between rounds, in milliseconds.")
    var announceMaxMs: Int = AnnounceSchedule.qemuDefault.maxMs

    var announceSchedule: AnnounceSchedule {
        AnnounceSchedule(initialMs: announceInitialMs, stepMs: announceStepMs, rounds: noAnnounce ? 0 : announceRounds ?? AnnounceSchedule.qemuDefault.rounds, maxMs: announceMaxMs)
    }

    /// Test-only: the destination commits this fault (a transport wraps the connection), so the
    /// subprocess tests can prove what the source does about it.
    @Option(help: .hidden) var injectFault: InjectedFault?

    @OptionGroup var net: NetworkOptions

    @OptionGroup var billboard: BillboardOptions

    func validate() throws {
        try net.validate()
        guard listenTimeout > 0 && listenTimeout <= 86_400 else { throw ValidationError("--listen-timeout must be 1 to 86400 seconds") }
        guard postcopyRecoverTimeout >= 0 && postcopyRecoverTimeout <= 604_800 else {
            throw ValidationError("--postcopy-recover-timeout must be 0 (wait for the operator) to 604800 seconds")
        }
        if let problem = announceSchedule.problem { throw ValidationError("--announce-*: \(problem)") }
        if noAnnounce, let rounds = announceRounds, rounds != 0 {
            throw ValidationError("--no-announce and --announce-rounds \(rounds) contradict each other: give one of them")
        }
        try validateSnapshotDir(snapshotDir, apiSocket: apiSocket)
        try billboard.validate()
    }

    /// The exit status when the listen timeout passes without a completed migration.
    static let listenTimeoutStatus: Int32 = 4

    func run() throws {
        let status = try CommandRunner.fail {
            let snapshots = try snapshotDir.map(SnapshotDirectory.init)
            let output = try SerialOutput(path: serialLog)
            let store = try billboard.open()
            let settings = billboard.settings
            let listener = try GuestDoors.listen(listen, store: store, plaintext: insecurePlaintext)
            FileHandle.standardError.write(Data("vmm: listening on \(listener.address):\(listener.port)\n".utf8))
            // Before the guest arrives a signal just ends the process; once it runs here,
            // a signal stops its vCPUs and the VMM cleans up as `vmm run` does.
            let running = RunningGuest()
            TerminationSignals.handle { signal in
                if let guest = running.guest {
                    guest.requestStop(signal: signal)
                } else {
                    listener.shutdownListening()
                    Foundation.exit(128 + signal)
                }
            }
            let fault = injectFault
            let guest: AdmittedGuest
            do {
                guest = try GuestDoors.receive(listener: listener, deadline: monotonicMilliseconds() + listenTimeout * 1000,
                                               store: store, settings: settings, dirtyTracker: dirtyTracker,
                                               tap: try net.tap(), announce: announceSchedule,
                                               postcopyRecoverTimeout: postcopyRecoverTimeout > 0 ? postcopyRecoverTimeout : nil,
                                               wrapTransport: { transport in fault.map { FaultInjectingTransport(transport, fault: $0) } ?? transport },
                                               log: logLine, serialOutput: output.write)
            } catch MigrationError.timedOut(let what) {
                FileHandle.standardError.write(Data("vmm: \(what) (\(Int(listenTimeout)) s); nothing was received\n".utf8))
                return Self.listenTimeoutStatus
            }
            running.guest = guest
            MigrationService.reportArrival(of: guest, in: reportDir, log: logLine)
            return try Host.serve(guest, apiSocket: apiSocket, snapshotDirectory: snapshots, startPaused: false, reportDir: reportDir,
                                  alreadyStarted: true)
        }
        throw ExitCode(status)
    }
}

/// Runs an admitted guest in this process: signals, optional API, exit status.
enum Host {
    final class Controller: VMControlling {
        let guest: AdmittedGuest
        let migrations: MigrationService
        let snapshotDirectory: SnapshotDirectory?
        init(guest: AdmittedGuest, migrations: MigrationService, snapshotDirectory: SnapshotDirectory?) {
            self.guest = guest; self.migrations = migrations; self.snapshotDirectory = snapshotDirectory
        }

        func beforeResume(force: Bool) throws {
            if migrations.inDoubt && !force {
                throw APIError(.conflict, "the last migration is in doubt: the destination may be running this guest. Resume only if it is not, with {\"force\": true}")
            }
            if migrations.inDoubt {
                // The lease went to the destination with GO: resuming here needs it back.
                do { try guest.reclaim() } catch {
                    throw APIError(.conflict, "the billboard refuses to resume this copy: \(error)")
                }
            }
        }
    }

    static func serve(_ guest: AdmittedGuest, apiSocket: String?, snapshotDirectory: SnapshotDirectory?, startPaused: Bool, reportDir: String?,
                      alreadyStarted: Bool = false, beforeStart: () throws -> Void = {}) throws -> Int32 {
        // However this ends (an error included), the lease goes back and the record says so.
        defer { guest.end() }
        let migrations = MigrationService(guest: guest, reportDirectory: reportDir)
        if !alreadyStarted {
            TerminationSignals.handle { signal in
                // A migration in flight is aborted first (the guest resumes here), then the VMM stops.
                migrations.cancel(reason: "the VMM received signal \(signal)")
                let deadline = Date().addingTimeInterval(10)
                while [.setup, .precopy, .stopAndCopy, .handover].contains(migrations.status.progress.phase) && Date() < deadline {
                    usleep(10_000)
                }
                guest.requestStop(signal: signal)
            }
        }
        var server: ControlServer?
        if let apiSocket {
            do {
                server = try ControlServer.start(socketPath: apiSocket, controller: Controller(guest: guest, migrations: migrations,
                                                                                                   snapshotDirectory: snapshotDirectory))
            } catch where alreadyStarted {
                // A guest that arrived by migration already runs here and is the only copy: keep it.
                FileHandle.standardError.write(Data("vmm: warning: the control API could not start (\(error)); the guest keeps running without it\n".utf8))
            }
        }
        defer { server?.stop() }
        try beforeStart()
        if alreadyStarted {
            // Started by the migration receiver on GO.
        } else if startPaused {
            guest.startPaused()
        } else {
            guest.start()
        }
        let exit = guest.waitForExit()
        // Let the API answer the request that ended the VM before the socket goes away (a
        // post-copy migration given up through it ends the VM too).
        if exit == .migrated || exit == .shutdown || guest.incomingPostCopy?.status.phase == .lost { usleep(300_000) }
        switch exit {
        case .exitPort, .halted, .shutdown, .migrated: break
        default: FileHandle.standardError.write(Data("vmm: \(exit)\n".utf8))
        }
        return exit.exitStatus
    }
}

/// The Billboard options of every command that runs a guest. There is deliberately no option
/// to skip admission.
struct BillboardOptions: ParsableArguments {
    @Option(help: "The billboard directory: this host's registry of guests (vmm billboard init). The guest must be registered there.")
    var billboard: String = BillboardStore.defaultDirectory

    @Option(help: "Seconds between active scans for false, duplicate and stale guests.")
    var scanInterval: Double = 5

    @Option(help: "Seconds after a dead VMM's last lease renewal before its guest may be taken over.")
    var leaseTimeout: Double = 10

    @Option(help: "Milliseconds between the guest's beacons (written into its beacon block).")
    var beaconInterval: UInt32 = 1000

    @Option(help: "Frames with another MAC or IP than registered that a guest's network card may send (each dropped and audited) before it is stopped as a false VM.")
    var spoofThreshold: Int = 8

    func validate() throws {
        guard scanInterval >= 0.1 && scanInterval <= 3600 else { throw ValidationError("--scan-interval must be 0.1 to 3600 seconds") }
        guard leaseTimeout >= 1 && leaseTimeout <= 3600 else { throw ValidationError("--lease-timeout must be 1 to 3600 seconds") }
        guard beaconInterval >= 10 && beaconInterval <= 600_000 else { throw ValidationError("--beacon-interval must be 10 to 600000 ms") }
        guard spoofThreshold >= 1 && spoofThreshold <= 10_000 else { throw ValidationError("--spoof-threshold must be 1 to 10000 frames") }
    }

    func open() throws -> BillboardStore { try BillboardStore(directory: billboard) }

    var settings: BillboardSettings {
        BillboardSettings(scanInterval: scanInterval, beaconIntervalMs: beaconInterval, leaseTimeout: leaseTimeout,
                          spoofThreshold: spoofThreshold)
    }
}

/// `--net tap=NAME`: the guest's network card, on a tap that exists on this host. The MAC is
/// not an option: the VMM gives it (see `NetworkConfiguration.mac`).
struct NetworkOptions: ParsableArguments {
    @Option(help: "Give the guest a network card on this host's tap interface: tap=NAME. The tap must exist already (e.g. ip tuntap add dev NAME mode tap; ip link set NAME master BRIDGE up): a missing one is refused, never created. Its MAC (and the IP it may use) are the guest's registration's; a guest registered without --mac is refused a card. A restored or received guest that had a card needs one here (its MAC travels with it).")
    var net: String?

    func validate() throws { _ = try tap() }

    /// The tap named by --net tap=NAME.
    func tap() throws -> String? {
        guard let net else { return nil }
        guard net.hasPrefix("tap="), case let name = String(net.dropFirst(4)), TapDevice.isValidName(name) else {
            throw ValidationError("--net takes tap=NAME, NAME the host's tap interface (1 to 15 bytes); the MAC is the guest's registration's and cannot be given here (got '\(net)')")
        }
        return name
    }
}

/// --snapshot-dir only matters to the control API.
func validateSnapshotDir(_ snapshotDir: String?, apiSocket: String?) throws {
    if snapshotDir != nil && apiSocket == nil {
        throw ValidationError("--snapshot-dir is where API snapshots go; it needs --api-socket")
    }
}

/// One line on stderr, for the Billboard's reports.
@Sendable func logLine(_ line: String) {
    FileHandle.standardError.write(Data("vmm: \(line)\n".utf8))
}

/// The dirty ring is unreliable on kvm_pvm (see the README); say so where it is chosen.
func warnAboutRing(_ tracker: DirtyTrackerKind) {
    if tracker == .ring && FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm") {
        FileHandle.standardError.write(Data("vmm: warning: this host's KVM is kvm_pvm, whose dirty ring was seen to stop logging after its first reset; a migration may miss pages. Prefer --dirty-tracker bitmap here.\n".utf8))
    }
}

/// The guest a signal handler should stop, once there is one.
final class RunningGuest: Sendable {
    private let current = Mutex<AdmittedGuest?>(nil)
    var guest: AdmittedGuest? {
        get { current.withLock { $0 } }
        set { current.withLock { $0 = newValue } }
    }
}

/// Where serial bytes go: stdout or a log file, one unbuffered write per byte.
final class SerialOutput: Sendable {
    /// The log file, closed when the output goes away; nil for stdout, which is not ours to close.
    private let file: OwnedFileDescriptor?
    init(path: String?) throws {
        if let path {
            // Created 0600, or an existing FIFO or file of ours (for `tail -f`) checked before it is
            // opened or truncated; never a symlink or another user's file.
            do { file = try StreamedFile.openForWriting(path, what: "serial log") } catch { throw CLIError(error.description) }
        } else {
            file = nil
        }
    }
    func write(_ byte: UInt8) {
        var b = byte
        _ = Foundation.write(file?.raw ?? STDOUT_FILENO, &b, 1)
    }
}

/// Runs a command body, printing any error as one clear line and exiting 1.
enum CommandRunner {
    static func fail(_ body: () throws -> Int32) throws -> Int32 {
        do {
            return try body()
        } catch {
            FileHandle.standardError.write(Data("vmm: error: \(describeWithFlagHint(error))\n".utf8))
            throw ExitCode(1)
        }
    }
}

/// A command-line error with a message that says what to do.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

VMMCommand.main()
