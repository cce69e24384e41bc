import Billboard
import Foundation
import GuestMemory
import Testing
import TestSupport
import MachineCore
import Migration
import SystemCalls
import VMM

/// A loopback TCP proxy between a migration source and its destination: it forwards both ways,
/// keeps what went each way, and can flip one bit of the source's stream, as an attacker on the
/// path could.
// @unchecked: the captures are read and written only under `lock`; the sockets are owned.
final class TCPProxy: @unchecked Sendable {
    private let listening: OwnedFileDescriptor
    let port: UInt16
    private let lock = NSLock()
    private var fromSource: [UInt8] = []
    private var fromDestination: [UInt8] = []

    /// What the proxy does to the source's stream: flip one bit at an offset, drop a range of
    /// bytes, or cut the connection after a number of bytes.
    enum Tamper: Sendable { case none, flip(at: Int), drop(Range<Int>), cut(after: Int) }

    convenience init(targetPort: UInt16, flipSourceByteAt flip: Int) throws {
        try self.init(targetPort: targetPort, tamper: .flip(at: flip))
    }

    init(targetPort: UInt16, tamper: Tamper = .none) throws {
        (listening, port) = try Self.listen()
        let listening = self.listening
        Thread.detachNewThread { [self] in
            let client = accept(listening.raw, nil, nil)
            guard client >= 0 else { return }
            let server = Self.connect(targetPort)
            guard server >= 0 else { Glibc.close(client); return }
            let a = OwnedFileDescriptor(taking: client), b = OwnedFileDescriptor(taking: server)
            let done = DispatchSemaphore(value: 0)
            Thread.detachNewThread { [self] in pump(from: a, to: b, tamper: tamper, toDestination: true); done.signal() }
            pump(from: b, to: a, tamper: .none, toDestination: false)
            done.wait()
        }
    }

    /// What the source sent and what the destination answered, as seen on the wire.
    var captured: (fromSource: [UInt8], fromDestination: [UInt8]) { lock.withLock { (fromSource, fromDestination) } }

    private func pump(from: OwnedFileDescriptor, to: OwnedFileDescriptor, tamper: Tamper, toDestination: Bool) {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        var offset = 0
        while true {
            let n = buffer.withUnsafeMutableBytes { read(from.raw, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            lock.withLock {
                if toDestination { fromSource += buffer[0..<n] } else { fromDestination += buffer[0..<n] }
            }
            var chunk = Array(buffer[0..<n])
            switch tamper {
            case let .flip(at) where at >= offset && at < offset + n:
                chunk[at - offset] ^= 0x01
            case let .drop(range):
                chunk = chunk.enumerated().filter { !range.contains(offset + $0.offset) }.map(\.element)
            case let .cut(after) where offset + n > after:
                chunk = Array(chunk.prefix(max(0, after - offset)))
            default:
                break
            }
            offset += n
            var sent = 0
            while sent < chunk.count {
                let w = chunk.withUnsafeBytes { write(to.raw, $0.baseAddress! + sent, chunk.count - sent) }
                if w <= 0 { break }
                sent += w
            }
            if case let .cut(after) = tamper, offset >= after { break }
        }
        shutdown(to.raw, Int32(SHUT_RDWR))
        shutdown(from.raw, Int32(SHUT_RDWR))
    }

    static func listen() throws -> (OwnedFileDescriptor, UInt16) {
        let fd = OwnedFileDescriptor(taking: socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd.raw, $0, len) } }
        try #require(bound == 0 && Glibc.listen(fd.raw, 4) == 0)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd.raw, $0, &len) } }
        return (fd, UInt16(bigEndian: addr.sin_port))
    }

    static func connect(_ port: UInt16) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = port.bigEndian
        let r = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        if r != 0 { Glibc.close(fd); return -1 }
        return fd
    }
}

/// A destination that listens with TLS (or plaintext) on the destination host's store.
// @unchecked: `guest` and `error` are written by the receiving thread before `done` is signalled, read after.
final class SecureDestination: @unchecked Sendable {
    let listener: any MigrationListener
    private let done = DispatchSemaphore(value: 0)
    private(set) var guest: AdmittedGuest?
    private(set) var error: (any Error)?
    let refusals = LockedLines()

    init(plaintext: Bool = false, listenSeconds: Double = 60) throws {
        let hosts = try localHosts()
        let store = hosts.destination
        listener = try GuestDoors.listen("127.0.0.1:0", store: store, plaintext: plaintext)
        let refusals = self.refusals
        Thread.detachNewThread { [self] in
            do {
                guest = try GuestDoors.receive(listener: listener, deadline: monotonicMilliseconds() + listenSeconds * 1000,
                                               store: store, settings: hosts.settings, dirtyTracker: .bitmap,
                                               log: { refusals.append($0) }, serialOutput: { _ in })
            } catch { self.error = error }
            done.signal()
        }
    }

    var port: UInt16 { listener.port }
    func wait(timeout: Double = 120) -> Bool { done.wait(timeout: .now() + timeout) == .success }
}

// @unchecked: `lines` is read and written only under `lock`.
final class LockedLines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.withLock { lines.append(line) } }
    var all: [String] { lock.withLock { lines } }
}

/// Migrates `guest` to 127.0.0.1:`port` over TLS to the enrolled `peer` (or in plaintext).
func secureMigrate(_ guest: AdmittedGuest, port: UInt16, peer: String? = "dst", plaintext: Bool = false) -> MigrationReport {
    let settings = MigrationSettings(destination: "127.0.0.1:\(port)", peer: peer, transport: plaintext ? .plaintext : .tls,
                                     maxDowntimeMs: 300, timeoutSeconds: 30)
    return PreCopySender(vm: guest, settings: settings).run { try guest.connect(settings) }
}

@Suite("Secure migration, tried as an attacker would", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct SecureMigrationTests {
    static let canary = "SWIFTVMMCANARY7f3a"

    /// A counter with the canary in its command line and in a page of its memory.
    func canaryGuest(_ capture: SerialCapture) throws -> AdmittedGuest {
        let guest = try bootLocal("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=400000 note=\(Self.canary)"),
                                  serialOutput: capture.append)
        try guest.memory.write(Array(Self.canary.utf8), at: GuestAddress(0x30_0000))
        guest.start()
        return guest
    }

    func contains(_ haystack: [UInt8], _ needle: String) -> Bool {
        let n = Array(needle.utf8)
        guard haystack.count >= n.count else { return false }
        return (0...(haystack.count - n.count)).contains { haystack[$0..<$0 + n.count].elementsEqual(n) }
    }

    func expectStillRunning(_ guest: AdmittedGuest, _ capture: SerialCapture) {
        #expect(guest.state == .running)
        #expect(guest.session.holdsLease, "the source lost its lease")
        let before = capture.count
        // Progress, however loaded the machine: a few more bytes within a generous bound.
        #expect(waitUntil(20) { capture.count > before }, "the source guest makes no progress")
    }

    @Test("the canary in the guest's memory and command line never appears on the wire (and does in plaintext)")
    func nothingReadable() throws {
        for plaintext in [false, true] {
            let capture = SerialCapture()
            let guest = try canaryGuest(capture)
            usleep(100_000)
            let destination = try SecureDestination(plaintext: plaintext)
            let proxy = try TCPProxy(targetPort: destination.port)
            let report = secureMigrate(guest, port: proxy.port, plaintext: plaintext)
            #expect(report.outcome == .completed, "\(report.error ?? "")")
            #expect(destination.wait())
            destination.guest?.requestStop()
            guest.end(with: .migrated)
            let wire = proxy.captured.fromSource + proxy.captured.fromDestination
            #expect(wire.count > 16 << 10, "the proxy saw too little: \(wire.count) bytes")
            // The control case proves the search finds the canary when it is there.
            #expect(contains(wire, Self.canary) == plaintext, plaintext ? "the canary was not found in a plaintext capture" : "the canary crossed the wire readable")
        }
    }

    // The counter's stream is about 30-40 KB after the handshake: 12 000 lands in its memory
    // records, 28 000 late in the stream, among the vCPU and device state.
    @Test("the source's stream tampered with by a proxy (a bit flipped in memory or in the vCPU state, bytes dropped, the link cut before the commit): the destination never starts the guest, the source keeps it",
          arguments: [TCPProxy.Tamper.flip(at: 12_000), .flip(at: 28_000), .drop(14_000..<14_100), .cut(after: 20_000)])
    func tamperedStreamRefused(_ tamper: TCPProxy.Tamper) throws {
        let capture = SerialCapture()
        let guest = try canaryGuest(capture)
        usleep(100_000)
        let destination = try SecureDestination(listenSeconds: 5)
        let proxy = try TCPProxy(targetPort: destination.port, tamper: tamper)
        let report = secureMigrate(guest, port: proxy.port)
        #expect(report.outcome == .failed)
        #expect(destination.wait())
        #expect(destination.guest == nil, "the destination started a guest from a tampered stream")
        expectStillRunning(guest, capture)
        guest.requestStop()
        guest.end()
    }

    @Test("a recorded TLS migration replayed to the destination is refused at the handshake")
    func replayRefused() throws {
        let capture = SerialCapture()
        let guest = try canaryGuest(capture)
        usleep(100_000)
        let first = try SecureDestination()
        let proxy = try TCPProxy(targetPort: first.port)
        #expect(secureMigrate(guest, port: proxy.port).outcome == .completed)
        #expect(first.wait())
        first.guest?.requestStop()
        guest.end(with: .migrated)
        // The recording, sent again to a fresh destination.
        let second = try SecureDestination(listenSeconds: 4)
        let fd = TCPProxy.connect(second.port)
        try #require(fd >= 0)
        let replay = OwnedFileDescriptor(taking: fd)
        let recorded = proxy.captured.fromSource
        _ = recorded.withUnsafeBytes { write(replay.raw, $0.baseAddress, $0.count) }
        #expect(second.wait())
        #expect(second.guest == nil, "a replayed migration started a guest")
        #expect(!second.refusals.all.isEmpty, "the replay was not refused")
    }

    @Test("a rogue plain listener gets no guest byte; the source keeps its guest and its lease")
    func rogueListener() throws {
        let capture = SerialCapture()
        let guest = try canaryGuest(capture)
        usleep(100_000)
        let (rogue, port) = try TCPProxy.listen()
        let received = LockedLines()
        Thread.detachNewThread {
            let c = accept(rogue.raw, nil, nil)
            guard c >= 0 else { return }
            let conn = OwnedFileDescriptor(taking: c)
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            // Answer like a plaintext destination would, and keep what arrives.
            let n = buffer.withUnsafeMutableBytes { read(conn.raw, $0.baseAddress, $0.count) }
            if n > 0 { received.append(String(decoding: buffer[0..<n], as: UTF8.self)) }
            _ = "HTTP/1.0 200 OK\r\n\r\n".withCString { write(conn.raw, $0, 19) }
            while read(conn.raw, &buffer, buffer.count) > 0 {}
        }
        let report = secureMigrate(guest, port: port)
        #expect(report.outcome == .failed)
        #expect(!received.all.joined().contains(Self.canary))
        expectStillRunning(guest, capture)
        guest.requestStop()
        guest.end()
    }

    /// A migration the channel must refuse: which transport each side uses, and whom the
    /// source names.
    struct Mismatch: Sendable, CustomTestStringConvertible {
        let name: String
        let plaintextDestination: Bool
        let plaintextSource: Bool
        let peer: String?
        var testDescription: String { name }
    }

    @Test("refused by the channel before any guest byte, the source keeping its guest and lease, the destination reserving nothing and listening on",
          arguments: [
              Mismatch(name: "a destination enrolled as another host than the one named", plaintextDestination: false, plaintextSource: false, peer: "src"),
              Mismatch(name: "a source offering plaintext to a TLS destination", plaintextDestination: false, plaintextSource: true, peer: nil),
              Mismatch(name: "a TLS source meeting a plaintext destination", plaintextDestination: true, plaintextSource: false, peer: "dst"),
          ])
    func channelMismatchRefused(_ mismatch: Mismatch) throws {
        let capture = SerialCapture()
        let guest = try canaryGuest(capture)
        usleep(100_000)
        let destination = try SecureDestination(plaintext: mismatch.plaintextDestination, listenSeconds: 4)
        let report = secureMigrate(guest, port: destination.port, peer: mismatch.peer, plaintext: mismatch.plaintextSource)
        #expect(report.outcome == .failed)
        #expect(report.pagesSent == 0, "guest pages left for a peer the channel refused")
        expectStillRunning(guest, capture)
        #expect(destination.wait())
        #expect(destination.guest == nil)
        guest.requestStop()
        guest.end()
    }

    @Test("after a successful move, the source cannot resume the guest")
    func noResumeAfterMove() throws {
        let capture = SerialCapture()
        let guest = try canaryGuest(capture)
        usleep(100_000)
        let destination = try SecureDestination()
        #expect(secureMigrate(guest, port: destination.port).outcome == .completed)
        #expect(destination.wait())
        #expect(throws: (any Error).self) { try guest.resume() }
        #expect(guest.state == .paused)
        destination.guest?.requestStop()
        guest.end(with: .migrated)
    }

    @Test("a destination with a self-made identity (a store nobody enrolled) gets no guest byte")
    func selfMadeIdentityRefused() throws {
        let capture = SerialCapture()
        let guest = try canaryGuest(capture)
        usleep(100_000)
        let eve = try BillboardStore.initialize(directory: temporaryPath("eve"), hostName: "dst", firstAdmin: try AdminKey(name: "eve"))
        let rogue = try GuestDoors.listen("127.0.0.1:0", store: eve, plaintext: false)
        let refused = LockedLines()
        Thread.detachNewThread {
            _ = try? rogue.nextConnection(deadline: monotonicMilliseconds() + 4000, onRefused: { refused.append($0) })
        }
        // Same host name as the real destination, another key: the pinned key decides.
        let report = secureMigrate(guest, port: rogue.port, peer: "dst")
        #expect(report.outcome == .failed)
        #expect(report.pagesSent == 0)
        #expect(report.error?.contains("not enrolled") == true || report.error?.contains("refused") == true, "\(report.error ?? "")")
        expectStillRunning(guest, capture)
        guest.requestStop()
        guest.end()
    }

    @Test("a source whose enrolment the destination removed is refused at the handshake: no guest byte leaves, the source keeps its guest and lease")
    func revokedSourceRefused() throws {
        let hosts = try localHosts()
        // A destination host of its own, so that removing the source there changes no other test.
        let name = "dst-revoking-\(UInt16.random(in: 0...UInt16.max))"
        let revoking = try BillboardStore.initialize(directory: temporaryPath(name), hostName: name, firstAdmin: hosts.admin)
        try revoking.peerHosts.add(name: "src", signingKey: hosts.source.hostSigningKey, agreementKey: hosts.source.hostAgreementKey, signedBy: hosts.admin)
        try hosts.source.peerHosts.add(name: name, signingKey: revoking.hostSigningKey, agreementKey: revoking.hostAgreementKey, signedBy: hosts.admin)
        try revoking.peerHosts.remove(name: "src", signedBy: hosts.admin)

        let image = try Fixtures.guestBytes("counter.elf")
        let c = MachineConfiguration(commandLine: "count=0 ticks=400000 note=\(Self.canary)")
        let guestName = "revoked-\(UInt32.random(in: 0...UInt32.max))"
        for store in [hosts.source, revoking] {
            try store.registry.register(GuestRegistration(name: guestName, imageSHA256: ImageDigest.sha256(Data(image)), memoryBytes: c.memorySize,
                                                          vcpus: c.vcpuCount, commandLine: c.commandLine,
                                                          allowedHosts: ["src", name], beacons: .required), signedBy: hosts.admin)
        }
        let capture = SerialCapture()
        let guest = try GuestDoors.boot(image: image, name: guestName, configuration: c, store: hosts.source, settings: hosts.settings,
                                        log: { _ in }, serialOutput: capture.append)
        guest.start()
        usleep(100_000)

        let listener = try GuestDoors.listen("127.0.0.1:0", store: revoking, plaintext: false)
        let refused = LockedLines()
        let received = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            _ = try? GuestDoors.receive(listener: listener, deadline: monotonicMilliseconds() + 4000, store: revoking,
                                        settings: hosts.settings, dirtyTracker: .bitmap, log: { refused.append($0) }, serialOutput: { _ in })
            received.signal()
        }
        let report = secureMigrate(guest, port: listener.port, peer: name)
        #expect(report.outcome == .failed)
        #expect(report.pagesSent == 0, "guest pages left for a destination that refuses the source")
        expectStillRunning(guest, capture)
        #expect(received.wait(timeout: .now() + 30) == .success)
        #expect(refused.all.contains { $0.contains("removed") || $0.contains("not enrolled") }, "\(refused.all)")
        #expect(try revoking.instances.list().isEmpty, "the destination reserved something for a refused source")
        guest.requestStop()
        guest.end()
    }

    @Test("a flood of idle and garbage connections does not keep a receiving VMM from the real migration, nor a guest already running on that host from its beacons")
    func floodDoesNotStarve() throws {
        let capture = SerialCapture()
        let guest = try canaryGuest(capture)
        usleep(100_000)
        // A guest already running on the receiving host, in the receiving process: the flood
        // must not make it late with its beacons or its lease.
        let hosts = try localHosts()
        let image = try Fixtures.guestBytes("counter.elf")
        let c = MachineConfiguration(commandLine: "count=0 ticks=400000")
        let resident = try GuestDoors.boot(image: image, name: try hosts.register(image, c), configuration: c, store: hosts.destination,
                                           settings: hosts.settings, log: { _ in }, serialOutput: { _ in })
        resident.start()
        defer { resident.requestStop(); _ = resident.waitForExit(); resident.end() }
        let residentName = resident.session.registration.name
        func residentBeacons() throws -> Int64 {
            try hosts.destination.instances.list().first { $0.pid == getpid() && $0.guestName == residentName }?.beaconCount ?? 0
        }
        let destination = try SecureDestination()
        // More idle connections than the listener has handshake slots, and some that send junk.
        var flood: [OwnedFileDescriptor] = []
        for i in 0..<24 {
            let fd = TCPProxy.connect(destination.port)
            guard fd >= 0 else { continue }
            let connection = OwnedFileDescriptor(taking: fd)
            if i % 4 == 0 { _ = "GET / HTTP/1.0\r\n\r\n".withCString { write(connection.raw, $0, 18) } }
            flood.append(connection)
        }
        // Let the listener take them all in before the real source arrives.
        usleep(300_000)
        let report = secureMigrate(guest, port: destination.port)
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(destination.wait())
        #expect(destination.guest?.state == .running)
        let beaconsAfterMove = try residentBeacons()
        #expect(try waitUntil(10) { try residentBeacons() > beaconsAfterMove }, "the resident guest's beacons stopped being recorded")
        let stale = try hosts.destination.scan.run(staleAfter: Double(hosts.settings.beaconIntervalMs) / 1000 * 3)
            .filter { $0.kind == .stale && $0.guest == residentName }
        #expect(stale.isEmpty, "\(stale)")
        #expect(resident.session.holdsLease && resident.state == .running)
        destination.guest?.requestStop()
        guest.end(with: .migrated)
        flood.forEach { $0.close() }
    }
}

