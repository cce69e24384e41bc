import Foundation
import Snapshot

// The migration protocol: the wire messages, and nothing else. (What a migration is asked to
// do and what it reports are in MigrationRecords.swift.)
//
// Every message is a section of the snapshot stream format (Snapshot target), so one codec,
// with its limits, guards files and the wire. The transport is mutually authenticated TLS 1.3
// between enrolled Billboard hosts (SecureChannel), or plain TCP when both sides consented;
// the stream's integrity follows: inside TLS no checksums, no digest and no signature (the
// channel authenticates every byte and its sender); in plaintext the signed, checksummed
// stream of a snapshot file. The sequence on one connection:
//
//   transport: TLS handshake; each side checks the other's certificate key is an enrolled
//              host (the source also that it is the host it named)
//   destination -> source, reply stream:
//     header, control{challenge: version, fresh random nonce, destination host}
//       (sent only once the source is authenticated: no guest byte leaves the source before)
//   source -> destination, stream 1 (state):
//     header, control{manifest: version, the challenge, source and destination hosts, source
//       pid, machine description with the guest's identity and lease epoch}
//   destination -> source:
//     control{accept: host, pid} (challenge, hosts and identity checked, the Billboard
//       admitted, VM reserved: memory, vCPUs) or control{refuse: reason}
//   source -> destination, stream 1 continues:
//     memory sections, round by round (pre-copy, guest running);
//     control{drain: the counts so far} (without data channels; the guest still runs)
//   destination -> source: control{drained: the counts applied}, once every page before the
//     drain is applied (nothing in flight is left for the pause)
//   source -> destination, stream 1 continues:
//     guest paused: the last dirty pages, vcpu, devices, [signature: plaintext only,
//     the source host's, over every byte before it, the manifest and its challenge included],
//     end [stream digest: plaintext only]
//   destination -> source:
//     control{ready: the page entries and memory sections it applied} once everything is
//     verified and applied to the paused VM; or control{refuse: reason}
//   source: checks the counts against what it sent, then hands the guest's lease to the
//     authenticated destination host and the accept's pid; if either fails, no GO. (Before the
//     pause it wrote a durable intent for exactly that hand-over, so this commit inside the
//     pause need not wait for the disk: docs/migration.md, "Crash safety of the hand-over".)
//   source -> destination, stream 2 (commit): header, control{go: the counts, and in
//     plaintext the source host's signature over the challenge and the counts}, end
//     (from here the source never resumes on its own)
//   destination -> source: control{running: resumed_at, [announce: the schedule and the
//     first round, which the destination sends before this reply], what the destination
//     measured of the downtime}, end
//
// Data channels (the manifest says `channels: N`, 2 to maxMigrationChannels; DataChannels.swift):
// after the accept the source opens N more connections, one after the other, each checked as
// the page channel is (the main connection's peer) and opening with control{data-channel: the
// challenge, its index, N}, answered control{accept} or control{refuse}; every memory section
// of stream 1 then travels on those instead, each page always on channel (pfn / 512) % N, each
// channel a stream of its own (header, data-channel, memory sections and round marks,
// [signature], end, in plaintext signed and checksummed as stream 1); stream 1 keeps the vCPU
// and device state, with round marks while the channels work. READY comes once every channel
// reached its end, and counts the pages of all of them.
//
// Post-copy (the manifest says so; docs/migration.md "Post-copy" draws it): the state stream
// closes without the last dirty pages; right after the accept, while the guest still runs, the
// source opens a second connection, the page channel (control{page-channel: the challenge},
// control{accept}). At the switch, before its pause, the source drains as stop-and-copy does,
// so that no page is still in flight inside the pause; then it pauses and sends the pages the
// guest wrote last with the state. Stream 2 carries control{postcopy: the
// bitmap of missing pages} before GO, in slices of 32 KiB of bitmap each (a control section
// holds 64 KiB; the destination knows the memory's size, so how many bytes make the whole
// bitmap; still-missing is sliced the same way). After RUNNING:
//
//   page channel:  destination -> control{page-request: pfn} | control{heartbeat}
//                  source      -> memory section (that one page) | control{refuse} | control{heartbeat}
//   main:          source -> stream 3 (push): header, memory sections, end
//                  destination -> control{complete: figures}, end (on its reply stream)
//
// The destination asks for a heartbeat whenever the page channel was quiet for a second; each
// side gives the link up after a few seconds without a word (PostCopyLink.swift). Then both
// pause (`postcopy-paused`), keep everything, and a recovery reconnects, on a new listener the
// destination opens, with mutually authenticated TLS only:
//
//   destination -> source, reply stream: header, control{challenge: version, fresh nonce, host}
//   source -> destination: header, control{resume: version, the fresh nonce, the original
//     challenge (which migration), source and destination hosts, guest}
//   destination: the channel's host must be the migration's source, the nonce this
//     connection's, the original challenge, hosts and guest this migration's; then
//     -> control{still-missing: bitmap of the pages not installed} (or control{refuse: reason})
//   source: checks the bitmap lies within the pages missing at the switch; opens a new page
//     channel answering the fresh nonce (control{page-channel}, control{accept})
//   then as after RUNNING: requests and heartbeats on the page channel; on the main
//     connection the push of exactly the still-missing pages, end; control{complete}, end.
//
// A failure before GO leaves the guest running on the source and the destination discards
// what it had. A failure after GO leaves the source paused and the migration "in doubt":
// exactly one side may run, and it is not the source. A recorded migration cannot be replayed:
// TLS refuses the recording, and in plaintext the challenge in the signed manifest and GO is
// fresh for every connection.
//
// The receiver's states (MigrationReceiver):
//
//   challenge sent ──manifest──▶ admitting ──admitted──▶ reserved ──accept──▶ receiving
//        │                          │ refused (stale challenge,                │ memory, vcpu,
//        │                          │ wrong hosts, Billboard)                  │ devices, [signature], end
//        │                          ▼                                          ▼
//        │                     refuse, done                    verifying ──ok──▶ ready (READY sent)
//        │                                                         │ bad signature / state    │ GO (counts,
//        ▼                                                         ▼                          ▼ signature)
//   any error before GO: the reserved VM is discarded      refuse, discard       committed: lease taken,
//                                                                                guest started, RUNNING sent

/// Version of this protocol; the destination refuses any other. (3: post-copy heartbeats and
/// recovery; 4: the vcpu section in binary, which a version 3 destination cannot read, the page
/// channel opened right after the accept rather than inside the pause, and the post-copy
/// switch's drain of the pages in flight before its pause; 5: data channels, and round marks on
/// the main stream.)
public let migrationProtocolVersion = 5

/// The most data channels a migration may ask for (`channels`); a destination refuses more.
public let maxMigrationChannels = 8

/// What the source says of the migration it starts, bound to the destination's challenge.
public struct MigrationManifest: Codable, Sendable, Equatable {
    public var version: Int
    /// The destination's challenge, echoed (base64): binds everything after it to this connection.
    public var challenge: String
    public var sourceHost: String
    /// The host the source expects to hand the guest to.
    public var destinationHost: String
    public var sourcePid: Int32
    /// The machine description with the guest's identity (JSON defined by the VMM).
    public var machine: Data
    /// The guest's name, for logs (the admission reads the machine description).
    public var guest: String?
    /// The source will switch to post-copy: the destination accepts a page channel before READY.
    public var postcopy: Bool?
    /// Data channels (2 to `maxMigrationChannels`) that carry the memory sections, each page
    /// always on the same one; nil or 1: the pages travel on this connection.
    public var channels: Int?

    public init(version: Int = migrationProtocolVersion, challenge: String, sourceHost: String, destinationHost: String,
                sourcePid: Int32, machine: Data, guest: String?, postcopy: Bool? = nil, channels: Int? = nil) {
        self.postcopy = postcopy
        self.channels = channels
        self.version = version
        self.challenge = challenge
        self.sourceHost = sourceHost
        self.destinationHost = destinationHost
        self.sourcePid = sourcePid
        self.machine = machine
        self.guest = guest
    }
}

/// What a source says when it reconnects to a post-copy migration whose link failed, bound to
/// the destination's fresh challenge on the new connection and to the migration it resumes.
public struct PostCopyResume: Codable, Sendable, Equatable {
    public var version: Int
    /// The recovery connection's challenge, echoed: a resume recorded on another connection
    /// answers another challenge.
    public var challenge: String
    /// The original migration's challenge: which migration this resumes. Only its two hosts
    /// ever saw it, inside their TLS channel.
    public var migration: String
    public var sourceHost: String
    public var destinationHost: String
    /// The guest, as the original manifest named it.
    public var guest: String?

    public init(version: Int = migrationProtocolVersion, challenge: String, migration: String, sourceHost: String,
                destinationHost: String, guest: String?) {
        self.version = version
        self.challenge = challenge
        self.migration = migration
        self.sourceHost = sourceHost
        self.destinationHost = destinationHost
        self.guest = guest
    }
}

/// What was moved: counted by the destination (READY) and by the source (GO), so a dropped or
/// duplicated record never commits.
public struct TransferCounts: Codable, Sendable, Equatable, CustomStringConvertible {
    /// Page entries, zero pages included.
    public var pages: Int
    public var memorySections: Int

    public init(pages: Int, memorySections: Int) {
        self.pages = pages
        self.memorySections = memorySections
    }

    public var description: String { "\(pages) page entries in \(memorySections) memory sections" }
}

/// One control message (a `control` section, JSON with a `kind`).
public enum WireMessage: Sendable, Equatable {
    case challenge(version: Int, nonce: String, host: String)
    case manifest(MigrationManifest)
    /// The host and process that will own the guest after GO.
    case accept(host: String, pid: Int32)
    case refuse(reason: String)
    case ready(TransferCounts)
    /// The commit; in plaintext signed by the source host over the challenge and the counts.
    case go(TransferCounts, signature: Data?)
    /// When the destination resumed the guest (CLOCK_MONOTONIC ms; same host only), its
    /// announcement as it stood then (the schedule and the first round, sent before this
    /// reply; nil without a network card), and what it measured of the downtime on its own
    /// clock. An older destination sends neither of the last two.
    case running(resumedAt: Double, announce: AnnounceReport?, phases: DestinationPhases?)
    /// Post-copy, in the commit stream before GO: the pages the destination must not take from
    /// what it received (a bitmap, 64-bit little-endian words, one bit per guest page).
    case postcopy(missing: Data)
    /// The first message on a post-copy page channel: the main connection's challenge, which
    /// binds this second connection to that migration.
    case pageChannel(challenge: String)
    /// The first message on data channel `index` of `count`: the main connection's challenge,
    /// which binds this connection to that migration, as for the page channel.
    case dataChannel(challenge: String, index: Int, count: Int)
    /// Post-copy, destination to source on the page channel: send page `pfn` now.
    case pageRequest(pfn: UInt64)
    /// Post-copy, destination to source on the main connection: every page is in; the source
    /// may drop its copy.
    case complete(PostCopyFigures)
    /// Post-copy, on the page channel: the destination asks, the source answers at once. Keeps a
    /// quiet link proven alive, so that both sides notice a failed one within seconds.
    case heartbeat
    /// With data channels, on any of the migration's connections: the source is at round
    /// `round` (or between rounds); keeps a connection that has no page to carry proven alive.
    case roundMark(round: Int)
    /// Post-copy recovery, source to destination, first on the new main connection.
    case resume(PostCopyResume)
    /// Post-copy recovery, destination to source: the resume is accepted, and these are the
    /// pages it still lacks (a bitmap as in `postcopy`); the source sends exactly those.
    case stillMissing(missing: Data)
    /// Source to destination, among the pages just before the switch's pause: answer once every
    /// page before this is applied (these are the counts sent so far).
    case drain(TransferCounts)
    /// Destination to source, the answer to `drain`: the counts applied so far.
    case drained(TransferCounts)

    /// The message's kind, for errors.
    public var kind: String {
        switch self {
        case .challenge: "challenge"
        case .manifest: "manifest"
        case .accept: "accept"
        case .refuse: "refuse"
        case .ready: "ready"
        case .go: "go"
        case .running: "running"
        case .postcopy: "postcopy"
        case .pageChannel: "page-channel"
        case .dataChannel: "data-channel"
        case .pageRequest: "page-request"
        case .complete: "complete"
        case .heartbeat: "heartbeat"
        case .roundMark: "round-mark"
        case .resume: "resume"
        case .stillMissing: "still-missing"
        case .drain: "drain"
        case .drained: "drained"
        }
    }

    /// The bytes the source signs for GO in plaintext: the connection's challenge and the counts.
    public static func goPayload(challenge: String, counts: TransferCounts) -> [UInt8] {
        Array("swift-vmm.migration.go.v2:\(challenge):\(counts.pages):\(counts.memorySections)".utf8)
    }

    public func encoded() throws -> [UInt8] { try StateJSON.encode(Envelope(self)) }

    public static func decode(_ payload: [UInt8]) throws -> WireMessage {
        let envelope: Envelope
        do { envelope = try StateJSON.decode(Envelope.self, from: payload, what: "control message") } catch {
            throw MigrationError.protocolViolation("a control message is not valid: \(error)")
        }
        return try envelope.message()
    }

    /// The JSON form: a kind and the fields that kind uses.
    struct Envelope: Codable {
        var kind: String
        var version: Int?
        var nonce: String?
        var host: String?
        var pid: Int32?
        var manifest: MigrationManifest?
        var reason: String?
        var counts: TransferCounts?
        var signature: Data?
        var resumedAt: Double?
        var missingPages: Data?
        var pfn: UInt64?
        var figures: PostCopyFigures?
        var announce: AnnounceReport?
        var phases: DestinationPhases?
        var resume: PostCopyResume?
        var channel: Int?
        var channels: Int?
        var round: Int?

        init(kind: String) { self.kind = kind }

        init(_ message: WireMessage) {
            self.init(kind: message.kind)
            switch message {
            case let .challenge(version, nonce, host): self.version = version; self.nonce = nonce; self.host = host
            case let .manifest(m): manifest = m
            case let .accept(host, pid): self.host = host; self.pid = pid
            case let .refuse(reason): self.reason = reason
            case let .ready(counts): self.counts = counts
            case let .go(counts, signature): self.counts = counts; self.signature = signature
            case let .running(resumedAt, announce, phases):
                self.resumedAt = resumedAt; self.announce = announce; self.phases = phases
            case let .postcopy(missing): missingPages = missing
            case let .pageChannel(challenge): nonce = challenge
            case let .dataChannel(challenge, index, count): nonce = challenge; channel = index; channels = count
            case let .pageRequest(pfn): self.pfn = pfn
            case let .complete(figures): self.figures = figures
            case .heartbeat: break
            case let .roundMark(round): self.round = round
            case let .resume(r): resume = r
            case let .stillMissing(missing): missingPages = missing
            case let .drain(counts), let .drained(counts): self.counts = counts
            }
        }

        func message() throws -> WireMessage {
            func missing(_ field: String) -> MigrationError {
                .protocolViolation("a \(kind) message has no \(field)")
            }
            switch kind {
            case "challenge":
                guard let version else { throw missing("version") }
                guard let nonce else { throw missing("nonce") }
                guard let host else { throw missing("host") }
                return .challenge(version: version, nonce: nonce, host: host)
            case "manifest":
                guard let manifest else { throw missing("manifest") }
                return .manifest(manifest)
            case "accept":
                guard let host else { throw missing("host") }
                guard let pid else { throw missing("pid") }
                return .accept(host: host, pid: pid)
            case "refuse":
                return .refuse(reason: reason ?? "no reason given")
            case "ready":
                guard let counts else { throw missing("counts") }
                return .ready(counts)
            case "go":
                guard let counts else { throw missing("counts") }
                return .go(counts, signature: signature)
            case "running":
                guard let resumedAt else { throw missing("resumedAt") }
                return .running(resumedAt: resumedAt, announce: announce, phases: phases)
            case "postcopy":
                guard let missingPages else { throw missing("missingPages") }
                return .postcopy(missing: missingPages)
            case "page-channel":
                guard let nonce else { throw missing("nonce") }
                return .pageChannel(challenge: nonce)
            case "data-channel":
                guard let nonce else { throw missing("nonce") }
                guard let channel else { throw missing("channel") }
                guard let channels else { throw missing("channels") }
                return .dataChannel(challenge: nonce, index: channel, count: channels)
            case "page-request":
                guard let pfn else { throw missing("pfn") }
                return .pageRequest(pfn: pfn)
            case "complete":
                guard let figures else { throw missing("figures") }
                return .complete(figures)
            case "heartbeat":
                return .heartbeat
            case "round-mark":
                guard let round else { throw missing("round") }
                return .roundMark(round: round)
            case "resume":
                guard let resume else { throw missing("resume") }
                return .resume(resume)
            case "still-missing":
                guard let missingPages else { throw missing("missingPages") }
                return .stillMissing(missing: missingPages)
            case "drain":
                guard let counts else { throw missing("counts") }
                return .drain(counts)
            case "drained":
                guard let counts else { throw missing("counts") }
                return .drained(counts)
            default:
                throw MigrationError.protocolViolation("unknown control message kind '\(kind)'")
            }
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

