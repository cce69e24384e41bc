import Foundation
import Testing
import GuestMemory
@testable import Migration
import PageFaults
import Snapshot
import Synchronization

/// A dirty tracker that reports the pages a test tells it were written.
final class ScriptedTracker: DirtyTracker {
    let name = "scripted"
    private let rounds: Mutex<[[UInt64]]>
    private let pageCount: UInt64
    init(pageCount: UInt64, rounds: [[UInt64]]) { self.pageCount = pageCount; self.rounds = Mutex(rounds) }
    func enable() throws {}
    func disable() throws {}
    func collect() throws -> DirtyBitmap {
        var bitmap = DirtyBitmap(pageCount: pageCount)
        for page in rounds.withLock({ $0.isEmpty ? [] : $0.removeFirst() }) { bitmap.set(page) }
        return bitmap
    }
    func rearm(firstPage: UInt64, mask: UInt64) throws {}
}

/// A source VM with no KVM behind it: memory, a scripted tracker and fixed state payloads.
final class FakeSource: MigrationSourceVM {
    let memory: GuestMemory
    let dirtyTracker: any DirtyTracker
    private struct Record { var paused = false; var resumed = false; var handedTo: (String?, Int32?)? }
    private let record = Mutex(Record())
    init(memory: GuestMemory, dirtyRounds: [[UInt64]], hostName: String = "src") {
        self.memory = memory
        self.hostName = hostName
        self.dirtyTracker = ScriptedTracker(pageCount: memory.pageCount, rounds: dirtyRounds)
    }
    func machineDescriptionPayload() throws -> [UInt8] { Array(#"{"fake":true}"#.utf8) }
    var migrationIdentity: String? { "fake" }
    let hostName: String
    func commitHandover(toHost host: String?, toPid pid: Int32?) throws { record.withLock { $0.handedTo = (host, pid) } }
    func signState(digest: [UInt8]) throws -> [UInt8]? { Array("signed:".utf8) + digest }
    func pauseForMigration() -> Bool { record.withLock { $0.paused = true }; return true }
    func resumeAfterMigration() { record.withLock { $0.resumed = true } }
    func statePayloads() throws -> (vcpu: [UInt8], devices: [UInt8]) { (Array("vcpus".utf8), Array("devices".utf8)) }
    func setThrottle(percent: Int) {}
    func notePostCopyPageServer(awaitingRecovery: Bool) {}
    var paused: Bool { record.withLock { $0.paused } }
    var resumed: Bool { record.withLock { $0.resumed } }
    var handedTo: (String?, Int32?)? { record.withLock { $0.handedTo } }
}

/// A destination VM with no KVM behind it: it records what the receiver gives it.
final class FakeDestination: MigrationDestinationVM {
    let memory: GuestMemory
    private struct Record { var vcpu: [UInt8] = []; var devices: [UInt8] = []; var signature: [UInt8]?; var digest: [UInt8] = []; var started = false; var discarded = false; var postCopyServers = 0; var lost: String? }
    private let record = Mutex(Record())
    /// What it says of its announcement after the start (nil: as a guest without a card).
    let announce: AnnounceReport?
    init(memory: GuestMemory, announce: AnnounceReport? = nil) { self.memory = memory; self.announce = announce }
    var announceSoFar: AnnounceReport? { announce }
    func applyState(vcpu: [UInt8], devices: [UInt8]) throws { record.withLock { $0.vcpu = vcpu; $0.devices = devices } }
    func verifyState(signature: [UInt8]?, digest: [UInt8]) throws {
        record.withLock { $0.signature = signature; $0.digest = digest }
        guard signature == Array("signed:".utf8) + digest else { throw MigrationError.refused("bad signature") }
    }
    func startGuest() throws { record.withLock { $0.started = true } }
    func discard() { record.withLock { $0.discarded = true } }
    var owner: (host: String, pid: Int32)? { ("dst", 4242) }
    func attachPostCopy(_ incoming: PostCopyIncoming) { record.withLock { $0.postCopyServers += 1 } }
    func postCopyPaused(reason: String) {}
    func postCopyResumed() {}
    func postCopyLost(reason: String) { record.withLock { $0.lost = reason } }
    var started: Bool { record.withLock { $0.started } }
    var discarded: Bool { record.withLock { $0.discarded } }
    var vcpu: [UInt8] { record.withLock { $0.vcpu } }
    var devices: [UInt8] { record.withLock { $0.devices } }
}

/// Runs a receiver on a thread over the destination end; returns what it returned or threw.
final class ReceiverRun: Sendable {
    private let result = Mutex<Result<FakeDestination, any Error>?>(nil)
    private let done = DispatchSemaphore(value: 0)

    init(_ end: any MigrationTransport, admit: @escaping @Sendable (MigrationManifest) throws -> FakeDestination) {
        let receiver = MigrationReceiver<FakeDestination>(hostName: "dst") { manifest, _ in try admit(manifest) }
        Thread.detachNewThread { [self] in
            let r = Result { try receiver.run(transport: end).vm }
            result.withLock { $0 = r }
            end.close()
            done.signal()
        }
    }

    func wait() -> Result<FakeDestination, any Error>? {
        _ = done.wait(timeout: .now() + 30)
        return result.withLock { $0 }
    }
}

@Suite("The migration protocol over an in-memory transport, with fake VMs (no KVM, no TCP)")
struct ProtocolTests {
    static func sourceMemory() throws -> GuestMemory {
        let memory = try GuestMemory(size: 1 << 20)
        for page: UInt64 in [0, 3, 17, 255] { try memory.write(Array(repeating: UInt8(page % 200 + 1), count: 4096), at: GuestAddress(page * 4096)) }
        return memory
    }

    static func settings() -> MigrationSettings { MigrationSettings(destination: "in-memory", maxDowntimeMs: 300, timeoutSeconds: 20) }

    @Test("a whole migration: every page arrives, the state is verified and applied, the lease is handed to the accept's owner, GO starts the guest",
          arguments: [false, true])
    func completes(authenticated: Bool) throws {
        let memory = try Self.sourceMemory()
        // The guest rewrites page 17 during round 0 and page 3 while paused.
        let source = FakeSource(memory: memory, dirtyRounds: [[17], [3]])
        let destinationMemory = try GuestMemory(size: 1 << 20)
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair(authenticated: authenticated ? ("src", "dst") : nil)
        let run = ReceiverRun(destinationEnd) { manifest in
            #expect(manifest.machine == Data(#"{"fake":true}"#.utf8))
            #expect(manifest.sourceHost == "src" && manifest.destinationHost == "dst")
            return FakeDestination(memory: destinationMemory)
        }
        let report = PreCopySender(vm: source, settings: Self.settings()).run { sourceEnd }
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        let destination = try #require(try run.wait()?.get())
        #expect(destination.started)
        #expect(!destination.discarded)
        #expect(destination.vcpu == Array("vcpus".utf8) && destination.devices == Array("devices".utf8))
        #expect(source.paused && !source.resumed)
        #expect(source.handedTo?.0 == "dst" && source.handedTo?.1 == 4242)
        for page: UInt64 in 0..<256 {
            #expect(try memory.read(at: GuestAddress(page * 4096), count: 4096) == destinationMemory.read(at: GuestAddress(page * 4096), count: 4096),
                    "page \(page) differs")
        }
        #expect(report.pagesPerRound.count >= 2)
    }

    @Test("the destination's announcement as it stood at RUNNING (schedule, first round) reaches the source's report; without one the report has none")
    func announceInRunning() throws {
        let told = AnnounceReport(state: .sending, schedule: .init(rounds: 5, initialMs: 50, stepMs: 100, maxMs: 550),
                                  plannedMs: [0, 50, 200, 450, 800], sentMs: [0.25], framesPerRound: 2, framesSent: 2)
        for announce in [told, nil] {
            let memory = try Self.sourceMemory()
            let (sourceEnd, destinationEnd) = InMemoryTransport.pair(authenticated: ("src", "dst"))
            let run = ReceiverRun(destinationEnd) { _ in FakeDestination(memory: try GuestMemory(size: 1 << 20), announce: announce) }
            let report = PreCopySender(vm: FakeSource(memory: memory, dirtyRounds: [[]]), settings: Self.settings()).run { sourceEnd }
            #expect(report.outcome == .completed, "\(report.error ?? "")")
            #expect(report.destinationAnnounce == announce)
            _ = run.wait()
            let json = String(decoding: try JSONEncoder().encode(report), as: UTF8.self)
            #expect(json.contains("\"destination_announce\"") == (announce != nil), "\(json)")
        }
        // An older destination's RUNNING has no announcement: it still reads.
        #expect(try WireMessage.decode(Array(#"{"kind":"running","resumedAt":12.5}"#.utf8)) == .running(resumedAt: 12.5, announce: nil, phases: nil))
        let roundTrip = WireMessage.running(resumedAt: 3, announce: told, phases: nil)
        #expect(try WireMessage.decode(roundTrip.encoded()) == roundTrip)
    }

    @Test("a drain among the pages is answered once they are applied, with their counts; one that claims other counts than arrived fails the migration and the reserved VM is discarded",
          arguments: [false, true])
    func drain(lies: Bool) throws {
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair(authenticated: ("src", "dst"))
        let destinationMemory = try GuestMemory(size: 1 << 20)
        let destination = FakeDestination(memory: destinationMemory)
        let run = ReceiverRun(destinationEnd) { _ in destination }
        var reader = try StreamReader(source: TransportSource(sourceEnd), integrity: sourceEnd.streamIntegrity)
        guard case let .challenge(_, nonce, _) = try WireMessage.decode(try #require(try reader.nextSection()).payload) else {
            Issue.record("no challenge")
            return
        }
        var writer = try StreamWriter(sink: TransportSink(sourceEnd), integrity: sourceEnd.streamIntegrity)
        let manifest = MigrationManifest(challenge: nonce, sourceHost: "src", destinationHost: "dst", sourcePid: 1,
                                         machine: Data(#"{"fake":true}"#.utf8), guest: nil)
        try writer.writeSection(.control, payload: WireMessage.manifest(manifest).encoded())
        try writer.sink.flush()
        guard case .accept = try WireMessage.decode(try #require(try reader.nextSection()).payload) else {
            Issue.record("not accepted")
            return
        }
        let memory = try Self.sourceMemory()
        let stats = try writer.writeMemoryPages([0, 3, 17], from: memory)
        var claimed = TransferCounts(pages: stats.pages, memorySections: stats.sections)
        if lies { claimed.pages += 1 }
        try writer.writeSection(.control, payload: WireMessage.drain(claimed).encoded())
        try writer.sink.flush()
        let answer = try? reader.nextSection().map { try WireMessage.decode($0.payload) }
        if lies {
            #expect(answer == nil, "\(String(describing: answer))")
        } else {
            #expect(answer == .drained(claimed))
            // Answered only once applied.
            for page: UInt64 in [0, 3, 17] {
                #expect(try memory.read(at: GuestAddress(page * 4096), count: 4096) == destinationMemory.read(at: GuestAddress(page * 4096), count: 4096))
            }
            sourceEnd.close()
        }
        let outcome = run.wait()
        if case .success = outcome { Issue.record("the receiver completed a migration that never sent its state") }
        if lies, case let .failure(error) = outcome {
            #expect("\(error)".contains("before its drain"), "\(error)")
        }
        #expect(destination.discarded)
    }

    @Test("a refused admission fails the migration before any page is sent, and the source never pauses")
    func refusedAdmission() throws {
        let source = FakeSource(memory: try Self.sourceMemory(), dirtyRounds: [])
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair()
        let run = ReceiverRun(destinationEnd) { _ in throw MigrationError.refused("not registered here") }
        let report = PreCopySender(vm: source, settings: Self.settings()).run { sourceEnd }
        #expect(report.outcome == .failed)
        #expect(report.error?.contains("not registered here") == true)
        #expect(report.pagesSent == 0)
        #expect(!source.paused)
        if case .success = run.wait() { Issue.record("the receiver accepted a refused guest") }
    }

    @Test("a destination that refuses READY (fault transport): the source resumes, the destination discards",
          arguments: [InjectedFault.refuseReady, .malformedReady, .closeAfterHello, .closeDuringPrecopy])
    func faultBeforeGo(_ fault: InjectedFault) throws {
        let source = FakeSource(memory: try Self.sourceMemory(), dirtyRounds: [])
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair()
        let destination = FakeDestination(memory: try GuestMemory(size: 1 << 20))
        let run = ReceiverRun(FaultInjectingTransport(destinationEnd, fault: fault)) { _ in destination }
        let report = PreCopySender(vm: source, settings: Self.settings()).run { sourceEnd }
        #expect(report.outcome == .failed, "\(fault)")
        #expect(source.handedTo == nil, "the lease moved although GO was never sent")
        if source.paused { #expect(source.resumed, "a source paused for the migration was not resumed") }
        _ = run.wait()
        #expect(!destination.started)
        #expect(destination.discarded, "the reserved VM was not discarded")
    }

    @Test("the link cut after GO leaves the migration in doubt: the source stays paused, the destination runs")
    func cutAfterGo() throws {
        let source = FakeSource(memory: try Self.sourceMemory(), dirtyRounds: [])
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair()
        let destination = FakeDestination(memory: try GuestMemory(size: 1 << 20))
        let run = ReceiverRun(FaultInjectingTransport(destinationEnd, fault: .closeAfterGo)) { _ in destination }
        let report = PreCopySender(vm: source, settings: Self.settings()).run { sourceEnd }
        #expect(report.outcome == .inDoubt)
        #expect(source.paused && !source.resumed)
        _ = run.wait()
        #expect(destination.started)
    }

    @Test("a tampered state signature is refused before READY and nothing is applied (plaintext)")
    func tamperedSignature() throws {
        final class Forger: MigrationSourceVM {
            let inner: FakeSource
            init(_ inner: FakeSource) { self.inner = inner }
            var memory: GuestMemory { inner.memory }
            var dirtyTracker: any DirtyTracker { inner.dirtyTracker }
            func machineDescriptionPayload() throws -> [UInt8] { try inner.machineDescriptionPayload() }
            var migrationIdentity: String? { nil }
            var hostName: String { inner.hostName }
            func commitHandover(toHost host: String?, toPid pid: Int32?) throws { try inner.commitHandover(toHost: host, toPid: pid) }
            func signState(digest: [UInt8]) throws -> [UInt8]? { Array("signed:".utf8) + digest.map { $0 ^ 1 } }
            func pauseForMigration() -> Bool { inner.pauseForMigration() }
            func resumeAfterMigration() { inner.resumeAfterMigration() }
            func statePayloads() throws -> (vcpu: [UInt8], devices: [UInt8]) { try inner.statePayloads() }
            func setThrottle(percent: Int) {}
            func notePostCopyPageServer(awaitingRecovery: Bool) {}
        }
        let inner = FakeSource(memory: try Self.sourceMemory(), dirtyRounds: [])
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair()
        let destination = FakeDestination(memory: try GuestMemory(size: 1 << 20))
        let run = ReceiverRun(destinationEnd) { _ in destination }
        let report = PreCopySender(vm: Forger(inner), settings: Self.settings()).run { sourceEnd }
        #expect(report.outcome == .failed)
        #expect(report.error?.contains("signed") == true, "\(report.error ?? "")")
        #expect(inner.handedTo == nil)
        #expect(inner.resumed)
        _ = run.wait()
        #expect(destination.discarded && !destination.started)
        #expect(destination.vcpu.isEmpty, "state was applied before the signature was checked")
    }

    @Test("a recorded migration replayed on a new connection (plaintext, or inside a fresh authenticated channel by someone holding the source's key) answers a stale challenge: refused before anything is reserved",
          arguments: [false, true])
    func replayRefused(authenticated: Bool) throws {
        let hosts: (source: String, destination: String)? = authenticated ? ("src", "dst") : nil
        // Record what a real source sends on one connection.
        let source = FakeSource(memory: try Self.sourceMemory(), dirtyRounds: [])
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair(authenticated: hosts)
        let recorder = Recorder(sourceEnd)
        let first = ReceiverRun(destinationEnd) { _ in FakeDestination(memory: try GuestMemory(size: 1 << 20)) }
        #expect(PreCopySender(vm: source, settings: Self.settings()).run { recorder }.outcome == .completed)
        _ = first.wait()
        // Replay it, byte for byte, after a fresh challenge.
        let (attackerEnd, victimEnd) = InMemoryTransport.pair(authenticated: hosts)
        let reserved = Mutex(0)
        let second = ReceiverRun(victimEnd) { _ in
            reserved.withLock { $0 += 1 }
            return FakeDestination(memory: try GuestMemory(size: 1 << 20))
        }
        var challenge = [UInt8](repeating: 0, count: 16)
        try challenge.withUnsafeMutableBytes { try attackerEnd.receive(into: $0) }
        try recorder.sent.withUnsafeBytes { try? attackerEnd.send($0) }
        let result = second.wait()
        if case .success = result { Issue.record("a replayed migration was accepted") }
        #expect(reserved.withLock { $0 } == 0, "a VM was reserved for a replay")
        if case let .failure(error) = result { #expect("\(error)".contains("challenge"), "\(error)") }
    }

    @Test("a source that finds another host than the peer it names sends no guest byte")
    func wrongPeerGetsNothing() throws {
        let source = FakeSource(memory: try Self.sourceMemory(), dirtyRounds: [])
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair()
        let recorder = Recorder(sourceEnd)
        let run = ReceiverRun(destinationEnd) { _ in FakeDestination(memory: try GuestMemory(size: 1 << 20)) }
        var settings = Self.settings()
        settings.peer = "elsewhere"
        let report = PreCopySender(vm: source, settings: settings).run { recorder }
        #expect(report.outcome == .failed)
        #expect(report.error?.contains("elsewhere") == true, "\(report.error ?? "")")
        #expect(recorder.sent.isEmpty, "the source wrote \(recorder.sent.count) bytes to a host it did not name")
        #expect(!source.paused)
        _ = run.wait()
    }

    @Test("on an authenticated channel a manifest claiming another source host is refused")
    func impersonatedSourceRefused() throws {
        let source = FakeSource(memory: try Self.sourceMemory(), dirtyRounds: [], hostName: "mallory")
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair(authenticated: ("src", "dst"))
        let run = ReceiverRun(destinationEnd) { _ in FakeDestination(memory: try GuestMemory(size: 1 << 20)) }
        let report = PreCopySender(vm: source, settings: Self.settings()).run { sourceEnd }
        #expect(report.outcome == .failed)
        #expect(report.error?.contains("authenticated") == true, "\(report.error ?? "")")
        if case .success = run.wait() { Issue.record("an impersonating source was accepted") }
    }

    @Test("a fuzzed stream after the handshake (bytes flipped, cut, lengths rewritten, behind a valid manifest) never crashes or hangs the receiver; a cut one never starts a guest")
    func fuzzedStreamNeverStarts() throws {
        // One good recording on an authenticated channel (no checksums: only the parser stands guard).
        let source = FakeSource(memory: try Self.sourceMemory(), dirtyRounds: [[17]])
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair(authenticated: ("src", "dst"))
        let recorder = Recorder(sourceEnd)
        let first = ReceiverRun(destinationEnd) { _ in FakeDestination(memory: try GuestMemory(size: 1 << 20)) }
        #expect(PreCopySender(vm: source, settings: Self.settings()).run { recorder }.outcome == .completed)
        _ = first.wait()
        // What follows the manifest: memory, state, end, and the commit stream.
        let recording = recorder.sent
        let manifestLength = recording[(16 + 8)..<(16 + 16)].enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        let body = Array(recording[(16 + 16 + manifestLength)...])
        var rng = SystemRandomNumberGenerator()
        let iterations = Int(ProcessInfo.processInfo.environment["MIGRATION_FUZZ_ITERATIONS"] ?? "") ?? 150
        for _ in 0..<iterations {
            var bytes = body
            let mutation = Int.random(in: 0..<3, using: &rng)
            switch mutation {
            case 0:
                for _ in 0..<Int.random(in: 1...8, using: &rng) { bytes[Int.random(in: 0..<bytes.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng) }
            case 1:
                bytes = Array(bytes.prefix(Int.random(in: 0..<bytes.count, using: &rng)))
            default:
                // A little-endian u64 at a random offset (a section length, a page frame) made huge or zero.
                let at = Int.random(in: 0..<(bytes.count - 8), using: &rng)
                let value: UInt64 = Bool.random(using: &rng) ? UInt64.max >> UInt64.random(in: 0..<40, using: &rng) : 0
                for k in 0..<8 { bytes[at + k] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(k))) }
            }
            let (attackerEnd, victimEnd) = InMemoryTransport.pair(authenticated: ("src", "dst"))
            let destination = FakeDestination(memory: try GuestMemory(size: 1 << 20))
            let run = ReceiverRun(victimEnd) { _ in destination }
            // The attacker holds the source's key: it answers the fresh challenge properly.
            var reader = try StreamReader(source: TransportSource(attackerEnd), integrity: .channelAuthenticated)
            guard let section = try reader.nextSection(), case let .challenge(_, nonce, _) = try WireMessage.decode(section.payload) else {
                Issue.record("no challenge"); return
            }
            var writer = try StreamWriter(sink: BufferSink(), integrity: .channelAuthenticated)
            let manifest = MigrationManifest(challenge: nonce, sourceHost: "src", destinationHost: "dst", sourcePid: 1,
                                             machine: Data(try source.machineDescriptionPayload()), guest: "fake")
            try writer.writeSection(.control, payload: WireMessage.manifest(manifest).encoded())
            let stream = writer.sink.bytes + bytes
            try? stream.withUnsafeBytes { try attackerEnd.send($0) }
            attackerEnd.close()
            // Inside an authenticated channel a changed page is just other guest memory from an
            // authorised source; what must hold is that the receiver ends, whatever came.
            guard let outcome = run.wait() else { Issue.record("the receiver hung on a fuzzed stream"); return }
            if mutation == 1 {
                if case .success = outcome { Issue.record("a cut stream started a guest") }
                #expect(!destination.started)
            }
        }
    }
}

@Suite("Post-copy recovery messages on the wire")
struct PostCopyRecoveryMessageTests {
    @Test("heartbeat, resume and still-missing round-trip; one without its field, or of an unknown kind, is refused")
    func roundTripAndRefusals() throws {
        let resume = PostCopyResume(challenge: "fresh", migration: "original", sourceHost: "src", destinationHost: "dst", guest: "web1")
        #expect(resume.version == migrationProtocolVersion)
        for message in [WireMessage.heartbeat, .resume(resume), .stillMissing(missing: Data([1, 0, 0, 0, 0, 0, 0, 0]))] {
            #expect(try WireMessage.decode(try message.encoded()) == message)
        }
        for (json, field) in [(#"{"kind":"resume"}"#, "resume"), (#"{"kind":"still-missing"}"#, "missingPages")] {
            #expect(throws: MigrationError.protocolViolation("a \(json.contains("resume") ? "resume" : "still-missing") message has no \(field)")) {
                _ = try WireMessage.decode(Array(json.utf8))
            }
        }
        #expect(throws: MigrationError.self) { _ = try WireMessage.decode(Array(#"{"kind":"resume","resume":{"version":3}}"#.utf8)) }
        #expect(throws: MigrationError.protocolViolation("unknown control message kind 'recover-me'")) {
            _ = try WireMessage.decode(Array(#"{"kind":"recover-me"}"#.utf8))
        }
    }
}

/// Passes everything through, keeping a copy of what was sent.
final class Recorder: MigrationTransport {
    let inner: any MigrationTransport
    private let bytes = Mutex<[UInt8]>([])
    init(_ inner: any MigrationTransport) { self.inner = inner }
    var sent: [UInt8] { bytes.withLock { $0 } }
    var peer: String { inner.peer }
    var authenticatedPeer: String? { inner.authenticatedPeer }
    func send(_ buffer: UnsafeRawBufferPointer) throws {
        bytes.withLock { $0.append(contentsOf: buffer) }
        try inner.send(buffer)
    }
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws { try inner.receive(into: buffer) }
    func close() { inner.close() }
}

@Suite("Data channel negotiation")
struct DataChannelNegotiationTests {
    /// Plays a source that answers the challenge with a manifest asking for `channels` (and
    /// post-copy when `postcopy`); returns the destination's answer and whether it admitted.
    func answer(channels: Int?, postcopy: Bool = false) throws -> (reply: WireMessage, admitted: Bool, next: WireMessage?) {
        let (sourceEnd, destinationEnd) = InMemoryTransport.pair(authenticated: ("src", "dst"))
        let admitted = Mutex(false)
        let run = ReceiverRun(destinationEnd) { _ in
            admitted.withLock { $0 = true }
            return FakeDestination(memory: try GuestMemory(size: 1 << 20))
        }
        var reader = try StreamReader(source: TransportSource(sourceEnd), integrity: .channelAuthenticated)
        guard let first = try reader.nextSection(), case let .challenge(_, nonce, _) = try WireMessage.decode(first.payload) else {
            throw MigrationError.protocolViolation("no challenge")
        }
        var writer = try StreamWriter(sink: TransportSink(sourceEnd), integrity: .channelAuthenticated)
        let manifest = MigrationManifest(challenge: nonce, sourceHost: "src", destinationHost: "dst", sourcePid: 1,
                                         machine: Data(#"{"fake":true}"#.utf8), guest: nil, postcopy: postcopy ? true : nil,
                                         channels: channels)
        try writer.writeSection(.control, payload: WireMessage.manifest(manifest).encoded())
        try writer.sink.flush()
        let reply = try #require(try reader.nextSection())
        let message = try WireMessage.decode(reply.payload)
        let next = message.kind == "accept" ? try reader.nextSection().map { try WireMessage.decode($0.payload) } : nil
        sourceEnd.close()
        _ = run.wait()
        return (message, admitted.withLock { $0 }, next)
    }

    @Test("a manifest asking for 0 or more than 8 data channels, or for channels with post-copy, is refused with a sentence naming the limit, before admission",
          arguments: [(0, false, "takes 1 to 8"), (9, false, "takes 1 to 8"), (1000, false, "asks for 1000 data channels"),
                      (2, true, "post-copy with data channels")])
    func refused(channels: Int, postcopy: Bool, says: String) throws {
        let (reply, admitted, _) = try answer(channels: channels, postcopy: postcopy)
        guard case let .refuse(reason) = reply else { Issue.record("not refused: \(reply.kind)"); return }
        #expect(reason.contains(says), "\(reason)")
        #expect(!admitted, "admitted before the channel count was checked")
    }

    @Test("a receiver that cannot accept more connections refuses data channels after admission, and discards")
    func noDoor() throws {
        let (reply, admitted, next) = try answer(channels: 2)
        // The accept goes out first (the VM is reserved), then the refusal.
        #expect(admitted)
        #expect(reply.kind == "accept")
        guard case let .refuse(reason)? = next else { Issue.record("no refusal after the accept: \(next?.kind ?? "nothing")"); return }
        #expect(reason.contains("does not take data channels"), "\(reason)")
    }

    @Test("data-channel and round-mark round-trip; one without its fields is refused")
    func messages() throws {
        for message in [WireMessage.dataChannel(challenge: "c", index: 1, count: 4), .roundMark(round: 7)] {
            #expect(try WireMessage.decode(try message.encoded()) == message)
        }
        #expect(throws: MigrationError.protocolViolation("a data-channel message has no channel")) {
            _ = try WireMessage.decode(Array(#"{"kind":"data-channel","nonce":"c","channels":2}"#.utf8))
        }
        #expect(throws: MigrationError.protocolViolation("a round-mark message has no round")) {
            _ = try WireMessage.decode(Array(#"{"kind":"round-mark"}"#.utf8))
        }
    }

    @Test("a page always goes on the channel of its 512-page stripe")
    func striping() {
        #expect(dataChannel(ofPage: 0, count: 4) == 0)
        #expect(dataChannel(ofPage: 511, count: 4) == 0)
        #expect(dataChannel(ofPage: 512, count: 4) == 1)
        #expect(dataChannel(ofPage: 4 * 512 + 3, count: 4) == 0)
    }
}
