import Foundation

/// Two connected transport ends in one process, for tests of the protocol without sockets: what
/// one end sends, the other receives, in order. Closing either end ends both directions.
public final class InMemoryTransport: MigrationTransport {
    /// One direction: bytes in flight, guarded by `condition`.
    // @unchecked: `bytes` and `closed` are read and written only with `condition` held.
    final class Pipe: @unchecked Sendable {
        let condition = NSCondition()
        var bytes: [UInt8] = []
        var start = 0
        var closed = false

        func close() {
            condition.lock(); closed = true; condition.broadcast(); condition.unlock()
        }
    }

    private let incoming: Pipe
    private let outgoing: Pipe
    public let peer: String
    /// What a test says the channel authenticated (nil: a plaintext channel).
    public let authenticatedPeer: String?

    private init(incoming: Pipe, outgoing: Pipe, peer: String, authenticatedPeer: String?) {
        self.incoming = incoming
        self.outgoing = outgoing
        self.peer = peer
        self.authenticatedPeer = authenticatedPeer
    }

    /// A connected pair: (source end, destination end). With host names, each end reports the
    /// other as authenticated, as a TLS channel between those hosts would.
    public static func pair(authenticated hosts: (source: String, destination: String)? = nil)
        -> (source: InMemoryTransport, destination: InMemoryTransport) {
        let toDestination = Pipe(), toSource = Pipe()
        return (InMemoryTransport(incoming: toSource, outgoing: toDestination, peer: "in-memory destination",
                                  authenticatedPeer: hosts?.destination),
                InMemoryTransport(incoming: toDestination, outgoing: toSource, peer: "in-memory source",
                                  authenticatedPeer: hosts?.source))
    }

    public func send(_ bytes: UnsafeRawBufferPointer) throws {
        outgoing.condition.lock(); defer { outgoing.condition.unlock() }
        guard !outgoing.closed else { throw MigrationError.connection("\(peer) closed the connection") }
        outgoing.bytes.append(contentsOf: bytes)
        outgoing.condition.broadcast()
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        incoming.condition.lock(); defer { incoming.condition.unlock() }
        while incoming.bytes.count - incoming.start < buffer.count && !incoming.closed { incoming.condition.wait() }
        guard incoming.bytes.count - incoming.start >= buffer.count else {
            throw MigrationError.connection("\(peer) closed the connection")
        }
        incoming.bytes.withUnsafeBytes { src in
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[incoming.start ..< incoming.start + buffer.count]))
        }
        incoming.start += buffer.count
        // Drop what was read once it is most of the buffer, so a long stream does not pile up.
        if incoming.start > 1 << 20 && incoming.start * 2 > incoming.bytes.count {
            incoming.bytes.removeFirst(incoming.start)
            incoming.start = 0
        }
    }

    public func close() {
        incoming.close()
        outgoing.close()
    }
}
