/// What a device that reads and writes guest memory by itself (a virtio device's rings and
/// buffers) may do with it. Addresses are guest-physical; every call checks its whole range
/// and refuses, rather than clamps, what lies outside guest RAM. The machine hands a device
/// its guest memory through this; tests hand it an array.
public protocol DeviceMemory: AnyObject {
    /// Whether `[address, address + length)` lies inside guest RAM (false on overflow).
    func contains(_ address: UInt64, length: UInt64) -> Bool
    /// `count` bytes at `address`, or nil when the range is outside guest RAM.
    func read(_ address: UInt64, count: Int) -> [UInt8]?
    /// Copies `bytes` to `address`; false (and nothing written) when the range is outside guest RAM.
    func write(_ bytes: [UInt8], at address: UInt64) -> Bool
}

extension DeviceMemory {
    func readU16(_ address: UInt64) -> UInt16? {
        guard let b = read(address, count: 2) else { return nil }
        return UInt16(b[0]) | UInt16(b[1]) << 8
    }

    func writeU16(_ value: UInt16, at address: UInt64) -> Bool {
        write([UInt8(truncatingIfNeeded: value), UInt8(truncatingIfNeeded: value >> 8)], at: address)
    }
}

/// Little-endian helpers for register images.
enum LittleEndian {
    static func bytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        (0..<MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
    }

    /// The integer in `bytes` (at most 8 of them), least significant first.
    static func value(_ bytes: some Collection<UInt8>) -> UInt64 {
        var v: UInt64 = 0
        for (i, b) in bytes.prefix(8).enumerated() { v |= UInt64(b) << (8 * UInt64(i)) }
        return v
    }
}
