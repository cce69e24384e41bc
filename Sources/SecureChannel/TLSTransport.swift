import Crypto
import Foundation
import Migration
import NIOCore
import NIOPosix
import NIOSSL
import SystemCalls

/// A mutually authenticated TLS 1.3 connection to another VMM, behind the blocking
/// `MigrationTransport` interface.
///
/// The TLS work runs on a SwiftNIO event loop (one `NIOSSLHandler` per connection); the
/// blocking calls meet it through `ConnectionState`: `receive` waits on a condition for
/// decrypted bytes, `send` hands 256 KiB pieces over and waits while more than 1 MiB is
/// unwritten, and reading from the socket pauses while 4 MiB of decrypted bytes wait for a
/// receiver. Nothing is buffered without bound.
///
/// Dead peers: a blocked `receive` throws `MigrationError.timedOut` when fewer than 64 KiB
/// arrived during `inactivityTimeoutSeconds` (30 s by default) and the call is not done; a
/// blocked `send` throws when nothing was written for as long. A peer sending a byte every
/// 29 s therefore does not keep a receiver waiting forever.
///
/// TLS settings (both ends): TLS 1.3 only, Ed25519 only for signing and verifying
/// handshake signatures (BoringSSL's default verify list lacks it), a certificate required
/// from the client too, and trust by pinning: see `SecureChannelConfiguration` and
/// `PeerCertificateCheck`.
///
/// One thread may receive while another sends; two concurrent receives (or sends) are not
/// supported and are serialized. Gathered writes (`gather`, through a `TransportSink`) are one
/// stream: one writer at a time.
public final class TLSTransport: GatheringTransport {
    /// The authenticated peer's host name, as the authorizer named its key.
    public let peerHost: String
    /// The handshake proved the peer is this enrolled host.
    public var authenticatedPeer: String? { peerHost }
    public let peer: String
    public let inactivityTimeoutSeconds: Double

    private let channel: any Channel
    private let state: ConnectionState
    private let receiving = NSLock()
    private let sending = NSLock()

    init(channel: any Channel, state: ConnectionState, peerHost: String, inactivityTimeoutSeconds: Double) {
        self.channel = channel
        self.state = state
        self.peerHost = peerHost
        self.peer = "\(peerHost) (\(state.remote))"
        self.inactivityTimeoutSeconds = inactivityTimeoutSeconds
    }

    deinit { close() }

    /// Connects to `destination` ("HOST:PORT") and completes a TLS 1.3 handshake in which both
    /// sides show their certificates. The server's certificate key must be authorized by
    /// `authorize` under exactly the name `expectedPeer`; otherwise the handshake is aborted
    /// before any application byte is sent.
    ///
    /// TLS 1.3 lets the client finish before the server has judged the client's certificate,
    /// so a server that refuses this host shows up as an error on the first `receive`.
    ///
    /// - Parameters:
    ///   - timeoutSeconds: for the TCP connection and the handshake together.
    ///   - inactivityTimeoutSeconds: see the type's description.
    public static func connect(
        to destination: String, identity: TLSIdentity, authorize: @escaping PeerAuthorizer, expectedPeer: String,
        timeoutSeconds: Double = 10, inactivityTimeoutSeconds: Double = 30
    ) throws -> TLSTransport {
        let (host, port) = try parseHostPort(destination)
        let deadline = monotonicMilliseconds() + timeoutSeconds * 1000
        let context: NIOSSLContext
        do {
            context = try NIOSSLContext(configuration: SecureChannelConfiguration.make(identity: identity, isServer: false))
        } catch let error as MigrationError {
            throw error
        } catch {
            throw MigrationError.connection("cannot set up TLS for \(identity.hostName): \(error)")
        }
        let state = ConnectionState(remote: destination)
        let bootstrap = ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connectTimeout(.milliseconds(Int64(max(1, timeoutSeconds * 1000))))
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.recvAllocator, value: receiveAllocator)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let verify = serverVerifier(state: state, authorize: authorize, destination: destination, expectedPeer: expectedPeer)
                    let tls = try NIOSSLClientHandler(context: context, serverHostname: nil, customVerificationCallback: verify)
                    try channel.pipeline.syncOperations.addHandlers(tls, ConnectionHandler(state: state))
                }
            }
        let channel: any Channel
        do {
            channel = try bootstrap.connect(host: host, port: Int(port)).wait()
        } catch {
            throw MigrationError.connection(
                "cannot connect to \(destination): \(error); is a VMM waiting there to receive the migration?")
        }
        if let failure = state.waitForHandshake(deadline: deadline) {
            state.closeLocally()
            channel.close(promise: nil)
            throw MigrationError.connection(failure)
        }
        return TLSTransport(channel: channel, state: state, peerHost: expectedPeer, inactivityTimeoutSeconds: inactivityTimeoutSeconds)
    }

    /// The client's check of the server: authorized, and under the name the caller expects.
    private static func serverVerifier(
        state: ConnectionState, authorize: @escaping PeerAuthorizer, destination: String, expectedPeer: String
    ) -> NIOSSLCustomVerificationCallback {
        return { chain, promise in
            switch PeerCertificateCheck.evaluate(chain, authorize: authorize) {
            case let .authorized(hostName) where sameBytes(hostName, expectedPeer):
                state.noteAuthorized(hostName: hostName)
                promise.succeed(.certificateVerified)
            case let .authorized(hostName):
                state.noteRefusal(
                    "refused the server at \(destination): its key is enrolled as \(hostName), not as \(expectedPeer); check which host listens there")
                promise.succeed(.failed)
            case let .refused(reason):
                state.noteRefusal("refused the server at \(destination): \(reason)")
                promise.succeed(.failed)
            }
        }
    }

    /// Socket reads grow up to 1 MiB, so a fast stream is decrypted in large batches.
    static let receiveAllocator = AdaptiveRecvByteBufferAllocator(minimum: 1024, initial: 64 << 10, maximum: 1 << 20)

    /// Writes all of `bytes` (after whatever was gathered): returns once they are in the
    /// socket, or throws.
    public func send(_ bytes: UnsafeRawBufferPointer) throws {
        sending.lock(); defer { sending.unlock() }
        if let failure = state.unusableReason() {
            throw MigrationError.connection("cannot send to \(peer): \(failure)")
        }
        try handOverGathered()
        var offset = 0
        while offset < bytes.count {
            let count = min(ConnectionLimits.sendChunk, bytes.count - offset)
            var piece = channel.allocator.buffer(capacity: count)
            // SAFETY: `offset + count <= bytes.count`; the bytes are copied before this call returns.
            piece.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[offset ..< offset + count]))
            try handOver(piece)
            offset += count
        }
        try state.waitForUnwritten(atMost: 0, peer: peer, inactivitySeconds: inactivityTimeoutSeconds)
    }

    /// Gathers `bytes` into the piece being filled, which goes to the network thread once it
    /// holds `ConnectionLimits.sendChunk`: the bytes are copied once, into the buffer TLS
    /// encrypts from.
    public func gather(_ bytes: UnsafeRawBufferPointer) throws {
        sending.lock(); defer { sending.unlock() }
        var offset = 0
        while offset < bytes.count {
            if gathering.piece == nil { gathering.piece = channel.allocator.buffer(capacity: ConnectionLimits.sendChunk) }
            let count = min(ConnectionLimits.sendChunk - gathering.piece!.readableBytes, bytes.count - offset)
            // SAFETY: `offset + count <= bytes.count`.
            gathering.piece!.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[offset ..< offset + count]))
            offset += count
            if gathering.piece!.readableBytes >= ConnectionLimits.sendChunk { try handOverGathered() }
        }
    }

    /// Sends what was gathered; returns once every byte is in the socket, or throws.
    public func flushGathered() throws {
        sending.lock(); defer { sending.unlock() }
        if let failure = state.unusableReason() {
            throw MigrationError.connection("cannot send to \(peer): \(failure)")
        }
        try handOverGathered()
        try state.waitForUnwritten(atMost: 0, peer: peer, inactivitySeconds: inactivityTimeoutSeconds)
    }

    /// The piece `gather` is filling, not yet handed over.
    // @unchecked: `piece` is read and written only with `sending` held.
    private final class Gathering: @unchecked Sendable { var piece: ByteBuffer? }
    private let gathering = Gathering()

    /// Hands the gathered piece (if any) to the network thread. Called with `sending` held.
    private func handOverGathered() throws {
        guard let piece = gathering.piece, piece.readableBytes > 0 else { return }
        gathering.piece = nil
        try handOver(piece)
    }

    /// Hands `piece` to the network thread once at most a window of earlier bytes is unwritten.
    /// Called with `sending` held.
    private func handOver(_ piece: ByteBuffer) throws {
        // A closed or failed connection is noticed at the next piece, not only when the window fills.
        if let failure = state.unusableReason() {
            throw MigrationError.connection("cannot send to \(peer): \(failure)")
        }
        let count = piece.readableBytes
        try state.reserveWrite(count, window: ConnectionLimits.sendWindow - count, peer: peer, inactivitySeconds: inactivityTimeoutSeconds)
        let state = self.state
        let written = channel.eventLoop.makePromise(of: Void.self)
        written.futureResult.whenComplete { result in
            switch result {
            case .success: state.wrote(count)
            case let .failure(error): state.writeFailed(ConnectionHandler.describe(error, remote: state.remote))
            }
        }
        channel.writeAndFlush(piece, promise: written)
    }

    /// Fills `buffer` completely or throws: at end of stream, on close, or when the peer
    /// makes no progress for `inactivityTimeoutSeconds`.
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        receiving.lock(); defer { receiving.unlock() }
        let channel = self.channel
        try state.receive(into: buffer, peer: peer, inactivitySeconds: inactivityTimeoutSeconds) {
            // Goes through the pipeline from its tail, so `ConnectionHandler.read` decides again.
            channel.read()
        }
    }

    /// Closes both directions (sending TLS close_notify) and wakes any thread blocked in
    /// `send` or `receive` at once. Idempotent, callable from any thread.
    public func close() {
        state.closeLocally()
        channel.close(promise: nil)
    }
}
