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
    /// after that switch, neither side has the whole guest: it is lost (no recovery yet).
    public var postcopy: Bool = false
    /// Pre-copy rounds before the switch (1: after round 0; 0: no pre-copy at all).
    public var postcopyAfterRounds: Int = 1

    public init(destination: String, peer: String? = nil, transport: TransportKind = .tls, maxDowntimeMs: Double = 300,
                maxBandwidth: UInt64 = 0, autoConverge: Bool = false, timeoutSeconds: Double = 60,
                postcopy: Bool = false, postcopyAfterRounds: Int = 1) {
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
    }
}

/// Where a migration stands (`GET /vm/migration`).
public struct MigrationProgress: Codable, Sendable, Equatable {
    public enum Phase: String, Codable, Sendable {
        case none, setup, precopy, stopAndCopy = "stop-and-copy", handover, postcopy, completed, failed, inDoubt = "in-doubt"
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
        case downtimePhasesMs = "downtime_phases_ms"
        case handoverIntentMs = "handover_intent_ms"
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
    /// and device state applied (post-copy: the page channel accepted too).
    public var apply: Double = 0
    /// GO read → the lease taken in this host's store (post-copy: the missing pages dropped
    /// and registered with the fault server first).
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
        case bootID = "boot_id"
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
    }
}
