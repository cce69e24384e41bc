/// The paravirtual beacon: how a guest tells the VMM "I am still the guest you booted".
///
/// The VMM writes a `BeaconBlock` into guest memory (at `BootLayout.beaconBlock`) before the
/// guest runs: magic, version, the notification port, the per-boot token, the period and the TSC
/// rate. To send a beacon the guest copies the token into the message slot, stores its counter
/// next to it, and writes any byte to the port; the VMM then reads the 16-byte message.
/// One `out` makes the message atomic with respect to pausing, snapshots and migration.
///
/// Layout (little-endian): 0x00 u32 magic "BCN1", 0x04 u16 version 1, 0x06 u16 port,
/// 0x08 u64 token (VMM; may change at any time), 0x10 u32 interval_ms, 0x14 u32 tsc_khz,
/// 0x18 u64 message token (guest), 0x20 u64 message counter (guest).
public struct BeaconBlock: Sendable, Equatable {
    public static let magic: UInt32 = 0x314E_4342  // "BCN1"
    public static let version: UInt16 = 1
    public static let port: UInt16 = 0x0BEA
    public static let tokenOffset: UInt64 = 0x08
    public static let messageOffset: UInt64 = 0x18
    public static let messageSize = 16

    public var token: UInt64
    public var intervalMs: UInt32
    public var tscKHz: UInt32

    public init(token: UInt64, intervalMs: UInt32, tscKHz: UInt32) {
        self.token = token
        self.intervalMs = intervalMs
        self.tscKHz = tscKHz
    }

    /// The whole block, with an empty message slot.
    public var bytes: [UInt8] {
        var b: [UInt8] = []
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { b.append(contentsOf: $0) } }
        put(Self.magic); put(Self.version); put(Self.port); put(token); put(intervalMs); put(tscKHz)
        put(UInt64(0)); put(UInt64(0))
        return b
    }

    /// Whether `header` (the block's first 8 bytes) is a block of this version.
    public static func isBlock(_ header: [UInt8]) -> Bool {
        guard header.count >= 8 else { return false }
        let magic = UInt32(header[0]) | UInt32(header[1]) << 8 | UInt32(header[2]) << 16 | UInt32(header[3]) << 24
        let version = UInt16(header[4]) | UInt16(header[5]) << 8
        return magic == Self.magic && version == Self.version
    }
}

/// One beacon as the guest wrote it into the message slot.
public struct BeaconMessage: Sendable, Equatable {
    public var token: UInt64
    public var counter: UInt64

    public init(token: UInt64, counter: UInt64) {
        self.token = token
        self.counter = counter
    }

    /// Decodes the 16-byte message slot.
    public init?(_ bytes: [UInt8]) {
        guard bytes.count == BeaconBlock.messageSize else { return nil }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(bytes[at + $1]) << (8 * $1) } }
        self.init(token: u64(0), counter: u64(8))
    }
}

/// The beacon's notification port: a write tells the VMM a message waits in the beacon block.
/// The device reads the 16-byte slot through `readSlot` (guest memory, owned by the machine) and
/// hands the message to whoever listens (`onBeacon`); what a beacon means is not its business.
public final class BeaconPort: BusDevice {
    private let readSlot: () -> [UInt8]?
    private var listener: ((BeaconMessage) -> Void)?

    /// `readSlot` returns the message slot's bytes, or nil if they cannot be read.
    public init(readSlot: @escaping () -> [UInt8]?) { self.readSlot = readSlot }

    /// Replaces the listener (called on the vCPU thread, under the bus lock: keep it short).
    public func onBeacon(_ listener: @escaping (BeaconMessage) -> Void) { self.listener = listener }

    public func read(offset: UInt64, into data: inout [UInt8]) {
        for i in data.indices { data[i] = 0xFF }
    }

    public func write(offset: UInt64, data: [UInt8]) -> BusEvent? {
        if let bytes = readSlot(), let message = BeaconMessage(bytes) { listener?(message) }
        return nil
    }
}
