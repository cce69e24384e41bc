/// Ethernet, ARP/RARP and IPv4 headers read from bytes that may be hostile: every length is
/// checked before it is used, and anything short or inconsistent is `nil`, never a trap.

/// EtherType values this module knows.
public enum EtherType {
    public static let ipv4: UInt16 = 0x0800
    public static let arp: UInt16 = 0x0806
    public static let rarp: UInt16 = 0x8035
    public static let vlan: UInt16 = 0x8100
    public static let qinq: UInt16 = 0x88a8
    public static let ipv6: UInt16 = 0x86dd
}

/// The minimum Ethernet frame without its FCS: shorter frames are padded with zeroes.
public let minimumFrameLength = 60

extension Collection<UInt8> where Index == Int {
    /// Big-endian 16 bits at `offset`; the caller has checked the length.
    func be16(_ offset: Int) -> UInt16 { UInt16(self[startIndex + offset]) << 8 | UInt16(self[startIndex + offset + 1]) }
}

/// An Ethernet II header, with at most one 802.1Q/802.1ad tag stepped over.
public struct EthernetFrame: Sendable, Equatable {
    public let destination: MACAddress
    public let source: MACAddress
    /// The EtherType after any VLAN tag.
    public let etherType: UInt16
    /// The VLAN tag's 12-bit id, when the frame carried one.
    public let vlan: UInt16?
    /// The bytes after the header (padding included: the headers inside say their own lengths).
    public let payload: ArraySlice<UInt8>

    public static let headerLength = 14

    /// nil when `bytes` is shorter than its header says (14 bytes, 18 with a tag).
    public init?(_ bytes: [UInt8]) {
        guard bytes.count >= Self.headerLength else { return nil }
        destination = MACAddress(unchecked: Array(bytes[0..<6]))
        source = MACAddress(unchecked: Array(bytes[6..<12]))
        let outer = bytes.be16(12)
        if outer == EtherType.vlan || outer == EtherType.qinq {
            guard bytes.count >= Self.headerLength + 4 else { return nil }
            vlan = bytes.be16(14) & 0x0fff
            etherType = bytes.be16(16)
            payload = bytes[18...]
        } else {
            vlan = nil
            etherType = outer
            payload = bytes[14...]
        }
    }
}

/// An ARP or RARP packet for Ethernet and IPv4 (hardware type 1, protocol 0x0800, lengths 6 and 4).
public struct ARPPacket: Sendable, Equatable {
    public let operation: UInt16
    public let senderMAC: MACAddress
    public let senderIP: IPv4Address
    public let targetMAC: MACAddress
    public let targetIP: IPv4Address

    public static let length = 28
    public static let request: UInt16 = 1
    public static let reply: UInt16 = 2
    public static let reverseRequest: UInt16 = 3
    public static let reverseReply: UInt16 = 4

    public init(operation: UInt16, senderMAC: MACAddress, senderIP: IPv4Address, targetMAC: MACAddress, targetIP: IPv4Address) {
        self.operation = operation
        self.senderMAC = senderMAC
        self.senderIP = senderIP
        self.targetMAC = targetMAC
        self.targetIP = targetIP
    }

    /// nil when shorter than 28 bytes or not Ethernet/IPv4 with lengths 6 and 4.
    public init?(_ bytes: ArraySlice<UInt8>) {
        guard bytes.count >= Self.length, bytes.be16(0) == 1, bytes.be16(2) == EtherType.ipv4 else { return nil }
        let s = bytes.startIndex
        guard bytes[s + 4] == 6, bytes[s + 5] == 4 else { return nil }
        operation = bytes.be16(6)
        senderMAC = MACAddress(unchecked: Array(bytes[(s + 8)..<(s + 14)]))
        senderIP = IPv4Address(unchecked: Array(bytes[(s + 14)..<(s + 18)]))
        targetMAC = MACAddress(unchecked: Array(bytes[(s + 18)..<(s + 24)]))
        targetIP = IPv4Address(unchecked: Array(bytes[(s + 24)..<(s + 28)]))
    }

    /// The 28 bytes on the wire.
    public var bytes: [UInt8] {
        [0, 1, UInt8(EtherType.ipv4 >> 8), UInt8(EtherType.ipv4 & 0xff), 6, 4, UInt8(operation >> 8), UInt8(operation & 0xff)]
            + senderMAC.bytes + senderIP.bytes + targetMAC.bytes + targetIP.bytes
    }
}

/// The fixed part of an IPv4 header.
public struct IPv4Header: Sendable, Equatable {
    public let headerLength: Int
    public let totalLength: Int
    public let protocolNumber: UInt8
    public let source: IPv4Address
    public let destination: IPv4Address

    /// nil unless version 4, a header length of at least 20 bytes that fits, and a total length
    /// that covers the header and fits in `bytes` (Ethernet padding may follow it).
    public init?(_ bytes: ArraySlice<UInt8>) {
        guard bytes.count >= 20 else { return nil }
        let s = bytes.startIndex
        guard bytes[s] >> 4 == 4 else { return nil }
        headerLength = Int(bytes[s] & 0x0f) * 4
        totalLength = Int(bytes.be16(2))
        guard headerLength >= 20, headerLength <= totalLength, totalLength <= bytes.count else { return nil }
        protocolNumber = bytes[s + 9]
        source = IPv4Address(unchecked: Array(bytes[(s + 12)..<(s + 16)]))
        destination = IPv4Address(unchecked: Array(bytes[(s + 16)..<(s + 20)]))
    }
}

/// Builds Ethernet frames, padded to the 60-byte minimum.
public enum FrameBuilder {
    public static func ethernet(destination: MACAddress, source: MACAddress, etherType: UInt16, payload: [UInt8]) -> [UInt8] {
        var frame = destination.bytes + source.bytes + [UInt8(etherType >> 8), UInt8(etherType & 0xff)] + payload
        if frame.count < minimumFrameLength { frame += [UInt8](repeating: 0, count: minimumFrameLength - frame.count) }
        return frame
    }
}
