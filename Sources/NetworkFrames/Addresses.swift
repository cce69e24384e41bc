/// A 48-bit Ethernet address: the one MAC type of the project (the registry, the frames, the
/// virtio-net device and its saved state all use it).
public struct MACAddress: Hashable, Sendable, Codable, CustomStringConvertible {
    /// Always exactly six bytes.
    public let bytes: [UInt8]

    public static let broadcast = MACAddress(unchecked: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
    public static let zero = MACAddress(unchecked: [0, 0, 0, 0, 0, 0])

    /// nil unless `bytes` has exactly six bytes.
    public init?(_ bytes: some Collection<UInt8>) {
        guard bytes.count == 6 else { return nil }
        self.bytes = Array(bytes)
    }

    init(unchecked bytes: [UInt8]) { self.bytes = bytes }

    /// "52:54:00:12:34:56" (colons or dashes, hex digits of either case); nil otherwise.
    public init?(parsing text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        let fields = parts.count == 6 ? parts : text.split(separator: "-", omittingEmptySubsequences: false)
        guard fields.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for field in fields {
            guard field.utf8.count == 2, field.utf8.allSatisfy(\.isHexDigit), let byte = UInt8(field, radix: 16) else { return nil }
            bytes.append(byte)
        }
        self.bytes = bytes
    }

    /// The group bit: broadcast and multicast addresses, which no card may claim as its own.
    public var isMulticast: Bool { bytes[0] & 1 == 1 }

    /// An address one network card can own: not multicast, not all zeroes.
    public var isUnicast: Bool { !isMulticast && self != .zero }

    public var description: String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }

    /// Saved as its text ("52:54:00:12:34:56"), and parsed again when read back: saved device
    /// state comes from files and peers, so six bytes are never assumed.
    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        guard let mac = MACAddress(parsing: text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not a MAC address: \(text)"))
        }
        self = mac
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// An IPv4 address.
public struct IPv4Address: Hashable, Sendable, CustomStringConvertible {
    /// Always exactly four bytes, network order.
    public let bytes: [UInt8]

    public static let unspecified = IPv4Address(unchecked: [0, 0, 0, 0])

    /// nil unless `bytes` has exactly four bytes.
    public init?(_ bytes: some Collection<UInt8>) {
        guard bytes.count == 4 else { return nil }
        self.bytes = Array(bytes)
    }

    init(unchecked bytes: [UInt8]) { self.bytes = bytes }

    /// Dotted decimal, "10.0.0.2": four fields of 1 to 3 digits, each at most 255; nil otherwise.
    public init?(parsing text: String) {
        let fields = text.split(separator: ".", omittingEmptySubsequences: false)
        guard fields.count == 4 else { return nil }
        var bytes: [UInt8] = []
        for field in fields {
            guard (1...3).contains(field.utf8.count), field.utf8.allSatisfy({ (48...57).contains($0) }),
                  let byte = UInt8(field) else { return nil }
            bytes.append(byte)
        }
        self.bytes = bytes
    }

    public var description: String { bytes.map(String.init).joined(separator: ".") }
}

extension UInt8 {
    /// 0-9, a-f, A-F (Swift's integer parsing also takes a sign, which an address never has).
    var isHexDigit: Bool { (48...57).contains(self) || (65...70).contains(self) || (97...102).contains(self) }
}
