import Billboard
import Foundation
import GuestMemory
@testable import Migration
import MachineCore
import PageFaults
import Snapshot
import Synchronization
import SystemCalls
import Testing
import TestSupport
@testable import VMM

/// A destination VM that takes its lease on GO but keeps its vCPUs parked: the memory post-copy
/// brings in can then be compared with the source's at the switch.
// @unchecked: used by the receiver's one thread, then read after it returned.
final class ParkedDestination: MigrationDestinationVM, @unchecked Sendable {
    let machine: AdmittedGuest
    init(_ machine: AdmittedGuest) { self.machine = machine }
    var memory: GuestMemory { machine.memory }
    func applyState(vcpu: [UInt8], devices: [UInt8]) throws { try machine.applyState(vcpu: vcpu, devices: devices) }
    func verifyState(signature: [UInt8]?, digest: [UInt8]) throws { try machine.verifyState(signature: signature, digest: digest) }
    func startGuest() throws { try machine.startGuestParked() }
    func discard() { machine.discard() }
    var owner: (host: String, pid: Int32)? { machine.owner }
    func attachPostCopy(_ incoming: PostCopyIncoming) { machine.attachPostCopy(incoming) }
    func postCopyPaused(reason: String) { machine.postCopyPaused(reason: reason) }
    func postCopyResumed() { machine.postCopyResumed() }
    func postCopyLost(reason: String) { machine.postCopyLost(reason: reason) }

    /// A receiver on the local destination host that admits the incoming guest (as `vmm receive`
    /// does) and reserves it parked.
    static func receiver(on hosts: LocalHosts) -> MigrationReceiver<ParkedDestination> {
        MigrationReceiver<ParkedDestination>(hostName: hosts.destination.hostName) { manifest, authenticated in
            let header = try StateHeader.decode(Array(manifest.machine), what: "manifest")
            let session = try hosts.admitIncoming(header, source: (authenticated ?? manifest.sourceHost, manifest.sourcePid),
                                                  on: hosts.destination)
            return ParkedDestination(try GuestDoors.reserveIncoming(session: session, configuration: header.description.configuration,
                                                                    serialOutput: { _ in }))
        }
    }
}

/// A transport that a test can cut (both directions, as a failed link) at any moment, or make
/// silent: nothing it sends arrives and nothing arrives through it, but no error says so, as a
/// link that went dead without a reset.
final class CuttableTransport: MigrationTransport {
    let inner: any MigrationTransport
    private let cut = Mutex(false)
    private let quiet = NSCondition()
    private let silence = Mutex((silent: false, closed: false))
    init(_ inner: any MigrationTransport) { self.inner = inner }
    var authenticatedPeer: String? { inner.authenticatedPeer }
    var peer: String { inner.peer }
    func send(_ bytes: UnsafeRawBufferPointer) throws {
        let fire = trigger.withLock { t -> (@Sendable () -> Void)? in
            guard let action = t.action, t.when(bytes.count) else { return nil }
            t.action = nil
            return action
        }
        fire?()
        if cut.withLock({ $0 }) { throw MigrationError.connection("the link was cut") }
        if silence.withLock({ $0.silent }) { return }
        try inner.send(bytes)
    }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        if cut.withLock({ $0 }) { throw MigrationError.connection("the link was cut") }
        if !silence.withLock({ $0.silent }) {
            do { try inner.receive(into: buffer) } catch {
                // A receive already under way when the link went silent hears nothing either,
                // not even the peer giving the link up (its close).
                guard silence.withLock({ $0.silent }) else { throw error }
            }
        }
        // A silent link delivers nothing, not even what was already on its way; only a close
        // on this side ends the wait (as a dead link's only way out).
        guard silence.withLock({ $0.silent }) else { return }
        quiet.lock()
        while !silence.withLock({ $0.closed }) { quiet.wait() }
        quiet.unlock()
        throw MigrationError.connection("the connection was closed on this side")
    }
    func close() {
        quiet.lock(); silence.withLock { $0.closed = true }; quiet.broadcast(); quiet.unlock()
        inner.close()
    }
    func sever() { cut.withLock { $0 = true }; inner.close() }
    func goSilent() { silence.withLock { $0.silent = true } }

    private let trigger = Mutex<(when: @Sendable (Int) -> Bool, action: (@Sendable () -> Void)?)>(({ _ in false }, nil))
    /// Runs `action` before the first send of a size `when` accepts; cut, that send fails.
    func onSend(where when: @escaping @Sendable (Int) -> Bool, _ action: @escaping @Sendable () -> Void) {
        trigger.withLock { $0 = (when, action) }
    }
}

/// A counter guest migrated by post-copy with no pre-copy round (every page it touches is
/// missing at the destination), whose link (both connections) fails when the source is about to
/// answer the first page request: cut (closed at once), or silent (nothing more arrives, no error).
struct InterruptedPostCopy {
    enum Failure { case cut, silent }
    let sourceOutput: SerialCapture
    let machine: AdmittedGuest
    let destination: Destination
    let settings: MigrationSettings
    let sender: PreCopySender
    let report: MigrationReport
    let guest: AdmittedGuest
    let incoming: PostCopyIncoming

    /// The link fails at the first page the guest asks for over the page channel. A guest that
    /// asked for none (every page it touched came with the state or was pushed before it ran:
    /// the push can outrun a vCPU thread waiting for a core), or a destination the push completed
    /// before the failure was noticed, leaves nothing to recover; such an attempt is wound down
    /// and the scenario made again, at most three times in all.
    init(_ failure: Failure, postcopyRecoverTimeout: Double? = nil) throws {
        var attempt = 1
        while true {
            let made = try Self.attempt(failure, postcopyRecoverTimeout: postcopyRecoverTimeout)
            // Failed with pages still missing at the destination: the scenario the tests need.
            // (The push may also have brought every page before the failure was noticed; the
            // destination then completes on its own, and that attempt is made again too.)
            // A paused destination still applies the pushed pages it had already received (its
            // push reader drains what arrived before the link failed), and those may be the last
            // ones: it then completes a moment after pausing. Such an attempt is made again too; the
            // wait is only for that to show, no figure is asserted on it.
            let failedMidway = made.report.outcome != .completed
                && made.incoming.wait(for: [.postcopyPaused, .completed, .lost], timeout: 60) != .completed
                && made.incoming.wait(for: [.completed], timeout: 3) != .completed
            if failedMidway || attempt == 3 {
                (sourceOutput, machine, destination, settings, sender, report, guest, incoming) = made
                return
            }
            print("InterruptedPostCopy: attempt \(attempt) completed (no page asked for, or every page pushed before the failure); made again")
            made.guest.requestStop()
            _ = made.guest.waitForExit(timeout: 60)
            made.guest.end()
            made.machine.end(with: .migrated)
            attempt += 1
        }
    }

    private static func attempt(_ failure: Failure, postcopyRecoverTimeout: Double?) throws
        -> (sourceOutput: SerialCapture, machine: AdmittedGuest, destination: Destination, settings: MigrationSettings,
            sender: PreCopySender, report: MigrationReport, guest: AdmittedGuest, incoming: PostCopyIncoming) {
        let sourceOutput = SerialCapture()
        let machine = try bootCounter(capture: sourceOutput)
        usleep(200_000)
        let destination = try Destination(postcopyRecoverTimeout: postcopyRecoverTimeout)
        let settings = postcopySettings(destination, afterRounds: 0)
        let sender = PreCopySender(vm: machine, settings: settings)
        let made = Mutex<[CuttableTransport]>([])
        let report = sender.run {
            let t = CuttableTransport(try machine.connect(settings))
            let isPageChannel = made.withLock { $0.append(t); return $0.count == 2 }
            // The page channel carries small messages (its opening, heartbeats) and pages; the
            // first reply of a page's size is the first requested page.
            if isPageChannel {
                t.onSend(where: { $0 >= 4096 }) {
                    for each in made.withLock({ $0 }) {
                        switch failure {
                        case .cut: each.sever()
                        case .silent: each.goSilent()
                        }
                    }
                }
            }
            return t
        }
        #expect(destination.wait())
        let guest = try #require(destination.machine, "\(String(describing: destination.error))")
        let incoming = try #require(guest.incomingPostCopy)
        return (sourceOutput, machine, destination, settings, sender, report, guest, incoming)
    }

    /// The source's instance record on its billboard.
    var sourceInstanceState: InstanceState? {
        let hosts = try? localHosts()
        return (try? hosts?.source.instances.list())?.first { $0.pid == getpid() && $0.guestName == machine.name }?.state
    }

    /// Recovers the migration: the destination listens, the source resumes there.
    func recover() throws -> MigrationReport {
        let address = try guest.recoverIncomingMigration(listen: "127.0.0.1:0", timeoutSeconds: 120)
        var resume = settings
        resume.destination = address
        resume.resume = true
        return sender.resumePostCopy(settings: resume) { try machine.connect(resume) }
    }

    /// Counter numbers printed by both sides, in order.
    var numbers: [Int] { counterNumbers(sourceOutput.text + destination.capture.text) }

    func finish() {
        guest.requestStop()
        _ = guest.waitForExit(timeout: 60)
        guest.end()
        machine.end(with: .migrated)
    }
}

func postcopySettings(_ destination: Destination, afterRounds: Int) -> MigrationSettings {
    MigrationSettings(destination: destination.address, peer: destination.host, transport: .tls,
                      timeoutSeconds: 60, postcopy: true, postcopyAfterRounds: afterRounds)
}

@Suite("Post-copy migration", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct PostCopyTests {
    @Test("memory after the last page equals the source's at the switch (before any round, after round 0, after round 1)", arguments: [0, 1, 2])
    func digestsMatch(afterRounds: Int) throws {
        try checkDigestAfterPostCopy(memory: 128 << 20, afterRounds: afterRounds)
    }

    @Test("a 2 GiB guest, whose bitmap of missing pages is too large for one control section, gets it in slices and its memory after the last page equals the source's at the switch")
    func largeGuestBitmapInSlices() throws {
        try checkDigestAfterPostCopy(memory: 2 << 30, afterRounds: 0)
    }

    /// A dirtier rewriting 16 MiB at random switched to post-copy after `afterRounds` rounds: the
    /// destination's memory digest once the last page is in must equal the source's at the switch.
    private func checkDigestAfterPostCopy(memory: UInt64, afterRounds: Int) throws {
        let machine = try bootDirtier(memory: memory, commandLine: "pages=4096 rate=0 passes=0 mark_us=0 pattern=random")
        usleep(200_000)
        let hosts = try localHosts()
        let listener = try GuestDoors.listen("127.0.0.1:0", store: hosts.destination, plaintext: false)
        let arrived = Mutex<(digest: String?, figures: PostCopyFigures?, error: String?)>((nil, nil, nil))
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let receiver = ParkedDestination.receiver(on: hosts)
            do {
                let transport = try listener.nextConnection(deadline: monotonicMilliseconds() + 60_000, onRefused: { _ in })
                defer { transport.close() }
                let (vm, result) = try receiver.run(transport: transport) {} acceptPageChannel: {
                    try listener.nextConnection(deadline: monotonicMilliseconds() + 30_000, onRefused: { _ in })
                }
                let incoming = try #require(result.incoming)
                let phase = incoming.wait(for: [.completed, .lost], timeout: 120)
                guard phase == .completed else {
                    // Its memory cannot be read whole (a read would wait for a page that may not come).
                    arrived.withLock { $0.error = "post-copy ended \(phase.rawValue): \(incoming.status.error ?? "")" }
                    vm.machine.requestStop()
                    done.signal()
                    return
                }
                let digest = try vm.machine.memoryDigest()
                arrived.withLock { $0 = (digest, incoming.figures, nil) }
                vm.machine.requestStop()
            } catch { arrived.withLock { $0.error = "\(error)" } }
            done.signal()
        }
        let source = DigestingSource(machine)
        let settings = MigrationSettings(destination: "127.0.0.1:\(listener.port)", peer: hosts.destination.hostName,
                                         postcopy: true, postcopyAfterRounds: afterRounds)
        let report = PreCopySender(vm: source, settings: settings).run { try machine.connect(settings) }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(done.wait(timeout: .now() + 120) == .success)
        let (digest, figures, error) = arrived.withLock { $0 }
        #expect(error == nil, "\(error ?? "")")
        #expect(digest != nil && digest == source.digestAtPause)
        let postcopy = try #require(report.postcopy)
        #expect(postcopy.switchedAfterRounds == afterRounds)
        // How many pages the guest dirtied after they were sent depends on how fast it ran
        // (on a loaded machine, possibly none); the digest above is the proof either way.
        #expect(postcopy.pagesPushed + postcopy.pagesRequested >= postcopy.pagesMissingAtSwitch)
        #expect(figures != nil)
        #expect(machine.state == .paused, "the source ran on after the switch")
        machine.end(with: .migrated)
    }

    @Test("the counter switched to post-copy continues on the destination with no gap and no repeat (after 0, 1 and 2 rounds)", arguments: [0, 1, 2])
    func counterContinues(afterRounds: Int) throws {
        let sourceOutput = SerialCapture()
        let machine = try bootCounter(capture: sourceOutput)
        usleep(200_000)
        let destination = try Destination()
        let settings = postcopySettings(destination, afterRounds: afterRounds)
        let report = PreCopySender(vm: machine, settings: settings).run { try machine.connect(settings) }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(machine.state == .paused, "the source ran on after the switch")
        #expect(destination.wait())
        let dest = try #require(destination.machine)
        let figures = try #require(report.postcopy)
        #expect(figures.switchedAfterRounds == afterRounds)
        #expect(figures.pagesPushed + figures.pagesRequested >= figures.pagesMissingAtSwitch)
        #expect(dest.postCopyStats?.completeAfterMs != nil)
        usleep(200_000)
        dest.requestStop()
        _ = dest.waitForExit()
        machine.end(with: .migrated)
        let numbers = counterNumbers(sourceOutput.text + destination.capture.text)
        #expect(numbers.count > 10)
        #expect(isSequence(numbers), "gap or repeat around \(counterNumbers(sourceOutput.text).suffix(3)) / \(destination.capture.text.prefix(30))")
    }

    @Test("the page channel opens before any page, while the guest runs; one that answers another challenge is refused, and the migration's own is then accepted and carries the switch")
    func pageChannelOpensEarlyAndIsBound() throws {
        let sourceOutput = SerialCapture()
        let machine = try bootCounter(capture: sourceOutput)
        usleep(200_000)
        let destination = try Destination()
        let settings = postcopySettings(destination, afterRounds: 1)
        let sender = PreCopySender(vm: machine, settings: settings)
        // At the second connection (the page channel): what had been sent, the guest's state, and
        // what became of a channel opened first with a wrong challenge.
        let seen = Mutex<(connections: Int, pagesSent: Int?, guest: RunState?, rogue: String?)>((0, nil, nil, nil))
        let report = sender.run {
            let n = seen.withLock { $0.connections += 1; return $0.connections }
            if n == 2 {
                let pages = sender.progress.pagesSent, state = machine.state
                var rogue = "accepted"
                do {
                    let channel = try PageChannel.open(connect: { try machine.connect(settings) }, challenge: "not-this-migration",
                                                       mainPeer: destination.host)
                    channel.transport.close()
                } catch { rogue = "\(error)" }
                seen.withLock { $0.pagesSent = pages; $0.guest = state; $0.rogue = rogue }
            }
            return try machine.connect(settings)
        }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(destination.wait())
        let s = seen.withLock { $0 }
        // The main connection and the page channel: the switch needed no other.
        #expect(s.connections == 2)
        #expect(s.pagesSent == 0, "the page channel opened after \(s.pagesSent ?? -1) pages")
        #expect(s.guest == .running)
        #expect(s.rogue?.contains("not this migration's challenge") == true, "\(s.rogue ?? "nil")")
        let figures = try #require(report.postcopy)
        #expect(figures.switchedAfterRounds == 1)
        let dest = try #require(destination.machine)
        #expect(dest.incomingPostCopy?.wait(for: [.completed, .lost], timeout: 120) == .completed)
        dest.requestStop()
        _ = dest.waitForExit()
        machine.end(with: .migrated)
        let numbers = counterNumbers(sourceOutput.text + destination.capture.text)
        #expect(isSequence(numbers))
    }

    @Test("a long push without page requests keeps the link alive: the source hears the destination's heartbeats on the page channel, whatever the push does")
    func longPushKeepsLinkAlive() throws {
        let machine = try bootDirtier(memory: 128 << 20, commandLine: "pages=4096 rate=0 passes=0 mark_us=0 pattern=random")
        usleep(200_000)
        let hosts = try localHosts()
        let listener = try GuestDoors.listen("127.0.0.1:0", store: hosts.destination, plaintext: false)
        // A short limit, and a push stretched by the bandwidth cap over several of them; the
        // destination's vCPUs stay parked, so no fault asks for a page on the way.
        let liveness = PostCopyLiveness(heartbeatSeconds: 0.2, silenceSeconds: 1)
        let arrived = Mutex<(phase: IncomingPostCopyStatus.Phase?, error: String?)>((nil, nil))
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let receiver = ParkedDestination.receiver(on: hosts)
            do {
                let transport = try listener.nextConnection(deadline: monotonicMilliseconds() + 60_000, onRefused: { _ in })
                let (vm, result) = try receiver.run(transport: transport, acceptPageChannel: {
                    try listener.nextConnection(deadline: monotonicMilliseconds() + 30_000, onRefused: { _ in })
                }, postcopyOptions: .init(liveness: liveness))
                let incoming = try #require(result.incoming)
                let phase = incoming.wait(for: [.completed, .lost, .postcopyPaused], timeout: 120)
                arrived.withLock { $0 = (phase, incoming.status.error) }
                if phase == .postcopyPaused { try? incoming.giveUp(reason: "the test is over") }
                vm.machine.requestStop()
                _ = vm.machine.waitForExit(timeout: 30)
                vm.machine.end()
            } catch { arrived.withLock { $0.error = "\(error)" } }
            done.signal()
        }
        let settings = MigrationSettings(destination: "127.0.0.1:\(listener.port)", peer: hosts.destination.hostName,
                                         maxBandwidth: 4_000_000, postcopy: true, postcopyAfterRounds: 1)
        let report = PreCopySender(vm: machine, settings: settings, postcopyLiveness: liveness).run { try machine.connect(settings) }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(done.wait(timeout: .now() + 180) == .success)
        let (phase, error) = arrived.withLock { $0 }
        #expect(phase == .completed, "\(error ?? "")")
        let figures = try #require(report.postcopy)
        #expect(figures.recoveries == 0)
        #expect(figures.pagesPushed > 0)
        machine.end(with: .migrated)
    }

    @Test("the link cut during post-copy: both sides pause and keep what they have; recovered on a new connection, the in-flight page is sent again and the counter goes on with no gap")
    func linkCutRecovered() throws {
        let m = try InterruptedPostCopy(.cut)
        #expect(m.report.outcome == .postcopyPaused, "\(m.report.error ?? "")")
        #expect(m.machine.state == .paused, "the source resumed a guest the destination had taken")
        #expect(m.sourceInstanceState == .pageServerAwaitingRecovery)
        #expect(m.incoming.wait(for: [.postcopyPaused], timeout: 60) == .postcopyPaused)
        // (Every page may be in already: the push may have brought them before the link failed.)
        #expect(m.incoming.status.error != nil)
        // Nothing of the guest was given up on either side.
        #expect(m.guest.exitResult == nil)
        #expect(m.guest.session.holdsLease)
        let before = m.numbers.count

        let resumed = try m.recover()
        #expect(resumed.outcome == .completed, "\(resumed.error ?? "")")
        #expect(m.incoming.wait(for: [.completed, .lost], timeout: 120) == .completed, "\(m.incoming.status.error ?? "")")
        let figures = try #require(resumed.postcopy)
        #expect(figures.recoveries == 1)
        // The fault whose request the cut cut short waited for its page instead of failing.
        #expect(figures.faultsPostponed >= 1)
        #expect(figures.pagesPushed + figures.pagesRequested >= figures.pagesMissingAtSwitch)
        #expect(m.guest.postCopyStats?.completeAfterMs != nil)
        #expect(m.machine.state == .paused)
        #expect(waitUntil(120) { m.numbers.count >= before + 5 }, "the counter did not go on after the recovery")
        // Only a paused migration can be given up; this one completed.
        #expect(throws: PostCopyIncoming.Refusal.self) { try m.guest.giveUpIncomingMigration(reason: "too late") }
        m.finish()
        #expect(m.numbers.count > 10)
        #expect(isSequence(m.numbers), "gap or repeat: \(m.numbers.suffix(20))")
    }

    @Test("the link cut again while a recovery resends the in-flight page: both sides pause a second time, keep what they have, and a second recovery finishes with the counter intact")
    func secondFailureAfterRecovery() throws {
        let m = try InterruptedPostCopy(.cut)
        #expect(m.report.outcome == .postcopyPaused, "\(m.report.error ?? "")")
        #expect(m.incoming.wait(for: [.postcopyPaused], timeout: 60) == .postcopyPaused)

        // The first resume's connections fail at the first page they carry: at least the page
        // whose request the first cut cut short is still missing, so one is always sent again.
        let address = try m.guest.recoverIncomingMigration(listen: "127.0.0.1:0", timeoutSeconds: 120)
        var resume = m.settings
        resume.destination = address
        resume.resume = true
        let made = Mutex<[CuttableTransport]>([])
        let machine = m.machine
        let interrupted = m.sender.resumePostCopy(settings: resume) {
            let t = CuttableTransport(try machine.connect(resume))
            made.withLock { $0.append(t) }
            t.onSend(where: { $0 >= 4096 }) { for each in made.withLock({ $0 }) { each.sever() } }
            return t
        }
        #expect(interrupted.outcome == .postcopyPaused, "\(interrupted.error ?? "")")
        #expect(m.machine.state == .paused, "the source resumed a guest the destination had taken")
        #expect(m.sourceInstanceState == .pageServerAwaitingRecovery)
        // Paused again after the first recovery took (not still paused from the first cut).
        #expect(waitUntil(60) { m.incoming.status.recoveries == 1 && m.incoming.status.phase == .postcopyPaused },
                "\(m.incoming.status)")
        #expect(m.guest.exitResult == nil)
        #expect(m.guest.session.holdsLease)

        let resumed = try m.recover()
        #expect(resumed.outcome == .completed, "\(resumed.error ?? "")")
        #expect(m.incoming.wait(for: [.completed, .lost], timeout: 120) == .completed, "\(m.incoming.status.error ?? "")")
        #expect(try #require(resumed.postcopy).recoveries == 2)
        let before = m.numbers.count
        #expect(waitUntil(120) { m.numbers.count >= before + 5 }, "the counter did not go on after the second recovery")
        m.finish()
        #expect(isSequence(m.numbers), "gap or repeat: \(m.numbers.suffix(20))")
    }

    @Test("a link that goes silent during post-copy (no close, no error) is noticed by both sides through the heartbeats, and recovered")
    func silentLinkNoticed() throws {
        let m = try InterruptedPostCopy(.silent)
        // The silent transports never time out by themselves: only the heartbeats' watch closes them.
        #expect(m.report.outcome == .postcopyPaused, "\(m.report.error ?? "")")
        #expect(m.report.error?.contains("nothing heard from the destination") == true, "\(m.report.error ?? "")")
        #expect(m.incoming.wait(for: [.postcopyPaused], timeout: 60) == .postcopyPaused)
        let resumed = try m.recover()
        #expect(resumed.outcome == .completed, "\(resumed.error ?? "")")
        #expect(m.incoming.wait(for: [.completed, .lost], timeout: 120) == .completed, "\(m.incoming.status.error ?? "")")
        m.finish()
        #expect(isSequence(m.numbers), "gap or repeat: \(m.numbers.suffix(20))")
    }

    @Test("a resume from another host, for another migration or guest, or answering an old challenge is refused; the paused migration then still recovers intact")
    func forgedResumesRefused() throws {
        let m = try InterruptedPostCopy(.cut)
        #expect(m.report.outcome == .postcopyPaused, "\(m.report.error ?? "")")
        #expect(m.incoming.wait(for: [.postcopyPaused], timeout: 60) == .postcopyPaused)
        let hosts = try localHosts()
        let migration = try #require(m.sender.postcopyMigrationChallenge)
        let address = try m.guest.recoverIncomingMigration(listen: "127.0.0.1:0", timeoutSeconds: 120)
        let guestName = m.machine.migrationIdentity

        /// Connects as `store`'s host, answers the recovery challenge with `resume(nonce)` and
        /// returns the destination's refusal (or what else it said).
        func attempt(as store: BillboardStore, _ resume: (String) -> PostCopyResume) throws -> String {
            let transport = try HostChannel.connect(store, to: address, peer: "dst")
            defer { transport.close() }
            var reader = try StreamReader(source: TransportSource(transport), integrity: transport.streamIntegrity)
            let first = try #require(try reader.nextSection())
            guard case let .challenge(_, nonce, _) = try WireMessage.decode(first.payload) else { return "no challenge" }
            var writer = try StreamWriter(sink: TransportSink(transport), integrity: transport.streamIntegrity)
            try writer.writeSection(.control, payload: WireMessage.resume(resume(nonce)).encoded())
            try writer.sink.flush()
            guard let reply = try reader.nextSection(), case let .refuse(reason) = try WireMessage.decode(reply.payload) else {
                return "not refused"
            }
            return reason
        }
        func challenge(as store: BillboardStore) throws -> String {
            let transport = try HostChannel.connect(store, to: address, peer: "dst")
            defer { transport.close() }
            var reader = try StreamReader(source: TransportSource(transport), integrity: transport.streamIntegrity)
            guard case let .challenge(_, nonce, _) = try WireMessage.decode(try #require(try reader.nextSection()).payload) else { return "" }
            return nonce
        }

        // Another enrolled host (the destination itself) with everything else right.
        let wrongHost = try attempt(as: hosts.destination) {
            PostCopyResume(challenge: $0, migration: migration, sourceHost: "dst", destinationHost: "dst", guest: guestName)
        }
        #expect(wrongHost.contains("must come from the migration's source 'src'"), "\(wrongHost)")
        // The right host answering a challenge it saw on an earlier connection.
        let old = try challenge(as: hosts.source)
        let replayed = try attempt(as: hosts.source) { _ in
            PostCopyResume(challenge: old, migration: migration, sourceHost: "src", destinationHost: "dst", guest: guestName)
        }
        #expect(replayed.contains("does not answer this connection's challenge"), "\(replayed)")
        // Another migration, and another guest.
        let otherMigration = try attempt(as: hosts.source) {
            PostCopyResume(challenge: $0, migration: Data(repeating: 7, count: 32).base64EncodedString(), sourceHost: "src",
                           destinationHost: "dst", guest: guestName)
        }
        #expect(otherMigration.contains("another migration"), "\(otherMigration)")
        let otherGuest = try attempt(as: hosts.source) {
            PostCopyResume(challenge: $0, migration: migration, sourceHost: "src", destinationHost: "dst", guest: "someone-else")
        }
        #expect(otherGuest.contains("is for guest 'someone-else'"), "\(otherGuest)")

        // Nothing was lost: still paused, still listening, and the real source resumes.
        #expect(m.incoming.status.phase == .postcopyPaused)
        #expect(m.incoming.status.listening == address)
        #expect(m.guest.exitResult == nil)
        var resume = m.settings
        resume.destination = address
        resume.resume = true
        let resumed = m.sender.resumePostCopy(settings: resume) { try m.machine.connect(resume) }
        #expect(resumed.outcome == .completed, "\(resumed.error ?? "")")
        #expect(m.incoming.wait(for: [.completed, .lost], timeout: 120) == .completed, "\(m.incoming.status.error ?? "")")
        let before = m.numbers.count
        #expect(waitUntil(120) { m.numbers.count >= before + 3 })
        m.finish()
        #expect(isSequence(m.numbers), "gap or repeat: \(m.numbers.suffix(20))")
    }

    @Test("a resume sent to another host than the migration's destination is refused at the source, and nothing changes",
          arguments: ["elsewhere"])
    func resumeToAnotherHostRefused(peer: String) throws {
        let m = try InterruptedPostCopy(.cut)
        #expect(m.report.outcome == .postcopyPaused, "\(m.report.error ?? "")")
        var resume = m.settings
        resume.peer = peer
        resume.resume = true
        let refused = m.sender.resumePostCopy(settings: resume) { try m.machine.connect(resume) }
        #expect(refused.outcome == .postcopyPaused)
        #expect(refused.error?.contains("can only resume there") == true, "\(refused.error ?? "")")
        #expect(m.sender.progress.phase == .postcopyPaused)
        #expect(m.incoming.wait(for: [.postcopyPaused], timeout: 60) == .postcopyPaused)
        #expect(try m.recover().outcome == .completed)
        m.finish()
    }

    @Test("the source gone during post-copy: the destination pauses, and once given up (by the operator, or when the recovery window passes) reports the guest lost; it never ran on without its pages",
          arguments: [false, true])
    func sourceGoneGuestLost(window: Bool) throws {
        let m = try InterruptedPostCopy(.cut, postcopyRecoverTimeout: window ? 2 : nil)
        #expect(m.report.outcome == .postcopyPaused, "\(m.report.error ?? "")")
        // The source's VMM ends (as if killed): its pages are gone for good.
        m.machine.end(with: .stopped(signal: 9))
        m.machine.end()
        let sourceNumbers = counterNumbers(m.sourceOutput.text)
        if window {
            #expect(m.incoming.wait(for: [.lost], timeout: 120) == .lost)
        } else {
            #expect(m.incoming.wait(for: [.postcopyPaused], timeout: 60) == .postcopyPaused)
            try m.guest.giveUpIncomingMigration(reason: "the source host died")
        }
        #expect(m.incoming.status.phase == .lost)
        #expect(m.incoming.status.error?.contains(window ? "recovery window" : "the source host died") == true, "\(m.incoming.status.error ?? "")")
        let exit = try #require(m.guest.waitForExit(timeout: 60))
        guard case let .fatal(reason, _) = exit else {
            Issue.record("the destination's machine ended with \(exit), not a fatal exit")
            return
        }
        #expect(reason.contains("the guest is lost"), "\(reason)")
        #expect(m.guest.postCopyStats?.completeAfterMs == nil, "the destination claims every page arrived")
        // A guest that ran on zero pages would have printed from a zeroed counter, or nothing sane.
        #expect(isSequence(counterNumbers(m.sourceOutput.text + m.destination.capture.text)))
        #expect(counterNumbers(m.sourceOutput.text + m.destination.capture.text).count >= sourceNumbers.count)
        // And nothing is left to recover.
        #expect(throws: PostCopyIncoming.Refusal.self) { try m.guest.recoverIncomingMigration(listen: "127.0.0.1:0", timeoutSeconds: 5) }
        m.guest.end()
    }

    @Test("a page request past guest memory is refused and the page channel goes on")
    func hostileRequest() throws {
        let memory = try GuestMemory(size: 1 << 20)
        try memory.write(Array(repeating: 0xA5, count: 4096), at: GuestAddress(3 * 4096))
        var missing = [UInt64](repeating: 0, count: Int((memory.pageCount + 63) / 64))
        missing[0] = 0b1000
        let server = PostCopyPageServer(memory: memory, missing: missing)
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair()
        let served = DispatchSemaphore(value: 0)
        let serveError = Mutex<String?>(nil)
        Thread.detachNewThread {
            do {
                var writer = try StreamWriter(sink: TransportSink(sourceEnd))
                try writer.sink.flush()
                var reader = try StreamReader(source: TransportSource(sourceEnd))
                try server.serve(reader: &reader, writer: &writer)
            } catch { serveError.withLock { $0 = "\(error)" } }
            served.signal()
        }
        var requests = try StreamWriter(sink: TransportSink(destinationEnd))
        try requests.sink.flush()
        var replies = try StreamReader(source: TransportSource(destinationEnd))
        for pfn in [memory.pageCount, memory.pageCount + 7, UInt64(1) << 51] {
            try requests.writeSection(.control, payload: WireMessage.pageRequest(pfn: pfn).encoded())
            try requests.sink.flush()
            let reply = try #require(try replies.nextSection())
            #expect(reply.type == .control)
            guard case let .refuse(reason) = try WireMessage.decode(reply.payload) else {
                Issue.record("a request for frame \(pfn) was not refused")
                continue
            }
            #expect(reason.contains("outside guest memory"))
        }
        try requests.writeSection(.control, payload: WireMessage.pageRequest(pfn: 3).encoded())
        try requests.sink.flush()
        let page = try #require(try replies.nextSection())
        let batches = try PostCopyPageSource.batches(fromSection: page.payload, offset: nil, memorySize: memory.size)
        #expect(batches.count == 1 && batches.first?.pfn == 3)
        #expect(batches.first?.batch.bytes == Array(repeating: 0xA5, count: 4096))
        #expect(server.counts.refused == 3 && server.counts.requested == 1)
        destinationEnd.close()
        #expect(served.wait(timeout: .now() + 10) == .success)
    }

    @Test("a pushed page past guest memory is refused before anything is installed")
    func hostilePush() throws {
        let memorySize: UInt64 = 1 << 20
        for pfn in [memorySize / 4096, memorySize / 4096 + 1, MemorySection.pageFrameMask] {
            var payload: [UInt8] = []
            withUnsafeBytes(of: UInt32(1).littleEndian) { payload += $0 }
            withUnsafeBytes(of: UInt32(0).littleEndian) { payload += $0 }
            withUnsafeBytes(of: (pfn | MemorySection.zeroPageFlag).littleEndian) { payload += $0 }
            #expect(throws: SnapshotFormatError.self) {
                _ = try PostCopyPageSource.batches(fromSection: payload, offset: 0, memorySize: memorySize)
            }
        }
    }
}
