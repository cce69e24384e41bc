import Foundation

/// What a device asks of the machine it sits in, in answer to a guest access.
public enum BusEvent: Sendable, Equatable {
    /// The guest asked to end the run with `status` (the exit port).
    case exitRequested(status: UInt8)
}

/// A device on a bus: a state machine the guest reads and writes at an offset inside the range
/// the device was placed at. No threads, no KVM: the bus serialises calls, so a device needs no
/// lock of its own.
public protocol BusDevice: AnyObject {
    /// Fills `data` (the access's width) with what the guest reads at `offset`.
    func read(offset: UInt64, into data: inout [UInt8])
    /// Takes what the guest writes at `offset`; may ask something of the machine.
    func write(offset: UInt64, data: [UInt8]) -> BusEvent?
}

extension BusDevice {
    public func write(offset: UInt64, data: [UInt8]) -> BusEvent? { nil }
}

/// Why a device cannot be placed on a bus.
public enum BusError: Error, Equatable, CustomStringConvertible {
    case overlap(bus: String, base: UInt64, length: UInt64, existing: String)
    case emptyRange(bus: String, device: String)

    public var description: String {
        switch self {
        case let .overlap(bus, base, length, existing):
            "cannot place a device at \(bus) 0x\(String(base, radix: 16)) (+\(length)): it overlaps \(existing)"
        case let .emptyRange(bus, device):
            "cannot place \(device) on the \(bus) bus with an empty range"
        }
    }
}

/// An address space (port I/O or MMIO) mapping ranges to devices, as a PC bus does: an access no
/// device claims reads all ones and drops writes. Adding a device (a PCI host bridge at
/// `0xCF8..0xCFF`, a virtio BAR) needs no change to the run loop.
///
/// Thread-safety: every device call happens under the bus's lock, so vCPU threads and the
/// threads that save or restore device state never interleave inside a device.
// @unchecked: `entries` and every call into a device happen with `lock` held.
public final class Bus: @unchecked Sendable {
    public struct Range: Sendable, Equatable {
        public let base: UInt64
        public let length: UInt64
        public let name: String
        func contains(_ address: UInt64) -> Bool { address >= base && address - base < length }
    }

    private struct Entry {
        var range: Range
        var device: any BusDevice
    }

    /// "port I/O" or "MMIO", for messages.
    public let name: String
    // Devices are classes without locks of their own; this lock is the only way to reach them.
    private let lock = NSLock()
    private var entries: [Entry] = []

    public init(name: String) { self.name = name }

    /// Places `device` at `base ..< base + length`; ranges never overlap.
    public func insert(_ device: any BusDevice, named deviceName: String, base: UInt64, length: UInt64) throws(BusError) {
        guard length > 0 else { throw .emptyRange(bus: name, device: deviceName) }
        lock.lock(); defer { lock.unlock() }
        if let other = entries.first(where: { $0.range.base < base &+ length && base < $0.range.base &+ $0.range.length }) {
            throw .overlap(bus: name, base: base, length: length, existing: other.range.name)
        }
        entries.append(Entry(range: Range(base: base, length: length, name: deviceName), device: device))
        entries.sort { $0.range.base < $1.range.base }
    }

    /// The ranges taken, in address order.
    public var ranges: [Range] { lock.withLock { entries.map(\.range) } }

    /// A guest read of `width` bytes at `address`.
    public func read(_ address: UInt64, width: Int) -> [UInt8] {
        lock.lock(); defer { lock.unlock() }
        var data = [UInt8](repeating: 0xFF, count: width)
        if let entry = entries.first(where: { $0.range.contains(address) }) {
            entry.device.read(offset: address - entry.range.base, into: &data)
        }
        return data
    }

    /// A guest write at `address`; nil unless the device asks something of the machine.
    public func write(_ address: UInt64, data: [UInt8]) -> BusEvent? {
        lock.lock(); defer { lock.unlock() }
        guard let entry = entries.first(where: { $0.range.contains(address) }) else { return nil }
        return entry.device.write(offset: address - entry.range.base, data: data)
    }

    /// Runs `body` on `device` under the bus lock (saving or restoring its state, listening to it).
    public func withDevice<D: BusDevice, T>(_ device: D, _ body: (D) throws -> T) rethrows -> T {
        lock.lock(); defer { lock.unlock() }
        return try body(device)
    }
}
