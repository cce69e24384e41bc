import Billboard
@testable import ControlAPI
import Foundation
import MachineCore
import Migration
import NetworkFrames
import Synchronization
import Testing
import TestSupport
@testable import VMM

/// netecho on a real card and tap, admitted by the Billboard: what it sends passes the egress
/// policy on its way to the tap. The tap lives in a namespace of a `NetworkLab`.
@Suite("netecho through the Billboard's egress policy on a tap", .serialized)
struct NetworkEndToEndTests {
    static let hostAddress = "10.200.7.1"

    /// Serial output, collected.
    final class Console: Sendable {
        private let text = Mutex("")
        func append(_ byte: UInt8) { text.withLock { $0.unicodeScalars.append(UnicodeScalar(byte)) } }
        var contents: String { text.withLock { $0 } }
        func wait(for needle: String, timeout: Double) -> Bool {
            let deadline = Date(timeIntervalSinceNow: timeout)
            while Date() < deadline {
                if contents.lowercased().contains(needle.lowercased()) { return true }
                usleep(20_000)
            }
            return false
        }
    }

    /// Registers netecho with `mac` and `ip` and boots it with `guestIP` on its command line
    /// (its own idea of its address), on tap `tap0` inside `namespace`, the host side of the
    /// tap 10.200.7.1/24 and up.
    func boot(mac: String, ip: String, guestIP: String, note: String, lab: NetworkLab, namespace: String,
              console: Console) throws -> AdmittedGuest {
        let hosts = try localHosts()
        let c = MachineConfiguration(commandLine: "ip=\(guestIP)/24 note=\(note)")
        let image = try Fixtures.guestBytes("netecho.elf")
        let name = try hosts.register(image, c, mac: mac, ip: ip)
        try lab.persistentTap("tap0", in: namespace)
        try lab.address("\(Self.hostAddress)/24", on: "tap0", in: namespace)
        let guest = try lab.inside(namespace) {
            try GuestDoors.boot(image: image, name: name, configuration: c, tap: "tap0", store: hosts.source,
                                settings: hosts.settings, log: { _ in }, serialOutput: console.append)
        }
        return guest
    }

    /// Pings `address` `count` times from inside `namespace` (a raw ICMP socket in python3);
    /// true if every echo came back.
    func ping(_ address: String, count: Int, wait: Int = 3, in namespace: String) throws -> (ok: Bool, output: String) {
        let script = """
        import os, socket, struct, sys, time
        def csum(b):
            if len(b) % 2: b += b'\\0'
            s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
            while s >> 16: s = (s & 0xffff) + (s >> 16)
            return ~s & 0xffff
        ip, n, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        s.settimeout(wait)
        ok = 0
        for seq in range(n):
            payload = os.urandom(32)
            h = struct.pack('!BBHHH', 8, 0, 0, 0x4e46, seq)
            try: s.sendto(struct.pack('!BBHHH', 8, 0, csum(h + payload), 0x4e46, seq) + payload, (ip, 0))
            except OSError: break  # the tap went with a stopped guest
            end = time.time() + wait
            while time.time() < end:
                try: d, a = s.recvfrom(4096)
                except socket.timeout: break
                ihl = (d[0] & 15) * 4
                t, _, _, ident, sq = struct.unpack('!BBHHH', d[ihl:ihl + 8])
                if a[0] == ip and t == 0 and ident == 0x4e46 and sq == seq and d[ihl + 8:] == payload:
                    ok += 1
                    break
        print('%d/%d' % (ok, n))
        sys.exit(0 if ok == n else 1)
        """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["ip", "netns", "exec", namespace, "python3", "-c", script, address, String(count), String(wait)]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus == 0, String(decoding: data, as: UTF8.self))
    }

    @Test("netecho registered with a MAC and an IP boots with a card on a tap and answers ping; nothing it sends is refused",
          .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage))
    func honestGuestAnswers() throws {
        let lab = try NetworkLab()
        defer { lab.close() }
        let namespace = try lab.namespace("e2e")
        let console = Console()
        let guest = try boot(mac: "52:54:00:c8:07:02", ip: "10.200.7.2", guestIP: "10.200.7.2", note: "honest",
                             lab: lab, namespace: namespace, console: console)
        defer { guest.requestStop(); _ = guest.waitForExit(timeout: 10); guest.end() }
        guest.start()
        #expect(console.wait(for: "netecho mac=52:54:00:c8:07:02 ip=10.200.7.2/24", timeout: 20), "\(console.contents)")
        let (ok, output) = try ping("10.200.7.2", count: 3, in: namespace)
        #expect(ok, "\(output)\n\(console.contents)")
        #expect(guest.exitResult == nil)
        #expect(guest.machine.network?.statistics.filtered == 0)
        #expect(try localHosts().source.audit.entries().filter { $0.event == "network.spoof" && $0.guest == guest.name }.isEmpty)
    }

    @Test("netecho that answers for an IP it was not registered with: its replies never reach the tap, and past the threshold it is stopped",
          .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage))
    func spoofingGuestIsFilteredAndStopped() throws {
        let lab = try NetworkLab()
        defer { lab.close() }
        let namespace = try lab.namespace("e2e-spoof")
        let console = Console()
        let guest = try boot(mac: "52:54:00:c8:07:03", ip: "10.200.7.3", guestIP: "10.200.7.9", note: "spoof",
                             lab: lab, namespace: namespace, console: console)
        defer { guest.requestStop(); _ = guest.waitForExit(timeout: 10); guest.end() }
        guest.start()
        #expect(console.wait(for: "netecho mac=52:54:00:c8:07:03 ip=10.200.7.9/24", timeout: 20), "\(console.contents)")
        // The host knows where .9 is without asking (the guest's ARP replies would be refused too).
        try lab.ip(["-n", namespace, "neigh", "replace", "10.200.7.9", "lladdr", "52:54:00:c8:07:03", "dev", "tap0", "nud", "permanent"])
        let threshold = try #require(guest.egressPolicy?.threshold)
        let (ok, output) = try ping("10.200.7.9", count: threshold + 2, wait: 1, in: namespace)
        #expect(!ok && output.hasPrefix("0/"), "\(output)")
        // The replies were refused before the tap: the card counted them as filtered.
        #expect((guest.machine.network?.statistics.filtered ?? 0) >= threshold)
        let exit = guest.waitForExit(timeout: 20)
        guard case let .stoppedByOwner(reason)? = exit else {
            Issue.record("the guest was not stopped by the billboard: \(String(describing: exit))")
            return
        }
        #expect(reason.contains("spoofed-traffic"))
        let spoofs = try localHosts().source.audit.entries().filter { $0.event == "network.spoof" && $0.guest == guest.name }
        #expect(spoofs.count == threshold)
        #expect(spoofs.first?.details.contains("ip=10.200.7.9") == true, "\(spoofs.first?.details ?? "")")
    }
    @Test("a snapshot of netecho with a card restores only onto a tap named here (--net), keeps its registered MAC and answers ping there",
          .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage))
    func restoredGuestAnswers() throws {
        let lab = try NetworkLab()
        defer { lab.close() }
        let namespace = try lab.namespace("e2e-restore")
        // A persistent tap with the host's address: it outlives the source and serves the copy.
        try lab.ip(["-n", namespace, "tuntap", "add", "dev", "tap0", "mode", "tap"])
        try lab.address("\(Self.hostAddress)/24", on: "tap0", in: namespace)
        try lab.ip(["-n", namespace, "link", "set", "dev", "tap0", "up"])
        let hosts = try localHosts()
        let mac = "52:54:00:c8:07:04", ip = "10.200.7.4"
        let c = MachineConfiguration(commandLine: "ip=\(ip)/24 note=restore")
        let image = try Fixtures.guestBytes("netecho.elf")
        let name = try hosts.register(image, c, mac: mac, ip: ip)
        let console = Console()
        let source = try lab.inside(namespace) {
            try GuestDoors.boot(image: image, name: name, configuration: c, tap: "tap0", store: hosts.source,
                                settings: hosts.settings, log: { _ in }, serialOutput: console.append)
        }
        source.start()
        #expect(console.wait(for: "netecho mac=\(mac)", timeout: 20), "\(console.contents)")
        #expect(try ping(ip, count: 1, in: namespace).ok)
        #expect(source.pause())
        let path = temporaryPath("netecho-card.snap")
        defer { unlink(path) }
        _ = try source.snapshot(to: path)
        source.requestStop(); _ = source.waitForExit(timeout: 10); source.end()

        // The saved guest has a card: without a tap it is refused, and no other host gives it another MAC.
        let refusal = #expect(throws: NetworkRefusal.self) {
            _ = try GuestDoors.restore(path: path, requestedMemory: nil, store: hosts.destination, settings: hosts.settings,
                                       log: { _ in }, serialOutput: { _ in })
        }
        #expect(refusal?.description.contains("--net tap=NAME") == true)

        let restoredConsole = Console()
        let (restored, _) = try lab.inside(namespace) {
            try GuestDoors.restore(path: path, requestedMemory: nil, tap: "tap0", store: hosts.destination, settings: hosts.settings,
                                   log: { _ in }, serialOutput: restoredConsole.append)
        }
        defer { restored.requestStop(); _ = restored.waitForExit(timeout: 10); restored.end() }
        #expect(restored.configuration.network == NetworkConfiguration(mac: MACAddress(parsing: mac)!.bytes, tap: "tap0"))
        try restored.takeRestoredLease()
        restored.start()
        let (ok, output) = try ping(ip, count: 3, in: namespace)
        #expect(ok, "\(output)")
        #expect(restored.machine.network?.statistics.filtered == 0)
    }

}

@Suite("netecho migrated between hosts with its card", .serialized)
struct NetworkMigrationEndToEndTests {
    @Test("netecho migrated live from host A's tap to host B's, announced or not: with the announcement the LAN bridge moves its MAC to B's port at once and the LAN's pings are answered there; without it the bridge keeps sending to A's port and the pings go unanswered until an announcement teaches it. Both reports carry the announcement",
          .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage),
          arguments: [true, false])
    func migratedGuestOnTheNewHost(announced: Bool) throws {
        let lab = try NetworkLab()
        defer { lab.close() }
        let net = try MigrationNetwork(lab: lab)
        let (hostA, hostB) = (net.hosts[0], net.hosts[1])
        // Nothing may age out of the LAN bridge during the test (ageing_time is in 1/100 s:
        // 10 000 s here), so an entry that stays on A's port stays because nothing taught the
        // bridge otherwise, not because it was forgotten and flooded.
        try lab.ip(["-n", net.lan, "link", "set", "dev", net.lanBridge, "type", "bridge", "ageing_time", "1000000"])
        // Persistent taps, ports of each host's bridge, up before any guest attaches.
        for host in [hostA, hostB] { try lab.persistentTap(host.tap, in: host.namespace, bridge: host.bridge) }
        let mac = announced ? "52:54:00:c8:07:20" : "52:54:00:c8:07:21"
        let ip = announced ? "10.200.0.20" : "10.200.0.21"
        let hosts = try localHosts()
        let c = MachineConfiguration(commandLine: "ip=\(ip)/24 note=migrating-\(announced ? "on" : "off")")
        let image = try Fixtures.guestBytes("netecho.elf")
        let name = try hosts.register(image, c, mac: mac, ip: ip)
        let console = NetworkEndToEndTests.Console()
        let source = try lab.inside(hostA.namespace) {
            try GuestDoors.boot(image: image, name: name, configuration: c, tap: hostA.tap, store: hosts.source,
                                settings: hosts.settings, log: { _ in }, serialOutput: console.append)
        }
        defer { source.end() }
        source.start()
        #expect(console.wait(for: "netecho mac=\(mac)", timeout: 20), "\(console.contents)")
        let e2e = NetworkEndToEndTests()
        let before = try e2e.ping(ip, count: 2, wait: 2, in: net.lan)
        #expect(before.ok, "on host A: \(before.output)")
        #expect(try lab.port(of: mac, on: net.lanBridge, in: net.lan) == hostA.lanPort)
        // The client knows the guest's MAC for good: it never asks by broadcast ARP, whose
        // answer from host B would teach the bridge. Only an announcement (or the guest
        // speaking first, which netecho never does) can.
        try lab.ip(["-n", net.lan, "neigh", "replace", ip, "lladdr", mac, "dev", net.client, "nud", "permanent"])

        let destination = try Destination(tap: hostB.tap, namespace: hostB.namespace, announce: announced ? .qemuDefault : .off)
        let report = migrate(source, to: destination)
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        // The source VMM ends on completion, and lets its tap go.
        source.end(with: .migrated)
        #expect(destination.wait())
        let arrived = try #require(destination.machine)
        defer { arrived.requestStop(); _ = arrived.waitForExit(timeout: 10); arrived.end() }
        #expect(arrived.configuration.network == NetworkConfiguration(mac: MACAddress(parsing: mac)!.bytes, tap: hostB.tap))
        let planned = AnnounceSchedule.qemuDefault.offsets

        // The source's report: the announcement as the destination had it when it replied RUNNING.
        let told = try #require(report.destinationAnnounce, "the source's report has no destination_announce")
        if announced {
            #expect(told.schedule == AnnounceReport.Schedule(.qemuDefault) && told.plannedMs == planned)
            #expect(!told.sentMs.isEmpty && told.framesSent >= told.framesPerRound && told.framesPerRound == 2, "\(told)")
            #expect([.sending, .finished].contains(told.state))
        } else {
            #expect(told.state == .off && told.sentMs.isEmpty && told.framesSent == 0, "\(told)")
        }

        if announced {
            // The announcement through B's tap moves the MAC to B's port; the LAN reaches it there.
            #expect(waitUntil(10) { (try? lab.port(of: mac, on: net.lanBridge, in: net.lan)) == hostB.lanPort })
            #expect(arrived.announcer?.waitUntilFinished(timeout: 10) == true)
            let after = try e2e.ping(ip, count: 3, wait: 2, in: net.lan)
            #expect(after.ok, "on host B: \(after.output)\n\(destination.capture.text)")
        } else {
            #expect(arrived.announcer == nil)
            // A bounded observation window, not a duration: with ageing this long and the
            // client's neighbour entry permanent, nothing can move the entry during it, so the
            // pings (sent to the guest's MAC) go to A's port, where no guest is any more.
            #expect(try lab.port(of: mac, on: net.lanBridge, in: net.lan) == hostA.lanPort)
            let unanswered = try e2e.ping(ip, count: 3, wait: 1, in: net.lan)
            #expect(!unanswered.ok && unanswered.output.hasPrefix("0/3"), "\(unanswered.output)")
            #expect(try lab.port(of: mac, on: net.lanBridge, in: net.lan) == hostA.lanPort,
                    "the LAN bridge learned the guest's new port without an announcement")
            // The guest was there all along: an announcement now teaches the bridge, and it answers.
            let card = try #require(arrived.machine.network)
            let sink: @Sendable ([UInt8]) throws -> Void = { try card.writeHostFrame($0) }
            let late = try #require(arrived.startAnnouncing(.qemuDefault, sink: sink))
            #expect(waitUntil(10) { (try? lab.port(of: mac, on: net.lanBridge, in: net.lan)) == hostB.lanPort })
            #expect(late.waitUntilFinished(timeout: 10))
            let after = try e2e.ping(ip, count: 3, wait: 2, in: net.lan)
            #expect(after.ok, "on host B after a late announcement: \(after.output)")
        }
        #expect(arrived.machine.network?.statistics.filtered == 0)

        // The destination's report, as `vmm receive` writes it and its control API serves it.
        let arrival = try #require(arrived.arrivalReport)
        #expect(arrival.outcome == .running && arrival.source == hosts.source.hostName && arrival.pagesReceived > 0)
        let announce = try #require(arrival.announce)
        if announced {
            #expect(announce.state == .finished && announce.plannedMs == planned, "\(announce)")
            #expect(announce.sentMs.count == planned.count && announce.sentMs == announce.sentMs.sorted(), "\(announce.sentMs)")
            #expect(announce.framesSent == 2 * planned.count && announce.errors == 0 && announce.lastError == nil, "\(announce)")
            #expect(announce.sentMs.first == told.sentMs.first, "the first round is the one the source was told of")
        } else {
            // The late announcement above is not the arrival's: the arrival was not announced.
            #expect(announce.state == .off && announce.sentMs.isEmpty && announce.framesSent == 0 && announce.plannedMs.isEmpty, "\(announce)")
        }
        // The body of GET /vm/migration on the destination (built as the route builds it; an
        // HTTP server in this process would need the cooperative pool the other tests block).
        let status = try MigrationRoutes.statusObject(MigrationService(guest: arrived, reportDirectory: nil))
        let incoming = try #require(status["incoming"] as? [String: Any], "\(status)")
        let served = try #require(incoming["announce"] as? [String: Any], "\(incoming)")
        #expect(served["state"] as? String == (announced ? "finished" : "off"), "\(served)")
        #expect((served["sent_ms"] as? [Double])?.count == (announced ? planned.count : 0), "\(served)")
        #expect(served["planned_ms"] as? [Int] == (announced ? planned : []), "\(served)")
        #expect(incoming["source"] as? String == hosts.source.hostName && status["phase"] as? String == "none", "\(status)")

        let reports = temporaryPath("arrival-reports")
        let written = Mutex<String??>(nil)
        MigrationService.reportArrival(of: arrived, in: reports, log: { _ in }, completion: { path in written.withLock { $0 = .some(path) } })
        #expect(waitUntil(20) { written.withLock { $0 } != nil })
        let path = try #require(written.withLock { $0 } ?? nil)
        #expect(path.hasPrefix(reports + "/incoming-") && path.hasSuffix(".json"))
        let file = try JSONDecoder().decode(ArrivalReport.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
        #expect(file.announce?.state == announce.state && file.announce?.sentMs.count == announce.sentMs.count)
    }
}

@Suite("The network card in the machine description")
struct NetworkDescriptionTests {
    @Test("the card's MAC travels in the state header; a header without one (an older file, or no card) reads as no card")
    func macInTheHeader() throws {
        let mac: [UInt8] = [0x52, 0x54, 0x00, 0xc8, 0x07, 0x30]
        let header = StateHeader(description: MachineDescription(memorySize: 64 << 20, vcpuCount: 1, mode: nil, commandLine: "ip=10.0.0.2/24",
                                                                 tscKHz: 1_000_000, networkMAC: mac), identity: nil)
        let decoded = try StateHeader.decode(try header.encoded(), what: "header")
        #expect(decoded == header && decoded.description.networkMAC == mac)
        // Not a configuration of this host: the tap is named where the guest lands.
        #expect(decoded.description.configuration.network == nil)

        var plain = header
        plain.description.networkMAC = nil
        let text = String(decoding: try plain.encoded(), as: UTF8.self)
        #expect(!text.contains("networkMAC"))
        #expect(try StateHeader.decode(Array(text.utf8), what: "header").description.networkMAC == nil)
    }
}
