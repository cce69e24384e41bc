#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Snapshot
import SystemCalls

/// A bidirectional byte stream between two VMMs: mutually authenticated TLS (SecureChannel),
/// plain TCP by consent, or in memory for tests.
public protocol MigrationTransport: AnyObject, Sendable {
    /// The enrolled host the channel authenticated at the other end; nil for a plaintext
    /// channel, whose peer is only what it claims (and what its signatures prove).
    var authenticatedPeer: String? { get }
    /// Writes all of `bytes` or throws.
    func send(_ bytes: UnsafeRawBufferPointer) throws
    /// Fills `buffer` completely or throws (end of stream is an error).
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws
    /// Closes both directions; a blocked peer sees end of stream.
    func close()
    /// A readable name of the peer, for messages.
    var peer: String { get }
}

extension MigrationTransport {
    /// How the state stream is protected on this channel: an authenticated channel needs no
    /// checksums, digests or signatures of its own; a plaintext one carries a file's.
    public var streamIntegrity: SectionIntegrity { authenticatedPeer == nil ? .sha256Checksums : .channelAuthenticated }
}

/// A transport that gathers small writes into its own send buffers, so that a sink's bytes
/// are copied once, into the memory they are sent (or encrypted) from. Bytes given to `send`
/// go after everything gathered before them. One writer at a time: two sinks writing at once
/// would mix their bytes at every write, not at every flush.
public protocol GatheringTransport: MigrationTransport {
    /// Appends `bytes` to what is gathered; full pieces go to the network as they fill.
    func gather(_ bytes: UnsafeRawBufferPointer) throws
    /// Sends everything gathered; returns once it is all in the socket, or throws.
    func flushGathered() throws
}

/// The stream writer's view of a transport. Small writes (headers, page table
/// entries, single pages) are gathered into one buffer and sent in large pieces;
/// `flush()` must be called before waiting for the peer.
public struct TransportSink: ByteSink {
    public let transport: any MigrationTransport
    /// The transport itself, when it gathers: then the sink holds no buffer of its own.
    private let gatherer: (any GatheringTransport)?
    private var buffer: UnsafeMutableRawBufferPointer
    private var used = 0
    private let owner: BufferOwner?
    public static let bufferSize = 1 << 20

    /// Frees the buffer when the last copy of the sink goes away.
    // @unchecked: the memory is only touched through the sink that owns it, one thread at a time.
    private final class BufferOwner: @unchecked Sendable {
        let memory: UnsafeMutableRawBufferPointer
        init(_ size: Int) { memory = .allocate(byteCount: size, alignment: 64) }
        deinit { memory.deallocate() }
    }

    public init(_ transport: any MigrationTransport) {
        self.transport = transport
        if let gatherer = transport as? any GatheringTransport {
            self.gatherer = gatherer
            self.owner = nil
            self.buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
        } else {
            let owner = BufferOwner(Self.bufferSize)
            self.gatherer = nil
            self.owner = owner
            self.buffer = owner.memory
        }
    }

    public mutating func write(_ bytes: UnsafeRawBufferPointer) throws {
        if let gatherer { return try gatherer.gather(bytes) }
        if used + bytes.count > buffer.count { try flush() }
        if bytes.count >= buffer.count {
            try transport.send(bytes)
            return
        }
        // SAFETY: bounds checked above; the buffer lives as long as `owner`.
        (buffer.baseAddress! + used).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        used += bytes.count
    }

    /// Sends whatever is buffered.
    public mutating func flush() throws {
        if let gatherer { return try gatherer.flushGathered() }
        guard used > 0 else { return }
        let pending = UnsafeRawBufferPointer(start: buffer.baseAddress, count: used)
        used = 0
        try transport.send(pending)
    }
}

/// The stream reader's view of a transport.
public struct TransportSource: ByteSource {
    public let transport: any MigrationTransport
    public init(_ transport: any MigrationTransport) { self.transport = transport }
    public mutating func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws { try transport.receive(into: buffer) }
}

/// Parses "HOST:PORT" (IPv4 or a name; "[v6]:PORT" for IPv6).
public func parseHostPort(_ text: String, allowAnyPort: Bool = false) throws -> (host: String, port: UInt16) {
    var host = text, portText = ""
    if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
        host = String(text[text.index(after: text.startIndex)..<close])
        portText = String(text[text.index(after: close)...].dropFirst())
    } else if let colon = text.lastIndex(of: ":") {
        host = String(text[..<colon])
        portText = String(text[text.index(after: colon)...])
    }
    guard !host.isEmpty, let port = UInt16(portText), port > 0 || allowAnyPort else {
        throw MigrationError.connection("'\(text)' is not HOST:PORT (e.g. 127.0.0.1:7000)")
    }
    return (host, port)
}

/// Plain TCP with send/receive timeouts, so a dead peer cannot hang a migration.
public final class TCPTransport: MigrationTransport {
    private let socket: OwnedFileDescriptor
    public let peer: String
    /// Plain TCP authenticates nobody.
    public var authenticatedPeer: String? { nil }

    init(socket: OwnedFileDescriptor, peer: String, timeoutSeconds: Int) {
        self.socket = socket
        self.peer = peer
        let fd = socket.raw
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close() }

    /// Connects to `destination` ("HOST:PORT").
    public static func connect(to destination: String, timeoutSeconds: Int = 30) throws -> TCPTransport {
        let (host, port) = try parseHostPort(destination)
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let first = list else {
            throw MigrationError.connection("cannot resolve '\(host)': \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(list) }
        var lastError: Int32 = 0
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let ai = cursor {
            let fd = Glibc.socket(ai.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if fd >= 0 {
                // Closed by its owner unless the transport takes it.
                let socket = OwnedFileDescriptor(taking: fd)
                // Not retried on EINTR: an interrupted connect(2) goes on in the background
                // and a second call would fail with EALREADY; the next address is tried instead.
                if Glibc.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 {
                    return TCPTransport(socket: socket, peer: destination, timeoutSeconds: timeoutSeconds)
                }
                lastError = errno
            }
            cursor = ai.pointee.ai_next
        }
        throw MigrationError.connection("cannot connect to \(destination): \(String(cString: strerror(lastError))); is a VMM waiting there to receive the migration?")
    }

    public func send(_ bytes: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < bytes.count {
            do {
                done += try retryingOnInterrupt("send") {
                    Glibc.send(socket.raw, bytes.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL))
                }
            } catch {
                throw MigrationError.connection(error.errno == EAGAIN ? "sending to \(peer) timed out" : "sending to \(peer) failed: \(error.message)")
            }
        }
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n: Int
            do {
                n = try retryingOnInterrupt("recv") { recv(socket.raw, buffer.baseAddress! + done, buffer.count - done, 0) }
            } catch {
                throw MigrationError.connection(error.errno == EAGAIN ? "no data from \(peer) within the timeout" : "receiving from \(peer) failed: \(error.message)")
            }
            if n == 0 { throw MigrationError.connection("\(peer) closed the connection") }
            done += n
        }
    }

    /// Shuts both directions down, so a thread blocked on the socket and the peer see end of
    /// stream. The descriptor itself is closed when the transport goes away, never here: another
    /// thread (a cancel) may call this while the owner is between reading the number and using
    /// it, and a number closed under it could be reused by anything.
    public func close() {
        shutdown(socket.raw, Int32(SHUT_RDWR))
    }
}

/// A listening TCP socket for an incoming migration.
public final class TCPListener: Sendable {
    private let socket: OwnedFileDescriptor
    public let address: String
    public let port: UInt16

    public init(listen: String) throws {
        let (host, port) = try parseHostPort(listen, allowAnyPort: true)
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &list)
        guard rc == 0, let ai = list else {
            throw MigrationError.connection("cannot resolve '\(host)': \(String(cString: gai_strerror(rc)))")
        }
        defer { freeaddrinfo(list) }
        let fd = Glibc.socket(ai.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw MigrationError.connection("socket: \(String(cString: strerror(errno)))") }
        // Closed by its owner on every path out, the early throws included.
        let socket = OwnedFileDescriptor(taking: fd)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0, Glibc.listen(fd, 4) == 0 else {
            throw MigrationError.connection("cannot listen on \(listen): \(String(cString: strerror(errno)))")
        }
        var addr = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(fd, $0, &len) } }
        let boundPort = withUnsafePointer(to: &addr) { p -> UInt16 in
            p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
        self.socket = socket
        self.address = host
        self.port = boundPort
    }

    /// Waits for one connection.
    public func accept(timeoutSeconds: Int = 30) throws -> TCPTransport {
        try accept(deadline: nil, timeoutSeconds: timeoutSeconds)
    }

    /// The next connection; throws `MigrationError.timedOut` once `deadline` (monotonic ms)
    /// passes with none.
    public func accept(deadline: Double?, timeoutSeconds: Int = 30) throws -> TCPTransport {
        if let deadline {
            var ready = pollfd(fd: socket.raw, events: Int16(POLLIN), revents: 0)
            while true {
                let left = deadline - monotonicMilliseconds()
                guard left > 0 else { throw MigrationError.timedOut("no migration arrived before the listen deadline") }
                let n = poll(&ready, 1, Int32(min(left, 60_000)))
                if n > 0 { break }
                if n < 0 && errno != EINTR { throw MigrationError.connection("poll on the listening socket failed: \(String(cString: strerror(errno)))") }
            }
        }
        var addr = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let c: Int32
        do throws(SystemCallError) {
            c = try retryingOnInterrupt("accept") {
                withUnsafeMutablePointer(to: &addr) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.accept(socket.raw, $0, &len) }
                }
            }
        } catch {
            throw MigrationError.connection("accept failed: \(error.message)")
        }
        let connection = OwnedFileDescriptor(taking: c)
        _ = fcntl(c, F_SETFD, FD_CLOEXEC)
        return TCPTransport(socket: connection, peer: "source", timeoutSeconds: timeoutSeconds)
    }

    /// Unblocks a pending `accept` (used on shutdown).
    public func shutdownListening() { shutdown(socket.raw, Int32(SHUT_RDWR)) }
}

/// Where incoming migrations arrive: plain TCP (`TCPListener`) or TLS (SecureChannel).
public protocol MigrationListener: Sendable {
    var address: String { get }
    var port: UInt16 { get }
    /// The next connection a migration may run on (on TLS: one whose peer authenticated);
    /// connections refused before that are reported through `onRefused`. Throws
    /// `MigrationError.timedOut` once `deadline` (monotonic ms) passes.
    func nextConnection(deadline: Double?, onRefused: @escaping @Sendable (String) -> Void) throws -> any MigrationTransport
    /// Stops listening (a signal before any guest arrived).
    func shutdownListening()
}

extension TCPListener: MigrationListener {
    public func nextConnection(deadline: Double?, onRefused: @escaping @Sendable (String) -> Void) throws -> any MigrationTransport {
        try accept(deadline: deadline)
    }
}
