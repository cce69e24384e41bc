import NetworkFrames

/// The saved state of a legacy virtio-net PCI device: its configuration header, what the
/// driver negotiated and where its queues are, and how far the device has gone in each.
public struct VirtioNetState: Sendable, Equatable, Codable {
    public var pci: PCIConfigurationState
    public var mac: MACAddress
    public var driverFeatures: UInt32 = 0
    public var status: UInt8 = 0
    public var isr: UInt8 = 0
    public var queueSelect: UInt16 = 0
    /// Receive (0) and transmit (1).
    public var queues: [VirtqueueState]
    /// Why the device stopped using its queues (status DEVICE_NEEDS_RESET), if it has.
    public var brokenReason: String?

    public init(mac: MACAddress, bar0: UInt16) {
        pci = PCIConfigurationState(bar0: UInt32(bar0))
        self.mac = mac
        queues = [VirtqueueState(size: VirtioNet.queueSize), VirtqueueState(size: VirtioNet.queueSize)]
    }
}

/// Why saved virtio-net state does not fit the device it is applied to.
public struct VirtioNetStateError: Error, Equatable, Sendable, CustomStringConvertible {
    public let description: String
}

/// What became of a frame from the host.
public enum VirtioNetDelivery: Equatable, Sendable {
    case delivered
    /// The machine is paused or not started: nothing may touch guest memory.
    case held
    /// The driver has not set DRIVER_OK, has no receive queue, or the device is broken.
    case notReady
    /// The guest has posted no receive buffer.
    case noBuffer
    /// The next posted buffer is smaller than the frame; it went back to the guest empty.
    case bufferTooSmall
    /// The guest broke the ring; the device is now broken.
    case broken
}

/// Counters of what the device did, for logs and tests (not saved: they describe this host's
/// run, not the guest).
public struct VirtioNetStatistics: Sendable, Equatable {
    public var framesReceived = 0
    public var framesTransmitted = 0
    /// Frames from the host that did not reach the guest (any delivery but `.delivered`).
    public var receiveDrops = 0
}

/// virtio-net behind the legacy PCI interface, as QEMU offers it with
/// `-device virtio-net-pci,disable-modern=on`: vendor 0x1AF4, device 0x1000, subsystem 1
/// (network), class 0x020000; BAR0 is an I/O BAR with the legacy registers (virtio 1.x spec,
/// 4.1.4.8): device features (u32, 0x00), driver features (u32, 0x04), queue PFN (u32, 0x08),
/// queue size (u16, 0x0C), queue select (u16, 0x0E), queue notify (u16, 0x10), device status
/// (u8, 0x12), ISR (u8, 0x13, read clears), then the device configuration: MAC (6 bytes, 0x14)
/// and link status (u16, 0x1A).
///
/// Receive is queue 0, transmit queue 1; every frame in a buffer follows the 10-byte legacy
/// `virtio_net_hdr` (no mergeable buffers, no offloads). Offered: VIRTIO_NET_F_MAC (the MAC is
/// the VMM's and read-only) and VIRTIO_NET_F_STATUS (link always up). No interrupts: guests
/// poll the used rings, but the ISR is kept (bit 0 queue, bit 1 configuration change).
///
/// A guest that breaks a ring (see `Virtqueue`) gets the device marked DEVICE_NEEDS_RESET; it
/// touches no queue again until the driver resets it. Nothing a guest writes makes the device
/// access memory outside guest RAM or crash the VMM.
///
/// Pure: frames go out through `transmit`, come in through `receive(_:)`; guest memory is
/// reached through `DeviceMemory`. The bus's lock serialises every call.
public final class VirtioNet: BusDevice, PCIFunction {
    public static let vendorID: UInt16 = 0x1AF4
    /// Transitional virtio-net (0x1000 + device type 1 - 1).
    public static let deviceID: UInt16 = 0x1000
    public static let subsystemNetwork: UInt16 = 1
    public static let queueSize: UInt16 = 256
    /// BAR0 size: 0x14 bytes of registers and 8 of configuration, rounded to a power of two.
    public static let registerSpace: UInt32 = 0x20
    public static let headerLength = 10
    /// The longest frame either way (without the header): what a tap passes at most.
    public static let maxFrameLength = 65_535

    public enum Feature {
        public static let mac: UInt32 = 1 << 5
        public static let status: UInt32 = 1 << 16
    }

    public enum Status {
        public static let acknowledge: UInt8 = 1
        public static let driver: UInt8 = 2
        public static let driverOK: UInt8 = 4
        public static let featuresOK: UInt8 = 8
        public static let needsReset: UInt8 = 0x40
        public static let failed: UInt8 = 0x80
    }

    public enum Register {
        public static let deviceFeatures: UInt64 = 0x00
        public static let driverFeatures: UInt64 = 0x04
        public static let queuePFN: UInt64 = 0x08
        public static let queueSize: UInt64 = 0x0C
        public static let queueSelect: UInt64 = 0x0E
        public static let queueNotify: UInt64 = 0x10
        public static let status: UInt64 = 0x12
        public static let isr: UInt64 = 0x13
        public static let config: UInt64 = 0x14
    }

    public static let deviceFeatures: UInt32 = Feature.mac | Feature.status
    public static let receiveQueue = 0
    public static let transmitQueue = 1
    static let linkUp: UInt16 = 1

    public static let header = PCIConfigurationHeader(vendorID: vendorID, deviceID: deviceID, revision: 0, classCode: 0x02_00_00,
                                                      subsystemVendorID: vendorID, subsystemID: subsystemNetwork,
                                                      bar0Size: registerSpace)

    private var state: VirtioNetState
    private var queues: [Virtqueue]
    private let memory: any DeviceMemory
    private let transmit: ([UInt8]) -> Void
    /// Host-side switch, not guest state: while held, `receive` touches nothing.
    private var held = true
    public private(set) var statistics = VirtioNetStatistics()

    /// A device with `mac` whose BAR0 decodes at `bar0` (fixed; see `PCIConfigurationHeader`).
    /// Frames the guest sends go to `transmit`, on the thread of the vCPU that notified. It
    /// starts held: `setHeld(false)` once the machine runs.
    public init(mac: MACAddress, bar0: UInt16, memory: any DeviceMemory, transmit: @escaping ([UInt8]) -> Void) {
        state = VirtioNetState(mac: mac, bar0: bar0)
        queues = state.queues.map { Virtqueue(state: $0) }
        self.memory = memory
        self.transmit = transmit
    }

    public var mac: MACAddress { state.mac }
    public var bar0: UInt16 { UInt16(truncatingIfNeeded: state.pci.bar0) }
    public var isBroken: Bool { state.status & Status.needsReset != 0 }
    public var brokenReason: String? { state.brokenReason }

    // MARK: Saving

    public func saveState() -> VirtioNetState {
        var s = state
        s.queues = queues.map(\.state)
        return s
    }

    /// Applies saved state; refuses state of a device placed or shaped otherwise.
    public func restoreState(_ saved: VirtioNetState) throws(VirtioNetStateError) {
        guard saved.pci.bar0 == state.pci.bar0 else {
            throw VirtioNetStateError(description: "the saved network card's BAR0 is at port 0x\(String(saved.pci.bar0, radix: 16)), this machine's at 0x\(String(state.pci.bar0, radix: 16))")
        }
        guard saved.queues.count == 2, saved.queues.allSatisfy({ $0.size == Self.queueSize }) else {
            throw VirtioNetStateError(description: "the saved network card has \(saved.queues.count) queues of sizes \(saved.queues.map(\.size)); this device has 2 of \(Self.queueSize)")
        }
        guard saved.mac == state.mac else {
            throw VirtioNetStateError(description: "the saved network card has MAC \(saved.mac), this machine's is \(state.mac)")
        }
        state = saved
        queues = saved.queues.map { Virtqueue(state: $0) }
    }

    /// Holds (true) or lets through (false) frames from the host. The machine holds the device
    /// whenever its vCPUs are parked, so nothing writes guest memory while it is paused.
    public func setHeld(_ held: Bool) { self.held = held }

    // MARK: PCI configuration space

    public func readConfiguration(offset: Int, into data: inout [UInt8]) {
        Self.header.read(state.pci, offset: offset, into: &data)
    }

    public func writeConfiguration(offset: Int, data: [UInt8]) {
        Self.header.write(&state.pci, offset: offset, data: data)
    }

    // MARK: BAR0 registers

    private var ioEnabled: Bool { state.pci.command & PCIConfigurationHeader.commandIOSpace != 0 }

    private var registerImage: [UInt8] {
        let selected = Int(state.queueSelect)
        let queue = selected < queues.count ? queues[selected].state : nil
        var image: [UInt8] = []
        image += LittleEndian.bytes(Self.deviceFeatures)
        image += LittleEndian.bytes(state.driverFeatures)
        image += LittleEndian.bytes(queue?.pfn ?? 0)
        image += LittleEndian.bytes(queue?.size ?? 0)   // 0: no such queue
        image += LittleEndian.bytes(state.queueSelect)
        image += LittleEndian.bytes(UInt16(0))          // queue notify reads 0
        image.append(state.status)
        image.append(state.isr)
        image += state.mac.bytes
        image += LittleEndian.bytes(Self.linkUp)
        return image
    }

    public func read(offset: UInt64, into data: inout [UInt8]) {
        for i in data.indices { data[i] = 0xFF }
        // With I/O decoding off the BAR is not there: the read floats.
        guard ioEnabled, offset < UInt64(Self.registerSpace) else { return }
        let image = registerImage
        for i in data.indices {
            let at = Int(offset) + i
            data[i] = at < image.count ? image[at] : 0
        }
        // Reading the ISR clears it (and is how a polling driver acknowledges).
        if offset <= Register.isr && Register.isr < offset + UInt64(data.count) { state.isr = 0 }
    }

    public func write(offset: UInt64, data: [UInt8]) -> BusEvent? {
        guard ioEnabled else { return nil }
        let value = LittleEndian.value(data)
        switch (offset, data.count) {
        case (Register.driverFeatures, 4):
            // Only offered features can be accepted.
            state.driverFeatures = UInt32(value) & Self.deviceFeatures
        case (Register.queuePFN, 4):
            setQueuePFN(UInt32(value))
        case (Register.queueSelect, 2):
            state.queueSelect = UInt16(value)
        case (Register.queueNotify, 2):
            if value == UInt64(Self.transmitQueue) { processTransmit() }
        case (Register.status, 1):
            setStatus(UInt8(value))
        default:
            break // read-only registers, the read-only MAC, odd widths
        }
        return nil
    }

    private func setStatus(_ value: UInt8) {
        if value == 0 {
            reset()
        } else {
            // DEVICE_NEEDS_RESET is the device's to set and only a reset clears it.
            state.status = value | (state.status & Status.needsReset)
        }
    }

    private func reset() {
        let pci = state.pci, mac = state.mac
        state = VirtioNetState(mac: mac, bar0: UInt16(truncatingIfNeeded: pci.bar0))
        state.pci = pci
        queues = state.queues.map { Virtqueue(state: $0) }
    }

    private func setQueuePFN(_ pfn: UInt32) {
        let selected = Int(state.queueSelect)
        guard selected < queues.count, !isBroken else { return }
        var queue = Virtqueue(state: VirtqueueState(size: Self.queueSize))
        queue.state.pfn = pfn
        if pfn != 0 && !queue.fits(in: memory) {
            markBroken(VirtqueueViolation("queue \(selected) at page 0x\(String(pfn, radix: 16)) does not fit in guest memory"))
            return
        }
        queues[selected] = queue
    }

    private func markBroken(_ violation: VirtqueueViolation) {
        state.status |= Status.needsReset
        state.isr |= 2  // configuration change: the status changed
        if state.brokenReason == nil { state.brokenReason = violation.description }
    }

    private var running: Bool {
        state.status & Status.driverOK != 0 && !isBroken
    }

    // MARK: Transmit (on the notifying vCPU's thread)

    private func processTransmit() {
        guard running, queues[Self.transmitQueue].isReady else { return }
        do throws(VirtqueueViolation) {
            var sent = false
            while try queues[Self.transmitQueue].pending(memory) > 0 {
                let (head, buffers) = try queues[Self.transmitQueue].takeChain(
                    memory, writable: false, limit: UInt64(Self.headerLength + Self.maxFrameLength))
                var bytes: [UInt8] = []
                for b in buffers {
                    guard let piece = memory.read(b.address, count: Int(b.length)) else {
                        throw VirtqueueViolation("a transmit buffer is outside guest memory")
                    }
                    bytes += piece
                }
                try queues[Self.transmitQueue].pushUsed(memory, head: head, length: 0)
                sent = true
                // A chain shorter than the header carries no frame: returned, not sent.
                if bytes.count > Self.headerLength {
                    statistics.framesTransmitted += 1
                    transmit(Array(bytes[Self.headerLength...]))
                }
            }
            if sent { state.isr |= 1 }
        } catch {
            markBroken(error)
        }
    }

    // MARK: Receive (on the machine's receive thread)

    /// Copies `frame` with a zeroed header into the next receive buffer the guest posted.
    @discardableResult
    public func receive(_ frame: [UInt8]) -> VirtioNetDelivery {
        let result = deliver(frame)
        if result == .delivered { statistics.framesReceived += 1 } else { statistics.receiveDrops += 1 }
        return result
    }

    private func deliver(_ frame: [UInt8]) -> VirtioNetDelivery {
        guard !held else { return .held }
        guard running, queues[Self.receiveQueue].isReady, frame.count <= Self.maxFrameLength else { return .notReady }
        do throws(VirtqueueViolation) {
            guard try queues[Self.receiveQueue].pending(memory) > 0 else { return .noBuffer }
            // The chain's length is capped only by what the guest owns; no more is read than fits.
            let (head, buffers) = try queues[Self.receiveQueue].takeChain(memory, writable: true, limit: UInt64(UInt32.max) * 2)
            let capacity = buffers.reduce(0) { $0 + UInt64($1.length) }
            let packet = [UInt8](repeating: 0, count: Self.headerLength) + frame
            guard capacity >= UInt64(packet.count) else {
                try queues[Self.receiveQueue].pushUsed(memory, head: head, length: 0)
                state.isr |= 1
                return .bufferTooSmall
            }
            var done = 0
            for b in buffers where done < packet.count {
                let n = min(Int(b.length), packet.count - done)
                guard memory.write(Array(packet[done..<done + n]), at: b.address) else {
                    throw VirtqueueViolation("a receive buffer is outside guest memory")
                }
                done += n
            }
            try queues[Self.receiveQueue].pushUsed(memory, head: head, length: UInt32(packet.count))
            state.isr |= 1
            return .delivered
        } catch {
            markBroken(error)
            return .broken
        }
    }
}
