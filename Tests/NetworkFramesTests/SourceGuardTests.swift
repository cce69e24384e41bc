import NetworkFrames
import Testing

@Suite("The egress source guard")
struct SourceGuardTests {
    let other = MACAddress(parsing: "52:54:00:aa:bb:cc")!
    let otherIP = IPv4Address(parsing: "10.200.1.77")!

    func dropped(_ verdict: SourceGuard.Verdict) -> DropEvidence? {
        if case let .drop(evidence, _) = verdict { return evidence }
        return nil
    }

    @Test("the guest's own announce, ARP probe, IPv4 and IPv6 pass")
    func honest() {
        var g = SourceGuard(mac: guestMAC, ip: guestIP)
        let probe = ARPPacket(operation: ARPPacket.request, senderMAC: guestMAC, senderIP: .unspecified, targetMAC: .zero, targetIP: guestIP)
        let frames = Announcement.round(mac: guestMAC, ip: guestIP) + [
            FrameBuilder.ethernet(destination: .broadcast, source: guestMAC, etherType: EtherType.arp, payload: probe.bytes),
            ParsingTests.ipv4Frame(source: guestIP),
            ParsingTests.ipv4Frame(source: .unspecified),
            FrameBuilder.ethernet(destination: .broadcast, source: guestMAC, etherType: EtherType.ipv6, payload: [0x60]),
        ]
        for frame in frames { #expect(g.inspect(frame) == .allow) }
        #expect(g.dropped == 0 && g.allowed == frames.count)
    }

    @Test("each kind of spoof is dropped with what it claimed")
    func spoofs() throws {
        var g = SourceGuard(mac: guestMAC, ip: guestIP, threshold: 100)
        let e1 = try #require(dropped(g.inspect(Announcement.rarp(mac: other))))
        #expect(e1.kind == .foreignSourceMAC && e1.claimedMAC == other && e1.length == 60)
        #expect(e1.head.hasPrefix("ffffffffffff525400aabbcc8035") && e1.head.count == 84)

        let e2 = try #require(dropped(g.inspect(Announcement.gratuitousARP(mac: guestMAC, ip: otherIP))))
        #expect(e2.kind == .arpSenderIP && e2.claimedIP == otherIP && e2.claimedMAC == guestMAC)
        #expect(e2.description.contains("kind=arp-sender-ip") && e2.description.contains("ip=10.200.1.77"))

        let poison = ARPPacket(operation: ARPPacket.reply, senderMAC: other, senderIP: guestIP, targetMAC: .zero, targetIP: otherIP)
        let e3 = try #require(dropped(g.inspect(FrameBuilder.ethernet(destination: .broadcast, source: guestMAC,
                                                                     etherType: EtherType.arp, payload: poison.bytes))))
        #expect(e3.kind == .arpSenderMAC && e3.claimedMAC == other)

        let e4 = try #require(dropped(g.inspect(ParsingTests.ipv4Frame(source: otherIP))))
        #expect(e4.kind == .ipv4Source && e4.claimedIP == otherIP)

        let e5 = try #require(dropped(g.inspect([1, 2, 3])))
        #expect(e5.kind == .malformed && e5.claimedMAC == nil && e5.head == "010203")

        let rarp = Announcement.rarp(mac: guestMAC)
        let tagged = Array(rarp[0..<12]) + [0x81, 0x00, 0x00, 0x2a] + Array(rarp[12...])
        #expect(try #require(dropped(g.inspect(tagged))).kind == .vlanTagged)
        #expect(g.dropped == 6 && g.allowed == 0)
    }

    @Test("a guest registered without an IP may not claim any IPv4 address")
    func noIP() {
        var g = SourceGuard(mac: guestMAC, ip: nil)
        #expect(g.inspect(Announcement.rarp(mac: guestMAC)) == .allow)
        #expect(dropped(g.inspect(Announcement.gratuitousARP(mac: guestMAC, ip: guestIP)))?.kind == .arpSenderIP)
        #expect(dropped(g.inspect(ParsingTests.ipv4Frame(source: guestIP)))?.kind == .ipv4Source)
    }

    @Test("the drop that reaches the threshold, and only it, makes the guest false; then nothing passes")
    func threshold() {
        var g = SourceGuard(mac: guestMAC, ip: guestIP, threshold: 3)
        var became: [Bool] = []
        for _ in 0..<5 {
            #expect(g.inspect(Announcement.rarp(mac: guestMAC)) == .allow || g.isFalse)
            if case let .drop(_, becameFalse) = g.inspect(Announcement.rarp(mac: other)) { became.append(becameFalse) }
        }
        #expect(became == [false, false, true, false, false])
        #expect(g.isFalse)
        #expect(dropped(g.inspect(Announcement.rarp(mac: guestMAC)))?.kind == .guestFalse)
        #expect(SourceGuard(mac: guestMAC, ip: nil).threshold == SourceGuard.defaultThreshold)
    }
}
