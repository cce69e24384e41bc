import Foundation
import Snapshot

// The migration protocol: the wire messages, and nothing else. (What a migration is asked to
// do and what it reports are in MigrationRecords.swift.)
//
// Every message is a section of the snapshot stream format (Snapshot target), so one
// codec, with its limits and checksums, guards files and the wire. The sequence of
// messages on one connection:
//
//   source -> destination, stream 1 (state):
//     header, control{hello: version, machine description (with the guest's identity)}
//   destination -> source, reply stream:
//     header, control{accept: host, pid} (admitted, VM reserved: memory, vCPUs) or control{refuse: reason}
//   source -> destination, stream 1 continues:
//     memory sections, round by round (pre-copy, guest running);
//     then, guest paused: the last dirty pages, vcpu, devices, signature (the source
//     host's, over every byte before it), end (stream digest)
//   destination -> source:
//     control{ready} once every section, the signature and the digest are verified and
//     the state applied to the paused VM; or control{refuse: reason}
//   source: hands the guest's lease to (host, pid) of the accept; if that fails, no GO
//   source -> destination, stream 2 (commit): header, control{go}, end
//     (from here the source never resumes on its own)
//   destination -> source: control{running: resumed_at}, end
//
// A failure before GO leaves the guest running on the source and the destination
// discards what it had. A failure after GO leaves the source paused and the
// migration "in doubt": exactly one side may run, and it is not the source.
//
// The receiver's states (MigrationReceiver):
//
//   awaiting hello ──hello──▶ admitting ──admitted──▶ reserved ──accept──▶ receiving
//        │                       │ refused                                  │ memory, vcpu,
//        │                       ▼                                          │ devices, signature, end
//        │                  refuse, done                                    ▼
//        │                                                      verifying ──ok──▶ ready (READY sent)
//        │                                                          │ bad signature / state
//        ▼                                                          ▼              │ GO, end
//   any error before GO: the reserved VM is discarded       refuse, discard        ▼
//                                                                             committed: guest started
//                                                                             (lease taken), RUNNING sent

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

    public func encoded() throws -> [UInt8] { try StateJSON.encode(self) }

    public static func decode(_ payload: [UInt8]) throws -> ControlMessage {
        do { return try StateJSON.decode(ControlMessage.self, from: payload, what: "control message") } catch {
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

