import Foundation
import GuestMemory
@testable import Migration
import MachineCore
import PageFaults
import Snapshot
import Synchronization
import SystemCalls
import Testing
import TestSupport
@testable import VMM

/// A destination VM that takes its lease on GO but keeps its vCPUs parked: the memory post-copy
/// brings in can then be compared with the source's at the switch.
// @unchecked: used by the receiver's one thread, then read after it returned.
final class ParkedDestination: MigrationDestinationVM, @unchecked Sendable {
    let machine: AdmittedGuest
    init(_ machine: AdmittedGuest) { self.machine = machine }
    var memory: GuestMemory { machine.memory }
    func applyState(vcpu: [UInt8], devices: [UInt8]) throws { try machine.applyState(vcpu: vcpu, devices: devices) }
    func verifyState(signature: [UInt8]?, digest: [UInt8]) throws { try machine.verifyState(signature: signature, digest: digest) }
    func startGuest() throws { try machine.startGuestParked() }
    func discard() { machine.discard() }
    var owner: (host: String, pid: Int32)? { machine.owner }
    func attachPostCopy(_ server: FaultServer) { machine.attachPostCopy(server) }
    func postCopyLost(reason: String) { machine.postCopyLost(reason: reason) }
}

/// A transport that a test can cut (both directions, as a failed link) at any moment.
final class CuttableTransport: MigrationTransport {
    let inner: any MigrationTransport
    private let cut = Mutex(false)
    init(_ inner: any MigrationTransport) { self.inner = inner }
    var authenticatedPeer: String? { inner.authenticatedPeer }
    var peer: String { inner.peer }
    func send(_ bytes: UnsafeRawBufferPointer) throws {
        let fire = trigger.withLock { t -> (@Sendable () -> Void)? in
            t.sends += 1
            return t.sends == t.at ? t.action : nil
        }
        fire?()
        if cut.withLock({ $0 }) { throw MigrationError.connection("the link was cut") }
        try inner.send(bytes)
    }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws {
        if cut.withLock({ $0 }) { throw MigrationError.connection("the link was cut") }
        try inner.receive(into: buffer)
    }
    func close() { inner.close() }
    func sever() { cut.withLock { $0 = true }; inner.close() }

    private let trigger = Mutex<(at: Int, sends: Int, action: (@Sendable () -> Void)?)>((0, 0, nil))
    /// Runs `action` instead of the `at`-th send (1-based), which then fails as on a cut link.
    func onSend(_ at: Int, _ action: @escaping @Sendable () -> Void) { trigger.withLock { $0 = (at, 0, action) } }
}

func postcopySettings(_ destination: Destination, afterRounds: Int) -> MigrationSettings {
    MigrationSettings(destination: destination.address, peer: destination.host, transport: .tls,
                      timeoutSeconds: 60, postcopy: true, postcopyAfterRounds: afterRounds)
}

@Suite("Post-copy migration", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct PostCopyTests {
    @Test("memory after the last page equals the source's at the switch (before any round, after round 0, after round 1)", arguments: [0, 1, 2])
    func digestsMatch(afterRounds: Int) throws {
        let machine = try bootDirtier(memory: 128 << 20, commandLine: "pages=4096 rate=0 passes=0 mark_us=0 pattern=random")
        usleep(200_000)
        let hosts = try localHosts()
        let listener = try GuestDoors.listen("127.0.0.1:0", store: hosts.destination, plaintext: false)
        let arrived = Mutex<(digest: String?, figures: PostCopyFigures?, error: String?)>((nil, nil, nil))
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            let receiver = MigrationReceiver<ParkedDestination>(hostName: hosts.destination.hostName) { manifest, authenticated in
                let header = try StateHeader.decode(Array(manifest.machine), what: "manifest")
                let session = try hosts.admitIncoming(header, source: (authenticated ?? manifest.sourceHost, manifest.sourcePid),
                                                      on: hosts.destination)
                return ParkedDestination(try GuestDoors.reserveIncoming(session: session, configuration: header.description.configuration,
                                                                        serialOutput: { _ in }))
            }
            do {
                let transport = try listener.nextConnection(deadline: monotonicMilliseconds() + 60_000, onRefused: { _ in })
                defer { transport.close() }
                let (vm, result) = try receiver.run(transport: transport) {} acceptPageChannel: {
                    try listener.nextConnection(deadline: monotonicMilliseconds() + 30_000, onRefused: { _ in })
                }
                let digest = try vm.machine.memoryDigest()
                arrived.withLock { $0 = (digest, result.postcopy, result.postcopyFailure) }
                vm.machine.requestStop()
            } catch { arrived.withLock { $0.error = "\(error)" } }
            done.signal()
        }
        let source = DigestingSource(machine)
        let settings = MigrationSettings(destination: "127.0.0.1:\(listener.port)", peer: hosts.destination.hostName,
                                         postcopy: true, postcopyAfterRounds: afterRounds)
        let report = PreCopySender(vm: source, settings: settings).run { try machine.connect(settings) }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(done.wait(timeout: .now() + 120) == .success)
        let (digest, figures, error) = arrived.withLock { $0 }
        #expect(error == nil, "\(error ?? "")")
        #expect(digest != nil && digest == source.digestAtPause)
        let postcopy = try #require(report.postcopy)
        #expect(postcopy.switchedAfterRounds == afterRounds)
        // How many pages the guest dirtied after they were sent depends on how fast it ran
        // (on a loaded machine, possibly none); the digest above is the proof either way.
        #expect(postcopy.pagesPushed + postcopy.pagesRequested >= postcopy.pagesMissingAtSwitch)
        #expect(figures != nil)
        #expect(machine.state == .paused, "the source ran on after the switch")
        machine.end(with: .migrated)
    }

    @Test("the counter switched to post-copy continues on the destination with no gap and no repeat (after 0, 1 and 2 rounds)", arguments: [0, 1, 2])
    func counterContinues(afterRounds: Int) throws {
        let sourceOutput = SerialCapture()
        let machine = try bootCounter(capture: sourceOutput)
        usleep(200_000)
        let destination = try Destination()
        let settings = postcopySettings(destination, afterRounds: afterRounds)
        let report = PreCopySender(vm: machine, settings: settings).run { try machine.connect(settings) }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(machine.state == .paused, "the source ran on after the switch")
        #expect(destination.wait())
        let dest = try #require(destination.machine)
        let figures = try #require(report.postcopy)
        #expect(figures.switchedAfterRounds == afterRounds)
        #expect(figures.pagesPushed + figures.pagesRequested >= figures.pagesMissingAtSwitch)
        #expect(dest.postCopyStats?.completeAfterMs != nil)
        usleep(200_000)
        dest.requestStop()
        _ = dest.waitForExit()
        machine.end(with: .migrated)
        let numbers = counterNumbers(sourceOutput.text + destination.capture.text)
        #expect(numbers.count > 10)
        #expect(isSequence(numbers), "gap or repeat around \(counterNumbers(sourceOutput.text).suffix(3)) / \(destination.capture.text.prefix(30))")
    }

    @Test("the link cut during post-copy: the destination never runs on without its pages, and the source never resumes")
    func linkCut() throws {
        let sourceOutput = SerialCapture()
        let machine = try bootCounter(capture: sourceOutput)
        usleep(200_000)
        let destination = try Destination()
        // No pre-copy round: every page the guest touches is missing at the destination. The
        // link (both connections) is cut when the source is about to answer the first request.
        let settings = postcopySettings(destination, afterRounds: 0)
        let made = Mutex<[CuttableTransport]>([])
        let report = PreCopySender(vm: machine, settings: settings).run {
            let t = CuttableTransport(try machine.connect(settings))
            let isPageChannel = made.withLock { $0.append(t); return $0.count == 2 }
            // The page channel's first send opens it; the second is the first page's reply.
            if isPageChannel { t.onSend(2) { for each in made.withLock({ $0 }) { each.sever() } } }
            return t
        }
        #expect(report.outcome == .failed)
        #expect(report.error?.contains("lost unless the link is recovered") == true, "\(report.error ?? "")")
        #expect(machine.state == .paused, "the source resumed a guest the destination had taken")
        #expect(destination.wait())
        let dest = try #require(destination.machine)
        let exit = try #require(dest.waitForExit(timeout: 60))
        guard case let .fatal(reason, _) = exit else {
            Issue.record("the destination's machine ended with \(exit), not a fatal exit")
            return
        }
        #expect(reason.contains("the guest is lost unless the link is recovered"), "\(reason)")
        #expect(dest.postCopyStats?.completeAfterMs == nil, "the destination claims every page arrived")
        machine.end(with: .migrated)
    }

    @Test("a page request past guest memory is refused and the page channel goes on")
    func hostileRequest() throws {
        let memory = try GuestMemory(size: 1 << 20)
        try memory.write(Array(repeating: 0xA5, count: 4096), at: GuestAddress(3 * 4096))
        var missing = [UInt64](repeating: 0, count: Int((memory.pageCount + 63) / 64))
        missing[0] = 0b1000
        let server = PostCopyPageServer(memory: memory, missing: missing)
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair()
        let served = DispatchSemaphore(value: 0)
        let serveError = Mutex<String?>(nil)
        Thread.detachNewThread {
            do {
                var writer = try StreamWriter(sink: TransportSink(sourceEnd))
                try writer.sink.flush()
                var reader = try StreamReader(source: TransportSource(sourceEnd))
                try server.serve(reader: &reader, writer: &writer)
            } catch { serveError.withLock { $0 = "\(error)" } }
            served.signal()
        }
        var requests = try StreamWriter(sink: TransportSink(destinationEnd))
        try requests.sink.flush()
        var replies = try StreamReader(source: TransportSource(destinationEnd))
        for pfn in [memory.pageCount, memory.pageCount + 7, UInt64(1) << 51] {
            try requests.writeSection(.control, payload: WireMessage.pageRequest(pfn: pfn).encoded())
            try requests.sink.flush()
            let reply = try #require(try replies.nextSection())
            #expect(reply.type == .control)
            guard case let .refuse(reason) = try WireMessage.decode(reply.payload) else {
                Issue.record("a request for frame \(pfn) was not refused")
                continue
            }
            #expect(reason.contains("outside guest memory"))
        }
        try requests.writeSection(.control, payload: WireMessage.pageRequest(pfn: 3).encoded())
        try requests.sink.flush()
        let page = try #require(try replies.nextSection())
        let batches = try PostCopyPageSource.batches(fromSection: page.payload, offset: nil, memorySize: memory.size)
        #expect(batches.count == 1 && batches.first?.pfn == 3)
        #expect(batches.first?.batch.bytes == Array(repeating: 0xA5, count: 4096))
        #expect(server.counts.refused == 3 && server.counts.requested == 1)
        destinationEnd.close()
        #expect(served.wait(timeout: .now() + 10) == .success)
    }

    @Test("a pushed page past guest memory is refused before anything is installed")
    func hostilePush() throws {
        let memorySize: UInt64 = 1 << 20
        for pfn in [memorySize / 4096, memorySize / 4096 + 1, MemorySection.pageFrameMask] {
            var payload: [UInt8] = []
            withUnsafeBytes(of: UInt32(1).littleEndian) { payload += $0 }
            withUnsafeBytes(of: UInt32(0).littleEndian) { payload += $0 }
            withUnsafeBytes(of: (pfn | MemorySection.zeroPageFlag).littleEndian) { payload += $0 }
            #expect(throws: SnapshotFormatError.self) {
                _ = try PostCopyPageSource.batches(fromSection: payload, offset: 0, memorySize: memorySize)
            }
        }
    }
}
