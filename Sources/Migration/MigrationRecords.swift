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

    public init(destination: String, peer: String? = nil, transport: TransportKind = .tls, maxDowntimeMs: Double = 300,
                maxBandwidth: UInt64 = 0, autoConverge: Bool = false, timeoutSeconds: Double = 60) {
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
    }
}

/// Where a migration stands (`GET /vm/migration`).
public struct MigrationProgress: Codable, Sendable, Equatable {
    public enum Phase: String, Codable, Sendable {
        case none, setup, precopy, stopAndCopy = "stop-and-copy", handover, completed, failed, inDoubt = "in-doubt"
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

    enum CodingKeys: String, CodingKey {
        case destination, tracker, converged, outcome, rounds, settings, error
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
