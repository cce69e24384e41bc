import NetworkFrames
import Testing

@Suite("Parsing hostile frames")
struct ParsingTests {
    static func ipv4Frame(source: IPv4Address, totalLength: UInt16 = 20, ihl: UInt8 = 5) -> [UInt8] {
        var header: [UInt8] = [0x40 | ihl, 0, UInt8(totalLength >> 8), UInt8(totalLength & 0xff), 0, 0, 0, 0, 64, 17, 0, 0]
        header += source.bytes + [10, 200, 1, 1]
        return FrameBuilder.ethernet(destination: .broadcast, source: guestMAC, etherType: EtherType.ipv4, payload: header)
    }

    @Test("every truncation of valid frames parses or is nil, never traps; full frames parse")
    func truncations() {
        let frames = [Announcement.rarp(mac: guestMAC), Announcement.gratuitousARP(mac: guestMAC, ip: guestIP),
                      Self.ipv4Frame(source: guestIP)]
        for frame in frames {
            for n in 0...frame.count {
                let cut = Array(frame.prefix(n))
                let ethernet = EthernetFrame(cut)
                #expect((ethernet == nil) == (n < 14))
                if let ethernet {
                    _ = ARPPacket(ethernet.payload)
                    _ = IPv4Header(ethernet.payload)
                    if ethernet.etherType != EtherType.ipv4 { #expect((ARPPacket(ethernet.payload) == nil) == (n < 42)) }
                }
                var guardian = SourceGuard(mac: guestMAC, ip: guestIP, threshold: 1000)
                if case .allow = guardian.inspect(cut) { #expect(n >= 34) }
            }
        }
    }

    @Test("inconsistent IPv4 lengths and ARP for other hardware are refused")
    func inconsistentHeaders() {
        #expect(IPv4Header(EthernetFrame(Self.ipv4Frame(source: guestIP, totalLength: 2000))!.payload) == nil)
        #expect(IPv4Header(EthernetFrame(Self.ipv4Frame(source: guestIP, totalLength: 12))!.payload) == nil)
        #expect(IPv4Header(EthernetFrame(Self.ipv4Frame(source: guestIP, ihl: 4))!.payload) == nil)
        #expect(IPv4Header(EthernetFrame(Self.ipv4Frame(source: guestIP, totalLength: 40, ihl: 15))!.payload) == nil)
        #expect(IPv4Header(EthernetFrame(Self.ipv4Frame(source: guestIP))!.payload)?.source == guestIP)
        var arp = Announcement.gratuitousARP(mac: guestMAC, ip: guestIP)
        arp[18] = 8  // hardware length 8
        #expect(ARPPacket(EthernetFrame(arp)!.payload) == nil)
    }

    @Test("a VLAN tag is stepped over, and a tag cut short is nil")
    func vlan() {
        let inner = Announcement.rarp(mac: guestMAC)
        let tagged = Array(inner[0..<12]) + [0x81, 0x00, 0x00, 0x2a] + Array(inner[12...])
        let frame = EthernetFrame(tagged)
        #expect(frame?.vlan == 42 && frame?.etherType == EtherType.rarp)
        #expect(EthernetFrame(Array(tagged.prefix(17))) == nil)
    }

    @Test("random bytes never trap the parsers or the guard")
    func randomBytes() {
        var rng = SplitMix(seed: 0x5eed)
        var guardian = SourceGuard(mac: guestMAC, ip: guestIP, threshold: .max)
        for _ in 0..<20_000 {
            let count = Int(rng.next() % 80)
            var bytes = (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            // Often a plausible header, so the inner parsers see hostile bodies too.
            if count >= 14 && rng.next() % 2 == 0 {
                bytes.replaceSubrange(6..<12, with: guestMAC.bytes)
                let types: [UInt16] = [EtherType.arp, EtherType.rarp, EtherType.ipv4, EtherType.vlan]
                let t = types[Int(rng.next() % 4)]
                bytes[12] = UInt8(t >> 8); bytes[13] = UInt8(t & 0xff)
            }
            if let e = EthernetFrame(bytes) { _ = ARPPacket(e.payload); _ = IPv4Header(e.payload) }
            _ = guardian.inspect(bytes)
        }
    }
}

/// A small deterministic generator, so a failure can be replayed.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
