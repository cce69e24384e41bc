/// Why a frame a guest sent was dropped, with what it claimed: the evidence an auditor reads.
public struct DropEvidence: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        /// Too short for an Ethernet header, or an ARP/IPv4 header that does not parse.
        case malformed
        /// The Ethernet source is not the guest's registered MAC.
        case foreignSourceMAC = "foreign-source-mac"
        /// An ARP/RARP packet whose sender hardware address is not the registered MAC.
        case arpSenderMAC = "arp-sender-mac"
        /// An ARP/RARP packet whose sender protocol address is neither the registered IP nor 0.0.0.0.
        case arpSenderIP = "arp-sender-ip"
        /// An IPv4 packet whose source is neither the registered IP nor 0.0.0.0.
        case ipv4Source = "ipv4-source"
        /// A VLAN-tagged frame: the guest may not choose its VLAN.
        case vlanTagged = "vlan-tagged"
        /// Anything, after the guest was found false: nothing more leaves it.
        case guestFalse = "guest-false"
    }

    public let kind: Kind
    /// The frame's Ethernet source, when it had one.
    public let claimedMAC: MACAddress?
    /// The IPv4 address the frame claims as its sender, when it claims one.
    public let claimedIP: IPv4Address?
    public let length: Int
    /// The first bytes of the frame, hex.
    public let head: String

    public var description: String {
        var parts = ["kind=\(kind.rawValue)"]
        if let claimedMAC { parts.append("mac=\(claimedMAC)") }
        if let claimedIP { parts.append("ip=\(claimedIP)") }
        parts.append("length=\(length)")
        parts.append("head=\(head)")
        return parts.joined(separator: " ")
    }
}

/// The egress filter of one guest's network card: only frames from its registered MAC, ARP
/// speaking for its registered IPv4 address (or probing, from 0.0.0.0), and IPv4 from that
/// address (or 0.0.0.0) get out. Other EtherTypes (IPv6, ...) pass when the source MAC is the
/// guest's. Every dropped frame is counted and described; the drop that reaches `threshold`
/// marks the guest false, and from then on every frame is dropped.
///
/// A value type with no clock and no I/O: its owner serialises calls and acts on the verdicts.
public struct SourceGuard: Sendable {
    public enum Verdict: Sendable, Equatable {
        case allow
        /// `becameFalse` is true on exactly one drop: the one that reached the threshold.
        case drop(DropEvidence, becameFalse: Bool)
    }

    public let mac: MACAddress
    public let ip: IPv4Address?
    /// Dropped frames after which the guest is false (at least 1).
    public let threshold: Int
    /// How many of a frame's first bytes the evidence shows.
    public let evidenceBytes: Int
    public private(set) var dropped = 0
    public private(set) var allowed = 0

    public static let defaultThreshold = 8

    public init(mac: MACAddress, ip: IPv4Address?, threshold: Int = defaultThreshold, evidenceBytes: Int = 42) {
        self.mac = mac
        self.ip = ip
        self.threshold = max(1, threshold)
        self.evidenceBytes = max(0, evidenceBytes)
    }

    public var isFalse: Bool { dropped >= threshold }

    public mutating func inspect(_ frame: [UInt8]) -> Verdict {
        if isFalse { return drop(.guestFalse, frame, mac: EthernetFrame(frame)?.source, ip: nil) }
        guard let ethernet = EthernetFrame(frame) else { return drop(.malformed, frame, mac: nil, ip: nil) }
        guard ethernet.source == mac else { return drop(.foreignSourceMAC, frame, mac: ethernet.source, ip: nil) }
        guard ethernet.vlan == nil else { return drop(.vlanTagged, frame, mac: ethernet.source, ip: nil) }
        switch ethernet.etherType {
        case EtherType.arp, EtherType.rarp:
            guard let arp = ARPPacket(ethernet.payload) else { return drop(.malformed, frame, mac: ethernet.source, ip: nil) }
            guard arp.senderMAC == mac else { return drop(.arpSenderMAC, frame, mac: arp.senderMAC, ip: arp.senderIP) }
            guard claimsNothingOrOwn(arp.senderIP) else { return drop(.arpSenderIP, frame, mac: arp.senderMAC, ip: arp.senderIP) }
        case EtherType.ipv4:
            guard let header = IPv4Header(ethernet.payload) else { return drop(.malformed, frame, mac: ethernet.source, ip: nil) }
            guard claimsNothingOrOwn(header.source) else { return drop(.ipv4Source, frame, mac: ethernet.source, ip: header.source) }
        default:
            break
        }
        allowed += 1
        return .allow
    }

    private func claimsNothingOrOwn(_ address: IPv4Address) -> Bool {
        address == .unspecified || address == ip
    }

    private mutating func drop(_ kind: DropEvidence.Kind, _ frame: [UInt8], mac: MACAddress?, ip: IPv4Address?) -> Verdict {
        let wasFalse = isFalse
        dropped += 1
        let head = frame.prefix(evidenceBytes).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        let evidence = DropEvidence(kind: kind, claimedMAC: mac, claimedIP: ip, length: frame.count, head: head)
        return .drop(evidence, becameFalse: !wasFalse && isFalse)
    }
}
