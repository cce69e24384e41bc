import Crypto
import Foundation
import Migration
import SecureChannel
import SystemCalls
import Testing

/// Serialized: several tests measure handshake and inactivity deadlines, which a 2-core
/// machine running the other tests at once could stretch.
@Suite(.serialized)
struct TLSTransportTests {
    let source: TLSIdentity
    let destination: TLSIdentity

    init() throws {
        source = try makeIdentity("host-a")
        destination = try makeIdentity("host-b")
    }

    /// A listener on a free loopback port for `destination`, trusting `clients`.
    func listener(trusting clients: [TLSIdentity], handshakeTimeoutSeconds: Double = 10, maxPendingHandshakes: Int = 8,
                  inactivityTimeoutSeconds: Double = 30) throws -> TLSListener {
        let names = Dictionary(clients.map { ($0.publicKeyBytes, $0.hostName) }, uniquingKeysWith: { first, _ in first })
        return try TLSListener(listen: "127.0.0.1:0", identity: destination, authorize: { names[$0] },
                               handshakeTimeoutSeconds: handshakeTimeoutSeconds, maxPendingHandshakes: maxPendingHandshakes,
                               inactivityTimeoutSeconds: inactivityTimeoutSeconds)
    }

    /// Runs `accept` on its own thread, as the receiver does.
    func acceptInBackground(_ listener: TLSListener, seconds: Double, log: RefusalLog) -> BackgroundThread<TLSTransport> {
        let end = deadline(inSeconds: seconds)
        return BackgroundThread { try listener.accept(deadline: end, onRefused: log.report) }
    }

    /// Asserts that the accept ran out of time with nothing handed out, i.e. that no
    /// connection (and so no application byte) reached the listener's owner.
    func expectNothingAccepted(_ accepting: BackgroundThread<TLSTransport>) {
        #expect(throws: MigrationError.self) { _ = try accepting.result() }
        if case let .timedOut(message)? = accepting.error as? MigrationError {
            #expect(message.contains("before the deadline"))
        } else {
            Issue.record("accept ended with \(String(describing: accepting.error)), not its deadline")
        }
    }

    @Test func authorizedHostsExchangeLargeAndSmallMessagesBothWays() throws {
        let listener = try listener(trusting: [source])
        let log = RefusalLog()
        let accepting = acceptInBackground(listener, seconds: 20, log: log)
        let client = try TLSTransport.connect(to: "127.0.0.1:\(listener.port)", identity: source,
                                              authorize: enrolled(destination), expectedPeer: "host-b")
        let server = try accepting.result()
        defer { client.close(); server.close() }
        #expect(client.peerHost == "host-b")
        #expect(server.peerHost == "host-a")

        // Small, in turn.
        try client.send(Array("hello".utf8))
        #expect(try server.receive(count: 5) == Array("hello".utf8))
        try server.send(Array("ok".utf8))
        #expect(try client.receive(count: 2) == Array("ok".utf8))

        // Large, both directions at once: each side sends on one thread and receives on another.
        let size = 64 << 20
        let toServer = pattern(count: size, seed: 1), toClient = pattern(count: size, seed: 2)
        let clientSends = BackgroundThread { try client.send(toServer) }
        let serverSends = BackgroundThread { try server.send(toClient) }
        let serverReceives = BackgroundThread { try server.receive(count: size) }
        let clientGot = try client.receive(count: size)
        try clientSends.result(); try serverSends.result()
        let serverGot = try serverReceives.result()
        #expect(SHA256.hash(data: clientGot) == SHA256.hash(data: toClient))
        #expect(SHA256.hash(data: serverGot) == SHA256.hash(data: toServer))
        #expect(log.all.isEmpty)

        // The stream goes on after a large transfer, and the end of it is seen.
        try client.send([42])
        #expect(try server.receive(count: 1) == [42])
        client.close()
        #expect(throws: MigrationError.self) { _ = try server.receive(count: 1) }
    }

    @Test func clientRefusesAServerWhoseKeyIsNotEnrolled() throws {
        let listener = try listener(trusting: [source])
        let log = RefusalLog()
        let accepting = acceptInBackground(listener, seconds: 2, log: log)
        let attempt = #expect(throws: MigrationError.self) {
            _ = try TLSTransport.connect(to: "127.0.0.1:\(listener.port)", identity: source,
                                         authorize: { _ in nil }, expectedPeer: "host-b")
        }
        #expect("\(attempt!)".contains("not enrolled"))
        expectNothingAccepted(accepting)
        #expect(!log.all.isEmpty)
    }

    @Test func clientRefusesAServerEnrolledUnderAnotherName() throws {
        let listener = try listener(trusting: [source])
        let log = RefusalLog()
        let accepting = acceptInBackground(listener, seconds: 2, log: log)
        let destinationKey = destination.publicKeyBytes
        let attempt = #expect(throws: MigrationError.self) {
            _ = try TLSTransport.connect(to: "127.0.0.1:\(listener.port)", identity: source,
                                         authorize: { $0 == destinationKey ? "host-c" : nil }, expectedPeer: "host-b")
        }
        #expect("\(attempt!)".contains("enrolled as host-c, not as host-b"))
        expectNothingAccepted(accepting)
    }

    @Test func serverRefusesAClientWithoutCertificate() throws {
        let listener = try listener(trusting: [source])
        let log = RefusalLog()
        let accepting = acceptInBackground(listener, seconds: 2, log: log)
        let client = try RawTLSClient(port: listener.port, configuration: RawTLSClient.configuration(identity: nil))
        _ = client.waitForHandshake()
        client.sendApplicationBytes("secret migration stream")
        expectNothingAccepted(accepting)
        #expect(log.all.count == 1)
        #expect(log.all.first?.contains("it presented no certificate") == true)
        client.close()
    }

    @Test func serverRefusesAClientWithAnUnknownKey() throws {
        let listener = try listener(trusting: [source])
        let log = RefusalLog()
        let accepting = acceptInBackground(listener, seconds: 2, log: log)
        let stranger = try makeIdentity("host-x")
        // TLS 1.3 lets the client finish first; the refusal reaches it afterwards.
        if let client = try? TLSTransport.connect(to: "127.0.0.1:\(listener.port)", identity: stranger,
                                                  authorize: enrolled(destination), expectedPeer: "host-b") {
            try? client.send(Array("secret migration stream".utf8))
            #expect(throws: MigrationError.self) { _ = try client.receive(count: 1) }
            client.close()
        }
        expectNothingAccepted(accepting)
        #expect(log.all.count == 1)
        #expect(log.all.first?.contains("is not enrolled here") == true)
    }

    @Test func serverRefusesAClientWithAnExpiredCertificate() throws {
        let expired = try makeIdentity("host-a", validFrom: Date().addingTimeInterval(-2 * 86400),
                                       validUntil: Date().addingTimeInterval(-86400))
        let listener = try listener(trusting: [expired])
        let log = RefusalLog()
        let accepting = acceptInBackground(listener, seconds: 2, log: log)
        if let client = try? TLSTransport.connect(to: "127.0.0.1:\(listener.port)", identity: expired,
                                                  authorize: enrolled(destination), expectedPeer: "host-b") {
            try? client.send(Array("secret migration stream".utf8))
            client.close()
        }
        expectNothingAccepted(accepting)
        #expect(log.all.count == 1)
        #expect(log.all.first?.contains("expired") == true)
    }

    @Test func serverRefusesAClientOfferingOnlyTLS12() throws {
        let listener = try listener(trusting: [source])
        let log = RefusalLog()
        let accepting = acceptInBackground(listener, seconds: 2, log: log)
        let client = try RawTLSClient(port: listener.port,
                                      configuration: RawTLSClient.configuration(identity: source, maximumVersion: .tlsv12))
        #expect(!client.waitForHandshake())
        client.sendApplicationBytes("secret migration stream")
        expectNothingAccepted(accepting)
        #expect(log.all.count == 1)
        #expect(log.all.first?.contains("it does not offer TLS 1.3") == true)
        client.close()
    }

    @Test func plaintextClientIsRefusedAndTheNextGoodClientAccepted() throws {
        let listener = try listener(trusting: [source])
        let log = RefusalLog()
        let plaintext = try RawTCPClient(port: listener.port)
        plaintext.send(Array("GET / HTTP/1.0\r\n\r\n".utf8))
        let answer = plaintext.readUntilClosed(within: 5)
        #expect(answer != nil, "the server should close a plaintext connection")
        #expect(answer.map { !String(decoding: $0, as: UTF8.self).contains("HTTP") } ?? true)

        let accepting = acceptInBackground(listener, seconds: 10, log: log)
        let client = try TLSTransport.connect(to: "127.0.0.1:\(listener.port)", identity: source,
                                              authorize: enrolled(destination), expectedPeer: "host-b")
        let server = try accepting.result()
        defer { client.close(); server.close() }
        try client.send([7, 8, 9])
        #expect(try server.receive(count: 3) == [7, 8, 9])
        #expect(log.all.count == 1)
        #expect(log.all.first?.contains("it does not speak TLS") == true)
    }

    @Test func idleConnectionsBeyondTheLimitDoNotLockOutAGoodClient() throws {
        // A handshake deadline (60 s) far beyond the client's own (30 s): if the client gets in,
        // only the limit can have made room, however loaded the machine is.
        let listener = try listener(trusting: [source], handshakeTimeoutSeconds: 60, maxPendingHandshakes: 4)
        let log = RefusalLog()
        let idle = try (0 ..< 10).map { _ in try RawTCPClient(port: listener.port) }
        Thread.sleep(forTimeInterval: 0.3)  // lets the listener take them in first (on a busy machine, perhaps not all)
        let accepting = acceptInBackground(listener, seconds: 40, log: log)
        let client = try TLSTransport.connect(to: "127.0.0.1:\(listener.port)", identity: source,
                                              authorize: enrolled(destination), expectedPeer: "host-b", timeoutSeconds: 30)
        let server = try accepting.result()
        defer { client.close(); server.close() }
        #expect(server.peerHost == "host-a")
        // Room for 4, and 10 idle connections before it: the client got in only because idle ones
        // were dropped to make room. How many depends on how many the listener had taken in by
        // then (on a loaded machine, not all), so the count is only required to be positive, and
        // every drop reported must be a connection actually closed.
        expectNothingAccepted(acceptInBackground(listener, seconds: 0.5, log: log))
        let dropped = log.all.filter { $0.contains("handshakes were pending") }.count
        #expect(dropped >= 1)
        #expect(idle.filter { $0.readUntilClosed(within: 2) != nil }.count >= dropped)
    }

    @Test func aClientThatStallsMidHandshakeIsDroppedAtTheHandshakeDeadline() throws {
        let listener = try listener(trusting: [source], handshakeTimeoutSeconds: 0.5)
        let log = RefusalLog()
        let staller = try RawTCPClient(port: listener.port)
        // The first bytes of a TLS handshake record header, then nothing.
        staller.send([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        let started = monotonicMilliseconds()
        // Upper bounds here are loose on purpose: only "not before the deadline" and "not never" matter.
        #expect(staller.readUntilClosed(within: 30) != nil, "the listener should close a stalled handshake")
        let elapsed = monotonicMilliseconds() - started
        #expect(elapsed >= 400)
        expectNothingAccepted(acceptInBackground(listener, seconds: 0.5, log: log))
        #expect(log.all.count == 1)
        #expect(log.all.first?.contains("no complete TLS handshake within 0.5 s") == true)
    }

    @Test func acceptThrowsAtItsDeadlineWithNoClient() throws {
        let listener = try listener(trusting: [source])
        let started = monotonicMilliseconds()
        expectNothingAccepted(acceptInBackground(listener, seconds: 0.3, log: RefusalLog()))
        #expect(monotonicMilliseconds() - started >= 290)
    }

    @Test func shutdownListeningEndsAWaitingAccept() throws {
        let listener = try listener(trusting: [source])
        let accepting = acceptInBackground(listener, seconds: 30, log: RefusalLog())
        Thread.sleep(forTimeInterval: 0.2)
        listener.shutdownListening()
        let failure = #expect(throws: MigrationError.self) { _ = try accepting.result(within: 5) }
        #expect("\(failure!)".contains("shut down"))
    }

    @Test func closeWakesABlockedReceiveAndIsIdempotent() throws {
        let (client, server) = try connectedPair()
        let receiving = BackgroundThread { try server.receive(count: 16) }
        Thread.sleep(forTimeInterval: 0.3)
        let closed = monotonicMilliseconds()
        server.close()
        server.close()
        let failure = #expect(throws: MigrationError.self) { _ = try receiving.result(within: 5) }
        #expect("\(failure!)".contains("closed on this side"))
        #expect(monotonicMilliseconds() - closed < 5000)
        // The peer sees the end of the stream.
        #expect(throws: MigrationError.self) { _ = try client.receive(count: 1) }
        client.close()
    }

    @Test func aPeerTricklingBytesDoesNotHoldAReceiverPastTheInactivityDeadline() throws {
        let (client, server) = try connectedPair(inactivityTimeoutSeconds: 1)
        defer { client.close(); server.close() }
        let trickling = BackgroundThread {
            // Trickles for 30 s: a receiver timed per read (not per whole receive) would wait all of it.
            for _ in 0 ..< 150 {
                guard (try? client.send([1])) != nil else { return }
                Thread.sleep(forTimeInterval: 0.2)
            }
        }
        let started = monotonicMilliseconds()
        let failure = #expect(throws: MigrationError.self) { _ = try server.receive(count: 1000) }
        guard case .timedOut? = failure else {
            Issue.record("expected a time-out, got \(String(describing: failure))")
            return
        }
        let elapsed = monotonicMilliseconds() - started
        #expect(elapsed >= 900 && elapsed < 20_000)
        client.close()
        _ = try? trickling.result()
    }

    @Test("bytes gathered by a stream sink reach the peer in order with bytes sent directly, small writes and pieces larger than a gathered piece alike; after a close a gather or flush fails and says why")
    func gatheredBytesKeepTheirOrder() throws {
        let (client, server) = try connectedPair()
        defer { client.close(); server.close() }
        var sink = TransportSink(client)
        var expected: [UInt8] = []
        func write(_ bytes: [UInt8]) throws {
            try bytes.withUnsafeBytes { try sink.write($0) }
            expected += bytes
        }
        // Headers and pages, as a stream writes them, across several 256 KiB pieces...
        for i in 0..<200 {
            try write(Array("header \(i)".utf8))
            try write(pattern(count: 4096, seed: UInt8(truncatingIfNeeded: i)))
        }
        // ...one write larger than a piece...
        try write(pattern(count: 600 << 10, seed: 99))
        try write([1, 2, 3])
        // ...and a direct send, which must go after everything gathered before it.
        let direct = Array("sent directly".utf8)
        try client.send(direct)
        expected += direct
        try write(Array("after".utf8))
        try sink.flush()
        #expect(try server.receive(count: expected.count) == expected)

        client.close()
        let afterClose = #expect(throws: MigrationError.self) {
            try write(pattern(count: 300 << 10, seed: 5))
            try sink.flush()
        }
        #expect("\(afterClose.map { "\($0)" } ?? "")".contains("closed on this side"))
    }

    func connectedPair(inactivityTimeoutSeconds: Double = 30) throws -> (client: TLSTransport, server: TLSTransport) {
        let listener = try listener(trusting: [source], inactivityTimeoutSeconds: inactivityTimeoutSeconds)
        let accepting = acceptInBackground(listener, seconds: 10, log: RefusalLog())
        let client = try TLSTransport.connect(to: "127.0.0.1:\(listener.port)", identity: source,
                                              authorize: enrolled(destination), expectedPeer: "host-b")
        return (client, try accepting.result())
    }
}
