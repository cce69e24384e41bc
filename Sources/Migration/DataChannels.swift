import Foundation
import GuestMemory
import Snapshot
import Synchronization
import SystemCalls

// Data channels (`channels` > 1): the memory sections of every round travel on N more
// connections, opened like the post-copy page channel (the migration's `connect`, the same
// authentication and expected peer) and bound to the session by the main connection's
// challenge; the main connection keeps the manifest, the vCPU and device state and the
// hand-over. Each channel is a stream of its own: header, control{data-channel}, memory
// sections and round marks, [signature], end; in plaintext each carries what the main stream
// carries (checksums, digest, and the source host's signature over it, the challenge included).
//
// A page always travels on the same channel (stripes of `stripePages` by page frame number), so
// the versions of one page arrive in the order they were sent, on one connection, and the
// destination applies each channel's sections as they come, on that channel's thread: no page
// can be overwritten by an older copy from another channel. A round ends at the source when
// every channel has sent its part (the next dirty set is collected only then); the destination
// says READY only once every channel reached its end.

/// Pages per stripe: a page's channel is `(pfn / stripePages) % count`. One memory section's
/// worth, so that a stripe's pages go in whole sections.
let dataChannelStripePages: UInt64 = 512

/// How often an idle connection of a migration with data channels says it is alive (a round
/// mark): the main connection carries no page while the channels work, and a channel may have
/// nothing to send for a while; the transports give a link up after 30 s of silence.
let dataChannelMarkSeconds = 5.0

/// Which channel carries page `pfn`.
func dataChannel(ofPage pfn: UInt64, count: Int) -> Int { Int((pfn / dataChannelStripePages) % UInt64(count)) }

/// The source's data channels, each with a thread of its own that reads, classifies (zero pages)
/// and sends (encrypts, on TLS) its part of each round.
final class DataChannels: @unchecked Sendable {
    /// One channel. `writer` and `tally` belong to its thread while a job runs, to the caller
    /// between jobs (after `run` returned).
    final class Lane: @unchecked Sendable {
        let index: Int
        let transport: any MigrationTransport
        var writer: StreamWriter<TransportSink>
        /// What the last job sent: pages given, page entries, zero pages, sections.
        var tally = (sent: 0, pages: 0, zeroPages: 0, counts: TransferCounts(pages: 0, memorySections: 0))
        /// The last failure, and the bytes written, kept apart from `writer`: an idle mark may
        /// be written on the lane's thread while the caller reads them.
        private let shared = Mutex<(error: MigrationError?, bytes: UInt64)>((nil, 0))
        var error: MigrationError? {
            get { shared.withLock { $0.error } }
            set { shared.withLock { $0.error = newValue } }
        }
        /// A failure on this lane, named by it unless it is the migration's own (a cancel, the time limit).
        private func fail(_ error: any Error) {
            switch error as? MigrationError {
            case .aborted?, .notConverged?: self.error = error as? MigrationError
            default: self.error = .connection("data channel \(index): \(error)")
            }
        }
        var bytesWritten: UInt64 { shared.withLock { $0.bytes } }
        private func noteWritten() {
            let bytes = writer.bytesWritten
            shared.withLock { $0.bytes = bytes }
        }
        private let work = DispatchSemaphore(value: 0)
        let done = DispatchSemaphore(value: 0)
        private let job = Mutex<(body: (@Sendable (Lane) throws -> Void)?, stop: Bool)>((nil, false))
        /// Set by the lane's thread once its stream is finished: no mark may follow.
        private var finished = false

        init(index: Int, transport: any MigrationTransport, writer: StreamWriter<TransportSink>) {
            self.index = index
            self.transport = transport
            self.writer = writer
            startNamedThread("migrate-chan\(index)") { [self] in loop() }
        }

        private func loop() {
            var round = 0
            while true {
                if work.wait(timeout: .now() + dataChannelMarkSeconds) == .timedOut {
                    // Idle: a mark keeps the link proven alive while other channels work.
                    if !finished && error == nil {
                        do {
                            try writer.writeSection(.control, payload: WireMessage.roundMark(round: round).encoded())
                            try writer.sink.flush()
                        } catch { fail(error) }
                        noteWritten()
                    }
                    continue
                }
                let (body, stop) = job.withLock { j in defer { j.body = nil }; return (j.body, j.stop) }
                if stop { done.signal(); return }
                if let body {
                    do { try body(self) } catch { fail(error) }
                    noteWritten()
                    round += 1
                }
                done.signal()
            }
        }

        /// Runs `body` on the lane's thread; `done` is signalled when it returned.
        func start(_ body: @escaping @Sendable (Lane) throws -> Void) {
            job.withLock { $0.body = body }
            work.signal()
        }

        /// Ends the stream (on the lane's thread): `sign` makes the signature over it (plaintext).
        func finishStream(sign: @escaping @Sendable ([UInt8]) throws -> [UInt8]?) {
            start { lane in
                if let signature = try sign(lane.writer.digestSoFar) {
                    try lane.writer.writeSection(.signature, payload: signature)
                }
                try lane.writer.finish()
                try lane.writer.sink.flush()
                lane.finished = true
            }
        }

        /// Ends the thread; waits for it.
        func stop() {
            job.withLock { $0.stop = true }
            work.signal()
            done.wait()
        }
    }

    let lanes: [Lane]
    var count: Int { lanes.count }
    private let stopped = Mutex(false)

    private init(lanes: [Lane]) { self.lanes = lanes }

    /// Opens `count` channels one after the other: each must reach the main connection's peer,
    /// open with the challenge and its index, and be accepted.
    static func open(count: Int, connect: () throws -> any MigrationTransport, challenge: String, mainPeer: String?) throws -> DataChannels {
        var lanes: [Lane] = []
        do {
            for index in 0..<count {
                let transport = try connect()
                do {
                    guard transport.authenticatedPeer == mainPeer else {
                        throw MigrationError.refused("data channel \(index) reached '\(transport.authenticatedPeer ?? "an unauthenticated peer")', not the destination of this migration")
                    }
                    let integrity = transport.streamIntegrity
                    var writer = try StreamWriter(sink: TransportSink(transport), integrity: integrity)
                    try writer.writeSection(.control, payload: WireMessage.dataChannel(challenge: challenge, index: index, count: count).encoded())
                    try writer.sink.flush()
                    var reader = try StreamReader(source: TransportSource(transport), integrity: integrity)
                    guard let section = try reader.nextSection(), section.type == .control else {
                        throw MigrationError.protocolViolation("the destination did not answer data channel \(index)")
                    }
                    switch try WireMessage.decode(section.payload) {
                    case .accept: break
                    case let .refuse(reason): throw MigrationError.refused("data channel \(index): \(reason)")
                    case let other: throw MigrationError.protocolViolation("expected accept on data channel \(index), got \(other.kind)")
                    }
                    lanes.append(Lane(index: index, transport: transport, writer: writer))
                } catch {
                    transport.close()
                    // A refusal names its channel already; a closed or failed link does not.
                    if case MigrationError.refused = error { throw error }
                    throw MigrationError.connection("data channel \(index): \(error)")
                }
            }
        } catch {
            let partial = DataChannels(lanes: lanes)
            partial.close()
            throw MigrationError.connection("opening the data channels: \(error)")
        }
        return DataChannels(lanes: lanes)
    }

    /// `bitmap` split by channel: each page in the part of the channel that always carries it.
    func split(_ bitmap: DirtyBitmap) -> [DirtyBitmap] {
        var parts = [DirtyBitmap](repeating: DirtyBitmap(pageCount: bitmap.pageCount), count: count)
        let wordsPerStripe = Int(dataChannelStripePages / 64)
        for (index, word) in bitmap.words.enumerated() where word != 0 {
            parts[(index / wordsPerStripe) % count].merge(word: word, at: index)
        }
        return parts
    }

    /// Runs `body` on every channel's thread at once and returns when all are done: the round's
    /// barrier. `waiting` runs every `dataChannelMarkSeconds` meanwhile (a mark on the main
    /// connection). The first failure closes every channel, so that none waits on a dead link,
    /// and is thrown once all returned.
    func run(_ body: @escaping @Sendable (Lane) throws -> Void, waiting: () throws -> Void) throws {
        for lane in lanes {
            lane.error = nil
            lane.start(body)
        }
        var failure: (any Error)?
        for lane in lanes {
            while lane.done.wait(timeout: .now() + dataChannelMarkSeconds) == .timedOut {
                if failure == nil {
                    do { try waiting() } catch { failure = error; closeTransports() }
                }
            }
            if let error = lane.error, failure == nil {
                failure = error
                closeTransports()
            }
        }
        if let failure { throw failure }
    }

    /// Ends every channel's stream (signed in plaintext), all at once.
    func finish(sign: @escaping @Sendable ([UInt8]) throws -> [UInt8]?, waiting: () throws -> Void) throws {
        for lane in lanes { lane.error = nil }
        for lane in lanes { lane.finishStream(sign: sign) }
        var failure: (any Error)?
        for lane in lanes {
            while lane.done.wait(timeout: .now() + dataChannelMarkSeconds) == .timedOut {
                if failure == nil { do { try waiting() } catch { failure = error } }
            }
            if let error = lane.error, failure == nil {
                failure = error
                closeTransports()
            }
        }
        if let failure { throw failure }
    }

    /// Bytes written on all channels.
    var bytesWritten: UInt64 { lanes.reduce(0) { $0 + $1.bytesWritten } }

    /// Closes every connection (a blocked send fails at once).
    func closeTransports() { for lane in lanes { lane.transport.close() } }

    /// Closes the connections and ends the threads (once).
    func close() {
        let first = stopped.withLock { s in defer { s = true }; return !s }
        guard first else { return }
        closeTransports()
        for lane in lanes { lane.stop() }
    }
}

/// The destination's data channels: accepted (bound to the session), then read on a thread
/// each, every memory section applied to guest memory as it arrives.
final class IncomingDataChannels: Sendable {
    /// What one channel brought.
    struct Tally: Sendable {
        var pages = 0, zeroPages = 0, memorySections = 0
        var bytes: UInt64 = 0
        var signature: [UInt8]?
        var signedDigest: [UInt8] = []
    }
    typealias Accepted = (transport: any MigrationTransport, reader: StreamReader<TransportSource>)

    private let transports: [any MigrationTransport]
    private let main: any MigrationTransport
    private let state = Mutex<(tallies: [Int: Tally], failure: String?)>(([:], nil))
    private let done: [DispatchSemaphore]
    /// Set once every reading thread was waited for (their semaphores are spent).
    private let joined = Mutex(false)

    /// Accepts `count` data channels: the next connections whose peer is the main connection's
    /// and whose first message answers `challenge` with an index not yet taken. Others get a
    /// refusal and are closed; `accept` throws once its deadline passes.
    static func accept(count: Int, _ accept: () throws -> any MigrationTransport, challenge: String, mainPeer: String?,
                       owner: (host: String, pid: Int32), log: (String) -> Void = { _ in }) throws -> [Accepted] {
        var lanes = [Accepted?](repeating: nil, count: count)
        do {
            while lanes.contains(where: { $0 == nil }) {
                let transport = try accept()
                do {
                    guard transport.authenticatedPeer == mainPeer else {
                        throw MigrationError.refused("a data channel must come from the migration's source ('\(mainPeer ?? "unauthenticated")'), not '\(transport.authenticatedPeer ?? "unauthenticated")'")
                    }
                    var reader = try StreamReader(source: TransportSource(transport), integrity: transport.streamIntegrity)
                    guard let first = try reader.nextSection(), first.type == .control,
                          case let .dataChannel(answer, index, of) = try WireMessage.decode(first.payload) else {
                        throw MigrationError.protocolViolation("a data channel must open with its challenge")
                    }
                    var writer = try StreamWriter(sink: TransportSink(transport), integrity: transport.streamIntegrity)
                    func refuse(_ reason: String) throws -> Never {
                        try? writer.writeSection(.control, payload: WireMessage.refuse(reason: reason).encoded())
                        try? writer.sink.flush()
                        throw MigrationError.refused(reason)
                    }
                    guard sameBytes(answer, challenge) else { try refuse("a data channel answered another challenge than this migration's") }
                    guard of == count, (0..<count).contains(index), lanes[index] == nil else {
                        try refuse("data channel \(index) of \(of) does not fit this migration's \(count) channels")
                    }
                    try writer.writeSection(.control, payload: WireMessage.accept(host: owner.host, pid: owner.pid).encoded())
                    try writer.sink.flush()
                    lanes[index] = (transport, reader)
                } catch {
                    log("refused a data channel: \(error)")
                    transport.close()
                }
            }
        } catch {
            for lane in lanes { lane?.transport.close() }
            throw MigrationError.connection("waiting for the data channels (\(lanes.filter { $0 != nil }.count) of \(count) came): \(error)")
        }
        return lanes.map { $0! }
    }

    /// Starts reading `lanes` into `memory`. A failed channel closes the main connection and
    /// every channel, so that the migration fails at once everywhere.
    init(_ lanes: [Accepted], memory: GuestMemory, main: any MigrationTransport) {
        transports = lanes.map(\.transport)
        self.main = main
        done = lanes.map { _ in DispatchSemaphore(value: 0) }
        let count = lanes.count
        for (index, lane) in lanes.enumerated() {
            let box = ReaderBox(lane.reader)
            startNamedThread("receive-chan\(index)") { [self] in
                do {
                    let tally = try Self.read(&box.reader, into: memory, channel: index, count: count)
                    state.withLock { $0.tallies[index] = tally }
                } catch {
                    let first = state.withLock { s in
                        defer { if s.failure == nil { s.failure = "data channel \(index): \(error)" } }
                        return s.failure == nil
                    }
                    if first { closeAll() }
                }
                done[index].signal()
            }
        }
    }

    /// One channel's stream after its opening: memory sections and round marks, [signature], end.
    private static func read(_ reader: inout StreamReader<TransportSource>, into memory: GuestMemory, channel: Int, count: Int) throws -> Tally {
        var tally = Tally()
        // The order of a page's versions holds only if it always comes on its own channel.
        func checkOwnChannel(_ pfn: UInt64) throws {
            let own = dataChannel(ofPage: pfn, count: count)
            if own != channel {
                throw MigrationError.protocolViolation("page frame \(pfn) came on data channel \(channel), not on its own (\(own))")
            }
        }
        while true {
            // Over TLS a memory section's pages go straight into guest memory once its table
            // passed every check, its channel included; after a signature, read whole (refused).
            let item = tally.signature == nil
                ? try reader.nextSection(applyingMemoryTo: memory, checkFrame: checkOwnChannel)
                : try reader.nextSection().map { .section($0) }
            let section: Section
            switch item {
            case nil:
                throw SnapshotFormatError.sectionOrder("data channel \(channel) has no end section")
            case let .appliedMemory(pages, zeroPages, _):
                tally.pages += pages
                tally.zeroPages += zeroPages
                tally.memorySections += 1
                continue
            case let .section(read):
                section = read
            }
            if tally.signature != nil && section.type != .end {
                throw SnapshotFormatError.sectionOrder("a \(section.type) section follows the signature of data channel \(channel)")
            }
            switch section.type {
            case .memory:
                // A checksummed (plaintext) channel: the section was read whole and verified.
                if let stray = strayPage(in: section.payload, channel: channel, count: count) { try checkOwnChannel(stray) }
                let applied = try MemorySection.apply(section, to: memory)
                tally.pages += applied.pages
                tally.zeroPages += applied.zeroPages
                tally.memorySections += 1
            case .control:
                guard case .roundMark = try WireMessage.decode(section.payload) else {
                    throw MigrationError.protocolViolation("data channel \(channel) carries memory and round marks only")
                }
            case .signature:
                tally.signature = section.payload
                tally.signedDigest = reader.digestBeforeLastSection
            case .end:
                tally.bytes = reader.offset
                return tally
            default:
                throw SnapshotFormatError.sectionOrder("a \(section.type) section on data channel \(channel)")
            }
        }
    }

    /// The first page of a memory section's table that belongs to another channel (the rest of
    /// the section's checks are `MemorySection.apply`'s).
    private static func strayPage(in payload: [UInt8], channel: Int, count: Int) -> UInt64? {
        payload.withUnsafeBytes { raw -> UInt64? in
            guard raw.count >= 8 else { return nil }
            let entries = Int(UInt32(littleEndian: raw.loadUnaligned(as: UInt32.self)))
            guard raw.count >= 8 + 8 * entries else { return nil }
            for i in 0..<entries {
                let pfn = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 + 8 * i, as: UInt64.self)) & MemorySection.pageFrameMask
                if dataChannel(ofPage: pfn, count: count) != channel { return pfn }
            }
            return nil
        }
    }

    /// Why a channel failed, if one did.
    var failure: String? { state.withLock { $0.failure } }

    /// Waits until every channel reached its end; their tallies in channel order, or the first failure.
    func wait() throws -> [Tally] {
        join()
        let (tallies, failure) = state.withLock { ($0.tallies, $0.failure) }
        if let failure { throw MigrationError.connection(failure) }
        return (0..<done.count).map { tallies[$0]! }
    }

    private func closeAll() {
        main.close()
        for transport in transports { transport.close() }
    }

    private func join() {
        let first = joined.withLock { j in defer { j = true }; return !j }
        if first { for semaphore in done { semaphore.wait() } }
    }

    /// Closes every channel (a failure elsewhere) and waits for the reading threads to end, so
    /// that none writes into guest memory after the VM is discarded.
    func close() {
        for transport in transports { transport.close() }
        join()
    }
}

/// Hands a channel's reader to the thread that reads it.
// @unchecked: after `init` only that one thread touches `reader`.
private final class ReaderBox: @unchecked Sendable {
    var reader: StreamReader<TransportSource>
    init(_ reader: StreamReader<TransportSource>) { self.reader = reader }
}
