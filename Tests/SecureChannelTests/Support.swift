#if canImport(Glibc)
import Glibc
#endif
import Crypto
import Foundation
import Migration
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import SecureChannel
import Synchronization
import SystemCalls
import X509

/// A host identity as the Billboard helper makes one: a self-signed X.509 certificate for the
/// host's Ed25519 key. The validity can be moved to make expired certificates.
func makeIdentity(_ hostName: String, validFrom: Date = Date().addingTimeInterval(-3600),
                  validUntil: Date = Date().addingTimeInterval(86400)) throws -> TLSIdentity {
    let key = Curve25519.Signing.PrivateKey()
    let certificateKey = Certificate.PrivateKey(key)
    let name = try DistinguishedName { CommonName(hostName) }
    let certificate = try Certificate(
        version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: certificateKey.publicKey,
        notValidBefore: validFrom, notValidAfter: validUntil, issuer: name, subject: name,
        signatureAlgorithm: .ed25519,
        extensions: try Certificate.Extensions { KeyUsage(digitalSignature: true) },
        issuerPrivateKey: certificateKey)
    return TLSIdentity(hostName: hostName, certificateDER: try certificate.serializeAsPEM().derBytes, privateKey: key)
}

extension TLSIdentity {
    var publicKeyBytes: [UInt8] { Array(privateKey.publicKey.rawRepresentation) }
}

/// An authorizer that knows exactly these hosts, each under its own name.
func enrolled(_ identities: TLSIdentity...) -> PeerAuthorizer {
    let names = Dictionary(identities.map { ($0.publicKeyBytes, $0.hostName) }, uniquingKeysWith: { first, _ in first })
    return { names[$0] }
}

/// Collects what a listener reports as refused.
final class RefusalLog: Sendable {
    private let messages = Mutex<[String]>([])
    var all: [String] { messages.withLock { $0 } }
    var report: @Sendable (String) -> Void { { message in self.messages.withLock { $0.append(message) } } }
}

/// A blocking body run on its own OS thread, as the migration sender and receiver are.
final class BackgroundThread<Value: Sendable>: Sendable {
    private let outcome = Mutex<Result<Value, any Error>?>(nil)
    private let done = DispatchSemaphore(value: 0)

    init(_ body: @escaping @Sendable () throws -> Value) {
        let thread = Thread { [self] in
            let result = Result { try body() }
            outcome.withLock { $0 = result }
            done.signal()
        }
        thread.start()
    }

    /// The body's value or error; fails the test (by throwing) if it is not done within `seconds`.
    func result(within seconds: Double = 60) throws -> Value {
        guard done.wait(timeout: .now() + seconds) == .success else {
            throw TestFailure("a background thread did not finish within \(seconds) s")
        }
        done.signal()
        return try outcome.withLock { $0! }.get()
    }

    var error: (any Error)? {
        do { _ = try result(); return nil } catch { return error }
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

func deadline(inSeconds seconds: Double) -> Double { monotonicMilliseconds() + seconds * 1000 }

/// Deterministic bytes that differ from offset to offset, to catch reordering and loss.
func pattern(count: Int, seed: UInt8) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    var state = UInt32(seed) &* 2654435761 | 1
    for i in 0 ..< count {
        state ^= state << 13; state ^= state >> 17; state ^= state << 5
        bytes[i] = UInt8(truncatingIfNeeded: state)
    }
    return bytes
}

extension MigrationTransport {
    func send(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try send($0) } }

    func receive(count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try receive(into: $0) }
        return bytes
    }
}

/// A plain TCP client, for peers that do not speak TLS or stop in the middle of it.
final class RawTCPClient {
    let socket: OwnedFileDescriptor

    init(port: UInt16) throws {
        let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
        socket = OwnedFileDescriptor(taking: fd)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0 else { throw TestFailure("connect to 127.0.0.1:\(port) failed: errno \(errno)") }
    }

    func send(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(socket.raw, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Reads until the server closes the connection; returns what arrived, or nil if it is
    /// still open after `seconds`.
    func readUntilClosed(within seconds: Double) -> [UInt8]? {
        var received: [UInt8] = []
        let end = deadline(inSeconds: seconds)
        while true {
            let left = Int32(max(0, end - monotonicMilliseconds()))
            var poller = pollfd(fd: socket.raw, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, left) > 0 else { return nil }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = chunk.withUnsafeMutableBytes { recv(socket.raw, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return received }
            received += chunk[..<n]
        }
    }
}

/// A TLS client built directly on NIOSSL, for handshakes `TLSTransport.connect` would never
/// make (no certificate, TLS 1.2 only).
final class RawTLSClient: Sendable {
    let channel: any Channel
    private let handshake: EventLoopFuture<Void>

    private final class Watcher: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let handshake: EventLoopPromise<Void>
        init(handshake: EventLoopPromise<Void>) { self.handshake = handshake }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case TLSUserEvent.handshakeCompleted = event { handshake.succeed() }
            context.fireUserInboundEventTriggered(event)
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            handshake.fail(error)
            context.close(promise: nil)
        }
        func channelInactive(context: ChannelHandlerContext) {
            handshake.fail(TestFailure("closed"))
            context.fireChannelInactive()
        }
    }

    init(port: UInt16, configuration: TLSConfiguration) throws {
        let context = try NIOSSLContext(configuration: configuration)
        let group = MultiThreadedEventLoopGroup.singleton
        let promise = group.next().makePromise(of: Void.self)
        channel = try ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers(
                        NIOSSLClientHandler(context: context, serverHostname: nil), Watcher(handshake: promise))
                }
            }
            .connect(host: "127.0.0.1", port: Int(port)).wait()
        handshake = promise.futureResult
    }

    /// Whether this side finished its handshake (in TLS 1.3 the client may, before the server
    /// has judged its certificate).
    func waitForHandshake() -> Bool { (try? handshake.wait()) != nil }

    /// Tries to send application bytes; the server must never hand them to anyone.
    func sendApplicationBytes(_ text: String) {
        try? channel.writeAndFlush(ByteBuffer(string: text)).wait()
    }

    func close() { try? channel.close().wait() }

    /// A client configuration with `identity`'s certificate (or none), not checking the server.
    static func configuration(identity: TLSIdentity?, maximumVersion: TLSVersion = .tlsv13) throws -> TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        if let identity {
            configuration.certificateChain = [.certificate(try NIOSSLCertificate(bytes: identity.certificateDER, format: .der))]
            let pkcs8 = try Certificate.PrivateKey(identity.privateKey).serializeAsPEM().derBytes
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: pkcs8, format: .der))
        }
        configuration.minimumTLSVersion = .tlsv12
        configuration.maximumTLSVersion = maximumVersion
        configuration.certificateVerification = .none
        configuration.verifySignatureAlgorithms = [.ed25519]
        configuration.signingSignatureAlgorithms = [.ed25519]
        return configuration
    }
}
