import Foundation
import GuestMemory
import Snapshot
import SystemCalls
import Synchronization

/// What the sender needs of a running VM; the VMM's admitted guest provides it.
public protocol MigrationSourceVM: AnyObject, Sendable {
    var memory: GuestMemory { get }
    var dirtyTracker: any DirtyTracker { get }
    /// The machine section (JSON), sent in the hello so the destination can check it first.
    func machineDescriptionPayload() throws -> [UInt8]
    /// The guest's name, for the destination's logs.
    var migrationIdentity: String? { get }
    /// The commit point: hands ownership (the Billboard lease) to the destination process named
    /// in the accept, just before GO. Throwing here cancels the migration; the guest resumes here.
    func commitHandover(toHost host: String?, toPid pid: Int32?) throws
    /// Signs the digest of the whole state stream (the destination verifies it before READY);
    /// nil when this VM has no host key to sign with.
    func signState(digest: [UInt8]) throws -> [UInt8]?
    /// Pauses every vCPU; false if the guest has already stopped.
    func pauseForMigration() -> Bool
    /// Resumes after a failed migration.
    func resumeAfterMigration()
    /// vCPU and device sections of the paused VM.
    func statePayloads() throws -> (vcpu: [UInt8], devices: [UInt8])
    /// Slows the guest: the share of time its vCPUs are held paused (0 = off).
    func setThrottle(percent: Int)
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
        /// Set, under the lock, at the moment GO is about to be written: from then on a cancel
        /// is refused and a failure leaves the migration in doubt.
        var goSent = false
    }
    private let state = Mutex<Shared>(Shared())
    /// Rounds beyond the first that met the downtime limit, while they keep shrinking the rest.
    static let maxExtraRounds = 4
    /// Pages per memory section (the format's limit).
    static let batchPages = 512

    public init(vm: any MigrationSourceVM, settings: MigrationSettings) {
        self.vm = vm
        self.settings = settings
    }

    /// A copy of the current progress.
    public var progress: MigrationProgress { state.withLock { $0.progress } }

    /// Aborts the migration unless GO was already sent (SIGINT/SIGTERM, or the API).
    public func cancel(reason: String) {
        let transport: (any MigrationTransport)? = state.withLock { s in
            // After GO, the hand-over must finish: cancelling then would leave no copy running.
            guard !s.goSent else { return nil }
            s.cancelled = reason
            return s.transport
        }
        // Closing the socket unblocks any send or receive in progress.
        transport?.close()
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
        var accept = ControlMessage(kind: .accept)
        var pending = DirtyBitmap(pageCount: 0)
        var pauseTime = 0.0
        var paused = false
        var tracking = false
    }

    /// Runs the whole migration. Never throws: the outcome is in the report, and
    /// on failure before GO the guest is running again here.
    public func run(connect: () throws -> any MigrationTransport) -> MigrationReport {
        let t0 = monotonicMilliseconds()
        var report = MigrationReport(destination: settings.destination, tracker: vm.dirtyTracker.name,
                                     converged: false, outcome: .failed, settings: settings)
        report.memoryBytes = vm.memory.size
        state.withLock { $0 = Shared(); $0.progress.phase = .setup }
        var paused = false, tracking = false
        do {
            let transport = try connect()
            state.withLock { $0.transport = transport }
            defer { transport.close() }
            var run = try setup(transport, t0: t0, report: report)
            defer { report = run.report; paused = run.paused; tracking = run.tracking }
            try precopy(&run)
            try stopAndCopy(&run)
            try handover(&run, transport: transport)
        } catch {
            fail(&report, error: error, paused: paused, tracking: tracking)
        }
        report.rounds = report.pagesPerRound.count
        report.totalMs = monotonicMilliseconds() - t0
        report.throughputBytesPerSecond = report.totalMs > 0 ? Double(report.bytesSent) / (report.totalMs / 1000) : 0
        state.withLock { $0.transport = nil }
        return report
    }

    /// Setup: hello (version, machine description with the guest's identity), then the
    /// destination's accept (admitted, VM reserved).
    private func setup(_ transport: any MigrationTransport, t0: Double, report: MigrationReport) throws -> Run {
        try checkCancelled()
        var writer = try StreamWriter(sink: TransportSink(transport))
        let hello = ControlMessage(kind: .hello, version: migrationProtocolVersion,
                                   machine: Data(try vm.machineDescriptionPayload()), identity: vm.migrationIdentity)
        try writer.writeSection(.control, payload: hello.encoded())
        try writer.sink.flush()
        var reader = try StreamReader(source: TransportSource(transport))
        var run = Run(t0: t0, writer: writer, reader: reader, report: report)
        run.accept = try expect(.accept, from: &reader)
        run.reader = reader
        run.report.setupMs = monotonicMilliseconds() - t0
        return run
    }

    /// Pre-copy: round 0 sends every page that may hold data while the guest runs; each later
    /// round what was dirtied since, until what is left fits the downtime limit.
    private func precopy(_ run: inout Run) throws {
        try vm.dirtyTracker.enable()
        run.tracking = true
        update { $0.phase = .precopy }
        // Logging is already on, so a page first written after this check is caught by the next round.
        var pending = vm.memory.possiblyNonZeroPages() ?? DirtyBitmap.all(pageCount: vm.memory.pageCount)
        var round = 0
        var extraRounds = 0
        var rate = 0.0
        while true {
            let roundStart = monotonicMilliseconds()
            let before = run.writer.bytesWritten
            let sent = try sendPages(pending, writer: &run.writer, rearm: round > 0, report: &run.report, t0: run.t0)
            run.report.pagesPerRound.append(sent)
            let seconds = max((monotonicMilliseconds() - roundStart) / 1000, 1e-6)
            let roundRate = Double(run.writer.bytesWritten - before) / seconds
            // Rounds of a few pages measure latency, not bandwidth: keep the better estimate.
            rate = sent >= 256 || rate == 0 ? roundRate : max(rate, roundRate)
            pending = try vm.dirtyTracker.collect()
            let expectedMs = Double(pending.count) * 4096 / max(rate, 1) * 1000
            let elapsed = (monotonicMilliseconds() - run.t0) / 1000
            update {
                $0.round = round
                $0.dirtyPagesLeft = pending.count
                $0.rateBytesPerSecond = rate
                $0.expectedDowntimeMs = expectedMs
                $0.elapsedSeconds = elapsed
            }
            round += 1
            if expectedMs <= settings.maxDowntimeMs {
                // The limit is a ceiling, not a target: while another round still shrinks
                // what is left by a quarter, it buys a shorter pause for little time.
                let shrinking = Double(pending.count) < Double(sent) * 0.75
                let worthOneMore = shrinking && expectedMs > 5 && extraRounds < Self.maxExtraRounds
                    && elapsed < settings.timeoutSeconds / 2
                if !worthOneMore { run.report.converged = true; break }
                extraRounds += 1
            }
            if elapsed >= settings.timeoutSeconds { throw MigrationError.notConverged(seconds: settings.timeoutSeconds) }
            try checkCancelled()
            if settings.autoConverge && round >= 2 {
                let current = progress.throttlePercent
                let next = min(99, current == 0 ? 20 : current + 10)
                if next != current {
                    vm.setThrottle(percent: next)
                    update { $0.throttlePercent = next }
                }
            }
        }
        run.pending = pending
    }

    /// Stop-and-copy: the guest pauses; the last dirty pages, vCPU and device state, the
    /// signature and the end of the state stream follow.
    private func stopAndCopy(_ run: inout Run) throws {
        vm.setThrottle(percent: 0)
        update { $0.phase = .stopAndCopy; $0.throttlePercent = 0 }
        try checkCancelled()
        guard vm.pauseForMigration() else { throw MigrationError.aborted("the guest stopped during the migration") }
        run.paused = true
        run.pauseTime = monotonicMilliseconds()
        run.pending.formUnion(try vm.dirtyTracker.collect())
        let last = try sendPages(run.pending, writer: &run.writer, rearm: false, report: &run.report, t0: run.t0, stopAndCopy: true)
        run.report.pagesPerRound.append(last)
        let (vcpu, devices) = try vm.statePayloads()
        try StateSequence.writeClosing(vcpus: vcpu, devices: devices, to: &run.writer) { try vm.signState(digest: $0) }
        try run.writer.sink.flush()
        run.report.bytesSent = run.writer.bytesWritten
        update { $0.phase = .handover; $0.dirtyPagesLeft = 0 }
    }

    /// Hand-over: READY (the destination verified and applied everything), the lease moves to
    /// the destination, GO, RUNNING. From the first byte of GO on, the source never resumes on
    /// its own.
    private func handover(_ run: inout Run, transport: any MigrationTransport) throws {
        try expect(.ready, from: &run.reader)
        let cancelled: String? = state.withLock { s in
            if s.cancelled == nil { s.goSent = true }
            return s.cancelled
        }
        if let cancelled { throw MigrationError.aborted(cancelled) }
        let handoverStart = monotonicMilliseconds()
        do { try vm.commitHandover(toHost: run.accept.host, toPid: run.accept.pid) } catch {
            // Nothing of GO was written: the guest may still resume here.
            state.withLock { $0.goSent = false }
            throw MigrationError.aborted("the hand-over of the guest's lease failed: \(error)")
        }
        run.report.handoverMs = monotonicMilliseconds() - handoverStart
        var commit = try StreamWriter(sink: TransportSink(transport))
        try commit.writeSection(.control, payload: ControlMessage(kind: .go).encoded())
        try commit.finish()
        try commit.sink.flush()
        run.report.bytesSent += commit.bytesWritten
        let running = try expect(.running, from: &run.reader)
        if let resumed = running.resumedAt { run.report.downtimeMs = resumed - run.pauseTime }
        run.report.outcome = .completed
        try? vm.dirtyTracker.disable()
        update { $0.phase = .completed }
    }

    /// A failure: before GO the guest runs here again; after GO the migration is in doubt.
    private func fail(_ report: inout MigrationReport, error: any Error, paused: Bool, tracking: Bool) {
        report.error = "\(error)"
        report.bytesSent = max(report.bytesSent, progress.bytesSent)
        vm.setThrottle(percent: 0)
        if state.withLock({ $0.goSent }) {
            report.outcome = .inDoubt
            let reason = MigrationError.inDoubt("\(error)").description
            report.error = reason
            update { $0.phase = .inDoubt; $0.error = reason }
        } else {
            if tracking { try? vm.dirtyTracker.disable() }
            if paused { vm.resumeAfterMigration() }
            report.outcome = .failed
            update { $0.phase = .failed; $0.error = "\(error)"; $0.throttlePercent = 0 }
        }
    }

    /// Reads the next control message and requires `kind`; a refusal or anything else is an error.
    @discardableResult
    func expect<S: ByteSource>(_ kind: ControlMessage.Kind, from reader: inout StreamReader<S>) throws -> ControlMessage {
        guard let section = try reader.nextSection() else {
            throw MigrationError.protocolViolation("the destination ended its stream while \(kind) was expected")
        }
        guard section.type == .control else {
            throw MigrationError.protocolViolation("expected a control message (\(kind)), got a \(section.type) section")
        }
        let message = try ControlMessage.decode(section.payload)
        if message.kind == .refuse { throw MigrationError.refused(message.reason ?? "no reason given") }
        guard message.kind == kind else {
            throw MigrationError.protocolViolation("expected \(kind), got \(message.kind)")
        }
        return message
    }

    /// Sends the pages set in `bitmap`, re-protecting each 64-page chunk just before it is read.
    func sendPages<S: ByteSink>(_ bitmap: DirtyBitmap, writer: inout StreamWriter<S>, rearm: Bool,
                                report: inout MigrationReport, t0: Double, stopAndCopy: Bool = false) throws -> Int {
        var batch: [UInt64] = []
        batch.reserveCapacity(Self.batchPages)
        var sent = 0
        let start = monotonicMilliseconds()
        let startBytes = writer.bytesWritten
        func flush() throws {
            guard !batch.isEmpty else { return }
            let stats = try writer.writeMemoryPages(batch, from: vm.memory)
            report.pagesSent += stats.pages
            report.zeroPages += stats.zeroPages
            sent += batch.count
            batch.removeAll(keepingCapacity: true)
            let bytes = writer.bytesWritten
            update { $0.pagesSent = report.pagesSent; $0.bytesSent = bytes; $0.elapsedSeconds = (monotonicMilliseconds() - t0) / 1000 }
            try checkCancelled()
            // The time limit holds within a round too (a slow link, a bandwidth cap).
            if !stopAndCopy && (monotonicMilliseconds() - t0) / 1000 >= settings.timeoutSeconds {
                throw MigrationError.notConverged(seconds: settings.timeoutSeconds)
            }
            if settings.maxBandwidth > 0 {
                // Hold the average rate of this round to the limit.
                let due = Double(writer.bytesWritten - startBytes) / Double(settings.maxBandwidth) * 1000
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
            if batch.count >= Self.batchPages - 64 { try flush() }
        }
        try flush()
        return sent
    }
}
