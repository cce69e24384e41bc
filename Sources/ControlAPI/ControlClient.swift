import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// A minimal HTTP/1.1 client for the control socket, on swift-nio's HTTP codec.
public struct ControlClient: Sendable {
    public let socketPath: String
    public init(socketPath: String) { self.socketPath = socketPath }

    /// An HTTP answer: status code and body.
    public struct Reply: Sendable {
        public var status: Int
        public var body: String
        public var json: [String: Any]? {
            (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any]
        }
    }

    public struct ConnectionError: Error, CustomStringConvertible {
        public let path: String
        public let underlying: String
        public var description: String {
            "cannot reach the VMM's control socket at '\(path)': \(underlying); is a VMM serving its control API there?"
        }
    }

    /// A short reason for a connection failure.
    static func describe(_ error: any Error) -> String {
        if let e = error as? IOError { return String(cString: strerror(e.errnoCode)) }
        return "\(error)"
    }

    /// Sends one request and waits for the whole reply.
    public func send(_ method: HTTPMethod, _ path: String, body: String? = nil, timeout: TimeAmount = .seconds(120)) throws -> Reply {
        let group = MultiThreadedEventLoopGroup.singleton
        let collector = ReplyCollector(promise: group.next().makePromise(of: Reply.self), socketPath: socketPath)
        let channel: Channel
        do {
            channel = try ClientBootstrap(group: group)
                .connectTimeout(.seconds(5))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        try channel.pipeline.syncOperations.addHandler(collector)
                    }
                }
                .connect(unixDomainSocketPath: socketPath).wait()
        } catch {
            collector.finish(.failure(error))
            throw ConnectionError(path: socketPath, underlying: Self.describe(error))
        }
        var head = HTTPRequestHead(version: .http1_1, method: method, uri: path)
        head.headers.add(name: "Host", value: "localhost")
        head.headers.add(name: "Connection", value: "close")
        let bytes = body.map { Array($0.utf8) } ?? []
        head.headers.add(name: "Content-Length", value: String(bytes.count))
        if body != nil { head.headers.add(name: "Content-Type", value: "application/json") }
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if !bytes.isEmpty {
            channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: bytes))), promise: nil)
        }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let scheduled = channel.eventLoop.scheduleTask(in: timeout) {
            collector.finish(.failure(ConnectionError(path: socketPath, underlying: "no answer within \(timeout.nanoseconds / 1_000_000_000) s")))
            channel.close(promise: nil)
        }
        defer { scheduled.cancel() }
        do {
            return try collector.promise.futureResult.wait()
        } catch let e as ConnectionError {
            throw e
        } catch {
            throw ConnectionError(path: socketPath, underlying: "\(error)")
        }
    }
}

/// Collects the response parts into a `Reply`.
// @unchecked: its mutable fields are touched only on the channel's event loop.
private final class ReplyCollector: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    let promise: EventLoopPromise<ControlClient.Reply>
    private var status = 0
    private var body = ByteBuffer()
    private var done = false
    // Only touched on the channel's event loop.
    let socketPath: String
    init(promise: EventLoopPromise<ControlClient.Reply>, socketPath: String) {
        self.promise = promise
        self.socketPath = socketPath
    }

    /// Completes the promise once; later outcomes are ignored.
    func finish(_ result: Result<ControlClient.Reply, any Error>) {
        guard !done else { return }
        done = true
        promise.completeWith(result)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case let .head(head): status = Int(head.status.code)
        case var .body(buffer): body.writeBuffer(&buffer)
        case .end:
            finish(.success(.init(status: status, body: body.readString(length: body.readableBytes) ?? "")))
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish(.failure(error))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(.failure(ControlClient.ConnectionError(path: socketPath, underlying: "the connection closed before a reply")))
    }
}
