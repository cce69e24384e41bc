import Foundation
import Migration
import SecureChannel
import SystemCalls
import Testing

/// Loopback throughput of the TLS transport's `send` against plain TCP, in 1 MiB pieces (a
/// migration stream over TLS goes through `gather` instead, in 256 KiB pieces). Prints MiB/s and asserts nothing about speed: the figure
/// depends on the machine. Off by default (it moves 512 MiB); run with
/// `SECURE_CHANNEL_BENCHMARK=1 swift test --filter ThroughputBenchmark`.
@Suite(.serialized, .enabled(if: ProcessInfo.processInfo.environment["SECURE_CHANNEL_BENCHMARK"] != nil))
struct ThroughputBenchmark {
    static let total = 256 << 20

    /// Sends `total` bytes from `sender` to `receiver` in 1 MiB pieces; returns MiB/s.
    func measure(sender: any MigrationTransport, receiver: any MigrationTransport) throws -> Double {
        let piece = pattern(count: TransportSink.bufferSize, seed: 3)
        let started = monotonicMilliseconds()
        let sending = BackgroundThread {
            try piece.withUnsafeBytes { bytes in
                for _ in 0 ..< Self.total / piece.count { try sender.send(bytes) }
            }
        }
        var sink = [UInt8](repeating: 0, count: piece.count)
        try sink.withUnsafeMutableBytes { buffer in
            for _ in 0 ..< Self.total / piece.count { try receiver.receive(into: buffer) }
        }
        try sending.result()
        #expect(sink == piece)
        let seconds = (monotonicMilliseconds() - started) / 1000
        return Double(Self.total >> 20) / seconds
    }

    @Test func tlsAgainstPlainTCP() throws {
        let tcpListener = try TCPListener(listen: "127.0.0.1:0")
        let tcpAccepting = BackgroundThread { try tcpListener.accept() }
        let tcpClient = try TCPTransport.connect(to: "127.0.0.1:\(tcpListener.port)")
        let tcpServer = try tcpAccepting.result()
        let tcp = try measure(sender: tcpClient, receiver: tcpServer)
        tcpClient.close(); tcpServer.close()

        let source = try makeIdentity("host-a"), destination = try makeIdentity("host-b")
        let tlsListener = try TLSListener(listen: "127.0.0.1:0", identity: destination, authorize: enrolled(source))
        let end = deadline(inSeconds: 10)
        let tlsAccepting = BackgroundThread { try tlsListener.accept(deadline: end, onRefused: { _ in }) }
        let tlsClient = try TLSTransport.connect(to: "127.0.0.1:\(tlsListener.port)", identity: source,
                                                 authorize: enrolled(destination), expectedPeer: "host-b")
        let tlsServer = try tlsAccepting.result()
        let tls = try measure(sender: tlsClient, receiver: tlsServer)
        tlsClient.close(); tlsServer.close()

        print("loopback, \(Self.total >> 20) MiB in 1 MiB sends: TCP \(Int(tcp)) MiB/s, TLS 1.3 \(Int(tls)) MiB/s (\(Int(100 * tls / tcp))% of TCP)")
    }
}
