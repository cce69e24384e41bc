import Crypto
import Foundation
import Snapshot
import Synchronization

/// Faults a destination can be made to commit, to prove what the source does about them.
///
/// Test-only: tests wrap a transport in `FaultInjectingTransport`; the `vmm receive` subprocess
/// tests select one with the hidden option `--inject-fault` (documented as test-only in
/// docs/migration.md). The production receiver has no fault branches.
public enum InjectedFault: String, Sendable, CaseIterable {
    /// Close the connection right after the accept.
    case closeAfterHello = "close-after-hello"
    /// Close the connection once the first memory section arrived, during pre-copy.
    case closeDuringPrecopy = "close-during-precopy"
    /// Refuse the final state instead of answering READY.
    case refuseReady = "refuse-ready"
    /// Start the guest on GO but cut the link before answering RUNNING.
    case closeAfterGo = "close-after-go"
    /// Answer READY with a malformed control message (well framed, not JSON).
    case malformedReady = "malformed-ready"
}

/// A destination-side transport that commits one `InjectedFault`. It follows the stream's
/// framing in both directions (stream headers, section headers, payloads, checksums), so it
/// acts on whole sections whatever sizes the reader and writer use.
public final class FaultInjectingTransport: MigrationTransport {
    public let inner: any MigrationTransport
    public let fault: InjectedFault
    /// The section integrity of the streams it follows (their trailers' size).
    public let integrity: SectionIntegrity
    private let incoming: Mutex<FramingTracker>

    public init(_ inner: any MigrationTransport, fault: InjectedFault) {
        self.inner = inner
        self.fault = fault
        let integrity = inner.streamIntegrity
        self.integrity = integrity
        self.incoming = Mutex(FramingTracker(trailerSize: integrity.trailerSize))
    }

    public var peer: String { inner.peer }
    public var authenticatedPeer: String? { inner.authenticatedPeer }

    public func close() { inner.close() }

    private func injected() -> MigrationError {
        close()
        return .aborted("injected fault: \(fault.rawValue)")
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        try inner.receive(into: buffer)
        guard fault == .closeDuringPrecopy else { return }
        let memorySections = incoming.withLock { tracker in
            tracker.consume(UnsafeRawBufferPointer(buffer))
            return tracker.completed.filter { $0.type == SectionType.memory.rawValue }.count
        }
        if memorySections >= 1 { throw injected() }
    }

    /// The receiver flushes after every control message, so each send holds whole sections
    /// (after a stream header, the first time).
    public func send(_ bytes: UnsafeRawBufferPointer) throws {
        var data = [UInt8](bytes)
        var sections = Self.split(data, trailerSize: integrity.trailerSize)
        let controls = sections.indices.filter { sections[$0].type == SectionType.control.rawValue }
        for index in controls {
            let kind = (try? WireMessage.decode(sections[index].payload))?.kind
            switch (fault, kind) {
            case (.refuseReady, "ready"?):
                sections[index].replacePayload(try WireMessage.refuse(reason: "injected fault: \(fault.rawValue)").encoded())
            case (.malformedReady, "ready"?):
                sections[index].replacePayload(Array("{not json".utf8))
            case (.closeAfterGo, "running"?):
                // The guest already runs here (started on GO); the source never hears of it.
                throw injected()
            default:
                break
            }
        }
        if !controls.isEmpty { data = Self.join(data, sections, trailerSize: integrity.trailerSize) }
        try data.withUnsafeBytes { try inner.send($0) }
        if fault == .closeAfterHello, controls.contains(where: { (try? WireMessage.decode(sections[$0].payload))?.kind == "accept" }) {
            throw injected()
        }
    }

    /// One framed section inside a chunk of bytes.
    struct FramedSection {
        var type: UInt32
        var start: Int
        var header: [UInt8]
        var payload: [UInt8]
        var trailerSize: Int

        /// Replaces the payload, fixing the length (and the section checksum, if there is one).
        mutating func replacePayload(_ new: [UInt8]) {
            payload = new
            var length = UInt64(new.count).littleEndian
            withUnsafeBytes(of: &length) { header.replaceSubrange(8..<16, with: $0) }
        }

        var bytes: [UInt8] {
            guard trailerSize > 0 else { return header + payload }
            var hasher = SHA256()
            hasher.update(data: header)
            hasher.update(data: payload)
            return header + payload + Array(hasher.finalize())
        }

        var end: Int { start + SnapshotFormat.sectionHeaderSize + payload.count + trailerSize }
    }

    static func split(_ data: [UInt8], trailerSize: Int) -> [FramedSection] {
        var sections: [FramedSection] = []
        var at = data.starts(with: SnapshotFormat.magic) ? SnapshotFormat.streamHeaderSize : 0
        while at + SnapshotFormat.sectionHeaderSize <= data.count {
            let header = Array(data[at..<at + SnapshotFormat.sectionHeaderSize])
            let type = header.prefix(4).enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * $1.offset) }
            let declared = header[8..<16].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * $1.offset) }
            // Checked against what is here before it becomes an Int or an allocation.
            guard declared <= UInt64(data.count) else { break }
            let length = Int(declared)
            guard at + SnapshotFormat.sectionHeaderSize + length + trailerSize <= data.count else { break }
            let payload = Array(data[at + SnapshotFormat.sectionHeaderSize ..< at + SnapshotFormat.sectionHeaderSize + length])
            let section = FramedSection(type: type, start: at, header: header, payload: payload, trailerSize: trailerSize)
            sections.append(section)
            at = section.end
        }
        return sections
    }

    /// `original` with its sections replaced by `sections` (which `split` found in it), and
    /// whatever followed them kept.
    static func join(_ original: [UInt8], _ sections: [FramedSection], trailerSize: Int) -> [UInt8] {
        var out = original.starts(with: SnapshotFormat.magic) ? Array(original.prefix(SnapshotFormat.streamHeaderSize)) : []
        for section in sections { out += section.bytes }
        let consumed = split(original, trailerSize: trailerSize).last?.end ?? out.count
        out += original[min(consumed, original.count)...]
        return out
    }
}

/// Follows the framing of a byte stream fed in pieces of any size: stream header, then
/// sections (header, payload, checksum); after an end section, a new stream may begin.
struct FramingTracker {
    struct Completed { var type: UInt32 }
    let trailerSize: Int
    private enum Place { case streamHeader, sectionHeader, payload(type: UInt32), checksum(type: UInt32) }
    private var place = Place.streamHeader
    private var needed = SnapshotFormat.streamHeaderSize
    private var header: [UInt8] = []
    private(set) var completed: [Completed] = []

    init(trailerSize: Int) { self.trailerSize = trailerSize }

    mutating func consume(_ bytes: UnsafeRawBufferPointer) {
        var index = 0
        while index < bytes.count {
            let take = min(needed, bytes.count - index)
            if case .sectionHeader = place { header += bytes[index..<index + take] }
            index += take
            needed -= take
            // Empty payloads and absent trailers complete at once.
            while needed == 0 { advance() }
        }
    }

    /// Moves to the next part of the framing once the current one is complete.
    private mutating func advance() {
        switch place {
        case .streamHeader:
            place = .sectionHeader
            needed = SnapshotFormat.sectionHeaderSize
            header = []
        case .sectionHeader:
            let type = header.prefix(4).enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * $1.offset) }
            let length = header[8..<16].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * $1.offset) }
            place = .payload(type: type)
            needed = Int(min(length, UInt64(Int.max / 2)))
        case let .payload(type):
            place = .checksum(type: type)
            needed = trailerSize
        case let .checksum(type):
            completed.append(Completed(type: type))
            let ended = type == SectionType.end.rawValue
            place = ended ? .streamHeader : .sectionHeader
            needed = ended ? SnapshotFormat.streamHeaderSize : SnapshotFormat.sectionHeaderSize
            header = []
        }
    }
}
