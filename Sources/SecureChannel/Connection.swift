import Foundation
import Migration
import NIOCore
import NIOSSL
import NIOTLS
import SystemCalls

/// Limits of one connection's buffers, shared by both ends.
enum ConnectionLimits {
    /// Decrypted bytes held for a receiver that has not asked for them yet. Past this the
    /// connection stops reading from the socket, so a fast sender is held back by TCP instead
    /// of filling memory.
    static let receiveHighWater = 4 << 20
    /// Reading resumes once the receiver has taken the buffer down to this.
    static let receiveLowWater = 1 << 20
    /// `send` hands bytes to the network thread in pieces of this size...
    static let sendChunk = 256 << 10
    /// ...and keeps at most this many bytes handed over and not yet written to the socket.
    static let sendWindow = 1 << 20
    /// A blocked `receive` or `send` counts as making progress only when at least this many
    /// bytes moved (or the call completed), so a peer trickling a byte at a time cannot keep
    /// resetting the inactivity deadline.
    static let progressUnit = 64 << 10
}

/// The state one connection's network thread and its blocking user share.
///
/// Everything mutable is guarded by `condition`; the network thread appends decrypted bytes,
/// write completions and the end of the connection, and wakes the user thread waiting for them.
// @unchecked: every stored var is read and written only with `condition` held.
final class ConnectionState: @unchecked Sendable {
    enum Phase {
        case handshaking
        case established
        /// Ended: the reason, for the next call that needs the connection.
        case ended(String)
    }

    let condition = NSCondition()
    /// A readable name of the other end, for messages ("127.0.0.1:52144" before the handshake).
    let remote: String
    private(set) var phase = Phase.handshaking
    /// Set by the verification callback: the enrolled name of the peer's key.
    private(set) var peerHost: String?
    /// Why this side refused or dropped the connection, when it did: clearer than the
    /// TLS library's alert it turns into.
    private(set) var refusal: String?

    private var received = CircularBuffer<ByteBuffer>(initialCapacity: 16)
    private var receivedBytes = 0
    /// The network thread skipped a read because `received` was full; whoever drains it asks again.
    private var readPaused = false
    /// The receiver is waiting until this many bytes are buffered (0: nobody waits).
    private var receiverWants = 0
    /// The peer sent close_notify or the socket reached end of stream: after the buffered bytes, nothing more.
    private var inputEnded = false
    private var closedLocally = false

    private var unwrittenBytes = 0
    private var writeFailure: String?
    /// Whether the peer has sent anything yet (a client starts its handshake at once; an idle
    /// connection never does), for choosing whom to drop when too many handshakes are pending.
    private var sentAnything = false

    func noteBytesArrived() {
        condition.lock(); sentAnything = true; condition.unlock()
    }

    var hasSentAnything: Bool {
        condition.lock(); defer { condition.unlock() }
        return sentAnything
    }

    init(remote: String) { self.remote = remote }

    var isEstablished: Bool {
        condition.lock(); defer { condition.unlock() }
        if case .established = phase { return true }
        return false
    }

    // MARK: Network thread

    func noteAuthorized(hostName: String) {
        condition.lock(); peerHost = hostName; condition.unlock()
    }

    /// Records why this side refuses; the first reason wins (a timeout, then the close it causes).
    func noteRefusal(_ reason: String) {
        condition.lock(); if refusal == nil { refusal = reason }; condition.unlock()
    }

    func handshakeCompleted() {
        condition.lock(); defer { condition.unlock() }
        if case .handshaking = phase { phase = .established }
        condition.broadcast()
    }

    /// The connection failed or closed; `reason` says why, unless a refusal already does.
    /// Returns whether it ended during the handshake (and so was never anybody's transport).
    @discardableResult
    func ended(_ reason: String) -> (duringHandshake: Bool, reason: String) {
        condition.lock(); defer { condition.unlock() }
        let duringHandshake: Bool
        switch phase {
        case .handshaking: duringHandshake = true
        case .established: duringHandshake = false
        case let .ended(earlier): return (false, earlier)
        }
        let why = refusal ?? reason
        phase = .ended(why)
        inputEnded = true
        if writeFailure == nil { writeFailure = why }
        condition.broadcast()
        return (duringHandshake, why)
    }

    func inputClosed() {
        condition.lock(); inputEnded = true; condition.broadcast(); condition.unlock()
    }

    func append(_ buffer: ByteBuffer) {
        condition.lock(); defer { condition.unlock() }
        received.append(buffer)
        receivedBytes += buffer.readableBytes
        if receiverWants > 0 && receivedBytes >= receiverWants { condition.signal() }
    }

    /// Whether the network thread may read more from the socket now; if not, it is asked
    /// again (`readPaused`) once the receiver has made room.
    func mayRead() -> Bool {
        condition.lock(); defer { condition.unlock() }
        if receivedBytes >= ConnectionLimits.receiveHighWater {
            readPaused = true
            return false
        }
        return true
    }

    func wrote(_ count: Int) {
        condition.lock(); unwrittenBytes -= count; condition.broadcast(); condition.unlock()
    }

    func writeFailed(_ reason: String) {
        condition.lock(); if writeFailure == nil { writeFailure = reason }; condition.broadcast(); condition.unlock()
    }

    // MARK: User thread

    /// Waits until the handshake completes, fails, or `deadline` (monotonic ms) passes.
    /// Returns nil when established, else why not.
    func waitForHandshake(deadline: Double) -> String? {
        condition.lock(); defer { condition.unlock() }
        while true {
            switch phase {
            case .established: return nil
            case let .ended(why): return why
            case .handshaking: break
            }
            let left = deadline - monotonicMilliseconds()
            if left <= 0 { return refusal ?? "no TLS handshake with \(remote) completed within the time allowed; is a VMM listening there?" }
            _ = condition.wait(until: Date(timeIntervalSinceNow: left / 1000))
        }
    }

    /// Wakes every waiting user thread for good: later calls fail at once.
    func closeLocally() {
        condition.lock(); closedLocally = true; condition.broadcast(); condition.unlock()
    }

    /// Why the connection can no longer be used, if it cannot.
    private func unusable() -> String? {
        if closedLocally { return "the connection was closed on this side" }
        if case let .ended(why) = phase { return why }
        return nil
    }

    /// Fills `destination` completely, waiting for the network thread; see `TLSTransport.receive`.
    /// `resumeReading` is called (without the lock) when reading had paused and there is room again.
    func receive(into destination: UnsafeMutableRawBufferPointer, peer: String, inactivitySeconds: Double,
                 resumeReading: () -> Void) throws {
        var filled = 0
        var movedSinceProgress = 0
        var deadline = monotonicMilliseconds() + inactivitySeconds * 1000
        while filled < destination.count {
            // Take what is there under the lock; copy it out without the lock, so the network
            // thread can go on appending meanwhile.
            condition.lock()
            var taken: [ByteBuffer] = []
            var takenBytes = 0
            while filled + takenBytes < destination.count, var first = received.popFirst() {
                let want = destination.count - filled - takenBytes
                if first.readableBytes > want {
                    taken.append(first.readSlice(length: want)!)
                    received.prepend(first)
                    takenBytes += want
                } else {
                    takenBytes += first.readableBytes
                    taken.append(first)
                }
            }
            receivedBytes -= takenBytes
            let wake = readPaused && receivedBytes <= ConnectionLimits.receiveLowWater
            if wake { readPaused = false }
            if takenBytes == 0 {
                if closedLocally {
                    condition.unlock()
                    throw MigrationError.connection("the connection to \(peer) was closed on this side")
                }
                if inputEnded {
                    let why: String
                    if case let .ended(reason) = phase { why = reason } else { why = "\(peer) closed the connection" }
                    condition.unlock()
                    throw MigrationError.connection(why)
                }
                let left = deadline - monotonicMilliseconds()
                if left <= 0 {
                    condition.unlock()
                    throw MigrationError.timedOut(
                        "\(peer) sent less than \(ConnectionLimits.progressUnit / 1024) KiB in \(Self.seconds(inactivitySeconds)) while a receive waited; the connection is considered dead")
                }
                receiverWants = min(destination.count - filled, ConnectionLimits.progressUnit)
                _ = condition.wait(until: Date(timeIntervalSinceNow: left / 1000))
                receiverWants = 0
                condition.unlock()
                continue
            }
            condition.unlock()
            if wake { resumeReading() }
            for var piece in taken {
                let count = piece.readableBytes
                piece.withUnsafeReadableBytes { source in
                    // SAFETY: `filled + count <= destination.count` by the loop above that took the pieces.
                    (destination.baseAddress! + filled).copyMemory(from: source.baseAddress!, byteCount: count)
                }
                piece.moveReaderIndex(forwardBy: count)
                filled += count
            }
            movedSinceProgress += takenBytes
            if movedSinceProgress >= ConnectionLimits.progressUnit {
                movedSinceProgress = 0
                deadline = monotonicMilliseconds() + inactivitySeconds * 1000
            }
        }
    }

    /// Counts `count` bytes as handed to the network thread, after waiting (for the inactivity
    /// deadline at most) until at most `window` bytes are still unwritten.
    func reserveWrite(_ count: Int, window: Int, peer: String, inactivitySeconds: Double) throws {
        try waitForUnwritten(atMost: window, peer: peer, inactivitySeconds: inactivitySeconds)
        condition.lock(); unwrittenBytes += count; condition.unlock()
    }

    /// Waits until at most `limit` bytes handed to the network thread are unwritten. The
    /// deadline restarts whenever a write completes (a write is at least a few KiB, never a
    /// trickle the caller did not ask for).
    func waitForUnwritten(atMost limit: Int, peer: String, inactivitySeconds: Double) throws {
        condition.lock(); defer { condition.unlock() }
        var lastSeen = unwrittenBytes
        var deadline = monotonicMilliseconds() + inactivitySeconds * 1000
        while true {
            // Bytes already in the socket count as sent, even if the peer closed right after
            // reading them (it may: it had everything it needed).
            if unwrittenBytes <= limit { return }
            if closedLocally { throw MigrationError.connection("the connection to \(peer) was closed on this side") }
            if let failure = writeFailure { throw MigrationError.connection("sending to \(peer) failed: \(failure)") }
            if unwrittenBytes < lastSeen {
                lastSeen = unwrittenBytes
                deadline = monotonicMilliseconds() + inactivitySeconds * 1000
            }
            let left = deadline - monotonicMilliseconds()
            if left <= 0 {
                throw MigrationError.timedOut(
                    "\(peer) took in nothing for \(Self.seconds(inactivitySeconds)) while a send waited; the connection is considered dead")
            }
            _ = condition.wait(until: Date(timeIntervalSinceNow: left / 1000))
        }
    }

    /// Why the connection can no longer be used, if it cannot; checked before a send starts.
    func unusableReason() -> String? {
        condition.lock(); defer { condition.unlock() }
        return unusable()
    }

    static func seconds(_ value: Double) -> String {
        value == value.rounded() ? "\(Int(value)) s" : "\(value) s"
    }
}

/// The last handler of a connection's pipeline, after `NIOSSLHandler`: it hands decrypted
/// bytes to `ConnectionState`, holds back reads while the receiver is behind, and reports
/// the handshake and the end of the connection.
final class ConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// What the owner (the listener, for accepted connections) learns about the handshake.
    struct Events {
        var established: (ConnectionState, Channel) -> Void = { _, _ in }
        /// Only for connections that ended before they were established.
        var refused: (ConnectionState, String) -> Void = { _, _ in }
    }

    let state: ConnectionState
    private let events: Events

    init(state: ConnectionState, events: Events = Events()) {
        self.state = state
        self.events = events
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        state.append(unwrapInboundIn(data))
    }

    func read(context: ChannelHandlerContext) {
        if state.mayRead() { context.read() }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        switch event {
        case let tls as TLSUserEvent:
            if case .handshakeCompleted = tls {
                state.handshakeCompleted()
                events.established(state, context.channel)
            }
        case ChannelEvent.inputClosed:
            state.inputClosed()
        default:
            break
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let (duringHandshake, why) = state.ended(Self.describe(error, remote: state.remote))
        if duringHandshake { events.refused(state, why) }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        let (duringHandshake, why) = state.ended("\(state.remote) closed the connection")
        if duringHandshake { events.refused(state, why) }
        context.fireChannelInactive()
    }

    /// A sentence for what went wrong, naming TLS failures in the terms of this channel.
    static func describe(_ error: any Error, remote: String) -> String {
        if let ssl = error as? NIOSSLError {
            switch ssl {
            case let .handshakeFailed(inner):
                let detail = "\(inner)"
                // BoringSSL's reason codes for the refusals a listener sees most, in plain words.
                let plain: String? =
                    if detail.contains("PEER_DID_NOT_RETURN_A_CERTIFICATE") { "it presented no certificate" }
                    else if detail.contains("UNSUPPORTED_PROTOCOL") { "it does not offer TLS 1.3" }
                    else if detail.contains("HTTP_REQUEST") || detail.contains("WRONG_VERSION_NUMBER") { "it does not speak TLS" }
                    else { nil }
                let reason = plain.map { "\($0) (\(detail))" } ?? detail
                return "the TLS 1.3 handshake with \(remote) failed: \(reason); both hosts must speak TLS 1.3 with enrolled Ed25519 certificates"
            case .uncleanShutdown:
                return "\(remote) closed the connection without a TLS close_notify"
            default:
                return "TLS error with \(remote): \(ssl)"
            }
        }
        if let io = error as? IOError {
            return "the connection with \(remote) failed: \(io)"
        }
        return "the connection with \(remote) failed: \(error)"
    }
}

/// Sits before the TLS handler and marks a connection as having sent its first bytes.
final class FirstBytesMarker: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private let state: ConnectionState

    init(state: ConnectionState) { self.state = state }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        state.noteBytesArrived()
        context.fireChannelRead(data)
        // Only the first read matters.
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}
