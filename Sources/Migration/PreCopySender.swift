import Foundation
import GuestMemory
import Snapshot
import SystemCalls
import Synchronization

/// What the sender needs of a running VM; the VMM's admitted guest provides it.
public protocol MigrationSourceVM: AnyObject, Sendable {
    var memory: GuestMemory { get }
    var dirtyTracker: any DirtyTracker { get }
    /// The machine section (JSON), sent in the manifest so the destination can check it first.
    func machineDescriptionPayload() throws -> [UInt8]
    /// The guest's name, for the destination's logs.
    var migrationIdentity: String? { get }
    /// This host's name, for the manifest.
    var hostName: String { get }
    /// Just before the pause: records, durably, the hand-over the commit may make (to that host
    /// and process, for the connection of `challenge`), so that the commit inside the pause need
    /// not wait for the disk. Throwing here fails the migration before the pause.
    func prepareHandover(toHost host: String?, toPid pid: Int32?, challenge: String) throws
    /// The commit point: hands ownership (the Billboard lease) to the destination process named
    /// in the accept, just before GO. Throwing here cancels the migration; the guest resumes here.
    func commitHandover(toHost host: String?, toPid pid: Int32?) throws
    /// The migration failed before GO: the prepared hand-over will not happen.
    func abandonHandover()
    /// Signs a digest with this host's key (a plaintext stream, and its GO; the destination
    /// verifies them); nil when this VM has no host key to sign with.
    func signState(digest: [UInt8]) throws -> [UInt8]?
    /// Pauses every vCPU; false if the guest has already stopped.
    func pauseForMigration() -> Bool
    /// Resumes after a failed migration.
    func resumeAfterMigration()
    /// vCPU and device sections of the paused VM.
    func statePayloads() throws -> (vcpu: [UInt8], devices: [UInt8])
    /// Slows the guest: the share of time its vCPUs are held paused (0 = off).
    func setThrottle(percent: Int)
    /// Post-copy, after GO: this copy now only serves the pages the destination lacks (paused
    /// for good, without the lease); `awaitingRecovery` while the link is down. For the
    /// Billboard's record of this process.
    func notePostCopyPageServer(awaitingRecovery: Bool)
}

extension MigrationSourceVM {
    /// A VM with no durable record to prepare commits the hand-over durably inside the pause.
    public func prepareHandover(toHost host: String?, toPid pid: Int32?, challenge: String) throws {}
    public func abandonHandover() {}
}

/// Iterative pre-copy: round 0 sends all memory while the guest runs; each later
/// round sends what was dirtied since the last; when what is left can go within
/// the downtime limit at the measured rate, the guest pauses for the last pages
/// and its state, and the READY / GO / RUNNING hand-over follows.
public final class PreCopySender: Sendable {
    public let settings: MigrationSettings
    let vm: any MigrationSourceVM
    private struct Shared {
        var progress = MigrationProgress()
        var cancelled: String?
        var transport: (any MigrationTransport)?
        /// The data channels, when the migration has them (closed by a cancel too).
        var channels: DataChannels?
        /// Set, under the lock, at the moment GO is about to be written: from then on a cancel
        /// is refused and a failure leaves the migration in doubt.
        var goSent = false
        /// Set with `goSent` when the guest switches to the destination before all its pages
        /// moved (post-copy): from then on no failure resumes it here.
        var postcopy = false
        /// Post-copy: what a resume after a failed link needs (set with GO).
        var postcopyContext: PostCopyContext?
        /// A resume is under way.
        var resuming = false
        /// A switch to post-copy on request: open while pre-copy may still switch.
        var switchWindow = SwitchWindow.open
    }
    enum SwitchWindow {
        case open, requested
        case closed(PostCopySwitchRefusal)
    }

    /// What a post-copy migration keeps, from GO on, for a resume after its link failed.
    struct PostCopyContext: Sendable {
        /// The original connection's challenge: names the migration to the destination.
        let challenge: String
        let destinationHost: String
        /// The pages the destination lacked at the switch: it can ask for no others.
        let missingAtSwitch: [UInt64]
        let switchedAfterRounds: Int
        let t0: Double
        var report: MigrationReport
        var pushed = 0
        var requested = 0
        var recoveries = 0
    }
    private let state = Mutex<Shared>(Shared())
    /// Rounds beyond the first that met the downtime limit, while they keep shrinking the rest.
    static let maxExtraRounds = 4
    /// Pages per memory section (the format's limit).
    static let batchPages = 512
    /// Post-copy: at most this many of the guest's hot pages (the ones it wrote in its last
    /// moments here: its stack, its counters, its page tables, where it was writing) go with the
    /// state inside the pause, so that the guest does not stop on them the moment it resumes at
    /// the destination. A hotter guest's go by fault or push.
    static let hotPagesAtSwitch = 256

    /// How long a post-copy link may stay quiet before it counts as failed.
    let postcopyLiveness: PostCopyLiveness

    public init(vm: any MigrationSourceVM, settings: MigrationSettings, postcopyLiveness: PostCopyLiveness = .standard) {
        self.vm = vm
        self.settings = settings
        self.postcopyLiveness = postcopyLiveness
    }

    /// A copy of the current progress.
    public var progress: MigrationProgress { state.withLock { $0.progress } }

    /// The identity of the post-copy migration (its original challenge), from GO on; tests forge
    /// resumes with it.
    var postcopyMigrationChallenge: String? { state.withLock { $0.postcopyContext?.challenge } }

    /// Asks a post-copy migration to switch as soon as it can: before its next round, or in the
    /// middle of the round it is sending (what that round has not sent yet stays missing, with
    /// every page dirtied since it was sent). A request accepted here is always carried out.
    public func requestPostCopySwitch() throws {
        guard settings.postcopy else { throw PostCopySwitchRefusal.notPostcopy }
        let refusal: PostCopySwitchRefusal? = state.withLock { s in
            if s.cancelled != nil { return .pastPrecopy("it is being cancelled") }
            switch s.switchWindow {
            case .open:
                s.switchWindow = .requested
                s.progress.postcopySwitch = PostCopySwitch.requested.rawValue
                return nil
            case .requested: return nil
            case let .closed(refusal): return refusal
            }
        }
        if let refusal { throw refusal }
    }

    private var switchIsRequested: Bool {
        state.withLock { if case .requested = $0.switchWindow { true } else { false } }
    }

    /// Ends the time for requests (a window already closed keeps its reason); whether one came
    /// first (and must still be carried out).
    private func closeSwitchWindow(_ refusal: PostCopySwitchRefusal) -> Bool {
        state.withLock { s in
            switch s.switchWindow {
            case .open: s.switchWindow = .closed(refusal); return false
            case .requested: s.switchWindow = .closed(.alreadySwitched(.requested)); return true
            case .closed: return false
            }
        }
    }


    /// Aborts the migration unless GO was already sent (SIGINT/SIGTERM, or the API); false if
    /// it was (then nothing changes).
    @discardableResult
    public func cancel(reason: String) -> Bool {
        let taken: (transport: (any MigrationTransport)?, Void)? = state.withLock { s in
            // After GO, the hand-over must finish: cancelling then would leave no copy running.
            guard !s.goSent else { return nil }
            s.cancelled = reason
            s.channels?.closeTransports()
            return (s.transport, ())
        }
        // Closing the socket unblocks any send or receive in progress.
        taken?.transport?.close()
        return taken != nil
    }

    private func update(_ body: (inout MigrationProgress) -> Void) {
        state.withLock { body(&$0.progress) }
    }

    private func checkCancelled() throws {
        if let reason = state.withLock({ $0.cancelled }) { throw MigrationError.aborted(reason) }
    }

    /// The streams and figures of one run, passed from phase to phase.
    struct Run {
        let t0: Double
        var writer: StreamWriter<TransportSink>
        var reader: StreamReader<TransportSource>
        var report: MigrationReport
        let integrity: SectionIntegrity
        /// The destination's challenge, answered in the manifest and signed into a plaintext GO.
        var challenge = ""
        /// Who gets the guest: the authenticated destination host (or, in plaintext, the one
        /// that answered), and its process from the accept.
        var destinationHost = ""
        var destinationPid: Int32 = 0
        var sent = TransferCounts(pages: 0, memorySections: 0)
        var pending = DirtyBitmap(pageCount: 0)
        var pauseTime = 0.0
        /// When each phase of the downtime ended (CLOCK_MONOTONIC ms), for the report.
        var marks = DowntimeMarks()
        var paused = false
        var tracking = false
        /// Post-copy: the pages the destination lacks at the switch, and the page channel.
        var missing: DirtyBitmap?
        /// Post-copy: the pages written in each of the last two rounds (or held back as such).
        var hot: DirtyBitmap?
        var pageChannel: PageChannel?
        /// Serves the page channel from GO on.
        var pageService: PageService?
        var switchedAfterRounds = 0
        /// The data channels (`settings.channels` > 1); nil: the pages go on `writer`.
        var channels: DataChannels?
        /// The round being sent, for the marks on idle connections.
        var round = 0
        /// Stream bytes written so far, on the main connection and the data channels.
        var bytesOnWire: UInt64 { writer.bytesWritten + (channels?.bytesWritten ?? 0) }
    }

    /// Runs the whole migration. Never throws: the outcome is in the report, and
    /// on failure before GO the guest is running again here.
    public func run(connect: () throws -> any MigrationTransport) -> MigrationReport {
        let t0 = monotonicMilliseconds()
        var report = MigrationReport(destination: settings.destination, tracker: vm.dirtyTracker.name,
                                     converged: false, outcome: .failed, settings: settings)
        report.memoryBytes = vm.memory.size
        state.withLock { s in
            // A switch asked for before the run began (while its thread started) still stands.
            let window = s.switchWindow
            s = Shared()
            if case .requested = window { s.switchWindow = window; s.progress.postcopySwitch = PostCopySwitch.requested.rawValue }
            s.progress.phase = .setup
        }
        var paused = false, tracking = false
        do {
            let transport = try connect()
            state.withLock { $0.transport = transport }
            defer { transport.close() }
            var run = try setup(transport, t0: t0, report: report, connect: connect)
            defer { report = run.report; paused = run.paused; tracking = run.tracking }
            if settings.channels > 1 {
                let channels = try DataChannels.open(count: settings.channels, connect: connect, challenge: run.challenge,
                                                     mainPeer: transport.authenticatedPeer)
                run.channels = channels
                let cancelled = state.withLock { s in
                    s.channels = channels
                    return s.cancelled
                }
                if let cancelled { throw MigrationError.aborted(cancelled) }
            }
            defer {
                run.channels?.close()
                state.withLock { $0.channels = nil }
                run.pageService?.stop()
                run.pageChannel?.transport.close()
            }
            try precopy(&run)
            if run.missing == nil {
                try stopAndCopy(&run)
                try handover(&run, transport: transport)
            } else {
                try switchToPostCopy(&run)
                try handover(&run, transport: transport)
                try postcopy(&run, transport: transport)
            }
        } catch {
            fail(&report, error: error, paused: paused, tracking: tracking)
        }
        state.withLock { s in
            if case .closed = s.switchWindow { return }
            s.switchWindow = .closed(.pastPrecopy("it has ended (\(report.outcome.rawValue))"))
        }
        report.rounds = report.pagesPerRound.count
        report.totalMs = monotonicMilliseconds() - t0
        report.throughputBytesPerSecond = report.totalMs > 0 ? Double(report.bytesSent) / (report.totalMs / 1000) : 0
        state.withLock { $0.transport = nil }
        return report
    }

    /// Setup: the destination's challenge (its host, authenticated on a TLS channel, must be the
    /// peer this migration names), then the manifest that answers it, then the accept
    /// (admitted, VM reserved). No guest byte is written before the challenge arrived. A
    /// migration that may switch to post-copy then opens its page channel, while the guest runs:
    /// its handshake must not count in the downtime.
    private func setup(_ transport: any MigrationTransport, t0: Double, report: MigrationReport,
                       connect: () throws -> any MigrationTransport) throws -> Run {
        try checkCancelled()
        guard (1...maxMigrationChannels).contains(settings.channels) else {
            throw MigrationError.aborted("channels must be 1 to \(maxMigrationChannels), not \(settings.channels)")
        }
        // A switch cuts a round short; with data channels a round is N streams, which the switch
        // does not know how to cut yet.
        guard settings.channels == 1 || !settings.postcopy else {
            throw MigrationError.aborted("post-copy is not available with more than one channel yet: give channels 1")
        }
        let integrity = transport.streamIntegrity
        var reader = try StreamReader(source: TransportSource(transport), integrity: integrity)
        guard case let .challenge(version, nonce, host) = try next(from: &reader, expecting: "challenge") else {
            throw MigrationError.protocolViolation("the destination did not open with a challenge")
        }
        guard version == migrationProtocolVersion else {
            throw MigrationError.refused("the destination speaks protocol version \(version), this VMM \(migrationProtocolVersion)")
        }
        if let authenticated = transport.authenticatedPeer, host != authenticated {
            throw MigrationError.refused("the destination calls itself '\(host)' but the channel authenticated '\(authenticated)'")
        }
        if let peer = settings.peer, host != peer {
            throw MigrationError.refused("the destination is host '\(host)', not '\(peer)', the peer this migration names")
        }
        var writer = try StreamWriter(sink: TransportSink(transport), integrity: integrity)
        let manifest = MigrationManifest(challenge: nonce, sourceHost: vm.hostName, destinationHost: host, sourcePid: getpid(),
                                         machine: Data(try vm.machineDescriptionPayload()), guest: vm.migrationIdentity,
                                         postcopy: settings.postcopy ? true : nil,
                                         channels: settings.channels > 1 ? settings.channels : nil)
        try writer.writeSection(.control, payload: WireMessage.manifest(manifest).encoded())
        try writer.sink.flush()
        guard case let .accept(acceptHost, pid) = try next(from: &reader, expecting: "accept") else {
            throw MigrationError.protocolViolation("expected accept")
        }
        // The lease goes to the host the channel authenticated, never to one a message names.
        guard acceptHost == host else {
            throw MigrationError.refused("the destination '\(host)' accepted for another host, '\(acceptHost)'")
        }
        var run = Run(t0: t0, writer: writer, reader: reader, report: report, integrity: integrity)
        run.challenge = nonce
        run.destinationHost = host
        run.destinationPid = pid
        if settings.postcopy {
            // Bound to this connection by its challenge, to the same authenticated peer.
            run.pageChannel = try PageChannel.open(connect: connect, challenge: nonce, mainPeer: transport.authenticatedPeer)
        }
        run.report.setupMs = monotonicMilliseconds() - t0
        return run
    }

    /// Pre-copy: round 0 sends every page that may hold data while the guest runs; each later
    /// round what was dirtied since, until what is left fits the downtime limit, or (post-copy)
    /// until the switch: after the rounds asked for, on request (even mid-round), or, with a
    /// switch on stall, once the convergence estimate says the limit will not be met.
    private func precopy(_ run: inout Run) throws {
        try vm.dirtyTracker.enable()
        run.tracking = true
        update { $0.phase = .precopy }
        // Logging is already on, so a page first written after this check is caught by the next round.
        var pending = vm.memory.possiblyNonZeroPages() ?? DirtyBitmap.all(pageCount: vm.memory.pageCount)
        var estimator = ConvergenceEstimator(maxDowntimeMs: settings.maxDowntimeMs)
        var policy = ConvergencePolicy(mode: settings.convergence, maxDowntimeMs: settings.maxDowntimeMs)
        // Pages held for the final round (adaptive): neither sent nor re-protected until then,
        // always part of `pending`. `hot`: pages written in each of the last two rounds.
        var held = DirtyBitmap(pageCount: vm.memory.pageCount)
        var hot = DirtyBitmap(pageCount: vm.memory.pageCount)
        var previouslyDirtied: DirtyBitmap?
        var round = 0
        var extraRounds = 0
        // A number of rounds is a promise: the switch comes after exactly that many, and
        // pre-copy does not finish first. Without one, it may.
        let switchByCount = settings.postcopy ? settings.postcopyAfterRounds : nil
        let t0 = run.t0
        let interrupt: (() -> PostCopySwitch?)? = settings.postcopy ? { [self] in midRoundSwitch(t0: t0) } : nil
        var trigger: PostCopySwitch?
        var stall: ConvergenceStall?
        var midRound = false
        func recordPolicy() {
            run.report.convergence?.policy = policy.mode
            run.report.convergence?.actions = policy.actions
            run.report.convergence?.throttlePercent = policy.throttlePercent
            run.report.convergence?.hotPagesHeld = held.count
        }
        while true {
            if settings.postcopy {
                if switchIsRequested { trigger = .requested; break }
                if let count = switchByCount, round >= count { trigger = .afterRounds; break }
            }
            let roundStart = monotonicMilliseconds()
            run.round = round
            let before = run.bytesOnWire
            // Hot pages go last in the round (read as late as possible, so fewer are written
            // again before it ends); held ones not at all.
            let sendable = pending.subtracting(held)
            let hotPart = policy.hotLast ? sendable.intersection(hot) : DirtyBitmap(pageCount: pending.pageCount)
            var sent = 0
            var interruption: Interruption?
            for (index, part) in [sendable.subtracting(hotPart), hotPart].enumerated() where interruption == nil && !part.isEmpty {
                let result = try sendRound(part, run: &run, rearm: round > 0, interrupt: interrupt)
                sent += result.sent
                if var stopped = result.interrupted {
                    if index == 0 { stopped.unsent.formUnion(hotPart) }
                    interruption = stopped
                }
            }
            run.report.pagesPerRound.append(sent)
            if var interruption {
                // What this round did not send stays missing (held pages too); what was dirtied
                // after it was sent is collected at the switch.
                interruption.unsent.formUnion(held)
                pending = interruption.unsent
                trigger = interruption.trigger
                midRound = true
                if interruption.trigger == .stall {
                    stall = ConvergenceStall(kind: .timeout, description: String(
                        format: "pre-copy reached its time limit (%.0f s) in round %d, with %d of its pages unsent",
                        settings.timeoutSeconds, round, interruption.unsent.count))
                }
                break
            }
            let seconds = max((monotonicMilliseconds() - roundStart) / 1000, 1e-6)
            let dirtied = try vm.dirtyTracker.collect().subtracting(held)
            if let previouslyDirtied { hot = dirtied.intersection(previouslyDirtied) }
            previouslyDirtied = dirtied
            pending = dirtied
            pending.formUnion(held)
            estimator.heldPages = held.count
            estimator.record(RoundFigures(pagesSent: sent, bytesSent: run.bytesOnWire - before, seconds: seconds,
                                          pagesDirtied: dirtied.count))
            let elapsed = (monotonicMilliseconds() - run.t0) / 1000
            let verdict = estimator.verdict(secondsLeft: settings.timeoutSeconds - elapsed)
            run.report.convergence = estimator.snapshot(secondsLeft: settings.timeoutSeconds - elapsed)
            recordPolicy()
            let expectedMs = estimator.predictedFinalRoundMs ?? 0
            update {
                $0.round = round
                $0.dirtyPagesLeft = pending.count
                $0.rateBytesPerSecond = estimator.linkRate ?? 0
                $0.expectedDowntimeMs = expectedMs
                $0.elapsedSeconds = elapsed
            }
            round += 1
            if switchByCount == nil && verdict == .fits {
                // The limit is a ceiling, not a target: while another round still shrinks
                // what is left by a quarter, it buys a shorter pause for little time.
                let shrinking = Double(pending.count) < Double(sent) * 0.75
                let worthOneMore = shrinking && expectedMs > 5 && extraRounds < Self.maxExtraRounds
                    && elapsed < settings.timeoutSeconds / 2
                if !worthOneMore { run.report.converged = true; break }
                extraRounds += 1
            }
            // A switch on stall, when asked for, comes before anything the policy would do.
            if settings.postcopy && settings.postcopyOnStall, case let .stalled(why) = verdict {
                trigger = .stall
                stall = why
                break
            }
            if elapsed >= settings.timeoutSeconds {
                guard settings.postcopy && settings.postcopyOnStall else {
                    throw MigrationError.notConverged(seconds: settings.timeoutSeconds)
                }
                // What is left fits, but the rounds promised are not done: the time limit decides.
                trigger = .stall
                stall = ConvergenceStall(kind: .timeout, description: String(
                    format: "pre-copy reached its time limit (%.0f s) after %d rounds", settings.timeoutSeconds, round))
                break
            }
            try checkCancelled()
            let throttleBefore = policy.throttlePercent
            policy.decide(round: round - 1, estimator: estimator, verdict: verdict, hotPages: hot.count)
            if policy.holdHot && held.isEmpty && !hot.isEmpty {
                held = hot
                hot = DirtyBitmap(pageCount: pending.pageCount)
                estimator.heldPages = held.count
            }
            if policy.throttlePercent != throttleBefore {
                let next = policy.throttlePercent
                vm.setThrottle(percent: next)
                update { $0.throttlePercent = next }
            }
            recordPolicy()
        }
        run.pending = pending
        if let trigger {
            _ = closeSwitchWindow(.alreadySwitched(trigger))
        } else if closeSwitchWindow(.pastPrecopy("pre-copy converged and is finishing without a switch")) {
            // Asked for after the last check: carried out all the same.
            trigger = .requested
        }
        if let trigger {
            run.missing = pending
            var hotOrHeld = hot
            hotOrHeld.formUnion(held)
            run.hot = hotOrHeld
            run.switchedAfterRounds = round
            var figures = PostCopyFigures()
            figures.trigger = trigger
            figures.switchedAfterRounds = round
            figures.switchedMidRound = midRound
            figures.stall = stall?.kind
            figures.stallReason = stall?.description
            run.report.postcopy = figures
            update { $0.postcopySwitch = trigger.rawValue }
        }
    }

    /// Checked after each batch of a post-copy migration's round: a request, or (switching on
    /// stall) the time limit, stops the round where it is.
    private func midRoundSwitch(t0: Double) -> PostCopySwitch? {
        if switchIsRequested { return .requested }
        if settings.postcopyOnStall && (monotonicMilliseconds() - t0) / 1000 >= settings.timeoutSeconds { return .stall }
        return nil
    }

    /// Stop-and-copy: the guest pauses; the last dirty pages, vCPU and device state, the
    /// signature and the end of the state stream follow.
    private func stopAndCopy(_ run: inout Run) throws {
        vm.setThrottle(percent: 0)
        update { $0.phase = .stopAndCopy; $0.throttlePercent = 0 }
        try checkCancelled()
        // With data channels the barrier of each round does this work, channel by channel.
        if run.channels == nil { run.report.drainMs = try drain(&run) }
        // Durable before the pause, so that the commit inside it need not be.
        let intentStart = monotonicMilliseconds()
        try vm.prepareHandover(toHost: run.destinationHost, toPid: run.destinationPid, challenge: run.challenge)
        run.report.handoverIntentMs = monotonicMilliseconds() - intentStart
        // The downtime starts with the pause asked for: the first vCPU kicked out stops the guest.
        run.pauseTime = monotonicMilliseconds()
        guard vm.pauseForMigration() else { throw MigrationError.aborted("the guest stopped during the migration") }
        run.paused = true
        run.marks.paused = monotonicMilliseconds()
        run.pending.formUnion(try vm.dirtyTracker.collect())
        let last = try sendRound(run.pending, run: &run, rearm: false, stopAndCopy: true).sent
        run.report.pagesPerRound.append(last)
        // Signed only in plaintext: on an authenticated channel the TLS identity is the signature.
        let signed = run.integrity.hasStreamDigest
        if let channels = run.channels {
            // Every channel's stream ends (signed in plaintext, as the main one) before the state.
            let vm = self.vm
            var main = run.writer
            defer { run.writer = main }
            try channels.finish(sign: { signed ? try vm.signState(digest: $0) : nil },
                                waiting: { try Self.mark(&main, round: -1) })
        }
        run.marks.lastPages = monotonicMilliseconds()
        let (vcpu, devices) = try vm.statePayloads()
        try StateSequence.writeClosing(vcpus: vcpu, devices: devices, to: &run.writer) { signed ? try vm.signState(digest: $0) : nil }
        try run.writer.sink.flush()
        run.marks.state = monotonicMilliseconds()
        run.report.bytesSent = run.bytesOnWire
        // A page channel (the manifest allowed post-copy) stays unused: GO comes without a switch.
        update { $0.phase = .handover; $0.dirtyPagesLeft = 0 }
    }

    /// Just before the pause: waits, the guest still running, until the destination has applied
    /// every page sent so far, so that nothing in flight (the sockets' buffers, the TLS layers':
    /// a round's megabytes) is read inside the downtime. Returns how long that took.
    private func drain(_ run: inout Run) throws -> Double {
        let start = monotonicMilliseconds()
        try run.writer.writeSection(.control, payload: WireMessage.drain(run.sent).encoded())
        try run.writer.sink.flush()
        guard case let .drained(applied) = try next(from: &run.reader, expecting: "drained") else {
            throw MigrationError.protocolViolation("expected drained")
        }
        guard applied == run.sent else {
            throw MigrationError.aborted("the destination applied \(applied) but \(run.sent) were sent")
        }
        return monotonicMilliseconds() - start
    }

    /// Hand-over: READY with the destination's counts (checked against what was sent), the lease
    /// moves to the authenticated destination, GO with the counts (signed in plaintext),
    /// RUNNING. From the first byte of GO on, the source never resumes on its own.
    private func handover(_ run: inout Run, transport: any MigrationTransport) throws {
        guard case let .ready(received) = try next(from: &run.reader, expecting: "ready") else {
            throw MigrationError.protocolViolation("expected ready")
        }
        run.marks.ready = monotonicMilliseconds()
        guard received == run.sent else {
            throw MigrationError.aborted("the destination applied \(received) but \(run.sent) were sent")
        }
        let postcopy = run.missing != nil
        let context = run.missing.map { missing in
            PostCopyContext(challenge: run.challenge, destinationHost: run.destinationHost, missingAtSwitch: missing.words,
                            switchedAfterRounds: run.switchedAfterRounds, t0: run.t0, report: run.report)
        }
        let cancelled: String? = state.withLock { s in
            if s.cancelled == nil { s.goSent = true; s.postcopy = postcopy; s.postcopyContext = context }
            return s.cancelled
        }
        if let cancelled { throw MigrationError.aborted(cancelled) }
        let handoverStart = monotonicMilliseconds()
        do { try vm.commitHandover(toHost: run.destinationHost, toPid: run.destinationPid) } catch {
            // Nothing of GO was written: the guest may still resume here.
            state.withLock { $0.goSent = false; $0.postcopy = false; $0.postcopyContext = nil }
            throw MigrationError.aborted("the hand-over of the guest's lease failed: \(error)")
        }
        run.marks.leaseHandedOver = monotonicMilliseconds()
        run.report.handoverMs = run.marks.leaseHandedOver - handoverStart
        let signature = run.integrity.hasStreamDigest
            ? try vm.signState(digest: sha256(WireMessage.goPayload(challenge: run.challenge, counts: run.sent))).map { Data($0) }
            : nil
        run.marks.go = monotonicMilliseconds()
        var commit = try StreamWriter(sink: TransportSink(transport), integrity: run.integrity)
        if let missing = run.missing {
            for slice in MissingPagesSlices.slices(missing.wireBytes) {
                try commit.writeSection(.control, payload: WireMessage.postcopy(missing: slice).encoded())
            }
        }
        try commit.writeSection(.control, payload: WireMessage.go(run.sent, signature: signature).encoded())
        try commit.finish()
        try commit.sink.flush()
        run.report.bytesSent += commit.bytesWritten
        if let missing = run.missing, let channel = run.pageChannel {
            // From GO on: the destination may fault before it says RUNNING (it reads the guest's
            // memory while it takes the guest over), and that page must not wait for RUNNING.
            run.pageService = PageService(memory: vm.memory, missing: missing, channel: channel)
            // The link is watched from GO on: a silent one must not leave this side waiting for
            // RUNNING either.
            run.pageService?.watch(main: transport, liveness: postcopyLiveness)
        }
        let runningMessage: WireMessage
        do { runningMessage = try next(from: &run.reader, expecting: "running") } catch {
            if let reason = run.pageService?.silence { throw MigrationError.connection("\(reason) (\(error))") }
            throw error
        }
        guard case let .running(resumedAt, announce, destination) = runningMessage else {
            throw MigrationError.protocolViolation("expected running")
        }
        run.marks.running = monotonicMilliseconds()
        run.report.destinationAnnounce = announce
        let phases = run.marks.phases(pausedAt: run.pauseTime, resumedAt: resumedAt, destination: destination)
        run.report.downtimePhasesMs = phases
        run.report.downtimeMs = phases.inDowntime.reduce(0, +)
        try? vm.dirtyTracker.disable()
        if postcopy {
            // Recorded after the downtime: the store's write need not delay the guest.
            vm.notePostCopyPageServer(awaitingRecovery: false)
            return
        }
        run.report.outcome = .completed
        update { $0.phase = .completed }
    }

    /// The switch to post-copy: the guest pauses here for good once GO goes out; the guest's hot
    /// pages (when few), the vCPU and device state close the state stream without the other
    /// pages dirtied since they were sent (they stay missing at the destination, with the pages
    /// never sent). The page channel is open since the setup.
    private func switchToPostCopy(_ run: inout Run) throws {
        vm.setThrottle(percent: 0)
        update { $0.phase = .stopAndCopy; $0.throttlePercent = 0 }
        try checkCancelled()
        let drained = try drain(&run)
        run.report.postcopy?.drainMs = drained
        var missing = run.missing ?? DirtyBitmap(pageCount: vm.memory.pageCount)
        // The pages still to go are logged again from here (they stay missing all the same), so
        // that what is collected in the pause is what the guest wrote in its last moments here,
        // the intent's sync below: the pages it will touch first at the destination.
        for (index, word) in missing.words.enumerated() where word != 0 {
            try vm.dirtyTracker.rearm(firstPage: UInt64(index) * 64, mask: word)
        }
        // Durable before the pause, as for stop-and-copy: the commit inside it need not sync.
        let intentStart = monotonicMilliseconds()
        try vm.prepareHandover(toHost: run.destinationHost, toPid: run.destinationPid, challenge: run.challenge)
        run.report.handoverIntentMs = monotonicMilliseconds() - intentStart
        run.pauseTime = monotonicMilliseconds()
        guard vm.pauseForMigration() else { throw MigrationError.aborted("the guest stopped during the migration") }
        run.paused = true
        run.marks.paused = monotonicMilliseconds()
        let recent = try vm.dirtyTracker.collect()
        missing.formUnion(recent)
        // The hot pages: sent now, they are there when the guest resumes. Too many written in
        // those moments, those also written in each of the last two rounds, if they are few.
        var hot = recent
        if hot.count > Self.hotPagesAtSwitch { hot = run.hot?.intersection(missing) ?? DirtyBitmap(pageCount: missing.pageCount) }
        var sentNow = 0
        if !hot.isEmpty && hot.count <= Self.hotPagesAtSwitch {
            sentNow = try sendPages(hot, writer: &run.writer, rearm: false, report: &run.report, counts: &run.sent,
                                    t0: run.t0, stopAndCopy: true).sent
            missing = missing.subtracting(hot)
        }
        run.missing = missing
        run.report.postcopy?.pagesMissingAtSwitch = missing.count
        run.report.pagesPerRound.append(sentNow)
        run.marks.lastPages = monotonicMilliseconds()
        let (vcpu, devices) = try vm.statePayloads()
        let signed = run.integrity.hasStreamDigest
        try StateSequence.writeClosing(vcpus: vcpu, devices: devices, to: &run.writer) { signed ? try vm.signState(digest: $0) : nil }
        try run.writer.sink.flush()
        run.marks.state = monotonicMilliseconds()
        run.report.bytesSent = run.writer.bytesWritten
        update { $0.phase = .handover; $0.dirtyPagesLeft = missing.count }
    }

    /// Post-copy: the destination runs the guest; this side answers page requests on the page
    /// channel and pushes the rest on the main connection until the destination says every page
    /// is in (COMPLETE). Only then is the migration completed and this copy may go.
    private func postcopy(_ run: inout Run, transport: any MigrationTransport) throws {
        guard let missing = run.missing, let service = run.pageService else { return }
        update { $0.phase = .postcopy }
        let served = try servePostCopy(main: transport, reader: &run.reader, service: service,
                                       integrity: run.integrity, maxBandwidth: settings.maxBandwidth)
        run.report.bytesSent += served.bytes
        complete(&run.report, destinationFigures: served.figures, switchedAfterRounds: run.switchedAfterRounds,
                 missingAtSwitch: missing.count)
    }

    /// The migration is complete: the destination's figures with this side's counts.
    private func complete(_ report: inout MigrationReport, destinationFigures: PostCopyFigures, switchedAfterRounds: Int,
                          missingAtSwitch: Int) {
        let context = state.withLock { $0.postcopyContext }
        var figures = destinationFigures
        // How it switched (a count, a request, a stall), as pre-copy recorded it.
        figures.takeSwitch(from: context?.report.postcopy ?? report.postcopy)
        figures.switchedAfterRounds = switchedAfterRounds
        figures.pagesMissingAtSwitch = missingAtSwitch
        figures.pagesPushed = context?.pushed ?? 0
        figures.pagesRequested = context?.requested ?? 0
        figures.recoveries = context?.recoveries ?? 0
        report.postcopy = figures
        report.pagesSent += figures.pagesPushed + figures.pagesRequested
        report.outcome = .completed
        report.error = nil
        update { $0.phase = .completed; $0.pagesSent = report.pagesSent; $0.dirtyPagesLeft = 0; $0.error = nil }
    }

    /// Serves one post-copy connection pair until COMPLETE: page requests and heartbeats on the
    /// page channel (`service`, serving and watching the link since GO or the resume), the push
    /// on `main`. Throws on any failure; the pages served are counted either way.
    private func servePostCopy(main: any MigrationTransport, reader: inout StreamReader<TransportSource>, service: PageService,
                               integrity: SectionIntegrity, maxBandwidth: UInt64) throws -> (figures: PostCopyFigures, bytes: UInt64) {
        let server = service.server
        defer {
            service.stop()
            let counts = server.counts
            state.withLock { s in
                s.postcopyContext?.pushed += counts.pushed
                s.postcopyContext?.requested += counts.requested
            }
        }
        do {
            let bytes = try server.push(on: main, integrity: integrity, batchPages: 64, maxBandwidth: maxBandwidth)
            update { $0.dirtyPagesLeft = 0 }
            guard case let .complete(figures) = try next(from: &reader, expecting: "complete") else {
                throw MigrationError.protocolViolation("expected complete")
            }
            return (figures, bytes)
        } catch {
            if let reason = service.silence { throw MigrationError.connection("\(reason) (\(error))") }
            if let reason = service.error { throw MigrationError.connection("\(error) (the page channel: \(reason))") }
            throw error
        }
    }

    // MARK: - Post-copy recovery

    /// Resumes this guest's post-copy migration, paused after its link failed, over a new
    /// connection (`connect`, to where the destination listens after `migration/recover`): the
    /// destination's fresh challenge is answered with the original migration's identity, the
    /// destination says which pages it still lacks, a new page channel opens, and exactly those
    /// pages are sent (pushed, and on request). Never throws: a failure leaves it paused, as before.
    public func resumePostCopy(settings resumeSettings: MigrationSettings, connect: () throws -> any MigrationTransport) -> MigrationReport {
        let claimed = state.withLock { s -> PostCopyContext? in
            guard s.progress.phase == .postcopyPaused, !s.resuming, let context = s.postcopyContext else { return nil }
            s.resuming = true
            return context
        }
        guard let context = claimed else {
            var report = MigrationReport(destination: resumeSettings.destination, tracker: vm.dirtyTracker.name, converged: false,
                                         outcome: .failed, settings: resumeSettings)
            report.error = "there is no paused post-copy migration to resume (the last migration is \(progress.phase.rawValue))"
            return report
        }
        defer { state.withLock { $0.resuming = false } }
        var report = context.report
        report.error = nil
        do {
            guard resumeSettings.transport == .tls else {
                throw MigrationError.refused("a post-copy migration resumes over mutually authenticated TLS only: name the destination host as the peer")
            }
            guard let peer = resumeSettings.peer, sameBytes(peer, context.destinationHost) else {
                throw MigrationError.refused("the guest went to '\(context.destinationHost)'; its migration can only resume there, not at '\(resumeSettings.peer ?? "?")'")
            }
            let transport = try connect()
            state.withLock { $0.transport = transport }
            defer {
                transport.close()
                state.withLock { $0.transport = nil }
            }
            let integrity = transport.streamIntegrity
            var reader = try StreamReader(source: TransportSource(transport), integrity: integrity)
            guard case let .challenge(version, nonce, host) = try next(from: &reader, expecting: "challenge") else {
                throw MigrationError.protocolViolation("the destination did not open with a challenge")
            }
            guard version == migrationProtocolVersion else {
                throw MigrationError.refused("the destination speaks protocol version \(version), this VMM \(migrationProtocolVersion)")
            }
            guard let authenticated = transport.authenticatedPeer, sameBytes(host, authenticated), sameBytes(host, context.destinationHost) else {
                throw MigrationError.refused("the destination calls itself '\(host)' (the channel authenticated '\(transport.authenticatedPeer ?? "nobody")'), not '\(context.destinationHost)'")
            }
            var writer = try StreamWriter(sink: TransportSink(transport), integrity: integrity)
            let resume = PostCopyResume(challenge: nonce, migration: context.challenge, sourceHost: vm.hostName,
                                        destinationHost: host, guest: vm.migrationIdentity)
            try writer.writeSection(.control, payload: WireMessage.resume(resume).encoded())
            try writer.sink.flush()
            var slices = MissingPagesSlices.Assembler(pageCount: vm.memory.pageCount)
            var bitmap: Data?
            while bitmap == nil {
                guard case let .stillMissing(slice) = try next(from: &reader, expecting: "still-missing") else {
                    throw MigrationError.protocolViolation("expected still-missing")
                }
                bitmap = try slices.add(slice)
            }
            guard let bitmap, let missing = missingPages(fromWire: bitmap, pageCount: vm.memory.pageCount) else {
                throw MigrationError.protocolViolation("the destination's bitmap of missing pages is not this memory's")
            }
            // It can lack only pages it lacked at the switch: anything else was sent before.
            guard zip(missing, context.missingAtSwitch).allSatisfy({ $0 & ~$1 == 0 }) else {
                throw MigrationError.protocolViolation("the destination asks for pages it was sent before the switch")
            }
            let stillMissing = missing.reduce(0) { $0 + $1.nonzeroBitCount }
            let channel = try PageChannel.open(connect: connect, challenge: nonce, mainPeer: authenticated)
            var pages = DirtyBitmap(pageCount: vm.memory.pageCount)
            for (index, word) in missing.enumerated() where word != 0 { pages.merge(word: word, at: index) }
            let service = PageService(memory: vm.memory, missing: pages, channel: channel)
            service.watch(main: transport, liveness: postcopyLiveness)
            state.withLock { $0.postcopyContext?.recoveries += 1 }
            vm.notePostCopyPageServer(awaitingRecovery: false)
            update { $0.phase = .postcopy; $0.dirtyPagesLeft = stillMissing; $0.error = nil }
            let served = try servePostCopy(main: transport, reader: &reader, service: service,
                                           integrity: integrity, maxBandwidth: resumeSettings.maxBandwidth)
            report.bytesSent += served.bytes
            complete(&report, destinationFigures: served.figures, switchedAfterRounds: context.switchedAfterRounds, missingAtSwitch: context.missingAtSwitch.reduce(0) { $0 + $1.nonzeroBitCount })
        } catch {
            pausePostCopy(&report, error: error)
        }
        report.totalMs = monotonicMilliseconds() - context.t0
        report.throughputBytesPerSecond = report.totalMs > 0 ? Double(report.bytesSent) / (report.totalMs / 1000) : 0
        return report
    }

    /// After the post-copy switch the link failed (or a resume did): this copy keeps the pages
    /// the destination lacks, paused for good, until the migration is resumed.
    private func pausePostCopy(_ report: inout MigrationReport, error: any Error) {
        report.outcome = .postcopyPaused
        let reason = "post-copy paused after the switch: \(error). The destination has the guest and this copy the pages it still lacks; both keep them (this copy stays paused for good: its lease went with GO). Recover with `vmm ctl migrate-recover` at the destination, then `vmm ctl migrate --resume` here; if either VMM ends first, the guest is lost"
        report.error = reason
        let recorded = report
        state.withLock { $0.postcopyContext?.report = recorded }
        vm.notePostCopyPageServer(awaitingRecovery: true)
        update { $0.phase = .postcopyPaused; $0.error = reason }
    }

    /// A failure: before GO the guest runs here again; after GO the migration is in doubt.
    private func fail(_ report: inout MigrationReport, error: any Error, paused: Bool, tracking: Bool) {
        report.error = "\(error)"
        report.bytesSent = max(report.bytesSent, progress.bytesSent)
        // Data channels count a round's pages into the report only once the round is whole.
        report.pagesSent = max(report.pagesSent, progress.pagesSent)
        vm.setThrottle(percent: 0)
        if state.withLock({ $0.postcopy }) {
            // After the switch the destination runs the guest: this copy never resumes, and keeps
            // the pages the destination lacks until the migration is resumed.
            report.rounds = report.pagesPerRound.count
            pausePostCopy(&report, error: error)
        } else if state.withLock({ $0.goSent }) {
            report.outcome = .inDoubt
            let reason = MigrationError.inDoubt("\(error)").description
            report.error = reason
            update { $0.phase = .inDoubt; $0.error = reason }
        } else {
            if tracking { try? vm.dirtyTracker.disable() }
            if paused { vm.resumeAfterMigration() }
            // After the resume: a crash before this only leaves a guest an administrator must release.
            vm.abandonHandover()
            report.outcome = .failed
            update { $0.phase = .failed; $0.error = "\(error)"; $0.throttlePercent = 0 }
        }
    }

    /// Reads the next control message; a refusal is an error, and so is anything that is not
    /// a control message.
    func next<S: ByteSource>(from reader: inout StreamReader<S>, expecting kind: String) throws -> WireMessage {
        guard let section = try reader.nextSection() else {
            throw MigrationError.protocolViolation("the destination ended its stream while \(kind) was expected")
        }
        guard section.type == .control else {
            throw MigrationError.protocolViolation("expected a control message (\(kind)), got a \(section.type) section")
        }
        let message = try WireMessage.decode(section.payload)
        if case let .refuse(reason) = message { throw MigrationError.refused(reason) }
        guard message.kind == kind else {
            throw MigrationError.protocolViolation("expected \(kind), got \(message.kind)")
        }
        return message
    }

    /// Sends one round's pages (or a part of one): on the main connection, or split across the
    /// data channels, each page on its own channel, every channel on its own thread; returns once
    /// all of them are sent (the round's barrier: the next dirty set is collected only then).
    private func sendRound(_ bitmap: DirtyBitmap, run: inout Run, rearm: Bool, stopAndCopy: Bool = false,
                           interrupt: (() -> PostCopySwitch?)? = nil) throws -> (sent: Int, interrupted: Interruption?) {
        guard let channels = run.channels else {
            return try sendPages(bitmap, writer: &run.writer, rearm: rearm, report: &run.report, counts: &run.sent,
                                 t0: run.t0, stopAndCopy: stopAndCopy, interrupt: interrupt)
        }
        let parts = channels.split(bitmap)
        let template = run.report, t0 = run.t0
        // The cap holds for the sum of the channels.
        let share = settings.maxBandwidth == 0 ? 0 : max(1, settings.maxBandwidth / UInt64(channels.count))
        let round = run.round
        var main = run.writer
        defer { run.writer = main }
        try channels.run({ [self] lane in
            var report = template
            report.pagesSent = 0
            report.zeroPages = 0
            var counts = TransferCounts(pages: 0, memorySections: 0)
            let sent = try sendPages(parts[lane.index], writer: &lane.writer, rearm: rearm, report: &report, counts: &counts,
                                     t0: t0, stopAndCopy: stopAndCopy, maxBandwidth: share, sharedProgress: true).sent
            try lane.writer.sink.flush()
            lane.tally = (sent, report.pagesSent, report.zeroPages, counts)
        }, waiting: { try Self.mark(&main, round: round) })
        var sent = 0
        for lane in channels.lanes {
            sent += lane.tally.sent
            run.report.pagesSent += lane.tally.pages
            run.report.zeroPages += lane.tally.zeroPages
            run.sent.pages += lane.tally.counts.pages
            run.sent.memorySections += lane.tally.counts.memorySections
        }
        let pages = run.report.pagesSent, bytes = run.bytesOnWire
        update { $0.pagesSent = pages; $0.bytesSent = bytes }
        return (sent, nil)
    }

    /// A round mark on the main connection: it carries no page while the data channels work.
    static func mark(_ writer: inout StreamWriter<TransportSink>, round: Int) throws {
        try writer.writeSection(.control, payload: WireMessage.roundMark(round: round).encoded())
        try writer.sink.flush()
    }

    /// A round stopped before its last page: why, and the pages it did not send.
    struct Interruption {
        var trigger: PostCopySwitch
        var unsent: DirtyBitmap
    }

    /// Sends the pages set in `bitmap`, re-protecting each 64-page chunk just before it is read.
    /// `interrupt`, asked after each batch, may stop the round there (post-copy switches).
    func sendPages<S: ByteSink>(_ bitmap: DirtyBitmap, writer: inout StreamWriter<S>, rearm: Bool,
                                report: inout MigrationReport, counts: inout TransferCounts, t0: Double,
                                stopAndCopy: Bool = false, interrupt: (() -> PostCopySwitch?)? = nil,
                                maxBandwidth: UInt64? = nil, sharedProgress: Bool = false)
        throws -> (sent: Int, interrupted: Interruption?) {
        let maxBandwidth = maxBandwidth ?? settings.maxBandwidth
        var batch: [UInt64] = []
        batch.reserveCapacity(Self.batchPages)
        var sent = 0
        var stopped: PostCopySwitch?
        let start = monotonicMilliseconds()
        let startBytes = writer.bytesWritten
        func flush() throws {
            guard !batch.isEmpty else { return }
            let stats = try writer.writeMemoryPages(batch, from: vm.memory)
            report.pagesSent += stats.pages
            report.zeroPages += stats.zeroPages
            counts.pages += stats.pages
            counts.memorySections += stats.sections
            sent += batch.count
            batch.removeAll(keepingCapacity: true)
            let bytes = writer.bytesWritten
            if sharedProgress {
                // One of several channels: each adds what it sent.
                update { $0.pagesSent += stats.pages; $0.bytesSent += stats.bytes; $0.elapsedSeconds = (monotonicMilliseconds() - t0) / 1000 }
            } else {
                update { $0.pagesSent = report.pagesSent; $0.bytesSent = bytes; $0.elapsedSeconds = (monotonicMilliseconds() - t0) / 1000 }
            }
            try checkCancelled()
            if let interrupt, let trigger = interrupt() {
                stopped = trigger
                return
            }
            // The time limit holds within a round too (a slow link, a bandwidth cap).
            if !stopAndCopy && (monotonicMilliseconds() - t0) / 1000 >= settings.timeoutSeconds {
                throw MigrationError.notConverged(seconds: settings.timeoutSeconds)
            }
            if maxBandwidth > 0 {
                // Hold the average rate of this round to the limit.
                let due = Double(writer.bytesWritten - startBytes) / Double(maxBandwidth) * 1000
                let spent = monotonicMilliseconds() - start
                if due > spent { usleep(UInt32(min((due - spent) * 1000, 1_000_000))) }
            }
        }
        for (index, word) in bitmap.words.enumerated() where word != 0 {
            let firstPage = UInt64(index) * 64
            if rearm { try vm.dirtyTracker.rearm(firstPage: firstPage, mask: word) }
            var w = word
            while w != 0 {
                batch.append(firstPage + UInt64(w.trailingZeroBitCount))
                w &= w - 1
            }
            if batch.count >= Self.batchPages - 64 {
                try flush()
                if let stopped {
                    // Every chunk up to this one went out whole (a batch holds whole chunks).
                    var unsent = DirtyBitmap(pageCount: bitmap.pageCount)
                    for later in (index + 1)..<bitmap.words.count { unsent.merge(word: bitmap.words[later], at: later) }
                    return (sent, Interruption(trigger: stopped, unsent: unsent))
                }
            }
        }
        // A stop asked for in the last batch comes too late to matter: the round is done.
        try flush()
        return (sent, nil)
    }
}

/// The page channel served from a thread of its own, from GO until the migration ends.
// @unchecked: `box` is used only by the serving thread; the rest is immutable or behind `state`.
final class PageService: @unchecked Sendable {
    let server: PostCopyPageServer
    /// Hears every request and heartbeat from the destination.
    let clock = LinkClock()
    private let transport: any MigrationTransport
    private let box: ChannelBox
    private let done = DispatchSemaphore(value: 0)
    private let state = Mutex<(error: String?, stopped: Bool)>((nil, false))

    init(memory: GuestMemory, missing: DirtyBitmap, channel: PageChannel) {
        server = PostCopyPageServer(memory: memory, missing: missing.words)
        transport = channel.transport
        box = ChannelBox(channel)
        startNamedThread("postcopy-pages") { [self] in
            do { try server.serve(reader: &box.reader, writer: &box.writer, clock: clock) } catch {
                state.withLock { $0.error = "\(error)" }
            }
            done.signal()
        }
    }

    /// Why the channel ended, if it failed.
    var error: String? { state.withLock { $0.error } }

    /// Why the link was given up for silence, if it was.
    var silence: String? { watchState.withLock { $0.reason } }
    private let watchState = Mutex<(watch: SilenceWatch?, reason: String?)>((nil, nil))

    /// Watches the link from now on: once the destination was silent on the page channel for the
    /// liveness limit (it asks for a heartbeat whenever it has asked nothing for a second), both
    /// connections are closed, so that whatever waits on them fails at once.
    func watch(main: any MigrationTransport, liveness: PostCopyLiveness) {
        let transport = self.transport
        clock.heard()
        let watch = SilenceWatch(clock: clock, liveness: liveness, name: "postcopy-silence") { [weak self] silent in
            self?.watchState.withLock { $0.reason = "nothing heard from the destination for \(Int(silent)) s" }
            main.close()
            transport.close()
        }
        watchState.withLock { $0.watch = watch }
    }

    /// Closes the channel and waits for its thread (once; later calls return at once).
    func stop() {
        let first = state.withLock { s in
            defer { s.stopped = true }
            return !s.stopped
        }
        guard first else { return }
        watchState.withLock { $0.watch }?.stop()
        transport.close()
        done.wait()
    }
}

/// Hands the page channel's streams to the thread that serves it.
// @unchecked: after `init` only that one thread touches `channel`.
private final class ChannelBox: @unchecked Sendable {
    var reader: StreamReader<TransportSource>
    var writer: StreamWriter<TransportSink>
    init(_ channel: PageChannel) { reader = channel.reader; writer = channel.writer }
}

/// When each phase of a pre-copy downtime ended, on this host's CLOCK_MONOTONIC.
struct DowntimeMarks {
    var paused = 0.0, lastPages = 0.0, state = 0.0, ready = 0.0, leaseHandedOver = 0.0, go = 0.0, running = 0.0

    /// The phases from the pause (`pausedAt`) to the destination's resume (`resumedAt`, on the
    /// destination's clock). On one kernel (the same boot id) that clock is this one; between
    /// hosts the resume is placed by the destination's own figures and half of what is left of
    /// the GO → RUNNING round trip.
    func phases(pausedAt: Double, resumedAt: Double, destination: DestinationPhases?) -> DowntimePhases {
        var p = DowntimePhases()
        p.pause = paused - pausedAt
        p.lastPages = lastPages - paused
        p.state = state - lastPages
        p.ready = ready - state
        p.leaseHandover = leaseHandedOver - ready
        p.go = go - leaseHandedOver
        p.destination = destination
        if let boot = destination?.bootID, boot == kernelBootID {
            p.clock = "shared"
            p.resume = resumedAt - go
            p.runningReply = running - resumedAt
        } else {
            p.clock = "estimated"
            let there = (destination?.postcopySetup ?? 0) + (destination?.lease ?? 0) + (destination?.start ?? 0)
            let wire = max(0, running - go - there)
            p.resume = there + wire / 2
            p.runningReply = wire / 2
        }
        return p
    }
}
