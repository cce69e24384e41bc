import Foundation
import GuestMemory
import PageFaults
import Snapshot
import Synchronization
import SystemCalls

/// The destination's side of post-copy: the pages it lacks at the switch come from the source,
/// asked for on the page channel when a fault needs one (this is the fault server's
/// `PageSource`), or pushed in order on the main connection (`offerPushed`). Each is installed
/// with `UFFDIO_COPY` by the fault server, never written into guest memory directly.
///
/// One unit per missing page. A page that is not missing was received in pre-copy and is
/// present, or was never sent because it is zero at the source (and not dirtied since, or it
/// would be missing): a fault on it gets a zero page.
///
/// The page channel can fail and be replaced (a recovery): each connection has a generation.
/// While there is none, or once it failed, `fetch` throws `PageSourceUnavailable` (the fault
/// waits) and the failure is reported once, with its generation, through `onBroken`.
final class PostCopyPageSource: PageSource {
    /// The missing page frames, in increasing order: unit `i` is `frames[i]`.
    let frames: [UInt64]
    let memorySize: UInt64
    private let channel: ChannelLock
    /// Hears every answer on the page channel (replies and heartbeats), with the push: whether
    /// the source is alive.
    let clock: LinkClock
    /// Hears the page channel alone: the source hears only this channel from here, so a
    /// heartbeat is due whenever it was quiet, however busy the push is.
    let channelClock = LinkClock()
    /// A page channel failed (its generation, why). Set once, before the first fetch.
    private let broken = Mutex<(@Sendable (Int, String) -> Void)?>(nil)
    /// The current connection's transport, to close it while a fetch holds the lock.
    private let current = Mutex<(transport: any MigrationTransport, generation: Int)?>(nil)

    /// Serialises the request/reply pairs on the page channel.
    // @unchecked: `connection` (and the streams in it) are used only under `lock`.
    private final class ChannelLock: @unchecked Sendable {
        let lock = NSLock()
        var connection: Connection?
    }

    struct Connection {
        let transport: any MigrationTransport
        var reader: StreamReader<TransportSource>
        var writer: StreamWriter<TransportSink>
        let generation: Int
    }

    init(missing: [UInt64], memorySize: UInt64, clock: LinkClock) {
        var frames: [UInt64] = []
        for (index, word) in missing.enumerated() where word != 0 {
            var w = word
            while w != 0 {
                frames.append(UInt64(index) * 64 + UInt64(w.trailingZeroBitCount))
                w &= w - 1
            }
        }
        self.frames = frames
        self.memorySize = memorySize
        self.clock = clock
        channel = ChannelLock()
    }

    func onBroken(_ body: @escaping @Sendable (Int, String) -> Void) { broken.withLock { $0 = body } }

    /// Takes `connection` as the page channel (the first, or one a recovery opened).
    func connect(_ connection: Connection) {
        current.withLock { $0 = (connection.transport, connection.generation) }
        channel.lock.lock(); defer { channel.lock.unlock() }
        channel.connection = connection
        clock.heard()
        channelClock.heard()
    }

    /// Drops the page channel (the link failed, or every page is in): a fetch blocked on it fails
    /// at once, and later ones throw `PageSourceUnavailable` until `connect`.
    func disconnect() {
        let transport = current.withLock { c in defer { c = nil }; return c?.transport }
        transport?.close()
        channel.lock.lock(); defer { channel.lock.unlock() }
        channel.connection = nil
    }

    var unitCount: Int { frames.count }

    func unit(containing pfn: UInt64) -> Int? {
        var low = 0, high = frames.count
        while low < high {
            let mid = (low + high) / 2
            if frames[mid] < pfn { low = mid + 1 } else { high = mid }
        }
        return low < frames.count && frames[low] == pfn ? low : nil
    }

    /// Asks the source for the unit's page and waits for it. Any failure of the page channel
    /// (the link cut, the connection closed, a source that breaks the protocol) makes the page
    /// unavailable, not failed: nothing of a bad answer is installed, and the page may still
    /// come after a recovery.
    func fetch(unit: Int) throws -> PageBatch {
        let pfn = frames[unit]
        return try exchange(.pageRequest(pfn: pfn), what: "page \(pfn)") { section in
            switch section.type {
            case .memory:
                let batch = try Self.batches(fromSection: section.payload, offset: section.offset, memorySize: memorySize)
                guard batch.count == 1, batch[0].pfn == pfn else {
                    throw MigrationError.protocolViolation("the source answered the request for page \(pfn) with other pages")
                }
                return batch[0].batch
            case .control:
                if case let .refuse(reason) = try WireMessage.decode(section.payload) {
                    throw MigrationError.refused("page \(pfn): \(reason)")
                }
                throw MigrationError.protocolViolation("the page channel answered with a control message, not page \(pfn)")
            default:
                throw MigrationError.protocolViolation("the page channel answered with a \(section.type) section")
            }
        }
    }

    /// A heartbeat: asks, and waits for the source's answer (under the same lock as the pages, so
    /// it never comes between a request and its page).
    func heartbeat() throws {
        try exchange(.heartbeat, what: "a heartbeat") { section in
            guard section.type == .control, case .heartbeat = try WireMessage.decode(section.payload) else {
                throw MigrationError.protocolViolation("the source answered a heartbeat with something else")
            }
        }
    }

    private func exchange<T>(_ message: WireMessage, what: String, _ answer: (Section) throws -> T) throws -> T {
        let outcome: Result<T, any Error>
        var failed: (generation: Int, reason: String)?
        do {
            channel.lock.lock(); defer { channel.lock.unlock() }
            guard var connection = channel.connection else {
                throw PageSourceUnavailable(reason: "\(what) cannot be asked for: the link to the source is down")
            }
            do {
                try connection.writer.writeSection(.control, payload: message.encoded())
                try connection.writer.sink.flush()
                guard let section = try connection.reader.nextSection() else {
                    throw MigrationError.connection("the source ended the page channel")
                }
                clock.heard()
                channelClock.heard()
                let value = try answer(section)
                channel.connection = connection
                outcome = .success(value)
            } catch {
                channel.connection = nil
                connection.transport.close()
                let reason = "the page channel failed while asking for \(what): \(error)"
                failed = (connection.generation, reason)
                outcome = .failure(PageSourceUnavailable(reason: reason))
            }
        }
        // Told outside the lock: the owner drops the channel in return.
        if let failed { broken.withLock { $0 }?(failed.generation, failed.reason) }
        return try outcome.get()
    }

    /// The pages of a memory section from the source, each as a one-page batch: the section
    /// decoder checks its structure and that every page lies inside guest memory, so a hostile
    /// section is refused before anything of it is installed.
    static func batches(fromSection payload: [UInt8], offset: UInt64?, memorySize: UInt64) throws -> [(pfn: UInt64, batch: PageBatch)] {
        let pages = try MemorySection.decode(payload, memorySize: memorySize, sectionOffset: offset)
        let size = Int(GuestMemory.pageSize)
        return pages.map { page in
            if let at = page.dataOffset {
                var batch = PageBatch(bytes: Array(payload[at..<at + size]))
                batch.appendData(page: page.pfn, offset: 0)
                return (page.pfn, batch)
            }
            var batch = PageBatch(bytes: [])
            batch.appendZero(page: page.pfn)
            return (page.pfn, batch)
        }
    }

    /// Installs the pages of one pushed section. Throws for a page that is not missing here
    /// (the source pushes only those) or lies outside guest memory.
    func offerPushed(_ section: Section, to server: FaultServer) throws {
        for (pfn, batch) in try Self.batches(fromSection: section.payload, offset: section.offset, memorySize: memorySize) {
            guard let unit = unit(containing: pfn) else {
                throw MigrationError.protocolViolation("the source pushed page \(pfn), which is not missing here")
            }
            server.offer(unit: unit, batch: batch)
        }
    }
}

enum PageChannelDoor {
    /// Accepts the post-copy page channel: the next connection whose peer is the main
    /// connection's and whose first message answers this migration's challenge (or, after a
    /// recovery, the recovery connection's). Others are closed and the next awaited (`accept`
    /// throws once its deadline passes).
    static func accept(_ accept: () throws -> any MigrationTransport, challenge: String, mainPeer: String?,
                           owner: (host: String, pid: Int32)) throws
        -> (transport: any MigrationTransport, reader: StreamReader<TransportSource>, writer: StreamWriter<TransportSink>) {
        while true {
            let transport = try accept()
            do {
                guard transport.authenticatedPeer == mainPeer else {
                    throw MigrationError.refused("a page channel must come from the migration's source ('\(mainPeer ?? "unauthenticated")')")
                }
                var reader = try StreamReader(source: TransportSource(transport), integrity: transport.streamIntegrity)
                guard let first = try reader.nextSection(), first.type == .control,
                      case let .pageChannel(answer) = try WireMessage.decode(first.payload) else {
                    throw MigrationError.protocolViolation("a page channel must open with its challenge")
                }
                var writer = try StreamWriter(sink: TransportSink(transport), integrity: transport.streamIntegrity)
                guard sameBytes(answer, challenge) else {
                    try? writer.writeSection(.control, payload: WireMessage.refuse(reason: "not this migration's challenge").encoded())
                    try? writer.sink.flush()
                    throw MigrationError.refused("a page channel answered another challenge")
                }
                try writer.writeSection(.control, payload: WireMessage.accept(host: owner.host, pid: owner.pid).encoded())
                try writer.sink.flush()
                return (transport, reader, writer)
            } catch {
                transport.close()
            }
        }
    }
}
