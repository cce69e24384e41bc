import Foundation

// The migration protocol, as the sequence of messages on one TCP connection.
// Every message is a section of the snapshot stream format (Snapshot target),
// so one codec, with its limits and checksums, guards files and the wire.
//
//   source -> destination, stream 1 (state):
//     header, control{hello: version, machine description (with the guest's identity)}
//   destination -> source, reply stream:
//     header, control{accept: host, pid} (admitted, VM reserved: memory, vCPUs) or control{refuse: reason}
//   source -> destination, stream 1 continues:
//     memory sections, round by round (pre-copy, guest running);
//     then, guest paused: the last dirty pages, vcpu, devices, end (stream digest)
//   destination -> source:
//     control{ready} once every section and the digest are verified and the state
//     applied to the paused VM; or control{refuse: reason}
//   source: hands the guest's lease to (host, pid) of the accept; if that fails, no GO
//   source -> destination, stream 2 (commit): header, control{go}, end
//     (from here the source never resumes on its own)
//   destination -> source: control{running: resumed_at}, end
//
// A failure before GO leaves the guest running on the source and the destination
// discards what it had. A failure after GO leaves the source paused and the
// migration "in doubt": exactly one side may run, and it is not the source.

/// Version of this protocol; the destination refuses any other.
public let migrationProtocolVersion = 1

/// One control message (a `control` section, JSON).
public struct ControlMessage: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        case hello, accept, refuse, ready, go, running
    }
    public var kind: Kind
    public var version: Int?
    /// hello: the machine description (JSON defined by the VMM).
    public var machine: Data?
    /// hello: who the guest is, for logs (the admission reads the machine description).
    public var identity: String?
    /// accept: the host and process that will own the guest after GO (the source hands its lease to them).
    public var host: String?
    public var pid: Int32?
    /// refuse: why.
    public var reason: String?
    /// running: when the destination resumed the guest (CLOCK_MONOTONIC ms; same host only).
    public var resumedAt: Double?

    public init(kind: Kind, version: Int? = nil, machine: Data? = nil, identity: String? = nil,
                reason: String? = nil, resumedAt: Double? = nil, host: String? = nil, pid: Int32? = nil) {
        self.host = host
        self.pid = pid
        self.kind = kind
        self.version = version
        self.machine = machine
        self.identity = identity
        self.reason = reason
        self.resumedAt = resumedAt
    }

    public func encoded() throws -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return Array(try e.encode(self))
    }

    public static func decode(_ payload: [UInt8]) throws -> ControlMessage {
        do { return try JSONDecoder().decode(ControlMessage.self, from: Data(payload)) } catch {
            throw MigrationError.protocolViolation("a control message is not valid JSON: \(error)")
        }
    }
}

/// Why a migration failed.
public enum MigrationError: Error, CustomStringConvertible, Equatable {
    case connection(String)
    case refused(String)
    case protocolViolation(String)
    case timedOut(String)
    case aborted(String)
    case notConverged(seconds: Double)
    case inDoubt(String)

    public var description: String {
        switch self {
        case let .connection(s): "connection: \(s)"
        case let .refused(s): "the destination refused: \(s)"
        case let .protocolViolation(s): "protocol violation: \(s)"
        case let .timedOut(s): "timed out: \(s)"
        case let .aborted(s): "aborted: \(s)"
        case let .notConverged(s): "did not converge within \(Int(s)) s; the guest keeps running here (try a larger max_downtime_ms or auto_converge)"
        case let .inDoubt(s): "in doubt after GO: \(s); the guest stays paused here and must not be resumed unless the destination is known not to run it"
        }
    }
}

/// Settings of one migration (the body of `PUT /vm/migrate`).
public struct MigrationSettings: Codable, Sendable, Equatable {
    public var destination: String
    public var maxDowntimeMs: Double = 300
    /// Bytes per second; 0 = unlimited.
    public var maxBandwidth: UInt64 = 0
    public var autoConverge: Bool = false
    public var timeoutSeconds: Double = 60

    public init(destination: String, maxDowntimeMs: Double = 300, maxBandwidth: UInt64 = 0,
                autoConverge: Bool = false, timeoutSeconds: Double = 60) {
        self.destination = destination
        self.maxDowntimeMs = maxDowntimeMs
        self.maxBandwidth = maxBandwidth
        self.autoConverge = autoConverge
        self.timeoutSeconds = timeoutSeconds
    }

    enum CodingKeys: String, CodingKey {
        case destination
        case maxDowntimeMs = "max_downtime_ms"
        case maxBandwidth = "max_bandwidth"
        case autoConverge = "auto_converge"
        case timeoutSeconds = "timeout_s"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        destination = try c.decode(String.self, forKey: .destination)
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

/// The figures of one migration, written as JSON when it ends.
public struct MigrationReport: Codable, Sendable {
    public var destination: String
    public var tracker: String
    public var converged: Bool
    public var outcome: String
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
