import Foundation
import Migration
import NIOCore
import NIOPosix
import NIOSSL
import SystemCalls

/// A listening socket that hands out only connections whose TLS 1.3 handshake completed
/// with an authorized client certificate.
///
/// Handshakes run on SwiftNIO's event loops whether or not a thread is in `accept`. Limits:
/// - at most `maxPendingHandshakes` connections may be in their handshake at once; when one
///   more arrives, the oldest pending one that has not sent a byte is dropped (or, if all
///   have, the oldest), reported as refused. Idle connections thus cannot lock a good client
///   out, whatever order the event loops admit connections in.
/// - each handshake must finish within `handshakeTimeoutSeconds` of the TCP accept.
/// - at most `maxPendingHandshakes` authenticated connections wait for `accept`; more are
///   closed and reported as refused. Each buffers at most 4 MiB of received data meanwhile.
public final class TLSListener: Sendable {
    public let address: String
    public let port: UInt16
    private let core: ListenerCore
    private let serverChannel: any Channel

    /// Listens on `listen` ("HOST:PORT"; port 0 picks a free one, see `port`).
    ///
    /// - Parameters:
    ///   - authorize: names the enrolled host of a client certificate's key, or refuses it.
    ///   - handshakeTimeoutSeconds: the time a client has from its TCP connect to a completed handshake.
    ///   - maxPendingHandshakes: the most unauthenticated connections held at once.
    ///   - inactivityTimeoutSeconds: for the accepted transports' blocking calls (see `TLSTransport`).
    public init(
        listen: String, identity: TLSIdentity, authorize: @escaping PeerAuthorizer,
        handshakeTimeoutSeconds: Double = 10, maxPendingHandshakes: Int = 8, inactivityTimeoutSeconds: Double = 30
    ) throws {
        guard maxPendingHandshakes >= 1 else {
            throw MigrationError.connection("a TLS listener must allow at least one pending handshake (was asked for \(maxPendingHandshakes))")
        }
        let (host, requestedPort) = try parseHostPort(listen, allowAnyPort: true)
        let context: NIOSSLContext
        do {
            context = try NIOSSLContext(configuration: SecureChannelConfiguration.make(identity: identity, isServer: true))
        } catch let error as MigrationError {
            throw error
        } catch {
            throw MigrationError.connection("cannot set up TLS for \(identity.hostName): \(error)")
        }
        let core = ListenerCore(maxPending: maxPendingHandshakes, inactivityTimeoutSeconds: inactivityTimeoutSeconds)
        let handshakeTimeout = TimeAmount.nanoseconds(Int64(max(0.001, handshakeTimeoutSeconds) * 1e9))
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.recvAllocator, value: TLSTransport.receiveAllocator)
            .childChannelInitializer { channel in
                let state = ConnectionState(remote: describe(channel.remoteAddress))
                let verify: NIOSSLCustomVerificationCallback = { chain, promise in
                    switch PeerCertificateCheck.evaluate(chain, authorize: authorize) {
                    case let .authorized(hostName):
                        state.noteAuthorized(hostName: hostName)
                        promise.succeed(.certificateVerified)
                    case let .refused(reason):
                        state.noteRefusal("the client's certificate was refused: \(reason)")
                        promise.succeed(.failed)
                    }
                }
                var events = ConnectionHandler.Events()
                events.established = { state, channel in core.established(state, channel: channel) }
                events.refused = { state, reason in core.refused(state, reason: reason) }
                let timeout = channel.eventLoop.scheduleTask(in: handshakeTimeout) {
                    guard !state.isEstablished else { return }
                    state.noteRefusal("no complete TLS handshake within \(ConnectionState.seconds(handshakeTimeoutSeconds)) of connecting")
                    channel.close(promise: nil)
                }
                channel.closeFuture.whenComplete { _ in timeout.cancel() }
                core.admit(state, channel: channel)
                return channel.eventLoop.makeCompletedFuture {
                    let tls = NIOSSLServerHandler(context: context, customVerificationCallback: verify)
                    try channel.pipeline.syncOperations.addHandlers(FirstBytesMarker(state: state), tls,
                                                                    ConnectionHandler(state: state, events: events))
                }
            }
        do {
            serverChannel = try bootstrap.bind(host: host, port: Int(requestedPort)).wait()
        } catch {
            throw MigrationError.connection("cannot listen on \(listen): \(error)")
        }
        self.core = core
        self.address = host
        self.port = UInt16(serverChannel.localAddress?.port ?? Int(requestedPort))
    }

    deinit { shutdownListening() }

    /// Returns the next connection whose handshake completed with an authorized client
    /// certificate. Connections refused meanwhile (failed handshakes, plaintext, TLS 1.2, no
    /// or unknown certificates, timeouts) are reported through `onRefused`, on this thread,
    /// and do not end the wait.
    ///
    /// - Parameter deadline: a moment on `monotonicMilliseconds()` (SystemCalls' clock) after
    ///   which this throws `MigrationError.timedOut`; nil waits until `shutdownListening()`.
    public func accept(deadline: Double?, onRefused: @escaping @Sendable (String) -> Void) throws -> TLSTransport {
        try core.accept(deadline: deadline, listening: "\(address):\(port)", onRefused: onRefused)
    }

    /// Stops listening: a waiting `accept` throws, pending handshakes and connections not
    /// yet accepted are closed. Idempotent.
    public func shutdownListening() {
        core.shutDown()
        serverChannel.close(promise: nil)
    }
}

private func describe(_ address: SocketAddress?) -> String {
    guard let address else { return "an unknown address" }
    if let ip = address.ipAddress, let port = address.port {
        return address.protocol == .inet6 ? "[\(ip)]:\(port)" : "\(ip):\(port)"
    }
    return "\(address)"
}

/// The listener's bookkeeping, shared by the event loops (which admit, establish and refuse
/// connections) and the thread in `accept`.
// @unchecked: every stored var is read and written only with `condition` held.
private final class ListenerCore: @unchecked Sendable {
    private let condition = NSCondition()
    private let maxPending: Int
    private let inactivityTimeoutSeconds: Double
    /// Connections in their handshake, oldest first.
    private var pending: [(state: ConnectionState, channel: any Channel)] = []
    /// Authenticated connections waiting for `accept`.
    private var ready: [TLSTransport] = []
    /// Refusals not yet reported to an `accept`.
    private var refusals: [String] = []
    private var refusalsDropped = 0
    private static let maxQueuedRefusals = 256
    private var isShutDown = false

    init(maxPending: Int, inactivityTimeoutSeconds: Double) {
        self.maxPending = maxPending
        self.inactivityTimeoutSeconds = inactivityTimeoutSeconds
    }

    func admit(_ state: ConnectionState, channel: any Channel) {
        condition.lock()
        if isShutDown {
            condition.unlock()
            channel.close(promise: nil)
            return
        }
        var evicted: (state: ConnectionState, channel: any Channel)?
        if pending.count >= maxPending {
            // The oldest that never sent a byte goes first: a real client has started its
            // handshake within milliseconds, an idle connection never does.
            let index = pending.firstIndex { !$0.state.hasSentAnything } ?? 0
            evicted = pending.remove(at: index)
        }
        pending.append((state, channel))
        condition.unlock()
        if let evicted {
            evicted.state.noteRefusal(
                "dropped before its TLS handshake completed: more than \(maxPending) handshakes were pending and it was the oldest")
            evicted.channel.close(promise: nil)
        }
    }

    func established(_ state: ConnectionState, channel: any Channel) {
        condition.lock()
        pending.removeAll { $0.state === state }
        guard let host = state.peerHost, !isShutDown, ready.count < maxPending else {
            let why = isShutDown ? "the listener was shut down" : "\(maxPending) authenticated connections are already waiting to be accepted"
            condition.unlock()
            state.noteRefusal(why)
            queueRefusal("connection from \(state.remote) closed after its handshake: \(why)")
            channel.close(promise: nil)
            return
        }
        ready.append(TLSTransport(channel: channel, state: state, peerHost: host, inactivityTimeoutSeconds: inactivityTimeoutSeconds))
        condition.broadcast()
        condition.unlock()
    }

    func refused(_ state: ConnectionState, reason: String) {
        condition.lock()
        pending.removeAll { $0.state === state }
        condition.unlock()
        queueRefusal("connection from \(state.remote) refused: \(reason)")
    }

    private func queueRefusal(_ message: String) {
        condition.lock(); defer { condition.unlock() }
        if refusals.count < Self.maxQueuedRefusals { refusals.append(message) } else { refusalsDropped += 1 }
        condition.broadcast()
    }

    func accept(deadline: Double?, listening: String, onRefused: @Sendable (String) -> Void) throws -> TLSTransport {
        condition.lock()
        while true {
            if !refusals.isEmpty {
                var toReport = refusals
                if refusalsDropped > 0 { toReport.append("\(refusalsDropped) more connections were refused and not described") }
                refusals = []
                refusalsDropped = 0
                condition.unlock()
                // Reported without the lock: the callback may take its time or log.
                toReport.forEach(onRefused)
                condition.lock()
                continue
            }
            if !ready.isEmpty {
                let transport = ready.removeFirst()
                condition.unlock()
                return transport
            }
            if isShutDown {
                condition.unlock()
                throw MigrationError.connection("the TLS listener on \(listening) was shut down")
            }
            if let deadline {
                let left = deadline - monotonicMilliseconds()
                if left <= 0 {
                    condition.unlock()
                    throw MigrationError.timedOut(
                        "no authenticated VMM connected to \(listening) before the deadline; is the source running and enrolled here?")
                }
                _ = condition.wait(until: Date(timeIntervalSinceNow: left / 1000))
            } else {
                condition.wait()
            }
        }
    }

    func shutDown() {
        condition.lock()
        isShutDown = true
        let pendingChannels = pending.map(\.channel)
        let unaccepted = ready
        pending = []
        ready = []
        condition.broadcast()
        condition.unlock()
        pendingChannels.forEach { $0.close(promise: nil) }
        unaccepted.forEach { $0.close() }
    }
}

extension TLSListener: MigrationListener {
    public func nextConnection(deadline: Double?, onRefused: @escaping @Sendable (String) -> Void) throws -> any MigrationTransport {
        try accept(deadline: deadline, onRefused: onRefused)
    }
}
