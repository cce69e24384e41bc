import Crypto
import Foundation
import GuestMemory
import PageFaults
import Snapshot
import SystemCalls

/// What the receiver needs of the VM it reserved; the VMM's admitted guest provides it.
public protocol MigrationDestinationVM: AnyObject, Sendable {
    var memory: GuestMemory { get }
    /// Applies the vCPU and device sections to the paused, not yet started VM.
    func applyState(vcpu: [UInt8], devices: [UInt8]) throws
    /// Checks the source's signature over the state stream (nil: the stream had none) before
    /// anything is applied; throws to refuse.
    func verifyState(signature: [UInt8]?, digest: [UInt8]) throws
    /// After the accept, while the pages arrive: makes ready what `startGuest` needs that does
    /// not depend on the state (the vCPU threads, waiting), so that the start on GO is short.
    /// Nothing may run yet.
    func prestartVCPUThreads()
    /// Starts the guest (after GO); throws if it may not run here after all (nothing started).
    func startGuest() throws
    /// As `startGuest`, and says when the lease was taken and when the vCPUs ran (CLOCK_MONOTONIC
    /// ms), for the report.
    func startGuestTimed() throws -> GuestStartTimes
    /// After READY, while the source hands the lease over and sends GO: the vCPU threads (made
    /// by `prestartVCPUThreads`) launched and parked with the state applied, so that the start
    /// after GO only releases them. No guest instruction may run before `startGuest`.
    func parkVCPUsForStart()
    /// Throws away the reserved VM (a failure before GO).
    func discard()
    /// The host and process that will own the guest (sent in the accept), if it has an owner record.
    var owner: (host: String, pid: Int32)? { get }
    /// Post-copy: the migration that fills this VM's missing pages from now on (its figures are
    /// the VM's; the VM tells it when it ends).
    func attachPostCopy(_ incoming: PostCopyIncoming)
    /// Post-copy: the link failed. Pause the guest without kicking or waiting for a vCPU asleep
    /// on a missing page (it stays asleep until its page comes); nothing else changes.
    func postCopyPaused(reason: String)
    /// Post-copy: the migration was recovered; resume the guest if `postCopyPaused` paused it.
    func postCopyResumed()
    /// Post-copy: the missing pages can no longer come. The guest must never run again: its
    /// vCPUs stay where they are and the machine ends with `reason`.
    func postCopyLost(reason: String)
    /// After `startGuest`: the guest's announcement so far, for the RUNNING reply (nil: the
    /// guest has no network card).
    var announceSoFar: AnnounceReport? { get }
    /// After `startGuest`: the moment (monotonic ms) the machine was started, when the VM knows
    /// it; the work `startGuest` does after that (the first announcement round) is then not
    /// counted as downtime.
    var resumedAt: Double? { get }
}

extension MigrationDestinationVM {
    public func prestartVCPUThreads() {}
    public var announceSoFar: AnnounceReport? { nil }
    public var resumedAt: Double? { nil }
    public func parkVCPUsForStart() {}
}

/// When a destination took the guest's lease and when its vCPUs ran (CLOCK_MONOTONIC ms).
public struct GuestStartTimes: Sendable, Equatable {
    public var leaseTaken: Double
    public var resumed: Double
    public init(leaseTaken: Double, resumed: Double) {
        self.leaseTaken = leaseTaken
        self.resumed = resumed
    }
}

extension MigrationDestinationVM {
    /// A VM that does not time its start: both moments are when `startGuest` returned.
    public func startGuestTimed() throws -> GuestStartTimes {
        try startGuest()
        let now = monotonicMilliseconds()
        return GuestStartTimes(leaseTaken: now, resumed: now)
    }
}

/// The destination side: challenge, admission, reservation, verified reception, READY, and
/// the resume on GO. Its states are drawn in Protocol.swift: challenge sent, admitting,
/// reserved (accept sent), receiving, verifying, ready (READY sent), committed (GO read, lease
/// taken, guest started, RUNNING sent). Any failure before `committed` discards the reserved
/// VM; the source keeps its guest.
public final class MigrationReceiver<VM: MigrationDestinationVM>: Sendable {
    /// What the VMM decides about a manifest whose challenge and hosts checked out: admit the
    /// guest and reserve its VM, or throw to refuse. `authenticatedSource` is the host the
    /// channel authenticated (nil on a plaintext channel, where `manifest.sourceHost` is a claim
    /// the stream's signature must later prove).
    public typealias Admit = @Sendable (_ manifest: MigrationManifest, _ authenticatedSource: String?) throws -> VM

    /// This host's name, sent with the challenge and expected in the manifest.
    let hostName: String
    let admit: Admit

    public init(hostName: String, admit: @escaping Admit) {
        self.hostName = hostName
        self.admit = admit
    }

    /// Figures the destination knows.
    public struct Result: Sendable {
        public var pages: Int
        public var zeroPages: Int
        /// Stream bytes received from the source (state stream and commit stream).
        public var bytes: UInt64
        public var resumedAt: Double
        /// The destination's share of the downtime (also sent to the source in RUNNING).
        public var phases: DestinationPhases?
        /// The host the guest came from.
        public var sourceHost: String
        /// Post-copy: the migration that goes on bringing the missing pages after this returned.
        public var incoming: PostCopyIncoming?
    }

    /// Receives one migration. Returns once the guest runs here; throws (with the
    /// reserved VM discarded) on any failure before GO.
    /// `onManifest` runs once the manifest arrived (a caller's deadline for it can stop).
    ///
    /// Post-copy (the manifest allows it): `acceptPageChannel` gives the next incoming connection,
    /// of which the one bound to this migration becomes the page channel (right after the
    /// accept, before any page: the source opens it then); if the source switched,
    /// the guest runs from GO and this returns then, while its missing pages go on arriving
    /// (`Result.incoming` owns `transport` from then on). If GO comes without a switch, pre-copy
    /// finished and the channel goes unused.
    public func run(transport: any MigrationTransport, onManifest: () -> Void = {},
                    acceptPageChannel: (() throws -> any MigrationTransport)? = nil,
                    postcopyOptions: PostCopyIncoming.Options = .init()) throws -> (vm: VM, result: Result) {
        let integrity = transport.streamIntegrity
        let authenticated = transport.authenticatedPeer
        var replies = try StreamWriter(sink: TransportSink(transport), integrity: integrity)
        func send(_ message: WireMessage) throws {
            try replies.writeSection(.control, payload: message.encoded())
            try replies.sink.flush()
        }
        func refuse(_ reason: String) { try? send(.refuse(reason: reason)) }

        // The challenge goes first: on TLS 1.3 the source learns only from it that this side
        // accepted its certificate, so it sends no guest byte before.
        let challenge = Data((0..<32).map { _ in UInt8.random(in: .min ... .max) }).base64EncodedString()
        try send(.challenge(version: migrationProtocolVersion, nonce: challenge, host: hostName))

        var reader = try StreamReader(source: TransportSource(transport), integrity: integrity)
        guard let first = try reader.nextSection(), first.type == .control,
              case let .manifest(manifest) = try WireMessage.decode(first.payload) else {
            throw MigrationError.protocolViolation("the stream does not start with a manifest")
        }
        onManifest()
        do {
            try check(manifest, challenge: challenge, authenticated: authenticated)
        } catch {
            refuse("\(error)")
            throw error
        }
        let vm: VM
        do { vm = try admit(manifest, authenticated) } catch {
            refuse("\(error)")
            throw error
        }
        var committed = false
        defer { if !committed { vm.discard() } }
        guard let owner = vm.owner else { throw MigrationError.refused("this destination has no owner record for the guest") }
        try send(.accept(host: owner.host, pid: owner.pid))
        // While the pages arrive (not in the downtime).
        vm.prestartVCPUThreads()

        // Data channels: the next connections bound to this migration, each read on a thread
        // of its own into guest memory while the main stream goes on here.
        var channels: IncomingDataChannels?
        if let count = manifest.channels, count > 1 {
            guard let acceptPageChannel else {
                refuse("this destination does not take data channels")
                throw MigrationError.refused("data channels asked of a receiver that cannot accept them")
            }
            do {
                let lanes = try IncomingDataChannels.accept(count: count, acceptPageChannel, challenge: challenge, mainPeer: authenticated,
                                                            owner: owner)
                channels = IncomingDataChannels(lanes, memory: vm.memory, main: transport)
            } catch {
                refuse("\(error)")
                throw error
            }
        }
        defer { if !committed { channels?.close() } }

        // Post-copy allowed: the page channel opens now, while the guest still runs at the
        // source, so that its handshake is not part of the downtime.
        var pageChannel: (transport: any MigrationTransport, reader: StreamReader<TransportSource>, writer: StreamWriter<TransportSink>)?
        if manifest.postcopy == true {
            guard let acceptPageChannel else {
                refuse("this destination does not take post-copy migrations")
                throw MigrationError.refused("post-copy asked of a receiver without a page channel")
            }
            do {
                pageChannel = try PageChannelDoor.accept(acceptPageChannel, challenge: challenge, mainPeer: authenticated, owner: owner)
            } catch {
                refuse("no page channel: \(error)")
                throw error
            }
        }
        defer { if !committed { pageChannel?.transport.close() } }

        // Pre-copy rounds and stop-and-copy: the same section sequence a snapshot file holds
        // (with data channels, round marks on the main stream and no memory there).
        var body: StateBody
        var tallies: [IncomingDataChannels.Tally] = []
        do {
            body = try StateSequence.readBody(from: &reader, into: vm.memory) { payload, pages, sections in
                switch try WireMessage.decode(payload) {
                case .roundMark where channels != nil:
                    break
                case let .drain(sent) where channels == nil:
                    // A drain: the source pauses once everything it sent is applied, so that
                    // nothing still in flight is read inside the downtime.
                    let applied = TransferCounts(pages: pages, memorySections: sections)
                    guard sent == applied else {
                        throw MigrationError.protocolViolation("the source sent \(sent) before its drain but \(applied) arrived")
                    }
                    try send(.drained(applied))
                default:
                    throw MigrationError.protocolViolation(channels == nil
                        ? "only a drain may come among the pages"
                        : "only round marks may come between the pages of a migration with data channels")
                }
            }
            // Every channel's pages applied before READY: the counts cover them all.
            tallies = try channels?.wait() ?? []
        } catch {
            // A failed channel closed this connection: its failure is the cause.
            if let failure = channels?.failure { throw MigrationError.connection(failure) }
            throw error
        }
        for tally in tallies {
            body.pages += tally.pages
            body.zeroPages += tally.zeroPages
            body.memorySections += tally.memorySections
        }
        let bodyRead = monotonicMilliseconds()
        if authenticated == nil {
            // Plaintext: the source host's signature over every byte, the manifest and its
            // challenge included, stands in for the channel's authentication; on each data
            // channel over every byte of it, its opening with the challenge included.
            do {
                try vm.verifyState(signature: body.signature, digest: body.signedDigest)
                for tally in tallies { try vm.verifyState(signature: tally.signature, digest: tally.signedDigest) }
            } catch {
                refuse("the state stream is not signed by the host it claims to come from: \(error)")
                throw error
            }
        }
        // Everything verified; apply it to the paused VM.
        do { try vm.applyState(vcpu: body.vcpus, devices: body.devices) } catch {
            refuse("the state does not apply here: \(error)")
            throw error
        }
        let received = TransferCounts(pages: body.pages, memorySections: body.memorySections)
        try send(.ready(received))
        var phases = DestinationPhases(apply: monotonicMilliseconds() - bodyRead, bootID: kernelBootID)
        // While READY travels and the source commits its lease: off the path from GO to the resume.
        vm.parkVCPUsForStart()

        var commit = try StreamReader(source: TransportSource(transport), integrity: integrity)
        guard var goSection = try commit.nextSection(), goSection.type == .control else {
            throw MigrationError.protocolViolation("expected GO")
        }
        var missing: [UInt64]?
        if case var .postcopy(slice) = try WireMessage.decode(goSection.payload) {
            // The bitmap in slices (MissingPagesSlices), then GO.
            var slices = MissingPagesSlices.Assembler(pageCount: vm.memory.pageCount)
            var bitmap = try slices.add(slice)
            while bitmap == nil {
                guard let next = try commit.nextSection(), next.type == .control,
                      case let .postcopy(more) = try WireMessage.decode(next.payload) else {
                    throw MigrationError.protocolViolation("the post-copy bitmap ended after \(slices.bytes.count) of \(slices.expected) bytes")
                }
                slice = more
                bitmap = try slices.add(slice)
            }
            guard pageChannel != nil, let bitmap, let words = missingPages(fromWire: bitmap, pageCount: vm.memory.pageCount) else {
                throw MigrationError.protocolViolation("a post-copy switch without a page channel, or with a bitmap that is not this memory's")
            }
            missing = words
            guard let next = try commit.nextSection(), next.type == .control else {
                throw MigrationError.protocolViolation("expected GO after the post-copy switch")
            }
            goSection = next
        }
        guard case let .go(sent, signature) = try WireMessage.decode(goSection.payload) else {
            throw MigrationError.protocolViolation("expected GO")
        }
        let goRead = monotonicMilliseconds()
        guard sent == received else {
            throw MigrationError.protocolViolation("the source sent \(sent) but \(received) arrived")
        }
        if authenticated == nil {
            let digest = sha256(WireMessage.goPayload(challenge: challenge, counts: sent))
            try vm.verifyState(signature: signature.map(Array.init), digest: digest)
        }
        guard let end = try commit.nextSection(), end.type == .end else {
            throw MigrationError.protocolViolation("GO was not followed by the end of its stream")
        }
        if missing == nil {
            // Post-copy was allowed but pre-copy finished first: the page channel carries nothing.
            pageChannel?.transport.close()
        }
        var incoming: PostCopyIncoming?
        if let missing, let channel = pageChannel {
            let binding = PostCopyIncoming.Binding(challenge: challenge, sourceHost: authenticated ?? manifest.sourceHost,
                                                   authenticated: authenticated != nil, destinationHost: hostName,
                                                   guest: manifest.guest, ownerHost: owner.host, ownerPid: owner.pid)
            let made = try PostCopyIncoming(vm: vm, missing: missing, binding: binding, integrity: integrity,
                                            options: postcopyOptions, pageChannel: channel)
            vm.attachPostCopy(made)
            incoming = made
        }
        let prepared = monotonicMilliseconds()
        if incoming != nil { phases.postcopySetup = prepared - goRead }
        let started: GuestStartTimes
        do { started = try vm.startGuestTimed() } catch {
            incoming?.abandonBeforeStart()
            throw error
        }
        committed = true
        let resumedAt = started.resumed
        phases.lease = max(0, started.leaseTaken - (incoming != nil ? prepared : goRead))
        phases.start = max(0, started.resumed - started.leaseTaken)
        // The guest runs here now, whatever happens to this reply.
        try? replies.writeSection(.control, payload: WireMessage.running(resumedAt: resumedAt, announce: vm.announceSoFar,
                                                                         phases: phases).encoded())
        if incoming == nil { try? replies.finish() }
        try? replies.sink.flush()
        var result = Result(pages: body.pages, zeroPages: body.zeroPages,
                            bytes: reader.offset + commit.offset + tallies.reduce(0) { $0 + $1.bytes },
                            resumedAt: resumedAt, phases: phases, sourceHost: authenticated ?? manifest.sourceHost)
        if let incoming {
            // COMPLETE goes on the same reply stream, once every page is in.
            incoming.start(main: transport, replies: replies)
            result.incoming = incoming
        }
        return (vm, result)
    }

    /// The manifest must answer this connection's challenge, name this host, and (on an
    /// authenticated channel) come from the host the channel authenticated.
    func check(_ manifest: MigrationManifest, challenge: String, authenticated: String?) throws {
        guard manifest.version == migrationProtocolVersion else {
            throw MigrationError.refused("protocol version \(manifest.version) is not supported (this VMM speaks \(migrationProtocolVersion))")
        }
        if let channels = manifest.channels, !(1...maxMigrationChannels).contains(channels) {
            throw MigrationError.refused("the source asks for \(channels) data channels; this destination takes 1 to \(maxMigrationChannels)")
        }
        if let channels = manifest.channels, channels > 1, manifest.postcopy == true {
            throw MigrationError.refused("post-copy with data channels is not supported: migrate with one channel")
        }
        guard sameBytes(manifest.challenge, challenge) else {
            throw MigrationError.refused("the manifest does not answer this connection's challenge (a replayed or forwarded migration)")
        }
        guard sameBytes(manifest.destinationHost, hostName) else {
            throw MigrationError.refused("the manifest is for host '\(manifest.destinationHost)', not this host ('\(hostName)')")
        }
        if let authenticated, !sameBytes(manifest.sourceHost, authenticated) {
            throw MigrationError.refused("the manifest claims to come from '\(manifest.sourceHost)' but the channel authenticated '\(authenticated)'")
        }
    }
}

/// SHA-256 of `bytes` (what a plaintext GO's signature signs).
func sha256(_ bytes: [UInt8]) -> [UInt8] { Array(SHA256.hash(data: bytes)) }
