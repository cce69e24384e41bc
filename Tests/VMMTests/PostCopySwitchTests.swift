import ControlAPI
import Foundation
import GuestMemory
@testable import Migration
import MachineCore
import Snapshot
import Synchronization
import SystemCalls
import Testing
import TestSupport
@testable import VMM

/// An in-process destination whose guest stays parked after GO: its memory once the last page is
/// in can be compared with the source's at the switch.
final class ParkedReceiver: Sendable {
    let listener: any MigrationListener
    let host: String
    private let done = DispatchSemaphore(value: 0)
    struct Outcome: Sendable {
        var digest: String?
        var figures: PostCopyFigures?
        var postcopyFailure: String?
        var error: String?
    }
    private let outcome = Mutex(Outcome())

    init() throws {
        let hosts = try localHosts()
        let listener = try GuestDoors.listen("127.0.0.1:0", store: hosts.destination, plaintext: false)
        self.listener = listener
        host = hosts.destination.hostName
        Thread.detachNewThread { [self] in
            let receiver = ParkedDestination.receiver(on: hosts)
            do {
                let transport = try listener.nextConnection(deadline: monotonicMilliseconds() + 120_000, onRefused: { _ in })
                defer { transport.close() }
                let (vm, result) = try receiver.run(transport: transport) {} acceptPageChannel: {
                    try listener.nextConnection(deadline: monotonicMilliseconds() + 30_000, onRefused: { _ in })
                }
                // Post-copy goes on after the guest started: every page in (or the guest lost) first.
                let phase = result.incoming?.wait(for: [.completed, .lost], timeout: 300)
                if let phase, phase != .completed {
                    // Its memory cannot be read whole (a read would wait for a page that may not come).
                    outcome.withLock { $0 = Outcome(postcopyFailure: "post-copy ended \(phase.rawValue): \(result.incoming?.status.error ?? "")") }
                    vm.machine.requestStop()
                    done.signal()
                    return
                }
                let failure: String? = nil
                let digest = try vm.machine.memoryDigest()
                outcome.withLock { $0 = Outcome(digest: digest, figures: result.incoming?.figures, postcopyFailure: failure) }
                vm.machine.requestStop()
            } catch { outcome.withLock { $0.error = "\(error)" } }
            done.signal()
        }
    }

    var address: String { "127.0.0.1:\(listener.port)" }

    /// The destination's outcome once its receive ended; nil if it did not within `timeout`.
    func wait(timeout: Double = 300) -> Outcome? {
        done.wait(timeout: .now() + timeout) == .success ? outcome.withLock { $0 } : nil
    }
}

/// Where a post-copy switch comes.
enum SwitchPoint: String, CustomStringConvertible, Sendable {
    /// After no pre-copy round: every page that holds data is missing.
    case beforeRound0
    /// After round 0 (`postcopy_after_rounds` 1).
    case afterRound0
    /// Asked for while round 0 is being sent: the rest of the round stays missing.
    case requestedMidRound0
    /// Asked for as round 0 ends (while its dirty pages are collected).
    case requestedAfterRound0
    var description: String { rawValue }
}

/// A source whose dirty tracker runs `onCollect(n)` before its n-th collection (1: as round 0 ends).
final class CollectHookSource: MigrationSourceVM, DirtyTracker, @unchecked Sendable {
    let base: DigestingSource
    private let collects = Mutex(0)
    private let onCollect: @Sendable (Int) -> Void
    init(_ base: DigestingSource, onCollect: @escaping @Sendable (Int) -> Void) {
        self.base = base
        self.onCollect = onCollect
    }
    var memory: GuestMemory { base.memory }
    var dirtyTracker: any DirtyTracker { self }
    func machineDescriptionPayload() throws -> [UInt8] { try base.machineDescriptionPayload() }
    var migrationIdentity: String? { base.migrationIdentity }
    var hostName: String { base.hostName }
    func commitHandover(toHost host: String?, toPid pid: Int32?) throws { try base.commitHandover(toHost: host, toPid: pid) }
    func signState(digest: [UInt8]) throws -> [UInt8]? { try base.signState(digest: digest) }
    func pauseForMigration() -> Bool { base.pauseForMigration() }
    func resumeAfterMigration() { base.resumeAfterMigration() }
    func statePayloads() throws -> (vcpu: [UInt8], devices: [UInt8]) { try base.statePayloads() }
    func setThrottle(percent: Int) { base.setThrottle(percent: percent) }
    func notePostCopyPageServer(awaitingRecovery: Bool) { base.notePostCopyPageServer(awaitingRecovery: awaitingRecovery) }

    var name: String { base.dirtyTracker.name }
    func enable() throws { try base.dirtyTracker.enable() }
    func disable() throws { try base.dirtyTracker.disable() }
    func collect() throws -> DirtyBitmap {
        onCollect(collects.withLock { $0 += 1; return $0 })
        return try base.dirtyTracker.collect()
    }
    func rearm(firstPage: UInt64, mask: UInt64) throws { try base.dirtyTracker.rearm(firstPage: firstPage, mask: mask) }
}

/// A transport that asks `fire(n)` before its n-th send (1-based), until it returns true.
final class SendHook: MigrationTransport {
    let inner: any MigrationTransport
    private let state: Mutex<(sends: Int, done: Bool)> = Mutex((0, false))
    private let fire: @Sendable (Int) -> Bool
    /// `fire(n)` is asked before send n (1-based) until it returns true.
    init(_ inner: any MigrationTransport, fire: @escaping @Sendable (Int) -> Bool) {
        self.inner = inner
        self.fire = fire
    }
    var authenticatedPeer: String? { inner.authenticatedPeer }
    var peer: String { inner.peer }
    func send(_ bytes: UnsafeRawBufferPointer) throws {
        let n = state.withLock { s -> Int? in
            guard !s.done else { return nil }
            s.sends += 1
            return s.sends
        }
        if let n, fire(n) { state.withLock { $0.done = true } }
        try inner.send(bytes)
    }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws { try inner.receive(into: buffer) }
    func close() { inner.close() }
}

// Serialized: four 128 MiB guests rewriting 64 MiB at once would load the machine for every other test.
@Suite("Post-copy switch points: on request, mid-round, on stall", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage),
       .serialized)
struct PostCopySwitchTests {
    /// Waits until the dirtier has touched its whole working set (round 0 then has it all to send).
    func waitForWorkingSet(_ machine: AdmittedGuest, pages: Int) {
        #expect(waitUntil(120) { (machine.memory.possiblyNonZeroPages()?.count ?? Int.max) >= pages },
                "the dirtier did not touch its \(pages) pages")
    }

    @Test("under a 64 MiB hot working set, memory after the last page equals the source's at the switch, at each switch point",
          arguments: [SwitchPoint.beforeRound0, .afterRound0, .requestedMidRound0, .requestedAfterRound0])
    func hotWorkingSet(_ point: SwitchPoint) throws {
        // 16384 pages (64 MiB, from 4 MiB on) rewritten in order, over and over, as fast as the
        // guest runs; and 16 MiB above them written once, before the migration, and never again:
        // the dirty log says nothing of those, so a switch that lost track of what a round had not
        // sent yet would lose them.
        let machine = try bootDirtier(memory: 128 << 20, commandLine: "pages=16384 rate=0 passes=0 mark_us=0 pattern=seq")
        try machine.memory.write((0..<(16 << 20)).map { UInt8(truncatingIfNeeded: $0 / 4096 &* 31 &+ $0 | 1) }, at: GuestAddress(100 << 20))
        waitForWorkingSet(machine, pages: 16384 + 4096)
        let destination = try ParkedReceiver()
        let source = DigestingSource(machine)
        let afterRounds: Int? = switch point {
        case .beforeRound0: 0
        case .afterRound0: 1
        case .requestedMidRound0, .requestedAfterRound0: nil
        }
        let settings = MigrationSettings(destination: destination.address, peer: destination.host, timeoutSeconds: 600,
                                         postcopy: true, postcopyAfterRounds: afterRounds)
        // Set once the sender exists: the hooks below ask it to switch.
        let senderBox = Mutex<PreCopySender?>(nil)
        let hooked = CollectHookSource(source) { n in
            if point == .requestedAfterRound0 && n == 1 { try? senderBox.withLock { $0 }?.requestPostCopySwitch() }
        }
        let sender = PreCopySender(vm: hooked, settings: settings)
        senderBox.withLock { $0 = sender }
        let connections = Mutex(0)
        let report = sender.run {
            let transport = try machine.connect(settings)
            guard connections.withLock({ $0 += 1; return $0 }) == 1 else { return transport }
            switch point {
            case .requestedMidRound0:
                // The main connection's sends go 1 MiB at a time: the 8th is well inside round 0,
                // which has 64 MiB to send, and the round stops after the batch being sent.
                return SendHook(transport) { n in
                    guard n == 8 else { return false }
                    try? sender.requestPostCopySwitch()
                    return true
                }
            default: return transport
            }
        }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        let arrived = try #require(destination.wait())
        #expect(arrived.error == nil, "\(arrived.error ?? "")")
        #expect(arrived.postcopyFailure == nil)
        #expect(arrived.digest != nil && arrived.digest == source.digestAtPause, "lost or stale pages after the switch (\(point))")
        let figures = try #require(report.postcopy)
        #expect(figures.pagesPushed + figures.pagesRequested >= figures.pagesMissingAtSwitch)
        switch point {
        case .beforeRound0:
            #expect(figures.trigger == .afterRounds && figures.switchedAfterRounds == 0 && figures.switchedMidRound == false)
            #expect(report.pagesSent >= 16384, "every page of the working set must have come after the switch")
        case .afterRound0:
            #expect(figures.trigger == .afterRounds && figures.switchedAfterRounds == 1 && figures.switchedMidRound == false)
        case .requestedMidRound0:
            #expect(figures.trigger == .requested && figures.switchedAfterRounds == 0 && figures.switchedMidRound == true)
            // Round 0 stopped early: the rest of the working set was missing at the switch.
            #expect(report.pagesPerRound.first.map { $0 < 16384 } == true, "\(report.pagesPerRound)")
            #expect(figures.pagesMissingAtSwitch > 0)
        case .requestedAfterRound0:
            // Asked for before round 1 began (or, had round 0 converged, before stop-and-copy).
            #expect(figures.trigger == .requested && figures.switchedAfterRounds == 1 && figures.switchedMidRound == false)
        }
        #expect(figures.stall == nil && figures.stallReason == nil)
        // Once switched, another request is refused, saying so.
        #expect(throws: PostCopySwitchRefusal.self) { try sender.requestPostCopySwitch() }
        #expect(machine.state == .paused, "the source ran on after the switch")
        machine.end(with: .migrated)
    }

    @Test("a guest too hot to converge under a small downtime limit switches to post-copy by itself, and no page is lost")
    func switchesOnStall() throws {
        // 1024 pages rewritten in order, continuously; the link is held to 1 MB/s (256 pages/s),
        // so each round leaves as much as it sent, and 20 ms is never within reach.
        let machine = try bootDirtier(memory: 64 << 20, commandLine: "pages=1024 rate=0 passes=0 mark_us=0 pattern=seq")
        waitForWorkingSet(machine, pages: 1024)
        let destination = try ParkedReceiver()
        let source = DigestingSource(machine)
        let settings = MigrationSettings(destination: destination.address, peer: destination.host, maxDowntimeMs: 20,
                                         maxBandwidth: 1_000_000, timeoutSeconds: 3600, postcopy: true,
                                         postcopyAfterRounds: nil, postcopyOnStall: true)
        let report = PreCopySender(vm: source, settings: settings).run { try machine.connect(settings) }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        let arrived = try #require(destination.wait())
        #expect(arrived.error == nil, "\(arrived.error ?? "")")
        #expect(arrived.digest != nil && arrived.digest == source.digestAtPause, "lost or stale pages after the switch on stall")
        let figures = try #require(report.postcopy, "it never switched: \(report.pagesPerRound)")
        #expect(figures.trigger == .stall)
        // Seen from the rounds' figures, long before the hour's time limit.
        #expect(figures.stall != nil && figures.stall != .timeout, "\(figures.stallReason ?? "")")
        #expect(figures.stallReason?.contains("20 ms limit") == true, "\(figures.stallReason ?? "")")
        #expect(figures.switchedAfterRounds >= 2 && figures.switchedMidRound == false)
        #expect(report.convergence?.verdict == "stalled")
        #expect(!report.converged)
        #expect(machine.state == .paused)
        machine.end(with: .migrated)
    }

    @Test("a migration allowed to switch but converging first finishes as pre-copy; a switch asked for afterwards is refused")
    func convergesWithoutSwitch() throws {
        let sourceOutput = SerialCapture()
        let machine = try bootCounter(capture: sourceOutput)
        usleep(200_000)
        let destination = try Destination()
        let settings = MigrationSettings(destination: destination.address, peer: destination.host, timeoutSeconds: 60,
                                         postcopy: true, postcopyAfterRounds: nil, postcopyOnStall: true)
        let sender = PreCopySender(vm: machine, settings: settings)
        let report = sender.run { try machine.connect(settings) }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(report.converged)
        #expect(report.postcopy == nil, "it switched: \(String(describing: report.postcopy))")
        #expect(destination.wait())
        let dest = try #require(destination.machine)
        usleep(200_000)
        dest.requestStop()
        _ = dest.waitForExit()
        machine.end(with: .migrated)
        let numbers = counterNumbers(sourceOutput.text + destination.capture.text)
        #expect(numbers.count > 10)
        #expect(isSequence(numbers), "gap or repeat around \(counterNumbers(sourceOutput.text).suffix(3))")
        let refusal = #expect(throws: PostCopySwitchRefusal.self) { try sender.requestPostCopySwitch() }
        #expect(refusal?.description.contains("past pre-copy") == true, "\(String(describing: refusal))")
    }

    @Test("a pre-copy migration refuses a switch; nothing is asked of a finished one")
    func refusedInProcess() throws {
        let machine = try bootCounter(capture: SerialCapture())
        defer { machine.end(with: .shutdown) }
        let plain = PreCopySender(vm: machine, settings: MigrationSettings(destination: "127.0.0.1:1", peer: "nobody"))
        #expect(throws: PostCopySwitchRefusal.notPostcopy) { try plain.requestPostCopySwitch() }
        #expect(PostCopySwitchRefusal.notPostcopy.description.contains("--postcopy"))
        // A post-copy migration that failed in setup (nobody listens) ends its window.
        let settings = MigrationSettings(destination: "127.0.0.1:1", peer: "nobody", postcopy: true, postcopyAfterRounds: nil)
        let failed = PreCopySender(vm: machine, settings: settings)
        let report = failed.run { try machine.connect(settings) }
        #expect(report.outcome == .failed)
        let refusal = #expect(throws: PostCopySwitchRefusal.self) { try failed.requestPostCopySwitch() }
        #expect(refusal?.description.contains("it has ended") == true, "\(String(describing: refusal))")
        #expect(machine.state == .running, "the guest stopped after a refused switch and a failed migration")
    }
}

@Suite("PUT /vm/migration/postcopy and vmm ctl migrate-postcopy", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct PostCopySwitchAPITests {
    func error(_ reply: ControlClient.Reply) -> String { reply.json?["error"] as? String ?? "(no JSON error: \(reply.body))" }

    @Test("refused with 409 and a clear error with no migration or one that does not allow post-copy; on request a running migration switches and completes; the guest runs throughout")
    func switchThroughTheAPI() throws {
        let store = try TestBillboard(host: "pcswitch")
        let guest = try Fixtures.guest("dirtier.elf")
        let cmdline = "pages=1024 rate=0 passes=0 mark_us=0 pattern=seq"
        let registration = try store.register(guest, cmdline: cmdline)
        let socket = temporaryPath("pcswitch-src") + ".sock"
        let reports = temporaryPath("pcswitch-reports")
        let source = try VMMProcess(["run", guest, "--cmdline", cmdline, "--api-socket", socket, "--report-dir", reports] + registration,
                                    socket: socket)
        try source.waitForSocket()
        defer { if source.process.isRunning { _ = try? source.call(.PUT, "/vm/shutdown"); _ = source.wait(timeout: 10) } }

        // No migration.
        let none = try source.call(.PUT, "/vm/migration/postcopy")
        #expect(none.status == 409, "\(none.body)")
        #expect(error(none).contains("no migration is running"), "\(error(none))")
        let cli = try runVMM(["ctl", "migrate-postcopy", "--api-socket", socket])
        #expect(cli.status == 1)
        #expect(cli.stderr.contains("HTTP 409") && cli.stderr.contains("no migration is running"), "\(cli.stderr)")
        let withBody = try source.call(.PUT, "/vm/migration/postcopy", "{\"now\": true}")
        #expect(withBody.status == 400 && error(withBody).contains("takes no fields"), "\(withBody.body)")
        #expect(try source.call(.GET, "/vm/migration/postcopy").status == 405)

        // A pre-copy migration (to a listener that accepts and then says nothing) refuses it.
        let silent = try TCPListener(listen: "127.0.0.1:0")
        let started = try source.call(.PUT, "/vm/migrate",
                                      "{\"destination\": \"127.0.0.1:\(silent.port)\", \"transport\": \"plaintext\", \"timeout_s\": 600}")
        #expect(started.status == 202, "\(started.body)")
        let held = try silent.accept(timeoutSeconds: 30)
        let precopyOnly = try source.call(.PUT, "/vm/migration/postcopy")
        #expect(precopyOnly.status == 409, "\(precopyOnly.body)")
        #expect(error(precopyOnly).contains("not started with post-copy allowed"), "\(error(precopyOnly))")
        held.close()
        #expect(waitUntil(60) { (try? source.call(.GET, "/vm/migration").json?["phase"] as? String) == "failed" },
                "the migration to a closed connection did not fail")
        #expect(try source.call(.GET, "/vm").json?["state"] as? String == "running", "the guest does not run after the refused switch")

        // A post-copy migration that would switch only on request, held back by a 1 MB/s link and
        // a 1 ms downtime limit it can never meet, switches when asked and completes.
        let port = try freePort()
        let destinationSocket = temporaryPath("pcswitch-dst") + ".sock"
        let destination = try VMMProcess(["receive", "--listen", "127.0.0.1:\(port)", "--api-socket", destinationSocket,
                                          "--listen-timeout", "600"] + store.storeArguments, socket: destinationSocket)
        defer { if destination.process.isRunning { _ = try? destination.call(.PUT, "/vm/shutdown"); _ = destination.wait(timeout: 10) } }
        #expect(destination.waitUntilListening(), "vmm receive did not listen: \(destination.errorText)")
        let migrate = try source.call(.PUT, "/vm/migrate", """
            {"destination": "127.0.0.1:\(port)", "peer": "\(store.host)", "postcopy": true, "postcopy_after_rounds": "never",
             "max_bandwidth": 1000000, "max_downtime_ms": 1, "timeout_s": 3600}
            """)
        #expect(migrate.status == 202, "\(migrate.body)")
        #expect(waitUntil(120) {
            guard let status = try? source.call(.GET, "/vm/migration").json else { return false }
            return status["phase"] as? String == "precopy" && (status["pages_sent"] as? Int ?? 0) > 0
        }, "the migration never got to sending pages")
        let asked = try runVMM(["ctl", "migrate-postcopy", "--api-socket", socket])
        #expect(asked.status == 0, "\(asked.stderr)")
        #expect(asked.stdout.contains("\"postcopy_switch\":\"requested\""), "\(asked.stdout)")
        #expect(asked.stdout.contains("\"warning\""), "\(asked.stdout)")
        #expect(source.wait(timeout: 300) == 0, "the source did not end as migrated: \(source.errorText)")
        try destination.waitForSocket(timeout: 120)
        #expect(try destination.call(.GET, "/vm").json?["state"] as? String == "running", "the guest does not run at the destination")

        let files = try FileManager.default.contentsOfDirectory(atPath: reports).filter { $0.hasSuffix(".json") }.sorted()
        let last = try #require(files.last)
        let report = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: reports + "/" + last))) as? [String: Any])
        #expect(report["outcome"] as? String == "completed", "\(report)")
        let postcopy = try #require(report["postcopy"] as? [String: Any], "\(report)")
        #expect(postcopy["switch"] as? String == "requested", "\(postcopy)")
        #expect((report["settings"] as? [String: Any])?["postcopy_after_rounds"] as? String == "never")
    }
}
