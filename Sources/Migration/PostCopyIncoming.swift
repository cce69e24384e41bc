import Foundation
import GuestMemory
import PageFaults
import Snapshot
import Synchronization
import SystemCalls

/// The destination's post-copy migration after GO: the guest runs here while its missing pages
/// arrive, and this owns what brings them (the fault server, the page channel, the push on the
/// main connection) until every page is in.
///
/// Its states (`IncomingPostCopyStatus.Phase`):
///
///     postcopy ──every page in, COMPLETE sent──▶ completed
///        │  ▲
///        │  └── recover: a resume from the migration's source, on a new authenticated
///        │      connection answering a fresh challenge; the pages still missing are sent
///        ▼      again; the guest resumes
///     postcopy-paused ──given up (the operator, or the recovery window passed)──▶ lost
///
/// **Paused** means: both connections are closed, the guest is asked to pause (its vCPUs park at
/// their next exit; one asleep in the kernel on a missing page, in `KVM_RUN` or in a device
/// access, is not kicked and stays asleep until that page is installed), the faults that could
/// not be asked for wait (their threads stay asleep on the page), and nothing is discarded: the
/// fault server, the memory's registration and the lease stay. A page cannot read as zero or
/// stale: it is installed from the source or never.
///
/// **Lost** (only from paused, or when a page cannot be installed at all): the machine ends
/// first, so that a vCPU woken by the fault server's teardown leaves before running again.
public final class PostCopyIncoming: Sendable {
    public struct Options: Sendable {
        public var liveness: PostCopyLiveness
        /// Seconds the migration may stay paused before the guest is given up as lost; nil: it
        /// waits for the operator (`giveUp`).
        public var recoverTimeoutSeconds: Double?
        public var log: @Sendable (String) -> Void

        public init(liveness: PostCopyLiveness = .standard, recoverTimeoutSeconds: Double? = nil,
                    log: @escaping @Sendable (String) -> Void = { _ in }) {
            self.liveness = liveness
            self.recoverTimeoutSeconds = recoverTimeoutSeconds
            self.log = log
        }
    }

    /// What a recovery must match: the migration it resumes.
    struct Binding: Sendable {
        /// The original connection's challenge.
        let challenge: String
        /// The host the guest came from (authenticated by the channel, or claimed in plaintext).
        let sourceHost: String
        let authenticated: Bool
        let destinationHost: String
        let guest: String?
        let ownerHost: String
        let ownerPid: Int32
    }

    /// Why a recovery or a give-up cannot be done now.
    public struct Refusal: Error, CustomStringConvertible {
        public let description: String
        public init(description: String) { self.description = description }
    }

    /// Held weakly: the VM holds this session (it tells it when the guest ends).
    private let vmRef: WeakVM
    private var vm: (any MigrationDestinationVM)? { vmRef.value }
    private let pageCount: UInt64
    public let server: FaultServer
    let source: PostCopyPageSource
    let binding: Binding
    let integrity: SectionIntegrity
    let options: Options
    let clock: LinkClock

    private struct State {
        var phase: IncomingPostCopyStatus.Phase = .postcopy
        /// Of the current connections: a failure reported for an older one is ignored.
        var generation = 1
        var main: (any MigrationTransport)?
        var watch: SilenceWatch?
        var error: String?
        var recoveries = 0
        var listener: (any MigrationListener)?
        var listening: String?
        /// Which `recover(timeoutSeconds:listen:)` the listener belongs to: the port may be the
        /// same from one recovery to the next.
        var listenerTurn = 0
        var pausedAt: Double?
        var figures: PostCopyFigures?
    }
    private let state = Mutex(State())
    private let settled = NSCondition()
    /// Serialises the guest's pause and resume with the phase they follow.
    private let guestLock = NSLock()

    private final class WeakVM: Sendable {
        struct Weak: Sendable { weak var value: (any MigrationDestinationVM)? }
        let target: Mutex<Weak>
        init(_ vm: any MigrationDestinationVM) { target = Mutex(Weak(value: vm)) }
        var value: (any MigrationDestinationVM)? { target.withLock { $0.value } }
    }

    /// The fault server's callbacks reach the session through this, without a cycle.
    private final class Backref: Sendable {
        struct Weak: Sendable { weak var value: PostCopyIncoming? }
        let target = Mutex(Weak())
        var value: PostCopyIncoming? { target.withLock { $0.value } }
    }

    /// Registers `vm`'s memory for its missing pages (dropped first, so that they fault) and
    /// starts serving faults on `pageChannel`. Call before the guest starts; `start` once
    /// RUNNING went out.
    init(vm: any MigrationDestinationVM, missing: [UInt64], binding: Binding, integrity: SectionIntegrity, options: Options,
         pageChannel: (transport: any MigrationTransport, reader: StreamReader<TransportSource>, writer: StreamWriter<TransportSink>)) throws {
        let clock = LinkClock()
        let source = PostCopyPageSource(missing: missing, memorySize: vm.memory.size, clock: clock)
        // The pages that changed after they were sent go, so that they fault; then the memory is
        // registered and every missing page comes from the source.
        // One madvise per run of consecutive frames, not per page: this is downtime.
        var i = 0
        let frames = source.frames
        while i < frames.count {
            var j = i + 1
            while j < frames.count && frames[j] == frames[j - 1] + 1 { j += 1 }
            try vm.memory.discardPages(atPageFrame: frames[i], count: UInt64(j - i))
            i = j
        }
        let backref = Backref()
        server = try FaultServer(memory: vm.memory, source: source, onUnavailable: { _ in
            // The page source reports the broken channel itself, with its generation.
        }, onFailure: { failure in
            backref.value?.lose("a missing page could not be installed: \(failure)", onlyIfPaused: false)
        })
        self.vmRef = WeakVM(vm)
        self.pageCount = vm.memory.pageCount
        self.source = source
        self.binding = binding
        self.integrity = integrity
        self.options = options
        self.clock = clock
        backref.target.withLock { $0.value = self }
        source.onBroken { generation, reason in backref.value?.linkFailed(generation: generation, reason: reason) }
        source.connect(.init(transport: pageChannel.transport, reader: pageChannel.reader, writer: pageChannel.writer, generation: 1))
        server.start(fill: false)
        // Heartbeats and the watch from GO on: the source serves the page channel from then,
        // and a link that fails before RUNNING must not be waited out either.
        watchLink(generation: 1)
    }

    /// The post-copy phase proper, once the guest runs: the push on the main connection (whose
    /// reply stream, RUNNING sent, stays open for COMPLETE).
    func start(main: any MigrationTransport, replies: StreamWriter<TransportSink>) {
        let going = state.withLock { s -> Bool in
            guard s.phase == .postcopy, s.generation == 1 else { return false }
            s.main = main
            return true
        }
        // The link may have failed on the first fault already: then only a recovery goes on.
        guard going else { return main.close() }
        receivePushOnThread(generation: 1, main: main, replies: replies)
    }

    /// The guest did not start after all (the receiver discards it): nothing more is done.
    func abandonBeforeStart() {
        let watch = state.withLock { s -> SilenceWatch? in
            s.phase = .lost
            s.error = "the guest did not start here"
            defer { s.watch = nil }
            return s.watch
        }
        watch?.stop()
        source.disconnect()
        server.stop()
        announce()
    }

    /// Heartbeats on the page channel, and the watch that gives the link up after its silence.
    private func watchLink(generation: Int) {
        clock.heard()
        let watch = SilenceWatch(clock: clock, liveness: options.liveness, name: "postcopy-silence") { [weak self] silent in
            self?.linkFailed(generation: generation, reason: "nothing heard from the source for \(Int(silent)) s")
        }
        let keep = state.withLock { s -> Bool in
            guard s.generation == generation, s.phase == .postcopy else { return false }
            s.watch = watch
            return true
        }
        guard keep else { return watch.stop() }
        startThread("postcopy-heartbeat") { [self] in heartbeats(generation: generation) }
    }

    private func receivePushOnThread(generation: Int, main: any MigrationTransport, replies: StreamWriter<TransportSink>) {
        let box = RepliesBox(replies)
        startThread("postcopy-push") { [self] in receivePush(generation: generation, main: main, replies: box) }
    }

    // MARK: - Pages

    /// Installs what the source pushes until its push stream ends, then waits for the pages
    /// faults still fetch; once every page is in, the memory becomes ordinary and COMPLETE goes
    /// to the source. Any failure of the link pauses the migration.
    private func receivePush(generation: Int, main: any MigrationTransport, replies: RepliesBox) {
        do {
            var push = try StreamReader(source: TransportSource(main), integrity: integrity)
            reading: while let section = try push.nextSection() {
                clock.heard()
                switch section.type {
                case .memory: try source.offerPushed(section, to: server)
                case .end: break reading
                default: throw MigrationError.protocolViolation("the post-copy push carries memory sections only, not \(section.type)")
                }
            }
            guard server.completeOnceUnitsAreIn() else {
                // A page asked for when the link failed (then the failure is already being
                // handled), or a source that pushed too little: either way, it must come again.
                throw MigrationError.protocolViolation("the source's push ended with \(server.unitsNotInstalled.count) pages still missing")
            }
            _ = server.waitUntilFinished(timeout: 365 * 86_400)
            if server.failure != nil { return }  // lost: `lose` ran through the server
            var figures = figures(from: server.stats)
            figures.lastPageAfterMs = server.stats.completeAfterMs ?? 0
            figures.recoveries = state.withLock { $0.recoveries }
            // Every page is in. If the link failed meanwhile, the guest needs nothing more: it
            // completes all the same (only the source cannot be told).
            let finished = state.withLock { s -> (watch: SilenceWatch?, listener: (any MigrationListener)?, wasPaused: Bool)? in
                guard s.generation == generation, s.phase == .postcopy || s.phase == .postcopyPaused else { return nil }
                let wasPaused = s.phase == .postcopyPaused
                s.phase = .completed
                s.figures = figures
                s.error = nil
                s.pausedAt = nil
                defer { s.watch = nil; s.listener = nil; s.listening = nil }
                return (s.watch, s.listener, wasPaused)
            }
            guard let finished else { return }
            finished.watch?.stop()
            finished.listener?.shutdownListening()
            source.disconnect()
            if finished.wasPaused {
                guestLock.withLock { vm?.postCopyResumed() }
                options.log("migration: post-copy complete: every page arrived just before the link failed; the source could not be told: stop its VMM, its copy is no longer needed")
            } else {
                do {
                    try replies.writer.writeSection(.control, payload: WireMessage.complete(figures).encoded())
                    try replies.writer.finish()
                    try replies.writer.sink.flush()
                } catch {
                    // Every page is here; only the source does not know it: it stays paused until
                    // stopped (its copy is no longer needed).
                    options.log("migration: post-copy complete, but COMPLETE could not reach the source (\(error)); stop the source's VMM: its copy is no longer needed")
                }
            }
            main.close()
            options.log("migration: post-copy complete: every page is in (\(figures.faults) faults, \(figures.recoveries) recoveries)")
            announce()
        } catch {
            linkFailed(generation: generation, reason: "\(error)")
        }
    }

    private func figures(from stats: FaultStats) -> PostCopyFigures {
        var figures = PostCopyFigures()
        figures.faults = stats.faults
        figures.medianFaultMs = stats.medianFaultMs
        figures.p99FaultMs = stats.p99FaultMs
        figures.blockedMs = stats.blockedMs
        figures.faultsPostponed = stats.faultsPostponed
        return figures
    }

    /// Asks for a heartbeat whenever the page channel has been quiet for the interval (the push
    /// on the main connection does not count: the source listens on the page channel only).
    private func heartbeats(generation: Int) {
        let interval = options.liveness.heartbeatSeconds
        while true {
            usleep(UInt32(max(interval / 4, 0.01) * 1_000_000))
            guard state.withLock({ $0.generation == generation && $0.phase == .postcopy }) else { return }
            if source.channelClock.silentSeconds >= interval {
                // A failure is reported by the page source, with its generation.
                do { try source.heartbeat() } catch { return }
            }
        }
    }

    // MARK: - Failure

    /// The link failed (a connection closed or broke, or the source fell silent): pause.
    func linkFailed(generation: Int, reason: String) {
        let taken = state.withLock { s -> (main: (any MigrationTransport)?, watch: SilenceWatch?)? in
            guard s.phase == .postcopy, s.generation == generation else { return nil }
            s.phase = .postcopyPaused
            s.error = reason
            s.pausedAt = monotonicMilliseconds()
            defer { s.main = nil; s.watch = nil }
            return (s.main, s.watch)
        }
        guard let taken else { return }
        taken.watch?.stop()
        taken.main?.close()
        source.disconnect()
        let text = "post-copy paused: the link to the source failed (\(reason)); the guest is paused here and nothing is lost while the source keeps its pages: recover with `vmm ctl migrate-recover` here and `vmm ctl migrate --resume` at the source"
        guestLock.withLock { vm?.postCopyPaused(reason: text) }
        options.log("migration: \(text)")
        if let window = options.recoverTimeoutSeconds, let pausedAt = state.withLock({ $0.pausedAt }) {
            startThread("postcopy-window") { [weak self] in
                while monotonicMilliseconds() < pausedAt + window * 1000 {
                    usleep(100_000)
                    guard let self, self.state.withLock({ $0.pausedAt == pausedAt }) else { return }
                }
                guard let self, self.state.withLock({ $0.pausedAt == pausedAt }) else { return }
                if !self.completeWithoutSource() {
                    self.lose("no recovery within the recovery window of \(Int(window)) s", onlyIfPaused: true, pausedAt: pausedAt)
                }
            }
        }
        announce()
    }

    /// Gives the guest up: its missing pages can no longer come (the source is gone). Only while
    /// paused: during post-copy the pages are still coming. Returns the phase it ends in: `lost`,
    /// or `completed` if every page had arrived before the link failed.
    @discardableResult
    public func giveUp(reason: String) throws -> IncomingPostCopyStatus.Phase {
        if completeWithoutSource() { return .completed }
        guard lose(reason, onlyIfPaused: true) else {
            throw Refusal(description: "the incoming post-copy migration is \(status.phase.rawValue), not paused; only a paused one can be given up (its guest is then lost)")
        }
        return .lost
    }

    /// Paused, but every page had arrived before the link failed: the memory becomes ordinary,
    /// the guest resumes, and the migration completes without its source. False otherwise.
    private func completeWithoutSource() -> Bool {
        guard state.withLock({ $0.phase == .postcopyPaused }), server.unitsNotInstalled.isEmpty,
              server.completeOnceUnitsAreIn() else { return false }
        _ = server.waitUntilFinished(timeout: 60)
        guard server.isFinished, server.failure == nil else { return false }
        var figures = figures(from: server.stats)
        figures.lastPageAfterMs = server.stats.completeAfterMs ?? 0
        let taken = state.withLock { s -> (listener: (any MigrationListener)?, Void)? in
            guard s.phase == .postcopyPaused else { return nil }
            figures.recoveries = s.recoveries
            s.phase = .completed
            s.figures = figures
            s.error = nil
            s.pausedAt = nil
            defer { s.listener = nil; s.listening = nil }
            return (s.listener, ())
        }
        guard let taken else { return false }
        taken.listener?.shutdownListening()
        guestLock.withLock { vm?.postCopyResumed() }
        options.log("migration: post-copy complete: every page had arrived before the link failed; the guest goes on without its source (stop the source's VMM: its copy is no longer needed)")
        announce()
        return true
    }

    /// Ends the migration with the guest lost. False if it was not in a phase this may end.
    @discardableResult
    private func lose(_ reason: String, onlyIfPaused: Bool, pausedAt: Double? = nil) -> Bool {
        let taken = state.withLock { s -> (main: (any MigrationTransport)?, watch: SilenceWatch?, listener: (any MigrationListener)?)? in
            if s.phase == .lost || s.phase == .completed { return nil }
            if onlyIfPaused && s.phase != .postcopyPaused { return nil }
            if let pausedAt, s.pausedAt != pausedAt { return nil }
            s.phase = .lost
            s.error = reason
            defer { s.main = nil; s.watch = nil; s.listener = nil; s.listening = nil }
            return (s.main, s.watch, s.listener)
        }
        guard let taken else { return false }
        taken.watch?.stop()
        taken.main?.close()
        taken.listener?.shutdownListening()
        source.disconnect()
        let text = "post-copy migration failed: \(reason); the guest is lost: its missing pages can no longer come, and it never ran here without them"
        // The machine ends first (its vCPUs are kicked), then the fault server's teardown wakes
        // whatever sleeps on a missing page: it leaves without running the guest again.
        guestLock.withLock { vm?.postCopyLost(reason: text) }
        server.abandon(reason: text)
        options.log("migration: \(text)")
        announce()
        return true
    }

    /// The guest ended here (stopped, shut down, the VMM exiting): nothing more comes.
    public func guestEnded() {
        if !lose("the guest was stopped here during post-copy", onlyIfPaused: false) { source.disconnect() }
        server.stop()
    }

    // MARK: - Recovery

    /// Listens (on what `listen` opens) for the source's resume of this paused migration, until
    /// one succeeds, the migration is given up, or `timeoutSeconds` pass (it then stays paused
    /// and may listen again). Returns the address it listens on.
    public func recover(timeoutSeconds: Double, listen: () throws -> any MigrationListener) throws -> String {
        guard binding.authenticated else {
            throw Refusal(description: "this migration came over plaintext: a recovery needs the hosts' TLS identities to prove it is the same source, so it cannot be recovered")
        }
        try state.withLock { s in
            guard s.phase == .postcopyPaused else {
                throw Refusal(description: "the incoming post-copy migration is \(s.phase.rawValue), not paused; there is nothing to recover")
            }
            if let listening = s.listening { throw Refusal(description: "already listening for the source's resume at \(listening)") }
        }
        let listener = try listen()
        let address = "\(listener.address):\(listener.port)"
        let turn = state.withLock { s -> Int? in
            guard s.phase == .postcopyPaused, s.listening == nil else { return nil }
            s.listener = listener
            s.listening = address
            s.listenerTurn += 1
            return s.listenerTurn
        }
        guard let turn else {
            listener.shutdownListening()
            throw Refusal(description: "the migration changed state while the listener opened; look at it again")
        }
        let deadline = monotonicMilliseconds() + timeoutSeconds * 1000
        startThread("postcopy-recover") { [self] in acceptRecovery(listener, address: address, turn: turn, deadline: deadline) }
        options.log("migration: post-copy recovery: listening at \(address) for '\(binding.sourceHost)'")
        return address
    }

    private func acceptRecovery(_ listener: any MigrationListener, address: String, turn: Int, deadline: Double) {
        defer {
            listener.shutdownListening()
            state.withLock { s in if s.listenerTurn == turn { s.listener = nil; s.listening = nil } }
        }
        while state.withLock({ $0.phase == .postcopyPaused }) {
            let transport: any MigrationTransport
            do {
                transport = try listener.nextConnection(deadline: deadline) { [options] reason in
                    options.log("migration: post-copy recovery: refused a connection: \(reason)")
                }
            } catch {
                options.log("migration: post-copy recovery: stopped listening at \(address): \(error)")
                return
            }
            do {
                let channelDeadline = min(deadline, monotonicMilliseconds() + 30_000)
                try recover(on: transport) {
                    try listener.nextConnection(deadline: channelDeadline) { [options] reason in
                        options.log("migration: post-copy recovery: refused a connection: \(reason)")
                    }
                }
                return
            } catch {
                transport.close()
                options.log("migration: post-copy recovery: refused \(transport.authenticatedPeer ?? transport.peer): \(error)")
            }
        }
    }

    /// One recovery connection: the challenge, the source's resume (checked), the pages still
    /// missing, the new page channel; then the post-copy phase goes on.
    func recover(on transport: any MigrationTransport, acceptPageChannel: () throws -> any MigrationTransport) throws {
        let integrity = transport.streamIntegrity
        var replies = try StreamWriter(sink: TransportSink(transport), integrity: integrity)
        func send(_ message: WireMessage) throws {
            try replies.writeSection(.control, payload: message.encoded())
            try replies.sink.flush()
        }
        let nonce = Data((0..<32).map { _ in UInt8.random(in: .min ... .max) }).base64EncodedString()
        try send(.challenge(version: migrationProtocolVersion, nonce: nonce, host: binding.destinationHost))
        var reader = try StreamReader(source: TransportSource(transport), integrity: integrity)
        guard let first = try reader.nextSection(), first.type == .control,
              case let .resume(resume) = try WireMessage.decode(first.payload) else {
            try? send(.refuse(reason: "a recovery connection must open with a resume"))
            throw MigrationError.protocolViolation("the connection did not open with a resume")
        }
        do { try check(resume, challenge: nonce, peer: transport.authenticatedPeer) } catch {
            try? send(.refuse(reason: "\(error)"))
            throw error
        }
        guard state.withLock({ $0.phase == .postcopyPaused }) else {
            try? send(.refuse(reason: "the migration is no longer paused"))
            throw Refusal(description: "the migration is no longer paused")
        }
        // Nothing is installed while paused (no page can come), so this is exactly what is left.
        let notInstalled = server.unitsNotInstalled.map { source.frames[$0] }
        for slice in MissingPagesSlices.slices(Self.bitmap(notInstalled, pageCount: pageCount)) { try send(.stillMissing(missing: slice)) }
        let channel = try PageChannelDoor.accept(acceptPageChannel, challenge: nonce, mainPeer: transport.authenticatedPeer,
                                                 owner: (binding.ownerHost, binding.ownerPid))
        let generation = state.withLock { s -> Int? in
            guard s.phase == .postcopyPaused else { return nil }
            s.generation += 1
            s.phase = .postcopy
            s.recoveries += 1
            s.error = nil
            s.pausedAt = nil
            s.main = transport
            // This recovery is done listening: a link that fails again at once may be recovered
            // again at once, before the accepting thread winds down.
            s.listener = nil
            s.listening = nil
            return s.generation
        }
        guard let generation else {
            channel.transport.close()
            throw Refusal(description: "the migration was given up while the source reconnected")
        }
        source.connect(.init(transport: channel.transport, reader: channel.reader, writer: channel.writer, generation: generation))
        watchLink(generation: generation)
        receivePushOnThread(generation: generation, main: transport, replies: replies)
        options.log("migration: post-copy resumed with '\(binding.sourceHost)': \(notInstalled.count) pages still missing")
        // The faults that waited ask first; then the guest goes on.
        server.retryPostponed()
        guestLock.withLock {
            if state.withLock({ $0.phase == .postcopy && $0.generation == generation }) { vm?.postCopyResumed() }
        }
        announce()
    }

    /// A resume must come from the migration's source (the channel's authenticated host), answer
    /// this connection's fresh challenge, and name this migration, this host and this guest.
    func check(_ resume: PostCopyResume, challenge: String, peer: String?) throws {
        guard let peer, sameBytes(peer, binding.sourceHost) else {
            throw MigrationError.refused("a recovery must come from the migration's source '\(binding.sourceHost)', not '\(peer ?? "an unauthenticated peer")'")
        }
        guard resume.version == migrationProtocolVersion else {
            throw MigrationError.refused("protocol version \(resume.version) is not supported (this VMM speaks \(migrationProtocolVersion))")
        }
        guard sameBytes(resume.challenge, challenge) else {
            throw MigrationError.refused("the resume does not answer this connection's challenge (a replayed or forwarded resume)")
        }
        guard sameBytes(resume.migration, binding.challenge) else {
            throw MigrationError.refused("the resume is for another migration than the one paused here")
        }
        guard sameBytes(resume.sourceHost, peer), sameBytes(resume.destinationHost, binding.destinationHost) else {
            throw MigrationError.refused("the resume names hosts '\(resume.sourceHost)' to '\(resume.destinationHost)', not '\(peer)' to '\(binding.destinationHost)'")
        }
        guard sameBytes(resume.guest, binding.guest) else {
            throw MigrationError.refused("the resume is for guest '\(resume.guest ?? "?")', not '\(binding.guest ?? "?")' whose migration is paused here")
        }
    }

    static func bitmap(_ frames: [UInt64], pageCount: UInt64) -> Data {
        var words = [UInt64](repeating: 0, count: Int((pageCount + 63) / 64))
        for pfn in frames { words[Int(pfn / 64)] |= 1 << (pfn % 64) }
        var data = Data(capacity: words.count * 8)
        for word in words { withUnsafeBytes(of: word.littleEndian) { data.append(contentsOf: $0) } }
        return data
    }

    // MARK: - Status

    public var status: IncomingPostCopyStatus {
        let missing = server.unitsNotInstalled.count
        return state.withLock { s in
            IncomingPostCopyStatus(phase: s.phase, source: binding.sourceHost, pagesMissing: s.phase == .completed ? 0 : missing,
                                   recoveries: s.recoveries, error: s.error, listening: s.listening)
        }
    }

    /// The destination's figures once every page is in.
    public var figures: PostCopyFigures? { state.withLock { $0.figures } }

    /// Waits until the phase is one of `phases`; returns the phase then (or the current one on timeout).
    @discardableResult
    public func wait(for phases: Set<IncomingPostCopyStatus.Phase>, timeout: Double) -> IncomingPostCopyStatus.Phase {
        let deadline = Date(timeIntervalSinceNow: timeout)
        settled.lock(); defer { settled.unlock() }
        while true {
            let phase = state.withLock { $0.phase }
            if phases.contains(phase) { return phase }
            if !settled.wait(until: deadline) { return state.withLock { $0.phase } }
        }
    }

    private func announce() {
        settled.lock(); settled.broadcast(); settled.unlock()
    }

    private func startThread(_ name: String, _ body: @escaping @Sendable () -> Void) {
        let thread = Thread(block: body)
        thread.name = name
        thread.start()
    }
}

/// Hands the main connection's reply stream to the thread that writes COMPLETE on it.
// @unchecked: after `init` only that one thread touches `writer`.
private final class RepliesBox: @unchecked Sendable {
    var writer: StreamWriter<TransportSink>
    init(_ writer: StreamWriter<TransportSink>) { self.writer = writer }
}
