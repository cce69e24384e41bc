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
    public var autoConverge: Bool = false
    public var timeoutSeconds: Double = 60
    /// Post-copy: after `postcopyAfterRounds` pre-copy rounds the guest moves to the destination
    /// at once and its remaining pages follow (pushed, and pulled on fault). If the link fails
    /// after that switch, neither side has the whole guest: both pause and keep what they have
    /// until the migration is recovered (`resume`); if either side dies then, the guest is lost.
    public var postcopy: Bool = false
    /// Pre-copy rounds before the switch (1: after round 0; 0: no pre-copy at all).
    public var postcopyAfterRounds: Int = 1
    /// Resume this guest's post-copy migration, paused after its link failed, on a new
    /// connection to `destination` (where the destination listens after `migration/recover`).
    public var resume: Bool = false

    public init(destination: String, peer: String? = nil, transport: TransportKind = .tls, maxDowntimeMs: Double = 300,
                maxBandwidth: UInt64 = 0, autoConverge: Bool = false, timeoutSeconds: Double = 60,
                postcopy: Bool = false, postcopyAfterRounds: Int = 1, resume: Bool = false) {
        self.resume = resume
        self.postcopy = postcopy
        self.postcopyAfterRounds = postcopyAfterRounds
        self.destination = destination
        self.peer = peer
        self.transport = transport
        self.maxDowntimeMs = maxDowntimeMs
        self.maxBandwidth = maxBandwidth
        self.autoConverge = autoConverge
        self.timeoutSeconds = timeoutSeconds
    }

    enum CodingKeys: String, CodingKey {
        case destination, peer, transport
        case maxDowntimeMs = "max_downtime_ms"
        case maxBandwidth = "max_bandwidth"
        case autoConverge = "auto_converge"
        case timeoutSeconds = "timeout_s"
        case postcopy
        case postcopyAfterRounds = "postcopy_after_rounds"
        case resume
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        destination = try c.decode(String.self, forKey: .destination)
        peer = try c.decodeIfPresent(String.self, forKey: .peer)
        transport = try c.decodeIfPresent(TransportKind.self, forKey: .transport) ?? .tls
        maxDowntimeMs = try c.decodeIfPresent(Double.self, forKey: .maxDowntimeMs) ?? 300
        maxBandwidth = try c.decodeIfPresent(UInt64.self, forKey: .maxBandwidth) ?? 0
        autoConverge = try c.decodeIfPresent(Bool.self, forKey: .autoConverge) ?? false
        timeoutSeconds = try c.decodeIfPresent(Double.self, forKey: .timeoutSeconds) ?? 60
        postcopy = try c.decodeIfPresent(Bool.self, forKey: .postcopy) ?? false
        postcopyAfterRounds = try c.decodeIfPresent(Int.self, forKey: .postcopyAfterRounds) ?? 1
        resume = try c.decodeIfPresent(Bool.self, forKey: .resume) ?? false
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
    /// Source pause to destination resume, on the host's monotonic clock.
    public var downtimeMs: Double?
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

    enum CodingKeys: String, CodingKey {
        case destination, tracker, converged, outcome, rounds, settings, error, postcopy
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
    }
}

/// What post-copy did: the destination measures the faults (sent back when the last page is in),
/// the source counts what it pushed and what was asked for.
public struct PostCopyFigures: Codable, Sendable, Equatable {
    /// Pre-copy rounds before the switch.
    public var switchedAfterRounds: Int = 0
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

    public init() {}

    enum CodingKeys: String, CodingKey {
        case faults
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
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
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
