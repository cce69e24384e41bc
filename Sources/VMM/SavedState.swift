import MachineCore
import Snapshot

/// Who a guest is, carried in snapshots and in the migration hello so the next VMM can admit it.
public struct GuestIdentity: Sendable, Equatable, Codable {
    /// The registered name.
    public var name: String
    /// The registration's UUID in the store that admitted it.
    public var id: String
    public var imageSHA256: String
    /// The lease epoch when the state was saved or sent: older than the guest's latest means a rollback.
    public var epoch: Int64
    /// The host and process that held the guest (a migration destination lets this holder's lease pass).
    public var host: String
    public var pid: Int32
}

/// The machine section of a snapshot and the machine in a migration hello: the machine's
/// description and, beside it, who the guest is. One flat JSON object (the identity is one more
/// key), so the machine's own description stays free of the Billboard.
public struct StateHeader: Sendable, Equatable, Codable {
    public var description: MachineDescription
    public var identity: GuestIdentity?

    public init(description: MachineDescription, identity: GuestIdentity?) {
        self.description = description
        self.identity = identity
    }

    private enum Keys: String, CodingKey { case identity }

    public init(from decoder: any Decoder) throws {
        description = try MachineDescription(from: decoder)
        identity = try decoder.container(keyedBy: Keys.self).decodeIfPresent(GuestIdentity.self, forKey: .identity)
    }

    public func encode(to encoder: any Encoder) throws {
        try description.encode(to: encoder)
        var c = encoder.container(keyedBy: Keys.self)
        try c.encodeIfPresent(identity, forKey: .identity)
    }

    public func encoded() throws -> [UInt8] { try StateJSON.encode(self) }

    /// Decodes a header, refusing one a machine cannot be built from here.
    public static func decode(_ payload: [UInt8], what: String) throws -> StateHeader {
        let header = try StateJSON.decode(StateHeader.self, from: payload, what: what)
        guard !header.description.inKernelIRQChip else { throw SnapshotError.inKernelIRQChip }
        return header
    }
}
