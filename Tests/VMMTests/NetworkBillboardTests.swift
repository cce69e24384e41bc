import Billboard
import Foundation
import MachineCore
import NetworkFrames
import SystemCalls
import Testing
import TestSupport
import VMM

@Suite("The Billboard on the wire: a network card only as registered, spoofing stops the guest", .serialized)
struct NetworkBillboardTests {
    static let counter = MachineConfiguration(commandLine: "count=0 ticks=400000")

    /// Registers counter.elf under a fresh name (with a distinct command line, so the digest and
    /// configuration pick this registration) and boots it on the source host with a card on `tap`.
    /// A card's tap is opened inside `namespace` of `lab` (nothing appears in the host's own).
    func boot(mac: String?, ip: String?, tap: String?, note: String, in lab: (NetworkLab, String)? = nil) throws -> AdmittedGuest {
        let hosts = try localHosts()
        var c = Self.counter
        c.commandLine! += " note=\(note)"
        let image = try Fixtures.guestBytes("counter.elf")
        let name = try hosts.register(image, c, mac: mac, ip: ip)
        let make = { [c] in
            try GuestDoors.boot(image: image, name: name, configuration: c, tap: tap, store: hosts.source,
                                settings: hosts.settings, log: { _ in }, serialOutput: { _ in })
        }
        guard let (lab, namespace) = lab else { return try make() }
        return try lab.inside(namespace, make)
    }

    /// A lab with one namespace for the cards' taps, which are made there first (a VMM attaches
    /// only to a tap that exists).
    static func tapNamespace() throws -> (NetworkLab, String) {
        let lab = try NetworkLab()
        let namespace = try lab.namespace("cards")
        for tap in ["tap0", "tap-honest", "tap-spoof"] { try lab.persistentTap(tap, in: namespace) }
        return (lab, namespace)
    }

    func entries(_ event: String, guest: String) throws -> [AuditEntry] {
        try localHosts().source.audit.entries().filter { $0.event == event && $0.guest == guest }
    }

    @Test("a spoofing guest's dropped frames are audited with what they claimed, and the one that reaches the threshold stops it as a false VM; an honest guest beside it keeps running and sending",
          .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage))
    func spoofingGuestIsStopped() throws {
        let lab = try Self.tapNamespace()
        defer { lab.0.close() }
        let honest = try boot(mac: "52:54:00:c8:00:01", ip: "10.200.0.11", tap: "tap-honest", note: "honest", in: lab)
        let spoofer = try boot(mac: "52:54:00:c8:00:02", ip: "10.200.0.12", tap: "tap-spoof", note: "spoofer", in: lab)
        defer { honest.requestStop(); _ = honest.waitForExit(timeout: 10); honest.end(); spoofer.end() }
        honest.start()
        spoofer.start()
        let honestMAC = MACAddress(parsing: "52:54:00:c8:00:01")!, spooferMAC = MACAddress(parsing: "52:54:00:c8:00:02")!
        let threshold = try #require(spoofer.egressPolicy?.threshold)
        #expect(threshold == BillboardSettings().spoofThreshold)
        #expect(spoofer.configuration.network == NetworkConfiguration(mac: spooferMAC.bytes, tap: "tap-spoof"))

        // Its own frames pass; frames claiming the honest guest's MAC or IP do not.
        #expect(spoofer.admitEgress(Announcement.gratuitousARP(mac: spooferMAC, ip: IPv4Address(parsing: "10.200.0.12")!)))
        let forged = [Announcement.rarp(mac: honestMAC),
                      Announcement.gratuitousARP(mac: spooferMAC, ip: IPv4Address(parsing: "10.200.0.11")!)]
        for i in 0..<(threshold - 1) {
            #expect(!spoofer.admitEgress(forged[i % 2]))
            #expect(honest.admitEgress(Announcement.rarp(mac: honestMAC)))
        }
        let audited = try entries("network.spoof", guest: spoofer.name)
        #expect(audited.count == threshold - 1)
        #expect(audited.first?.details.contains("kind=foreign-source-mac mac=52:54:00:c8:00:01") == true)
        #expect(audited.dropFirst().first?.details.contains("kind=arp-sender-ip mac=52:54:00:c8:00:02 ip=10.200.0.11") == true)
        #expect(audited.allSatisfy { $0.details.contains("head=ffffffffffff") })
        #expect(spoofer.state == .running && spoofer.exitResult == nil)

        // The frame that reaches the threshold: audited, and the guest is stopped.
        #expect(!spoofer.admitEgress(forged[0]))
        let exit = spoofer.waitForExit(timeout: 20)
        guard case let .stoppedByOwner(reason)? = exit else {
            Issue.record("the spoofer was not stopped by the billboard: \(String(describing: exit))")
            return
        }
        #expect(reason.contains("stopped by the billboard") && reason.contains("spoofed-traffic"))
        #expect(try entries("network.spoof", guest: spoofer.name).count == threshold)
        let stop = try #require(try entries("scan.stopped", guest: spoofer.name).last)
        #expect(stop.details.contains("\"kind\":\"spoofed-traffic\"") && stop.details.contains("\"self\":true"))
        // Nothing more leaves it, and nothing more is audited.
        #expect(!spoofer.admitEgress(Announcement.rarp(mac: spooferMAC)))
        #expect(try entries("network.spoof", guest: spoofer.name).count == threshold)

        #expect(honest.state == .running && honest.exitResult == nil)
        #expect(honest.admitEgress(Announcement.rarp(mac: honestMAC)))
        #expect(try entries("network.spoof", guest: honest.name).isEmpty)
        #expect(try localHosts().source.audit.verify().isIntact)
    }

    @Test("a guest registered without a MAC is refused a network card, and no card may carry another MAC than the registered one",
          .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage))
    func cardOnlyAsRegistered() throws {
        let lab = try Self.tapNamespace()
        defer { lab.0.close() }
        let refusal = #expect(throws: NetworkRefusal.self) { _ = try boot(mac: nil, ip: nil, tap: "tap0", note: "nomac", in: lab) }
        #expect(refusal?.description.contains("registered without a MAC address") == true)

        let hosts = try localHosts()
        var c = Self.counter
        c.commandLine! += " note=othermac"
        let image = try Fixtures.guestBytes("counter.elf")
        let name = try hosts.register(image, c, mac: "52:54:00:c8:00:03")
        c.network = NetworkConfiguration(mac: [0x52, 0x54, 0x00, 0xc8, 0x00, 0x99], tap: "tap0")
        #expect(throws: NetworkRefusal.self) {
            _ = try GuestDoors.boot(image: image, name: name, configuration: c, store: hosts.source, settings: hosts.settings,
                                    log: { _ in }, serialOutput: { _ in })
        }
        // The refused boot gave its lease back: the guest boots with its own MAC.
        let guest = try lab.0.inside(lab.1) { [c] in
            try GuestDoors.boot(image: image, name: name, configuration: c, tap: "tap0", store: hosts.source,
                                settings: hosts.settings, log: { _ in }, serialOutput: { _ in })
        }
        defer { guest.end() }
        #expect(guest.configuration.network?.mac == [0x52, 0x54, 0x00, 0xc8, 0x00, 0x03])
        #expect(guest.egressPolicy?.ip == nil)
    }

    @Test("a card on a tap that does not exist is refused, naming the tap and how to make it; nothing is created, and the lease goes back",
          .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage))
    func missingTapIsRefused() throws {
        let lab = try Self.tapNamespace()
        defer { lab.0.close() }
        let hosts = try localHosts()
        var c = Self.counter
        c.commandLine! += " note=missingtap"
        let image = try Fixtures.guestBytes("counter.elf")
        let name = try hosts.register(image, c, mac: "52:54:00:c8:00:08")
        let boot = { (tap: String) in
            try lab.0.inside(lab.1) { [c] in
                try GuestDoors.boot(image: image, name: name, configuration: c, tap: tap, store: hosts.source,
                                    settings: hosts.settings, log: { _ in }, serialOutput: { _ in })
            }
        }
        let error = #expect(throws: TapError.self) { _ = try boot("tap-nowhere") }
        #expect(error?.reason == .missing)
        #expect(error?.description.contains("there is no tap 'tap-nowhere'") == true && error?.description.contains("ip tuntap add") == true,
                "\(error?.description ?? "")")
        #expect(throws: LabError.self) { try lab.0.ip(["-n", lab.1, "link", "show", "dev", "tap-nowhere"]) }
        // The refused boot gave its lease back: the guest boots on a tap that exists.
        let guest = try boot("tap0")
        defer { guest.end() }
        #expect(guest.configuration.network?.tap == "tap0")
    }

    @Test("without a card no frame leaves and nothing is announced; with one, the announcement carries the registered MAC and IP",
          .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .enabled(if: NetworkLab.isAvailable, NetworkLab.skipMessage))
    func announceThroughTheGuest() throws {
        let lab = try Self.tapNamespace()
        defer { lab.0.close() }
        let plain = try boot(mac: "52:54:00:c8:00:04", ip: nil, tap: nil, note: "nocard")
        defer { plain.end() }
        #expect(plain.startAnnouncing(.qemuDefault, sink: { _ in }) == nil)
        let noRegistration = try boot(mac: nil, ip: nil, tap: nil, note: "nonet")
        defer { noRegistration.end() }
        #expect(!noRegistration.admitEgress(Announcement.rarp(mac: MACAddress(parsing: "52:54:00:c8:00:05")!)))

        let guest = try boot(mac: "52:54:00:c8:00:06", ip: "10.200.0.16", tap: "tap0", note: "card", in: lab)
        defer { guest.end() }
        let sent = FrameLog()
        let announcer = try #require(guest.startAnnouncing(AnnounceSchedule(initialMs: 1, stepMs: 1, rounds: 2), sink: sent.append))
        #expect(announcer.waitUntilFinished(timeout: 10))
        let round = Announcement.round(mac: MACAddress(parsing: "52:54:00:c8:00:06")!, ip: IPv4Address(parsing: "10.200.0.16")!)
        #expect(sent.frames == round + round)
    }

    @Test("a registration's MAC must be a unicast MAC and its IP an IPv4 address")
    func registrationChecksAddresses() throws {
        let hosts = try localHosts()
        for (mac, ip) in [("52:54:00:zz:00:01", nil), ("ff:ff:ff:ff:ff:ff", nil), ("52:54:00:c8:00:07", "10.0.0.256"),
                          (nil, "10.0.0.5")] as [(String?, String?)] {
            #expect(throws: BillboardError.self) {
                try hosts.source.registry.register(GuestRegistration(name: "badnet\(UInt16.random(in: 0...9999))", imageSHA256: String(repeating: "a", count: 64),
                                                                     memoryBytes: 1 << 20, vcpus: 1, mac: mac, ip: ip), signedBy: hosts.admin)
            }
        }
    }

    @Test("vmm run --net names only a tap, and a guest registered without a MAC is refused a card; vmm receive takes --no-announce or --announce-rounds, not both")
    func cliNet() throws {
        let image = try Fixtures.guest("counter.elf")
        let args = try billboard().register(image, cmdline: "count=0 ticks=400000 note=clinet")
        let r = try runVMM(["run", image, "--cmdline", "count=0 ticks=400000 note=clinet", "--net", "tap=vmmt0"] + args)
        #expect(r.status == 1 && r.stderr.contains("registered without a MAC address"), "\(r.stderr)")
        let bad = try runVMM(["run", image, "--net", "mac=52:54:00:00:00:01"] + args)
        #expect(bad.status != 0 && bad.stderr.contains("--net takes tap=NAME"), "\(bad.stderr)")
        let both = try runVMM(["receive", "--listen", "127.0.0.1:0", "--no-announce", "--announce-rounds", "3"] + args)
        #expect(both.status == 64 && both.stderr.contains("--no-announce and --announce-rounds 3 contradict each other"), "\(both.stderr)")
        let help = try runVMM(["receive", "--help"])
        #expect(help.stdout.contains("--no-announce") && help.stdout.contains("--announce-rounds"), "\(help.stdout)")
    }
}

/// Frames a sink was given, thread-safely.
final class FrameLog: @unchecked Sendable {
    private let lock = NSLock()
    private var sent: [[UInt8]] = []
    @Sendable func append(_ frame: [UInt8]) { lock.withLock { sent.append(frame) } }
    var frames: [[UInt8]] { lock.withLock { sent } }
}
