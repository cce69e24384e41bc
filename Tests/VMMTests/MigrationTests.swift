import Foundation
import Testing
import TestSupport
import GuestMemory
import KVM
import Migration
import Billboard
import Snapshot
import SystemCalls
import MachineCore
import NetworkFrames
import PageFaults
import VMM

/// A destination running `GuestDoors.receive` on a background thread; a fault, if given, is
/// committed by a `FaultInjectingTransport` around the accepted connection.
// @unchecked: `machine` and `error` are written by the receiving thread before `done` is signalled, read after.
final class Destination: @unchecked Sendable {
    let listener: any MigrationListener
    /// The host receiving: what a source names as its peer.
    let host: String
    let capture = SerialCapture()
    private let done = DispatchSemaphore(value: 0)
    private(set) var machine: AdmittedGuest?
    private(set) var error: (any Error)?

    /// `onSource`: receive on the source host (a guest coming back); by default on the destination host.
    /// `listenSeconds`: how long it keeps listening for a migration that completes.
    /// `tap`, `namespace`: the arriving guest's card goes on `tap`, opened in network namespace
    /// `namespace` (/run/netns/NAME; the receiving thread enters it), and is announced on
    /// `announce` once it runs. `postcopyRecoverTimeout`: seconds a paused post-copy migration
    /// waits before its guest is given up.
    init(tracker: DirtyTrackerKind = .bitmap, fault: InjectedFault? = nil, onSource: Bool = false, listenSeconds: Double = 60,
         tap: String? = nil, namespace: String? = nil, announce: AnnounceSchedule = .qemuDefault,
         postcopyRecoverTimeout: Double? = nil) throws {
        let hosts = try localHosts()
        let store = onSource ? hosts.source : hosts.destination
        listener = try GuestDoors.listen("127.0.0.1:0", store: store, plaintext: false)
        host = store.hostName
        let capture = self.capture
        Thread.detachNewThread { [self] in
            do {
                if let namespace { try NetworkNamespace.enter(path: "/run/netns/\(namespace)") }
                machine = try GuestDoors.receive(listener: listener, deadline: monotonicMilliseconds() + listenSeconds * 1000,
                                                 store: store, settings: hosts.settings, dirtyTracker: tracker, tap: tap,
                                                 announce: announce, postcopyRecoverTimeout: postcopyRecoverTimeout,
                                                 wrapTransport: { t in fault.map { FaultInjectingTransport(t, fault: $0) } ?? t },
                                                 log: { _ in }, serialOutput: capture.append)
            } catch {
                self.error = error
            }
            done.signal()
        }
    }

    var address: String { "127.0.0.1:\(listener.port)" }

    /// Waits for the receive to end (success or failure).
    func wait(timeout: Double = 120) -> Bool { done.wait(timeout: .now() + timeout) == .success }
}

/// A source VM that records the memory digest at the moment its state is captured (paused).
// @unchecked: `digestAtPause` is written by the sender's thread and read after `run` returned.
final class DigestingSource: MigrationSourceVM, @unchecked Sendable {
    let machine: AdmittedGuest
    var digestAtPause: String?
    init(_ machine: AdmittedGuest) { self.machine = machine }
    var memory: GuestMemory { machine.memory }
    var dirtyTracker: any DirtyTracker { machine.dirtyTracker }
    func machineDescriptionPayload() throws -> [UInt8] { try machine.machineDescriptionPayload() }
    var migrationIdentity: String? { nil }
    var hostName: String { machine.hostName }
    func prepareHandover(toHost host: String?, toPid pid: Int32?, challenge: String) throws {
        try machine.prepareHandover(toHost: host, toPid: pid, challenge: challenge)
    }
    func commitHandover(toHost host: String?, toPid pid: Int32?) throws { try machine.commitHandover(toHost: host, toPid: pid) }
    func abandonHandover() { machine.abandonHandover() }
    func signState(digest: [UInt8]) throws -> [UInt8]? { try machine.signState(digest: digest) }
    func pauseForMigration() -> Bool { machine.pauseForMigration() }
    func resumeAfterMigration() { machine.resumeAfterMigration() }
    func statePayloads() throws -> (vcpu: [UInt8], devices: [UInt8]) {
        digestAtPause = try machine.memoryDigest()
        return try machine.statePayloads()
    }
    func setThrottle(percent: Int) { machine.setThrottle(percent: percent) }
    func notePostCopyPageServer(awaitingRecovery: Bool) { machine.notePostCopyPageServer(awaitingRecovery: awaitingRecovery) }
}

func bootCounter(count: Int = 0, ticks: Int = 400_000, tracker: DirtyTrackerKind = .bitmap,
                 capture: SerialCapture) throws -> AdmittedGuest {
    let m = try bootLocal("counter.elf", MachineConfiguration(commandLine: "count=\(count) ticks=\(ticks)", dirtyTracker: tracker),
                          serialOutput: capture.append)
    m.start()
    return m
}

/// Boots the dirtier and starts it.
func bootDirtier(memory: UInt64, commandLine: String, tracker: DirtyTrackerKind = .bitmap) throws -> AdmittedGuest {
    let m = try bootLocal("dirtier.elf", MachineConfiguration(memorySize: memory, commandLine: commandLine, dirtyTracker: tracker))
    m.start()
    return m
}

/// Migrates over mutually authenticated TLS to the enrolled `peer` (the in-process hosts are
/// peers of each other), or in plaintext when no peer is named.
func migrate(_ vm: any MigrationSourceVM, via guest: AdmittedGuest? = nil, to destination: String, peer: String? = nil,
             maxDowntimeMs: Double = 300, timeout: Double = 60, autoConverge: Bool = false, maxBandwidth: UInt64 = 0) -> MigrationReport {
    let settings = MigrationSettings(destination: destination, peer: peer, transport: peer == nil ? .plaintext : .tls,
                                     maxDowntimeMs: maxDowntimeMs, maxBandwidth: maxBandwidth,
                                     autoConverge: autoConverge, timeoutSeconds: timeout)
    let connector = guest ?? (vm as? AdmittedGuest)
    return PreCopySender(vm: vm, settings: settings).run {
        guard let connector else { return try TCPTransport.connect(to: destination) }
        return try connector.connect(settings)
    }
}

/// Migrates to an in-process destination over TLS.
func migrate(_ vm: AdmittedGuest, to destination: Destination, maxDowntimeMs: Double = 300, timeout: Double = 60,
             autoConverge: Bool = false, maxBandwidth: UInt64 = 0) -> MigrationReport {
    migrate(vm, to: destination.address, peer: destination.host, maxDowntimeMs: maxDowntimeMs, timeout: timeout,
            autoConverge: autoConverge, maxBandwidth: maxBandwidth)
}

/// Numbers printed by the counter, from joined source and destination output.
func counterNumbers(_ text: String) -> [Int] {
    var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
    lines.removeLast()
    return lines.dropFirst().compactMap { Int($0) }
}

func isSequence(_ n: [Int]) -> Bool { n.enumerated().allSatisfy { $0.offset + 1 == $0.element } }

@Suite("Live migration between two VMMs", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct MigrationTests {
    @Test("the counter migrated live continues with no gap and no repeat, on the destination",
          arguments: DirtyTrackerKind.allCases)
    func counterMigrates(_ tracker: DirtyTrackerKind) throws {
        let source = SerialCapture()
        let machine = try bootCounter(tracker: tracker, capture: source)
        usleep(200_000)
        let destination = try Destination(tracker: tracker)
        let report = migrate(machine, to: destination)
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(report.tracker == tracker.rawValue)
        #expect(machine.state == .paused, "the source ran on after the hand-over")
        #expect(destination.wait())
        let dest = try #require(destination.machine)
        usleep(200_000)
        dest.requestStop()
        _ = dest.waitForExit()
        machine.end(with: .migrated)
        let numbers = counterNumbers(source.text + destination.capture.text)
        #expect(numbers.count > 10)
        #expect(isSequence(numbers), "gap or repeat around \(counterNumbers(source.text).suffix(3)) / \(destination.capture.text.prefix(30))")
        #expect(!destination.capture.text.isEmpty, "the destination did not run the guest")
    }

    @Test("the report breaks the downtime into phases, each non-negative, adding up to at most the downtime, with the destination's own figures; the pages in flight were drained before the pause; both hand-over intents are consumed")
    func downtimePhases() throws {
        let machine = try bootCounter(capture: SerialCapture())
        usleep(100_000)
        let destination = try Destination()
        let report = migrate(machine, to: destination)
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(destination.wait())
        destination.machine?.requestStop()
        machine.end(with: .migrated)
        let downtime = try #require(report.downtimeMs)
        let phases = try #require(report.downtimePhasesMs)
        #expect(phases.inDowntime.allSatisfy { $0 >= 0 } && phases.runningReply >= 0, "\(phases)")
        #expect(phases.inDowntime.reduce(0, +) <= downtime + 1e-6, "\(phases) against \(downtime) ms")
        // Both ends run on this kernel: the destination's resume time is on the source's clock.
        #expect(phases.clock == "shared")
        let there = try #require(phases.destination)
        #expect(there.apply >= 0 && there.lease >= 0 && there.start >= 0)
        // GO is read after the source began to write it, and the resume ends both.
        #expect(there.lease + there.start <= phases.resume + 1e-6, "\(phases)")
        #expect(report.handoverIntentMs.map { $0 >= 0 } == true)
        // The destination answered the drain (its counts equal to what was sent) before the pause.
        #expect(report.drainMs.map { $0 >= 0 } == true, "no drain before the pause")
        // The commit on each side consumed its side's intent: nothing is left to resolve.
        let hosts = try localHosts()
        let id = machine.session.registration.id
        #expect(try hosts.source.handoverIntents.list().filter { $0.guestID == id }.isEmpty)
        #expect(try hosts.destination.handoverIntents.list().filter { $0.guestID == id }.isEmpty)
        // And the JSON names them as the API describes.
        let json = String(decoding: try JSONEncoder().encode(report), as: UTF8.self)
        for key in ["downtime_phases_ms", "last_pages", "lease_handover", "running_reply", "handover_intent_ms", "boot_id"] {
            #expect(json.contains("\"\(key)\""), "\(key) missing from \(json)")
        }
    }

    @Test("memory at the source's pause equals memory at the destination before resume")
    func digestsMatch() throws {
        let machine = try bootDirtier(memory: 128 << 20, commandLine: "pages=4096 rate=0 passes=0 mark_us=0 pattern=random")
        usleep(200_000)
        let listener = try TCPListener(listen: "127.0.0.1:0")
        let destDigest = DigestBox()
        Thread.detachNewThread {
            let receiver = MigrationReceiver<DigestingDestination>(hostName: "dst") { manifest, _ in
                let header = try StateHeader.decode(Array(manifest.machine), what: "manifest")
                let hosts = try localHosts()
                let session = try hosts.admitIncoming(header, source: (manifest.sourceHost, manifest.sourcePid), on: hosts.destination)
                return DigestingDestination(try GuestDoors.reserveIncoming(session: session, configuration: header.description.configuration,
                                                                           serialOutput: { _ in }), box: destDigest)
            }
            do {
                let transport = try listener.accept()
                let (vm, _) = try receiver.run(transport: transport)
                vm.machine.requestStop()
            } catch { destDigest.set("error: \(error)") }
        }
        let vm = DigestingSource(machine)
        let report = migrate(vm, to: "127.0.0.1:\(listener.port)", maxDowntimeMs: 300, timeout: 60, autoConverge: true)
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        let d = destDigest.wait()
        #expect(d != nil && d == vm.digestAtPause)
        machine.end(with: .migrated)
    }

    @Test("a guest migrated A to B and back to A keeps counting")
    func thereAndBack() throws {
        let a = SerialCapture()
        let first = try bootCounter(capture: a)
        usleep(150_000)
        let b = try Destination()
        #expect(migrate(first, to: b).outcome == .completed)
        first.end(with: .migrated)
        #expect(b.wait())
        let onB = try #require(b.machine)
        usleep(150_000)
        let back = try Destination(onSource: true)
        #expect(migrate(onB, to: back).outcome == .completed)
        onB.end(with: .migrated)
        #expect(back.wait())
        let again = try #require(back.machine)
        usleep(150_000)
        again.requestStop()
        _ = again.waitForExit()
        let numbers = counterNumbers(a.text + b.capture.text + back.capture.text)
        #expect(isSequence(numbers))
        #expect(!back.capture.text.isEmpty)
    }

    @Test("a dirtier under load converges with each tracker", arguments: DirtyTrackerKind.allCases)
    func dirtierConverges(_ tracker: DirtyTrackerKind) throws {
        let machine = try bootDirtier(memory: 256 << 20, commandLine: "pages=8192 rate=20000 tsc_khz=\(try hostTSCKHz()) mark_us=1000", tracker: tracker)
        usleep(500_000)
        let destination = try Destination(tracker: tracker)
        let report = migrate(machine, to: destination, maxDowntimeMs: 300, timeout: 60, autoConverge: true)
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(report.converged)
        #expect(report.rounds >= 2)
        #expect(destination.wait())
        destination.machine?.requestStop()
        machine.end(with: .migrated)
    }

    @Test("connection refused: the migration fails and the guest keeps running on the source")
    func connectionRefused() throws {
        let capture = SerialCapture()
        let machine = try bootCounter(capture: capture)
        let listener = try TCPListener(listen: "127.0.0.1:0")
        let port = listener.port
        listener.shutdownListening()
        let report = migrate(machine, to: "127.0.0.1:\(port)")
        #expect(report.outcome == .failed)
        #expect(report.error?.contains("connect") == true)
        try expectStillRunning(machine, capture)
    }

    @Test("destination faults before GO: the source resumes and the destination discards",
          arguments: [InjectedFault.closeAfterHello, .closeDuringPrecopy, .refuseReady, .malformedReady])
    func faultBeforeGo(_ fault: InjectedFault) throws {
        let capture = SerialCapture()
        let machine = try bootCounter(capture: capture)
        usleep(100_000)
        let destination = try Destination(fault: fault, listenSeconds: 5)
        let report = migrate(machine, to: destination)
        #expect(report.outcome == .failed)
        #expect(destination.wait())
        #expect(destination.machine == nil)
        #expect(destination.error != nil)
        try expectStillRunning(machine, capture)
        machine.requestStop()
        #expect(isSequence(counterNumbers(capture.text)))
        #expect(destination.capture.text.isEmpty, "the destination ran the guest")
    }

    @Test("the link cut right after GO: the source stays paused in doubt, exactly one copy runs")
    func cutAfterGo() throws {
        let capture = SerialCapture()
        let machine = try bootCounter(capture: capture)
        usleep(100_000)
        let destination = try Destination(fault: .closeAfterGo)
        let report = migrate(machine, to: destination)
        #expect(report.outcome == .inDoubt)
        #expect(destination.wait())
        let dest = try #require(destination.machine)
        #expect(machine.state == .paused)
        let frozen = capture.count
        usleep(200_000)
        #expect(capture.count == frozen, "the source ran after GO")
        #expect(dest.state == .running)
        #expect(!destination.capture.text.isEmpty)
        dest.requestStop()
        machine.end(with: .migrated)
    }

    // A guest on this nested KVM may stall for a whole round (and so "converge"); a
    // bandwidth cap makes non-convergence certain.
    @Test("a migration that cannot converge is abandoned at its timeout with the guest still running")
    func notConverged() throws {
        let machine = try bootDirtier(memory: 256 << 20, commandLine: "pages=16384 rate=0 mark_us=0")
        usleep(200_000)
        let destination = try Destination(listenSeconds: 5)
        let report = migrate(machine, to: destination, maxDowntimeMs: 0.001, timeout: 2, maxBandwidth: 1_000_000)
        #expect(report.outcome == .failed)
        #expect(!report.converged)
        #expect(report.error?.contains("did not converge") == true, "\(report.error ?? "no error")")
        #expect(machine.state == .running)
        #expect(destination.wait())
        #expect(destination.machine == nil)
        machine.requestStop()
    }

    @Test("cancelling (as SIGTERM does) before GO aborts the migration and the guest keeps running")
    func cancelAborts() throws {
        let machine = try bootDirtier(memory: 256 << 20, commandLine: "pages=16384 rate=0 mark_us=0")
        usleep(300_000) // let the guest touch enough memory for round 0 to outlast the cancel
        let destination = try Destination(listenSeconds: 5)
        let settings = MigrationSettings(destination: destination.address, peer: destination.host, maxDowntimeMs: 0.001,
                                         maxBandwidth: 1_000_000, timeoutSeconds: 30)
        let sender = PreCopySender(vm: machine, settings: settings)
        Thread.detachNewThread { usleep(500_000); sender.cancel(reason: "signal 15") }
        let report = sender.run { try machine.connect(settings) }
        #expect(report.outcome == .failed)
        #expect(report.error?.contains("signal 15") == true || report.error?.contains("connection") == true)
        #expect(machine.state == .running)
        #expect(destination.wait())
        #expect(destination.machine == nil)
        machine.requestStop()
    }

    func expectStillRunning(_ machine: AdmittedGuest, _ capture: SerialCapture) throws {
        #expect(machine.state == .running)
        let before = capture.count
        // Progress, however loaded the machine: more output within a generous bound.
        #expect(waitUntil(20) { capture.count > before }, "the source guest makes no progress after the failed migration")
    }
}

// @unchecked: `value` is written before the semaphore is signalled and read after it is waited on.
final class DigestBox: @unchecked Sendable {
    private let sem = DispatchSemaphore(value: 0)
    private var value: String?
    func set(_ v: String) { value = v; sem.signal() }
    func wait() -> String? { _ = sem.wait(timeout: .now() + 120); return value }
}

// @unchecked: used by the receiver's one thread only.
final class DigestingDestination: MigrationDestinationVM, @unchecked Sendable {
    let machine: AdmittedGuest
    let box: DigestBox
    init(_ machine: AdmittedGuest, box: DigestBox) { self.machine = machine; self.box = box }
    var memory: GuestMemory { machine.memory }
    func applyState(vcpu: [UInt8], devices: [UInt8]) throws {
        try machine.applyState(vcpu: vcpu, devices: devices)
        box.set(try machine.memoryDigest())
    }
    func startGuest() throws { try machine.startGuest() }
    func startGuestTimed() throws -> GuestStartTimes { try machine.startGuestTimed() }
    func discard() { machine.discard() }
    var owner: (host: String, pid: Int32)? { machine.owner }
    func attachPostCopy(_ incoming: PostCopyIncoming) { machine.attachPostCopy(incoming) }
    func postCopyPaused(reason: String) { machine.postCopyPaused(reason: reason) }
    func postCopyResumed() { machine.postCopyResumed() }
    func postCopyLost(reason: String) { machine.postCopyLost(reason: reason) }
    func verifyState(signature: [UInt8]?, digest: [UInt8]) throws { try machine.verifyState(signature: signature, digest: digest) }
}

@Suite("Migration between two vmm processes", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct MigrationProcessTests {
    @Test("SIGTERM to the source during a migration aborts it: the destination discards, keeps listening and exits 4 at its listen timeout; no copy runs there")
    func sigtermDuringMigration() throws {
        let socket = temporaryPath("src") + ".sock"
        let port = try freePort()
        let dirtier = try Fixtures.guest("dirtier.elf")
        let source = try VMMProcess(["run", dirtier, "--memory", "256M",
                                     "--cmdline", "pages=32768 rate=0 mark_us=0", "--api-socket", socket,
                                     "--report-dir", temporaryPath("reports")]
                                    + billboard().register(dirtier, memory: "256M", cmdline: "pages=32768 rate=0 mark_us=0"),
                                    socket: socket)
        try source.waitForSocket()
        let destination = try VMMProcess(["receive", "--listen", "127.0.0.1:\(port)", "--listen-timeout", "8"] + billboard().storeArguments,
                                         socket: "")
        #expect(destination.waitUntilListening(), "vmm receive did not listen: \(destination.errorText)")
        let host = try billboard().host
        let start = try source.call(.PUT, "/vm/migrate",
                                    "{\"destination\": \"127.0.0.1:\(port)\", \"peer\": \"\(host)\", \"max_downtime_ms\": 0.001, \"max_bandwidth\": 1000000, \"timeout_s\": 30}")
        #expect(start.status == 202)
        #expect(waitUntil(60) { (try? source.call(.GET, "/vm/migration").json?["phase"] as? String) == "precopy" },
                "the migration never reached pre-copy")
        kill(source.process.processIdentifier, SIGTERM)
        #expect(source.wait() == 128 + SIGTERM)
        #expect(destination.wait() == 4)
        #expect(destination.errorText.contains("failed"), "\(destination.errorText)")
        #expect(destination.output.isEmpty, "the destination ran the guest")
    }

    @Test("vmm receive refuses a stream that is not a migration, keeps listening, and exits 4 when its listen timeout passes")
    func garbageRefused() throws {
        let port = try freePort()
        let destination = try VMMProcess(["receive", "--listen", "127.0.0.1:\(port)", "--listen-timeout", "4"] + billboard().storeArguments,
                                         socket: "")
        #expect(destination.waitUntilListening(), "vmm receive did not listen: \(destination.errorText)")
        for junk in [[UInt8]("GET / HTTP/1.0\r\n\r\n".utf8), [UInt8]("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8) + [UInt8](repeating: 0x41, count: 64)] {
            let t = try TCPTransport.connect(to: "127.0.0.1:\(port)")
            try junk.withUnsafeBytes { try t.send($0) }
            var byte = [UInt8](repeating: 0, count: 1)
            // The receiver hangs up on it (TLS refuses the handshake).
            #expect(throws: (any Error).self) { try byte.withUnsafeMutableBytes { try t.receive(into: $0) } }
            t.close()
        }
        #expect(destination.wait() == 4)
        #expect(destination.errorText.contains("refused a connection"), "\(destination.errorText)")
        #expect(destination.errorText.contains("nothing was received"), "\(destination.errorText)")
    }
}

/// A TCP port nobody listens on right now.
func freePort() throws -> UInt16 {
    let l = try TCPListener(listen: "127.0.0.1:0")
    return l.port
}
