import Foundation

// What a migration is asked to do (settings), where it stands (progress) and what it did
// (report): the sender's inputs and outputs, in the JSON the control API and the report files
// use. Not wire messages: those are in Protocol.swift.

/// Settings of one migration (the body of `PUT /vm/migrate`).
public struct MigrationSettings: Codable, Sendable, Equatable {
    /// How the stream travels: mutually authenticated TLS (the default), or plain TCP, which
    /// both sides must have agreed to.
    public enum TransportKind: String, Codable, Sendable {
        case tls, plaintext
    }

    public var destination: String
    /// The enrolled host expected at `destination` (required for TLS).
    public var peer: String?
    public var transport: TransportKind = .tls
    public var maxDowntimeMs: Double = 300
    /// Bytes per second; 0 = unlimited.
    public var maxBandwidth: UInt64 = 0
    /// What pre-copy does when its rounds stop shrinking: see `ConvergenceMode`.
    public var convergence: ConvergenceMode = .adaptive
    /// The old spelling of `convergence: throttle` (`auto_converge: true`); false leaves the
    /// policy as `convergence` says.
    public var autoConverge: Bool {
        get { convergence == .throttle }
        set { convergence = newValue ? .throttle : .adaptive }
    }
    public var timeoutSeconds: Double = 60
    /// Post-copy: the migration may switch the guest to the destination before all its pages
    /// moved, and the rest follow (pushed, and pulled on fault). It switches after
    /// `postcopyAfterRounds` rounds, when asked (`requestPostCopySwitch`), or, with
    /// `postcopyOnStall`, when pre-copy stops converging. If the link fails after the switch,
    /// neither side has the whole guest: both pause and keep what they have until the migration
    /// is recovered (`resume`); if either side dies then, the guest is lost.
    public var postcopy: Bool = false
    /// Pre-copy rounds before the switch (0: none at all, 1: after round 0), whatever is left
    /// then: pre-copy does not finish first. nil ("never" in JSON): no switch by count; it comes
    /// on request or on a stall, and a pre-copy that converges first finishes as usual.
    public var postcopyAfterRounds: Int? = 1
    /// With `postcopy`: switch as soon as the convergence estimate says pre-copy will not fit
    /// the downtime limit (or the time limit comes), instead of failing at the timeout.
    public var postcopyOnStall: Bool = false
    /// Resume this guest's post-copy migration, paused after its link failed, on a new
    /// connection to `destination` (where the destination listens after `migration/recover`).
    public var resume: Bool = false
    /// Connections that carry the pages (1 to `maxMigrationChannels`): with 1 the pages go on
    /// the main connection; with N > 1 on N more connections, each page always on the same one,
    /// each with its own thread for zero-page detection and encryption.
    public var channels: Int = 1

    public init(destination: String, peer: String? = nil, transport: TransportKind = .tls, maxDowntimeMs: Double = 300,
                maxBandwidth: UInt64 = 0, autoConverge: Bool = false, convergence: ConvergenceMode? = nil, timeoutSeconds: Double = 60,
                postcopy: Bool = false, postcopyAfterRounds: Int? = 1, postcopyOnStall: Bool = false, resume: Bool = false,
                channels: Int = 1) {
        self.channels = channels
        self.resume = resume
        self.postcopy = postcopy
        self.postcopyAfterRounds = postcopyAfterRounds
        self.postcopyOnStall = postcopyOnStall
        self.destination = destination
        self.peer = peer
        self.transport = transport
        self.maxDowntimeMs = maxDowntimeMs
        self.maxBandwidth = maxBandwidth
        self.convergence = convergence ?? (autoConverge ? .throttle : .adaptive)
        self.timeoutSeconds = timeoutSeconds
    }

    /// Why a `convergence` and `auto_converge` given together are refused, or nil.
    public static func convergenceConflict(convergence: String?, autoConverge: Bool?) -> String? {
        guard autoConverge == true, let convergence, convergence != ConvergenceMode.throttle.rawValue else { return nil }
        return "auto_converge: true is the old spelling of \"convergence\": \"throttle\" and contradicts \"convergence\": \"\(convergence)\"; give only \"convergence\""
    }

    /// How `postcopy_after_rounds` spells "no switch by count".
    public static let never = "never"

    enum CodingKeys: String, CodingKey {
        case destination, peer, transport
        case maxDowntimeMs = "max_downtime_ms"
        case maxBandwidth = "max_bandwidth"
        case autoConverge = "auto_converge"
        case convergence
        case timeoutSeconds = "timeout_s"
        case postcopy
        case postcopyAfterRounds = "postcopy_after_rounds"
        case postcopyOnStall = "postcopy_on_stall"
        case resume
        case channels
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        destination = try c.decode(String.self, forKey: .destination)
        peer = try c.decodeIfPresent(String.self, forKey: .peer)
        transport = try c.decodeIfPresent(TransportKind.self, forKey: .transport) ?? .tls
        maxDowntimeMs = try c.decodeIfPresent(Double.self, forKey: .maxDowntimeMs) ?? 300
        maxBandwidth = try c.decodeIfPresent(UInt64.self, forKey: .maxBandwidth) ?? 0
        let autoConverge = try c.decodeIfPresent(Bool.self, forKey: .autoConverge)
        let mode = try c.decodeIfPresent(String.self, forKey: .convergence)
        if let conflict = Self.convergenceConflict(convergence: mode, autoConverge: autoConverge) {
            throw DecodingError.dataCorruptedError(forKey: .convergence, in: c, debugDescription: conflict)
        }
        if let mode {
            guard let known = ConvergenceMode(rawValue: mode) else {
                throw DecodingError.dataCorruptedError(forKey: .convergence, in: c, debugDescription:
                    "'\(mode)' is no convergence policy: give off, throttle or adaptive (the default)")
            }
            convergence = known
        } else {
            convergence = autoConverge == true ? .throttle : .adaptive
        }
        timeoutSeconds = try c.decodeIfPresent(Double.self, forKey: .timeoutSeconds) ?? 60
        postcopy = try c.decodeIfPresent(Bool.self, forKey: .postcopy) ?? false
        postcopyOnStall = try c.decodeIfPresent(Bool.self, forKey: .postcopyOnStall) ?? false
        resume = try c.decodeIfPresent(Bool.self, forKey: .resume) ?? false
        channels = try c.decodeIfPresent(Int.self, forKey: .channels) ?? 1
        if !c.contains(.postcopyAfterRounds) {
            // A switch on stall is what such a migration waits for: no switch by count unless asked.
            postcopyAfterRounds = postcopyOnStall ? nil : 1
        } else if let rounds = try? c.decode(Int.self, forKey: .postcopyAfterRounds) {
            postcopyAfterRounds = rounds
        } else if (try? c.decode(String.self, forKey: .postcopyAfterRounds)) == Self.never {
            postcopyAfterRounds = nil
        } else {
            throw DecodingError.dataCorruptedError(forKey: .postcopyAfterRounds, in: c,
                                                   debugDescription: "give a whole number of rounds or \"\(Self.never)\"")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(destination, forKey: .destination)
        try c.encodeIfPresent(peer, forKey: .peer)
        try c.encode(transport, forKey: .transport)
        try c.encode(maxDowntimeMs, forKey: .maxDowntimeMs)
        try c.encode(maxBandwidth, forKey: .maxBandwidth)
        try c.encode(autoConverge, forKey: .autoConverge)
        try c.encode(convergence, forKey: .convergence)
        try c.encode(timeoutSeconds, forKey: .timeoutSeconds)
        try c.encode(postcopy, forKey: .postcopy)
        if let postcopyAfterRounds { try c.encode(postcopyAfterRounds, forKey: .postcopyAfterRounds) } else {
            try c.encode(Self.never, forKey: .postcopyAfterRounds)
        }
        try c.encode(postcopyOnStall, forKey: .postcopyOnStall)
        if resume { try c.encode(resume, forKey: .resume) }
        try c.encode(channels, forKey: .channels)
    }
}

/// What switched a migration to post-copy.
public enum PostCopySwitch: String, Codable, Sendable {
    /// `postcopyAfterRounds` rounds were done.
    case afterRounds = "after-rounds"
    /// Someone asked (`PUT /vm/migration/postcopy`, `vmm ctl migrate-postcopy`).
    case requested
    /// Pre-copy would not converge (`postcopyOnStall`).
    case stall
}

/// Why a request to switch to post-copy now was refused.
public enum PostCopySwitchRefusal: Error, Sendable, Equatable, CustomStringConvertible {
    case noMigration
    case notPostcopy
    case alreadySwitched(PostCopySwitch)
    case pastPrecopy(String)

    public var description: String {
        switch self {
        case .noMigration:
            "no migration is running; start one with post-copy allowed (vmm ctl migrate ... --postcopy, API \"postcopy\": true) first"
        case .notPostcopy:
            "this migration was not started with post-copy allowed (\"postcopy\": true, --postcopy); it can only finish as pre-copy or fail; to switch on demand, start the next one with --postcopy --postcopy-after-rounds never"
        case let .alreadySwitched(trigger):
            "this migration has already switched to post-copy (\(trigger.rawValue)); nothing more to ask"
        case let .pastPrecopy(why):
            "this migration is past pre-copy: \(why); it can no longer switch"
        }
    }
}

/// Where a migration stands (`GET /vm/migration`).
public struct MigrationProgress: Codable, Sendable, Equatable {
    public enum Phase: String, Codable, Sendable {
        case none, setup, precopy, stopAndCopy = "stop-and-copy", handover, postcopy, completed, failed, inDoubt = "in-doubt"
        /// After the post-copy switch the link failed: this copy keeps the pages the destination
        /// lacks, paused for good, until the migration is resumed.
        case postcopyPaused = "postcopy-paused"
    }
    public var phase: Phase = .none
    public var round: Int = 0
    public var pagesSent: Int = 0
    public var bytesSent: UInt64 = 0
    public var dirtyPagesLeft: Int = 0
    public var rateBytesPerSecond: Double = 0
    public var expectedDowntimeMs: Double = 0
    public var throttlePercent: Int = 0
    public var elapsedSeconds: Double = 0
    /// Post-copy: "requested" once a switch was asked for, then what switched it.
    public var postcopySwitch: String?
    public var error: String?

    public init() {}

    enum CodingKeys: String, CodingKey {
        case phase, round, error
        case pagesSent = "pages_sent"
        case bytesSent = "bytes_sent"
        case dirtyPagesLeft = "dirty_pages_left"
        case rateBytesPerSecond = "rate_bytes_per_s"
        case expectedDowntimeMs = "expected_downtime_ms"
        case throttlePercent = "throttle_percent"
        case elapsedSeconds = "elapsed_s"
        case postcopySwitch = "postcopy_switch"
    }
}

/// How a migration ended.
public enum MigrationOutcome: String, Codable, Sendable {
    /// The destination runs the guest; this copy ends.
    case completed
    /// It failed before GO: the guest runs here again.
    case failed
    /// It failed after GO: the guest stays paused here; exactly one side may run it.
    case inDoubt = "in-doubt"
    /// Post-copy, after the switch, the link failed: the destination runs (paused) the guest,
    /// this copy keeps the pages it lacks, until the migration is resumed.
    case postcopyPaused = "postcopy-paused"
}

/// The figures of one migration, written as JSON when it ends.
public struct MigrationReport: Codable, Sendable {
    public var destination: String
    public var tracker: String
    public var converged: Bool
    public var outcome: MigrationOutcome
    public var setupMs: Double = 0
    public var totalMs: Double = 0
    /// Source pause to destination resume: on one host its CLOCK_MONOTONIC; between hosts
    /// estimated (see `DowntimePhases.clock`).
    public var downtimeMs: Double?
    /// Where the downtime went, phase by phase (pre-copy that completed only).
    public var downtimePhasesMs: DowntimePhases?
    /// Writing the durable hand-over intent, just before the pause (not downtime: the guest runs).
    public var handoverIntentMs: Double?
    /// Pre-copy with one connection: just before the pause, the guest still running, the drain
    /// (the destination applying every page in flight) until its answer came. Not downtime.
    public var drainMs: Double?
    public var bytesSent: UInt64 = 0
    public var pagesSent: Int = 0
    public var zeroPages: Int = 0
    public var rounds: Int = 0
    public var pagesPerRound: [Int] = []
    public var throughputBytesPerSecond: Double = 0
    public var memoryBytes: UInt64 = 0
    /// Time spent handing ownership over (the Billboard lease) just before GO, inside the downtime.
    public var handoverMs: Double = 0
    public var settings: MigrationSettings
    public var error: String?
    /// The post-copy phase's figures, when the guest switched to the destination before all its
    /// pages had moved.
    public var postcopy: PostCopyFigures?
    /// The destination's announcement as it stood when the destination replied RUNNING: its
    /// schedule and the first round, which goes out before that reply (state `sending`), or
    /// state `off`. Absent when the guest has no network card, or the destination did not say.
    /// The later rounds are in the destination's own report (`ArrivalReport.announce`).
    public var destinationAnnounce: AnnounceReport?

    /// The convergence estimate after the last pre-copy round.
    public var convergence: ConvergenceFigures?

    enum CodingKeys: String, CodingKey {
        case destination, tracker, converged, outcome, rounds, settings, error, postcopy, convergence
        case destinationAnnounce = "destination_announce"
        case setupMs = "setup_ms"
        case totalMs = "total_ms"
        case downtimeMs = "downtime_ms"
        case bytesSent = "bytes_sent"
        case pagesSent = "pages_sent"
        case zeroPages = "zero_pages"
        case pagesPerRound = "pages_per_round"
        case throughputBytesPerSecond = "throughput_bytes_per_s"
        case memoryBytes = "memory_bytes"
        case handoverMs = "handover_ms"
        case downtimePhasesMs = "downtime_phases_ms"
        case handoverIntentMs = "handover_intent_ms"
        case drainMs = "drain_ms"
    }
}

/// Where a migration's downtime went, in milliseconds of CLOCK_MONOTONIC. Each phase starts
/// where the one before ended, so on one host they add up to `downtime_ms`; the destination's
/// own figures (`destination`) lie inside `resume` and overlap `ready`.
public struct DowntimePhases: Codable, Sendable, Equatable {
    /// The pause asked for → every vCPU out of `KVM_RUN` and parked.
    public var pause: Double = 0
    /// The last dirty set collected and its pages sent.
    public var lastPages: Double = 0
    /// vCPU and device state saved, encoded and sent; the state stream closed and flushed.
    public var state: Double = 0
    /// The state stream flushed → READY read: the destination's verification and apply
    /// (`destination.apply`) and the way there and back.
    public var ready: Double = 0
    /// The lease handed over in this host's store.
    public var leaseHandover: Double = 0
    /// The lease handed over → GO about to be written (in plaintext, its signature).
    public var go: Double = 0
    /// GO written → the destination's vCPUs running: GO's way there, the destination's lease
    /// (`destination.lease`) and start (`destination.start`).
    public var resume: Double = 0
    /// After the resume, so not downtime: RUNNING's way back to the source.
    public var runningReply: Double = 0
    /// What the destination measured on its own clock (nil from a destination that does not say).
    public var destination: DestinationPhases?
    /// How `resume`, `running_reply` and `downtime_ms` were found: "shared" when both sides ran
    /// on one kernel (the same boot id): from the destination's resume time on the common clock;
    /// "estimated" between hosts: the wire's share of the GO → RUNNING round trip (what the
    /// destination did not spend on its lease and start) is split evenly between GO and RUNNING.
    public var clock: String = "shared"

    public init() {}

    /// The phases inside the downtime, in order (running_reply is after it).
    public var inDowntime: [Double] { [pause, lastPages, state, ready, leaseHandover, go, resume] }

    enum CodingKeys: String, CodingKey {
        case pause, state, ready, go, resume, destination, clock
        case lastPages = "last_pages"
        case leaseHandover = "lease_handover"
        case runningReply = "running_reply"
    }
}

/// The destination's share of the downtime, on its own clock, sent back in RUNNING.
public struct DestinationPhases: Codable, Sendable, Equatable {
    /// The end of the state stream read → READY sent: the signature checked (plaintext), vCPU
    /// and device state applied.
    public var apply: Double = 0
    /// Post-copy only: GO read → the missing pages dropped, the memory registered with the fault
    /// server and the page channel served. Inside `lease`'s span, before it.
    public var postcopySetup: Double?
    /// GO read (post-copy: the fault server ready) → the lease taken in this host's store.
    public var lease: Double = 0
    /// The lease taken → every vCPU thread running the guest.
    public var start: Double = 0
    /// The kernel boot these were measured in (`/proc/sys/kernel/random/boot_id`): the same as
    /// the source's means one CLOCK_MONOTONIC for both.
    public var bootID: String?

    public init(apply: Double = 0, lease: Double = 0, start: Double = 0, bootID: String? = nil) {
        self.apply = apply
        self.lease = lease
        self.start = start
        self.bootID = bootID
    }

    enum CodingKeys: String, CodingKey {
        case apply, lease, start
        case postcopySetup = "postcopy_setup"
        case bootID = "boot_id"
    }
}

/// What post-copy did: the destination measures the faults (sent back when the last page is in),
/// the source counts what it pushed and what was asked for.
public struct PostCopyFigures: Codable, Sendable, Equatable {
    /// What switched it (absent in figures from a destination: the source knows).
    public var trigger: PostCopySwitch?
    /// Pre-copy rounds completed before the switch.
    public var switchedAfterRounds: Int = 0
    /// Whether the switch cut round `switchedAfterRounds` short (a request, or the time limit with
    /// a switch on stall, arrived while it was sending).
    public var switchedMidRound: Bool?
    /// Why pre-copy was judged stalled (trigger "stall").
    public var stall: ConvergenceStall.Kind?
    public var stallReason: String?
    /// Pages the destination did not have at the switch (dirty since sent, or never sent).
    public var pagesMissingAtSwitch: Int = 0
    /// Pages sent in order on the main connection, and pages sent because a fault asked.
    public var pagesPushed: Int = 0
    public var pagesRequested: Int = 0
    /// Missing-page faults at the destination (its vCPUs' and its own threads').
    public var faults: Int = 0
    public var medianFaultMs: Double = 0
    public var p99FaultMs: Double = 0
    /// Sum of the fault latencies: roughly how long the guest's vCPUs were blocked.
    public var blockedMs: Double = 0
    /// From the destination's resume to its last page installed.
    public var lastPageAfterMs: Double = 0
    /// Times the post-copy phase was resumed after its link failed.
    public var recoveries: Int = 0
    /// Faults that waited for a recovery (their page could not be asked for while the link was down).
    public var faultsPostponed: Int = 0
    /// Just before the switch's pause, while the guest still ran: the drain (the destination
    /// applying every page in flight) until its answer came.
    public var drainMs: Double?

    public init() {}

    enum CodingKeys: String, CodingKey {
        case faults, stall
        case trigger = "switch"
        case switchedMidRound = "switched_mid_round"
        case stallReason = "stall_reason"
        case switchedAfterRounds = "switched_after_rounds"
        case pagesMissingAtSwitch = "pages_missing_at_switch"
        case pagesPushed = "pages_pushed"
        case pagesRequested = "pages_requested"
        case medianFaultMs = "median_fault_ms"
        case p99FaultMs = "p99_fault_ms"
        case blockedMs = "vcpu_blocked_ms"
        case lastPageAfterMs = "last_page_after_ms"
        case recoveries
        case faultsPostponed = "faults_postponed"
        case drainMs = "drain_ms"
    }

    public init(from decoder: any Decoder) throws {
        // Every field optional: a destination's COMPLETE carries only what it measured, and an
        // older VMM's figures lack the recovery counts.
        let c = try decoder.container(keyedBy: CodingKeys.self)
        trigger = try c.decodeIfPresent(PostCopySwitch.self, forKey: .trigger)
        switchedMidRound = try c.decodeIfPresent(Bool.self, forKey: .switchedMidRound)
        stall = try c.decodeIfPresent(ConvergenceStall.Kind.self, forKey: .stall)
        stallReason = try c.decodeIfPresent(String.self, forKey: .stallReason)
        switchedAfterRounds = try c.decodeIfPresent(Int.self, forKey: .switchedAfterRounds) ?? 0
        pagesMissingAtSwitch = try c.decodeIfPresent(Int.self, forKey: .pagesMissingAtSwitch) ?? 0
        pagesPushed = try c.decodeIfPresent(Int.self, forKey: .pagesPushed) ?? 0
        pagesRequested = try c.decodeIfPresent(Int.self, forKey: .pagesRequested) ?? 0
        faults = try c.decodeIfPresent(Int.self, forKey: .faults) ?? 0
        medianFaultMs = try c.decodeIfPresent(Double.self, forKey: .medianFaultMs) ?? 0
        p99FaultMs = try c.decodeIfPresent(Double.self, forKey: .p99FaultMs) ?? 0
        blockedMs = try c.decodeIfPresent(Double.self, forKey: .blockedMs) ?? 0
        lastPageAfterMs = try c.decodeIfPresent(Double.self, forKey: .lastPageAfterMs) ?? 0
        recoveries = try c.decodeIfPresent(Int.self, forKey: .recoveries) ?? 0
        faultsPostponed = try c.decodeIfPresent(Int.self, forKey: .faultsPostponed) ?? 0
        drainMs = try c.decodeIfPresent(Double.self, forKey: .drainMs)
    }
}

/// The destination's side of a post-copy migration, as `GET /vm/migration` shows it (`incoming`).
public struct IncomingPostCopyStatus: Codable, Sendable, Equatable {
    public enum Phase: String, Codable, Sendable {
        /// The guest runs here; its missing pages arrive.
        case postcopy
        /// The link failed: the guest is paused here (a vCPU asleep on a missing page stays so),
        /// nothing is discarded, and the migration waits for `migration/recover`.
        case postcopyPaused = "postcopy-paused"
        /// Every page is in.
        case completed
        /// Given up while paused (or a page could not be installed): the guest is lost; it never
        /// ran on without its pages.
        case lost
    }
    public var phase: Phase
    /// The host the guest came from.
    public var source: String
    /// Pages not installed yet.
    public var pagesMissing: Int
    public var recoveries: Int
    /// Why it paused (or was lost).
    public var error: String?
    /// Where it listens for the source's resume, after `migration/recover`.
    public var listening: String?

    public init(phase: Phase, source: String, pagesMissing: Int, recoveries: Int, error: String?, listening: String?) {
        self.phase = phase
        self.source = source
        self.pagesMissing = pagesMissing
        self.recoveries = recoveries
        self.error = error
        self.listening = listening
    }

    enum CodingKeys: String, CodingKey {
        case phase, source, recoveries, error, listening
        case pagesMissing = "pages_missing"
    }
}

/// What a destination did to announce a guest with a network card after it resumed it there:
/// QEMU's self-announce (a RARP from the guest's MAC and a gratuitous ARP for its registered IP,
/// each round) on QEMU's schedule, so that the switches between it and its peers learn its new
/// port. Times are milliseconds after the guest resumed on the destination's monotonic clock.
public struct AnnounceReport: Codable, Sendable, Equatable {
    public enum State: String, Codable, Sendable {
        /// The destination was told not to announce (`vmm receive --no-announce` or
        /// `--announce-rounds 0`): switches keep sending to the old port until the guest talks.
        case off
        /// Rounds are still to come.
        case sending
        /// Every round went out (some frames may have failed: `errors`).
        case finished
        /// Stopped before the last round: the guest ended or moved on.
        case cancelled
        /// The guest has a card but its host side was not connected: nothing was sent.
        case notConnected = "not-connected"
    }

    /// The schedule's parameters (`vmm receive --announce-*`).
    public struct Schedule: Codable, Sendable, Equatable {
        public var rounds: Int
        public var initialMs: Int
        public var stepMs: Int
        public var maxMs: Int

        public init(rounds: Int, initialMs: Int, stepMs: Int, maxMs: Int) {
            self.rounds = rounds
            self.initialMs = initialMs
            self.stepMs = stepMs
            self.maxMs = maxMs
        }

        enum CodingKeys: String, CodingKey {
            case rounds
            case initialMs = "initial_ms"
            case stepMs = "step_ms"
            case maxMs = "max_ms"
        }
    }

    public var state: State
    public var schedule: Schedule
    /// When each round is due, by the schedule (`rounds` values; QEMU's defaults: 0, 50, 200, 450, 800).
    public var plannedMs: [Int]
    /// When each round went out so far.
    public var sentMs: [Double]
    public var framesPerRound: Int
    /// Frames written to the tap, and frames the tap refused (each failure is also counted in
    /// the card's tap write errors).
    public var framesSent: Int
    public var errors: Int
    /// The last refusal, when there was one.
    public var lastError: String?

    public init(state: State, schedule: Schedule, plannedMs: [Int], sentMs: [Double] = [], framesPerRound: Int,
                framesSent: Int = 0, errors: Int = 0, lastError: String? = nil) {
        self.state = state
        self.schedule = schedule
        self.plannedMs = plannedMs
        self.sentMs = sentMs
        self.framesPerRound = framesPerRound
        self.framesSent = framesSent
        self.errors = errors
        self.lastError = lastError
    }

    enum CodingKeys: String, CodingKey {
        case state, schedule, errors
        case plannedMs = "planned_ms"
        case sentMs = "sent_ms"
        case framesPerRound = "frames_per_round"
        case framesSent = "frames_sent"
        case lastError = "last_error"
    }
}

/// The destination's report of one incoming migration (`vmm receive`): where the guest came
/// from, what arrived, and the announcement that followed its resume. The announcement goes on
/// for about 800 ms after the resume (QEMU's schedule), so `announce` is read live: the
/// control API shows where it stands, the report file is written once it has finished.
public struct ArrivalReport: Codable, Sendable, Equatable {
    public enum Outcome: String, Codable, Sendable {
        /// The guest runs here.
        case running
        /// Post-copy could not bring every page (its source gone, the migration given up): the
        /// guest ended here, never having run without them (`error` says why).
        case lost
    }

    /// The host the guest came from (authenticated on TLS; claimed, then proven by the
    /// stream's signature, in plaintext).
    public var source: String
    public var outcome: Outcome
    /// When the guest resumed here (CLOCK_MONOTONIC ms: comparable only on one host).
    public var resumedAtMs: Double
    /// Page entries received (zero pages included), and stream bytes read.
    public var pagesReceived: Int
    public var zeroPages: Int
    public var bytesReceived: UInt64
    public var postcopy: PostCopyFigures?
    /// Post-copy: where the migration stands (its pages may still be arriving, or it may be
    /// paused by a failed link).
    public var postcopyState: IncomingPostCopyStatus?
    public var error: String?
    /// Absent when the guest has no network card.
    public var announce: AnnounceReport?

    public init(source: String, outcome: Outcome, resumedAtMs: Double, pagesReceived: Int, zeroPages: Int, bytesReceived: UInt64,
                postcopy: PostCopyFigures? = nil, error: String? = nil, announce: AnnounceReport? = nil) {
        self.source = source
        self.outcome = outcome
        self.resumedAtMs = resumedAtMs
        self.pagesReceived = pagesReceived
        self.zeroPages = zeroPages
        self.bytesReceived = bytesReceived
        self.postcopy = postcopy
        self.error = error
        self.announce = announce
    }

    enum CodingKeys: String, CodingKey {
        case source, outcome, postcopy, error, announce
        case postcopyState = "postcopy_state"
        case resumedAtMs = "resumed_at_ms"
        case pagesReceived = "pages_received"
        case zeroPages = "zero_pages"
        case bytesReceived = "bytes_received"
    }
}

extension PostCopyFigures {
    /// Takes how and when the switch happened from the source's record of it.
    mutating func takeSwitch(from other: PostCopyFigures?) {
        guard let other else { return }
        trigger = other.trigger
        switchedAfterRounds = other.switchedAfterRounds
        switchedMidRound = other.switchedMidRound
        stall = other.stall
        stallReason = other.stallReason
        drainMs = other.drainMs
    }
}
