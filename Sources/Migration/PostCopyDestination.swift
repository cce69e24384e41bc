import Foundation
import GuestMemory
import PageFaults
import Snapshot
import SystemCalls

/// The destination's side of post-copy: the pages it lacks at the switch come from the source,
/// asked for on the page channel when a fault needs one (this is the fault server's
/// `PageSource`), or pushed in order on the main connection (`offerPushed`). Each is installed
/// with `UFFDIO_COPY` by the fault server, never written into guest memory directly.
///
/// One unit per missing page. A page that is not missing was received in pre-copy and is
/// present, or was never sent because it is zero at the source (and not dirtied since, or it
/// would be missing): a fault on it gets a zero page.
final class PostCopyPageSource: PageSource {
    /// The missing page frames, in increasing order: unit `i` is `frames[i]`.
    let frames: [UInt64]
    let memorySize: UInt64
    private let channel: ChannelLock

    /// Serialises the request/reply pairs on the page channel.
    // @unchecked: `reader` and `writer` are used only under `lock`.
    private final class ChannelLock: @unchecked Sendable {
        let lock = NSLock()
        let transport: any MigrationTransport
        var reader: StreamReader<TransportSource>
        var writer: StreamWriter<TransportSink>
        init(transport: any MigrationTransport, reader: StreamReader<TransportSource>, writer: StreamWriter<TransportSink>) {
            self.transport = transport
            self.reader = reader
            self.writer = writer
        }
    }

    init(missing: [UInt64], memorySize: UInt64, transport: any MigrationTransport,
         reader: StreamReader<TransportSource>, writer: StreamWriter<TransportSink>) {
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
        channel = ChannelLock(transport: transport, reader: reader, writer: writer)
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

    /// Asks the source for the unit's page and waits for it.
    func fetch(unit: Int) throws -> PageBatch {
        let pfn = frames[unit]
        channel.lock.lock(); defer { channel.lock.unlock() }
        try channel.writer.writeSection(.control, payload: WireMessage.pageRequest(pfn: pfn).encoded())
        try channel.writer.sink.flush()
        guard let section = try channel.reader.nextSection() else {
            throw MigrationError.connection("the source ended the page channel")
        }
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

    /// Closes the page channel (every page is in, or the migration failed).
    func close() { channel.transport.close() }

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

extension MigrationReceiver {
    /// Accepts the post-copy page channel: the next connection whose peer is the main
    /// connection's and whose first message answers this migration's challenge. Others are
    /// closed and the next awaited (`accept` throws once its deadline passes).
    func acceptPageChannel(_ accept: () throws -> any MigrationTransport, challenge: String, mainPeer: String?,
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
