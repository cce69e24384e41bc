import Foundation
import GuestMemory
import Snapshot
import Synchronization
import SystemCalls

/// The source's side of post-copy, after the switch: the guest is paused here for good (the
/// destination holds the lease and runs it), and this side only serves its pages until the
/// destination has every one.
///
/// Two connections carry them. The **page channel**, a second connection opened like the main
/// one (same authentication, same expected peer) and bound to this migration by the main
/// connection's challenge, answers page requests, one page each, as the destination's faults
/// need them. The **main connection** pushes the rest in page order, from just after the last
/// requested page, so that a guest working through a region finds its next pages already there.
/// A page is sent at most once by the push; a requested page is taken out of what is left to push.
final class PostCopyPageServer: Sendable {
    let memory: GuestMemory
    private struct State {
        /// One bit per guest page still to push.
        var remaining: [UInt64]
        var left: Int
        /// Where the push goes on (a page frame number).
        var cursor: UInt64 = 0
        var pushed = 0
        var requested = 0
        var refused = 0
    }
    private let state: Mutex<State>

    /// `missing`: the destination's missing pages (a bitmap of `memory.pageCount` bits).
    init(memory: GuestMemory, missing: [UInt64]) {
        self.memory = memory
        state = Mutex(State(remaining: missing, left: missing.reduce(0) { $0 + $1.nonzeroBitCount }))
    }

    var counts: (pushed: Int, requested: Int, refused: Int) { state.withLock { ($0.pushed, $0.requested, $0.refused) } }

    /// Takes up to `limit` pages still to push, in order from the cursor (wrapping once); empty
    /// when none is left.
    func nextPushBatch(limit: Int) -> [UInt64] {
        state.withLock { s -> [UInt64] in
            var batch: [UInt64] = []
            guard s.left > 0 else { return batch }
            let pageCount = memory.pageCount
            var pfn = s.cursor % pageCount
            var scanned: UInt64 = 0
            while batch.count < limit && scanned < pageCount && s.left > 0 {
                let word = Int(pfn / 64), bit = UInt64(1) << (pfn % 64)
                if s.remaining[word] & bit != 0 {
                    s.remaining[word] &= ~bit
                    s.left -= 1
                    batch.append(pfn)
                } else if s.remaining[word] == 0 && pfn % 64 == 0 && pageCount - pfn >= 64 {
                    // A whole empty word: skip it at once.
                    pfn += 63
                    scanned += 63
                }
                pfn += 1
                scanned += 1
                if pfn >= pageCount {
                    // Sections hold increasing frames: a wrapped batch ends here.
                    pfn = 0
                    if !batch.isEmpty { break }
                }
            }
            s.cursor = pfn
            s.pushed += batch.count
            return batch
        }
    }

    /// One page asked for: taken out of what is left to push, and the push goes on after it.
    /// False (and counted) for a frame outside guest memory.
    func noteRequest(_ pfn: UInt64) -> Bool {
        state.withLock { s in
            guard pfn < memory.pageCount else { s.refused += 1; return false }
            let word = Int(pfn / 64), bit = UInt64(1) << (pfn % 64)
            if s.remaining[word] & bit != 0 {
                s.remaining[word] &= ~bit
                s.left -= 1
            }
            s.requested += 1
            s.cursor = pfn + 1
            return true
        }
    }

    /// Answers page requests (and heartbeats) on the page channel until it ends (the destination
    /// closes it once every page is in, or the link fails). A request for a frame outside guest
    /// memory is refused with a message and the channel goes on; anything else ends it.
    /// `clock` hears every message.
    func serve(reader: inout StreamReader<TransportSource>, writer: inout StreamWriter<TransportSink>, clock: LinkClock? = nil) throws {
        while let section = try reader.nextSection() {
            clock?.heard()
            guard section.type == .control else {
                throw MigrationError.protocolViolation("the page channel carries page requests only, not a \(section.type) section")
            }
            switch try WireMessage.decode(section.payload) {
            case .heartbeat:
                try writer.writeSection(.control, payload: WireMessage.heartbeat.encoded())
            case let .pageRequest(pfn):
                if noteRequest(pfn) {
                    _ = try writer.writeMemoryPages([pfn], from: memory)
                } else {
                    let reason = "page frame \(pfn) lies outside guest memory (\(memory.pageCount) pages)"
                    try writer.writeSection(.control, payload: WireMessage.refuse(reason: reason).encoded())
                }
            default:
                throw MigrationError.protocolViolation("the page channel carries page requests and heartbeats only")
            }
            try writer.sink.flush()
        }
    }

    /// Pushes every page left, in batches, on the main connection (a stream of its own: header,
    /// memory sections, end), at most `maxBandwidth` bytes per second on average (0: no cap).
    func push(on transport: any MigrationTransport, integrity: SectionIntegrity, batchPages: Int, maxBandwidth: UInt64 = 0) throws -> UInt64 {
        var writer = try StreamWriter(sink: TransportSink(transport), integrity: integrity)
        let start = monotonicMilliseconds()
        while true {
            let batch = nextPushBatch(limit: batchPages)
            if batch.isEmpty { break }
            _ = try writer.writeMemoryPages(batch, from: memory)
            // Each batch goes out at once: a page request's reply shares the link with it.
            try writer.sink.flush()
            if maxBandwidth > 0 {
                let due = Double(writer.bytesWritten) / Double(maxBandwidth) * 1000
                let spent = monotonicMilliseconds() - start
                if due > spent { usleep(UInt32(min((due - spent) * 1000, 1_000_000))) }
            }
        }
        try writer.finish()
        try writer.sink.flush()
        return writer.bytesWritten
    }
}

/// The page channel, source end: opened with the migration's `connect` (the same authentication
/// and expected peer as the main connection), bound by the main connection's challenge, and
/// accepted by the destination right after its accept on the main connection (before any page;
/// a recovery opens one after the destination's fresh challenge).
struct PageChannel {
    let transport: any MigrationTransport
    var reader: StreamReader<TransportSource>
    var writer: StreamWriter<TransportSink>

    static func open(connect: () throws -> any MigrationTransport, challenge: String, mainPeer: String?) throws -> PageChannel {
        let transport = try connect()
        do {
            guard transport.authenticatedPeer == mainPeer else {
                throw MigrationError.refused("the page channel reached '\(transport.authenticatedPeer ?? "an unauthenticated peer")', not the destination of this migration")
            }
            let integrity = transport.streamIntegrity
            var writer = try StreamWriter(sink: TransportSink(transport), integrity: integrity)
            try writer.writeSection(.control, payload: WireMessage.pageChannel(challenge: challenge).encoded())
            try writer.sink.flush()
            var reader = try StreamReader(source: TransportSource(transport), integrity: integrity)
            guard let section = try reader.nextSection(), section.type == .control else {
                throw MigrationError.protocolViolation("the destination did not answer the page channel")
            }
            switch try WireMessage.decode(section.payload) {
            case .accept: break
            case let .refuse(reason): throw MigrationError.refused("the page channel: \(reason)")
            case let other: throw MigrationError.protocolViolation("expected accept on the page channel, got \(other.kind)")
            }
            return PageChannel(transport: transport, reader: reader, writer: writer)
        } catch {
            transport.close()
            throw error
        }
    }
}

extension DirtyBitmap {
    /// The bitmap's words as bytes (64-bit little-endian), as the postcopy message carries them.
    var wireBytes: Data {
        var data = Data(capacity: words.count * 8)
        for word in words { withUnsafeBytes(of: word.littleEndian) { data.append(contentsOf: $0) } }
        return data
    }
}

/// A bitmap of missing pages travels in slices, one `postcopy` (or `still-missing`) message
/// each: a control section holds at most 64 KiB, and the bitmap of a guest over about 1.5 GiB
/// would not fit one in JSON. The receiver knows the guest's page count, hence how many bytes
/// make the whole bitmap, and reads slices until it has them.
enum MissingPagesSlices {
    /// 32 KiB of bitmap (262,144 pages, 1 GiB of guest memory) is under 44 KiB in base64.
    static let sliceBytes = 32 << 10

    /// The bitmap's bytes for a memory of `pageCount` pages.
    static func byteCount(pageCount: UInt64) -> Int { Int((pageCount + 63) / 64) * 8 }

    /// `bitmap` cut into slices, in order; one (perhaps empty) at least.
    static func slices(_ bitmap: Data) -> [Data] {
        guard bitmap.count > sliceBytes else { return [bitmap] }
        return stride(from: 0, to: bitmap.count, by: sliceBytes).map {
            Data(bitmap[bitmap.startIndex + $0 ..< bitmap.startIndex + min($0 + sliceBytes, bitmap.count)])
        }
    }

    /// Collects slices until the bitmap is whole; each is length-checked before it is kept.
    struct Assembler {
        let expected: Int
        private(set) var bytes = Data()

        init(pageCount: UInt64) {
            expected = MissingPagesSlices.byteCount(pageCount: pageCount)
            bytes.reserveCapacity(min(expected, MissingPagesSlices.sliceBytes))
        }

        /// Adds the next slice; the whole bitmap once it is complete, nil while more must come.
        mutating func add(_ slice: Data) throws -> Data? {
            guard slice.count <= MissingPagesSlices.sliceBytes, bytes.count + slice.count <= expected,
                  !slice.isEmpty || expected == 0 else {
                throw MigrationError.protocolViolation(
                    "a slice of \(slice.count) bytes of the missing pages' bitmap does not fit: \(bytes.count) of \(expected) bytes came before it, at most \(MissingPagesSlices.sliceBytes) a slice")
            }
            bytes.append(slice)
            return bytes.count == expected ? bytes : nil
        }
    }
}

/// Reads a postcopy message's bitmap for a memory of `pageCount` pages; nil if it is not one
/// (wrong length, or bits past the last page).
func missingPages(fromWire data: Data, pageCount: UInt64) -> [UInt64]? {
    let wordCount = Int((pageCount + 63) / 64)
    guard data.count == wordCount * 8 else { return nil }
    var words = [UInt64](repeating: 0, count: wordCount)
    data.withUnsafeBytes { raw in
        for i in 0..<wordCount { words[i] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
    }
    if pageCount % 64 != 0, let last = words.last, last >> (pageCount % 64) != 0 { return nil }
    return words
}
