/// The saved state of one split virtqueue in the legacy layout.
public struct VirtqueueState: Sendable, Equatable, Codable {
    /// Guest page frame number of the queue (4096-byte pages); 0: not set up.
    public var pfn: UInt32 = 0
    /// Entries in each ring; the device fixes it (legacy drivers cannot change it).
    public var size: UInt16
    /// The next available-ring entry the device will take.
    public var lastAvailIndex: UInt16 = 0
    /// The device's used index (the copy it writes to the used ring; the guest's copy of it is
    /// never trusted).
    public var usedIndex: UInt16 = 0

    public init(size: UInt16) { self.size = size }
}

/// Why a device stopped using its queues: the guest broke the rules of the ring.
public struct VirtqueueViolation: Error, Equatable, Sendable, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// One buffer of a descriptor chain: guest-physical, already checked to lie in guest RAM.
struct VirtqueueBuffer: Equatable {
    var address: UInt64
    var length: UInt32
}

/// A split virtqueue in the legacy layout (virtio 1.x spec, 2.7 and 4.1.5.1.3 "legacy
/// interface"): at `pfn * 4096` the descriptor table (16 bytes per entry), then the available
/// ring (flags, idx, ring[size], used_event), then at the next 4096-byte boundary the used
/// ring (flags, idx, ring[size] of {id u32, len u32}, avail_event).
///
/// Everything read from the guest is checked before use: the ring index may run ahead of the
/// device by at most `size`, a head and every `next` must be below `size`, a chain may have at
/// most `size` descriptors (so a loop ends), every buffer must lie inside guest RAM, and a
/// chain's total length is capped by the caller. A check that fails is a `VirtqueueViolation`,
/// which the device answers by marking itself broken.
struct Virtqueue {
    static let alignment: UInt64 = 4096
    static let descriptorSize: UInt64 = 16

    enum DescriptorFlag {
        static let next: UInt16 = 1
        static let write: UInt16 = 2
        static let indirect: UInt16 = 4
    }

    var state: VirtqueueState

    var isReady: Bool { state.pfn != 0 }
    var descriptorTable: UInt64 { UInt64(state.pfn) * Self.alignment }
    var availRing: UInt64 { descriptorTable + Self.descriptorSize * UInt64(state.size) }
    var usedRing: UInt64 {
        let end = availRing + 6 + 2 * UInt64(state.size)
        return (end + Self.alignment - 1) / Self.alignment * Self.alignment
    }
    /// Bytes from the descriptor table to the end of the used ring.
    var totalLength: UInt64 { usedRing + 6 + 8 * UInt64(state.size) - descriptorTable }

    /// Whether the whole queue lies inside guest RAM.
    func fits(in memory: any DeviceMemory) -> Bool {
        memory.contains(descriptorTable, length: totalLength)
    }

    /// How many chains the guest has made available and the device has not taken.
    func pending(_ memory: any DeviceMemory) throws(VirtqueueViolation) -> UInt16 {
        guard let index = memory.readU16(availRing + 2) else { throw VirtqueueViolation("the available ring is outside guest memory") }
        let pending = index &- state.lastAvailIndex
        guard pending <= state.size else {
            throw VirtqueueViolation("the available index moved \(pending) entries ahead of the device, more than the queue's \(state.size)")
        }
        return pending
    }

    /// Takes the next available chain: its head and its buffers, all device-writable
    /// (`writable`) or all device-readable, at most `limit` bytes in all.
    mutating func takeChain(_ memory: any DeviceMemory, writable: Bool, limit: UInt64) throws(VirtqueueViolation) -> (head: UInt16, buffers: [VirtqueueBuffer]) {
        let slot = availRing + 4 + 2 * UInt64(state.lastAvailIndex % state.size)
        guard let head = memory.readU16(slot) else { throw VirtqueueViolation("the available ring is outside guest memory") }
        var buffers: [VirtqueueBuffer] = []
        var index = head
        var total: UInt64 = 0
        while true {
            guard index < state.size else { throw VirtqueueViolation("descriptor index \(index) is outside the queue of \(state.size)") }
            guard buffers.count < Int(state.size) else {
                throw VirtqueueViolation("a descriptor chain is longer than the queue (\(state.size)): it loops")
            }
            guard let d = memory.read(descriptorTable + Self.descriptorSize * UInt64(index), count: 16) else {
                throw VirtqueueViolation("the descriptor table is outside guest memory")
            }
            let address = LittleEndian.value(d[0..<8])
            let length = UInt32(LittleEndian.value(d[8..<12]))
            let flags = UInt16(LittleEndian.value(d[12..<14]))
            let next = UInt16(LittleEndian.value(d[14..<16]))
            guard flags & DescriptorFlag.indirect == 0 else {
                throw VirtqueueViolation("an indirect descriptor, but indirect descriptors were not offered")
            }
            guard (flags & DescriptorFlag.write != 0) == writable else {
                throw VirtqueueViolation(writable ? "a device-readable buffer in a receive chain" : "a device-writable buffer in a transmit chain")
            }
            total += UInt64(length)
            guard total <= limit else { throw VirtqueueViolation("a descriptor chain of more than \(limit) bytes") }
            guard memory.contains(address, length: UInt64(length)) else {
                throw VirtqueueViolation("a buffer of \(length) bytes at 0x\(String(address, radix: 16)) is outside guest memory")
            }
            buffers.append(VirtqueueBuffer(address: address, length: length))
            if flags & DescriptorFlag.next == 0 { break }
            index = next
        }
        state.lastAvailIndex &+= 1
        return (head, buffers)
    }

    /// Returns chain `head` to the guest with `length` bytes written into it.
    mutating func pushUsed(_ memory: any DeviceMemory, head: UInt16, length: UInt32) throws(VirtqueueViolation) {
        let element = usedRing + 4 + 8 * UInt64(state.usedIndex % state.size)
        guard memory.write(LittleEndian.bytes(UInt32(head)) + LittleEndian.bytes(length), at: element) else {
            throw VirtqueueViolation("the used ring is outside guest memory")
        }
        // The element is written before the index that publishes it (x86 keeps stores in order).
        state.usedIndex &+= 1
        guard memory.writeU16(state.usedIndex, at: usedRing + 2) else { throw VirtqueueViolation("the used ring is outside guest memory") }
    }
}
