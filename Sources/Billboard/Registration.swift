import Foundation
import NetworkFrames

/// Whether a guest must send liveness beacons while it runs.
public enum BeaconPolicy: String, Sendable, Codable, Equatable {
    case required
    case none
}

/// What an administrator approved a guest to be: its image, its shape, and where it may run.
///
/// `allowedHosts` empty means "only the host whose billboard holds this registration"
/// (the safe default: a registration copied to another store does not widen where the guest runs).
public struct GuestRegistration: Sendable, Equatable {
    public var id: UUID
    public var name: String
    /// SHA-256 of the guest image, lower-case hex.
    public var imageSHA256: String
    public var memoryBytes: UInt64
    public var vcpus: Int
    public var mode: String?
    public var commandLine: String?
    public var mac: String?
    public var ip: String?
    public var os: String?
    public var allowedHosts: [String]
    public var beacons: BeaconPolicy
    /// Millisecond precision: the stored and signed value.
    public var createdAt: Date
    public var revoked: Bool

    public init(
        id: UUID = UUID(), name: String, imageSHA256: String, memoryBytes: UInt64, vcpus: Int,
        mode: String? = nil, commandLine: String? = nil, mac: String? = nil, ip: String? = nil,
        os: String? = nil, allowedHosts: [String] = [], beacons: BeaconPolicy = .none,
        createdAt: Date = Date(), revoked: Bool = false
    ) {
        self.id = id
        self.name = name
        self.imageSHA256 = imageSHA256.lowercased()
        self.memoryBytes = memoryBytes
        self.vcpus = vcpus
        // Empty and absent mean the same to the VMM; one spelling keeps admission exact.
        self.mode = mode.flatMap { $0.isEmpty ? nil : $0 }
        self.commandLine = commandLine.flatMap { $0.isEmpty ? nil : $0 }
        self.mac = mac
        self.ip = ip
        self.os = os
        self.allowedHosts = allowedHosts
        self.beacons = beacons
        self.createdAt = Date(milliseconds: createdAt.milliseconds)
        self.revoked = revoked
    }

    /// The bytes an administrator signs: sorted-keys canonical JSON of every field except `revoked`
    /// (which changes after signing and is protected by its own integrity code), plus a `kind`
    /// tag so a signature over one kind of request can never be replayed as another.
    public var signingPayload: Data {
        CanonicalJSON.object([
            "kind": .string("swift-vmm.billboard.registration.v1"),
            "id": .string(id.uuidString.lowercased()),
            "name": .string(name),
            "imageSHA256": .string(imageSHA256),
            "memoryBytes": .uint(memoryBytes),
            "vcpus": .int(Int64(vcpus)),
            "mode": .optional(mode),
            "commandLine": .optional(commandLine),
            "mac": .optional(mac),
            "ip": .optional(ip),
            "os": .optional(os),
            "allowedHosts": .array(allowedHosts.map(CanonicalJSON.string)),
            "beacons": .string(beacons.rawValue),
            "createdAt": .int(createdAt.milliseconds),
        ]).bytes
    }

    func validate() throws {
        try validateName(name)
        guard imageSHA256.utf8.count == 64, Data(hex: imageSHA256) != nil else {
            throw BillboardError.invalidRegistration("imageSHA256 must be 64 hex digits")
        }
        guard memoryBytes > 0 else { throw BillboardError.invalidRegistration("memoryBytes must be positive") }
        guard vcpus > 0 else { throw BillboardError.invalidRegistration("vcpus must be positive") }
        for host in allowedHosts { try validateName(host) }
        if let mac, MACAddress(parsing: mac)?.isUnicast != true {
            throw BillboardError.invalidRegistration("mac must be a unicast MAC address like 52:54:00:12:34:56, not '\(mac)'")
        }
        if let ip, IPv4Address(parsing: ip) == nil {
            throw BillboardError.invalidRegistration("ip must be an IPv4 address like 10.0.0.5, not '\(ip)'")
        }
        if ip != nil && mac == nil {
            throw BillboardError.invalidRegistration("an ip needs a mac: the ip is what the guest's network card may speak for")
        }
    }

    /// The network card this registration allows: its MAC and, when registered, its IPv4
    /// address; nil for a guest registered without a MAC, which may have no network card.
    public var network: (mac: MACAddress, ip: IPv4Address?)? {
        guard let mac = mac.flatMap(MACAddress.init(parsing:)), mac.isUnicast else { return nil }
        return (mac, ip.flatMap(IPv4Address.init(parsing:)))
    }
}

/// The fields encrypted at rest (identifying or secret); sealed as one AEAD box per guest.
struct SealedFields: Codable, Equatable {
    var mac: String?
    var ip: String?
    var os: String?
    var commandLine: String?
}

/// An enrolled administrator as the store knows it.
public struct Administrator: Sendable, Equatable {
    public let name: String
    public let publicKey: Data
    public let enrolledAt: Date
    public let enrolledBy: String
    public let removed: Bool
}

/// A peer host known to this store, with its public keys.
public struct PeerHost: Sendable, Equatable {
    public let name: String
    public let signingKey: Data
    public let agreementKey: Data
    /// The administrator who enrolled it, and when (the latest enrolment, for a host added again after a removal).
    public let addedBy: String
    public let addedAt: Date
    /// Removed by an administrator: its certificate and signatures are refused; the row stays for the record.
    public let removed: Bool
    public let removedBy: String?
    public let removedAt: Date?
}

extension Date {
    var milliseconds: Int64 { Int64((timeIntervalSince1970 * 1000).rounded()) }
    init(milliseconds: Int64) { self.init(timeIntervalSince1970: TimeInterval(milliseconds) / 1000) }
}

/// "64 MiB" when whole, else bytes: how memory sizes appear in refusals.
func formatMemory(_ bytes: UInt64) -> String {
    bytes % (1 << 20) == 0 ? "\(bytes >> 20) MiB" : "\(bytes) bytes"
}
