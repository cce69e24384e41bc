import Foundation
import Migration
import NetworkFrames
import SystemCalls
import Testing
import TestSupport
import VMM

@Suite("The announcement after a migration, on a real bridged network", .serialized)
struct AnnounceWireTests {
    let mac = MACAddress(parsing: "52:54:00:c8:01:05")!
    let ip = IPv4Address(parsing: "10.200.0.5")!

    @Test("through the new host's tap, the LAN sees QEMU's RARP and a gratuitous ARP each round, and its bridge moves the guest's MAC to the new host's port at the first",
          .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage))
    func announceMovesTheMAC() throws {
        let lab = try NetworkLab()
        defer { lab.close() }
        let net = try MigrationNetwork(lab: lab)
        let (hostA, hostB) = (net.hosts[0], net.hosts[1])
        let tapA = try net.openTap(hostA)
        let tapB = try net.openTap(hostB)
        let capture = try lab.capture(net.client, in: net.lan)

        // Before the migration the guest talked on host A: the LAN bridge learned it there.
        try tapA.write(Announcement.gratuitousARP(mac: mac, ip: ip))
        #expect(waitUntil(5) { (try? lab.port(of: "\(mac)", on: net.lanBridge, in: net.lan)) == hostA.lanPort })
        while try capture.receive(timeoutMilliseconds: 0) != nil {}  // only what follows counts

        // Host B resumes the guest and announces it.
        let schedule = AnnounceSchedule.qemuDefault
        let announcer = Announcer(schedule: schedule, mac: mac, ip: ip) { frame in
            do { try tapB.write(frame) } catch { Issue.record("tap write: \(error)") }
        }
        announcer.start()

        var seen: [[UInt8]] = []
        var portAtFirst: String?
        let expected = Array(repeating: Announcement.round(mac: mac, ip: ip), count: schedule.rounds).flatMap { $0 }
        while seen.count < expected.count, let frame = try capture.receive(timeoutMilliseconds: 5000) {
            guard let e = EthernetFrame(frame), e.source == mac, [EtherType.rarp, EtherType.arp].contains(e.etherType) else { continue }
            seen.append(frame)
            // The bridge learns a source before it forwards the frame: by the time the client
            // has the first RARP, the MAC must be on host B's port.
            if seen.count == 1 { portAtFirst = try lab.port(of: "\(mac)", on: net.lanBridge, in: net.lan) }
        }
        #expect(announcer.waitUntilFinished(timeout: 10))
        #expect(seen == expected)
        #expect(EthernetFrame(seen.first ?? [])?.etherType == EtherType.rarp)
        #expect(portAtFirst == hostB.lanPort)

        // One send per round, each no earlier than QEMU's delay after the previous one.
        let sent = announcer.sentMs
        #expect(sent.count == schedule.rounds)
        for (k, delay) in schedule.delays.enumerated() where k + 1 < sent.count {
            #expect(sent[k + 1] - sent[k] >= Double(delay), "round \(k + 2): \(sent)")
        }
    }

    @Test("a cancelled announcer sends no further round", .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage))
    func cancel() throws {
        let count = Counter()
        // The second round is an hour away: the cancel always comes first.
        let announcer = Announcer(schedule: AnnounceSchedule(initialMs: 3_600_000 / 36, stepMs: 0, rounds: 3, maxMs: 100_000),
                                  mac: mac, ip: nil) { _ in count.add() }
        announcer.start()
        #expect(waitUntil(5) { announcer.sentMs.count == 1 })
        #expect(announcer.report.state == .sending)
        announcer.cancel()
        #expect(announcer.waitUntilFinished(timeout: 10))
        #expect(count.value == 1 && announcer.sentMs.count == 1)
        #expect(announcer.report.state == .cancelled && announcer.report.framesSent == 1)
    }

    @Test("zero rounds sends nothing and is finished at once")
    func off() {
        let announcer = Announcer(schedule: .off, mac: mac, ip: ip) { _ in Issue.record("sent with rounds 0") }
        announcer.start()
        #expect(announcer.isFinished && announcer.sentMs.isEmpty)
        #expect(announcer.report == AnnounceReport(state: .off, schedule: .init(rounds: 0, initialMs: 50, stepMs: 100, maxMs: 550),
                                                   plannedMs: [], framesPerRound: 2))
    }

    @Test("the first round is out before start returns (so RUNNING can carry it); a frame the tap refuses is counted with its error and the rest of the round still goes")
    func refusedFramesCounted() {
        struct Refused: Error, CustomStringConvertible { var description: String { "the tap refused a RARP" } }
        let sent = Counter()
        let announcer = Announcer(schedule: AnnounceSchedule(initialMs: 1, stepMs: 1, rounds: 3, maxMs: 10), mac: mac, ip: ip) { frame in
            if EthernetFrame(frame)?.etherType == EtherType.rarp { throw Refused() }
            sent.add()
        }
        announcer.start()
        let first = announcer.report
        #expect(first.sentMs.count >= 1 && first.framesSent >= 1 && first.errors >= 1, "\(first)")
        #expect(announcer.waitUntilFinished(timeout: 10))
        let report = announcer.report
        #expect(report.state == .finished && report.sentMs.count == 3 && report.plannedMs == [0, 1, 3], "\(report)")
        #expect(report.framesPerRound == 2 && report.framesSent == 3 && report.errors == 3 && sent.value == 3)
        #expect(report.lastError == "the tap refused a RARP")
    }
}

/// A thread-safe counter.
final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add() { lock.withLock { count += 1 } }
    var value: Int { lock.withLock { count } }
}
