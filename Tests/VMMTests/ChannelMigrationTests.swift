import Foundation
@testable import Migration
import MachineCore
import Synchronization
import SystemCalls
import Testing
import TestSupport
@testable import VMM

/// A transport around a data channel that changes the challenge its opening answers: one
/// character of the `nonce` in the first control message, which on TLS carries no checksum
/// of its own (the channel is the integrity), so only the binding check can catch it.
final class ForgedChallengeTransport: MigrationTransport, @unchecked Sendable {
    let inner: any MigrationTransport
    private var forged = false
    init(_ inner: any MigrationTransport) { self.inner = inner }
    var authenticatedPeer: String? { inner.authenticatedPeer }
    var peer: String { inner.peer }
    func send(_ bytes: UnsafeRawBufferPointer) throws {
        var copy = Array(bytes)
        if !forged, let at = copy.firstRange(of: Array("\"nonce\":\"".utf8))?.upperBound {
            copy[at] = copy[at] == UInt8(ascii: "A") ? UInt8(ascii: "B") : UInt8(ascii: "A")
            forged = true
        }
        try copy.withUnsafeBytes { try inner.send($0) }
    }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws { try inner.receive(into: buffer) }
    func close() { inner.close() }
}

/// A transport around a data channel that is cut (both directions shut, as a failed link) once
/// `limit` bytes went out on it.
final class CutAfterTransport: MigrationTransport, @unchecked Sendable {
    let inner: any MigrationTransport
    let limit: Int
    private let sent = Mutex(0)
    init(_ inner: any MigrationTransport, limit: Int) {
        self.inner = inner
        self.limit = limit
    }
    var authenticatedPeer: String? { inner.authenticatedPeer }
    var peer: String { inner.peer }
    func send(_ bytes: UnsafeRawBufferPointer) throws {
        let total = sent.withLock { $0 += bytes.count; return $0 }
        if total > limit {
            inner.close()
            throw MigrationError.connection("the test cut this data channel after \(limit) bytes")
        }
        try inner.send(bytes)
    }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws { try inner.receive(into: buffer) }
    func close() { inner.close() }
}

/// The migration's connections in order: the first is the main one, the others data channels,
/// each passed through `channel`.
func connections(_ settings: MigrationSettings, via guest: AdmittedGuest,
                 channel: @escaping @Sendable (any MigrationTransport) throws -> any MigrationTransport = { $0 })
    -> @Sendable () throws -> any MigrationTransport {
    let count = Mutex(0)
    return {
        let n = count.withLock { $0 += 1; return $0 }
        let transport = try guest.connect(settings)
        return n == 1 ? transport : try channel(transport)
    }
}

@Suite("Migration over several data channels", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct ChannelMigrationTests {
    /// A dirtier rewriting 4096 random pages, unpaced, in 128 MiB.
    func busyDirtier() throws -> AdmittedGuest {
        let machine = try bootDirtier(memory: 128 << 20, commandLine: "pages=4096 rate=0 passes=0 mark_us=0 pattern=random")
        #expect(waitUntil(120) { (machine.memory.possiblyNonZeroPages()?.count ?? 0) >= 4096 }, "the dirtier did not start writing")
        return machine
    }

    @Test("a busy dirtier migrated over TLS with 2 and 4 data channels arrives with the memory the source had at its pause",
          arguments: [2, 4])
    func digestMatches(_ channels: Int) throws {
        let machine = try busyDirtier()
        let destination = try ParkedReceiver()
        let source = DigestingSource(machine)
        let settings = MigrationSettings(destination: destination.address, peer: destination.host, timeoutSeconds: 300,
                                         channels: channels)
        let report = PreCopySender(vm: source, settings: settings).run(connect: connections(settings, via: machine))
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(report.settings.channels == channels)
        #expect(report.pagesSent >= 4096, "\(report.pagesSent) pages sent")
        let arrived = try #require(destination.wait())
        #expect(arrived.error == nil, "\(arrived.error ?? "")")
        #expect(arrived.digest != nil && arrived.digest == source.digestAtPause, "the destination's memory differs from the source's at its pause")
        #expect(machine.state == .paused)
        machine.end(with: .migrated)
    }

    @Test("in plaintext, each data channel carries the plain path's checksums, digest and signature, and the guest arrives")
    func plaintextChannels() throws {
        let machine = try busyDirtier()
        let destination = try SecureDestination(plaintext: true, listenSeconds: 120)
        let settings = MigrationSettings(destination: "127.0.0.1:\(destination.port)", transport: .plaintext, timeoutSeconds: 120,
                                         channels: 3)
        let report = PreCopySender(vm: machine, settings: settings).run(connect: connections(settings, via: machine))
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(destination.wait())
        let arrived = try #require(destination.guest)
        arrived.requestStop()
        machine.end(with: .migrated)
    }

    struct Unbound: CustomTestStringConvertible, Sendable {
        let name: String
        /// What the source's error must say.
        let says: String
        let channel: @Sendable (any MigrationTransport) throws -> any MigrationTransport
        var testDescription: String { name }
    }

    @Test("a data channel not bound to the session is refused; the migration fails and the source keeps its guest",
          arguments: [
              Unbound(name: "a wrong challenge", says: "answered another challenge") { ForgedChallengeTransport($0) },
              // The destination closes it without a word: it cannot know whom it would answer.
              Unbound(name: "another host's certificate", says: "data channel 0") { _ in
                  // The destination host's own identity: accepted by its listener, but not the
                  // main connection's peer.
                  let hosts = try localHosts()
                  return try HostChannel.connect(hosts.destination, to: boundAddress.withLock { $0 }, peer: hosts.destination.hostName)
              },
          ])
    func unboundChannelRefused(_ unbound: Unbound) throws {
        let machine = try busyDirtier()
        defer { machine.requestStop() }
        let destination = try SecureDestination(listenSeconds: 15)
        let address = "127.0.0.1:\(destination.port)"
        boundAddress.withLock { $0 = address }
        let settings = MigrationSettings(destination: address, peer: "dst", timeoutSeconds: 60, channels: 2)
        let report = PreCopySender(vm: machine, settings: settings).run(connect: connections(settings, via: machine, channel: unbound.channel))
        #expect(report.outcome == .failed)
        #expect(report.error?.contains(unbound.says) == true, "\(report.error ?? "")")
        #expect(report.pagesSent == 0, "pages left before every channel was accepted")
        #expect(machine.state == .running, "the source lost its guest")
        #expect(destination.wait())
        #expect(destination.guest == nil)
    }

    @Test("a data channel cut in the middle of a round fails the migration cleanly: the source runs on, the destination has nothing")
    func channelCutMidRound() throws {
        let machine = try busyDirtier()
        defer { machine.requestStop() }
        let destination = try SecureDestination(listenSeconds: 15)
        let settings = MigrationSettings(destination: "127.0.0.1:\(destination.port)", peer: "dst", timeoutSeconds: 60, channels: 2)
        let report = PreCopySender(vm: machine, settings: settings).run(connect: connections(settings, via: machine) {
            CutAfterTransport($0, limit: 2 << 20)
        })
        #expect(report.outcome == .failed)
        #expect(report.error?.contains("data channel") == true, "\(report.error ?? "")")
        #expect(report.pagesSent > 0, "the cut came before any page")
        #expect(machine.state == .running, "the source lost its guest")
        #expect(destination.wait())
        #expect(destination.guest == nil)
    }
}

/// Where the destination of the running "another host's certificate" case listens.
let boundAddress = Mutex("")

@Suite("Channel counts refused at the CLI")
struct ChannelCLITests {
    @Test("vmm ctl migrate refuses --channels 0, 9, and more than 1 with --postcopy, naming the option", arguments: [
        (["--channels", "0"], "--channels takes 1 to 8"),
        (["--channels", "9"], "--channels takes 1 to 8"),
        (["--channels", "2", "--postcopy"], "does not combine with --postcopy"),
    ])
    func refused(_ extra: [String], _ says: String) throws {
        let r = try runVMM(["ctl", "migrate", "127.0.0.1:1", "--insecure-plaintext", "--api-socket", "/nonexistent/vmm.sock"] + extra)
        #expect(r.status != 0)
        #expect(r.stderr.contains(says), "\(r.stderr)")
    }
}
