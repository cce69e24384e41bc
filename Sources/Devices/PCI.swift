/// One PCI function's configuration space, as the host bridge reaches it.
public protocol PCIFunction: AnyObject {
    /// Fills `data` (1, 2 or 4 bytes) from configuration space at `offset` (0..<256).
    func readConfiguration(offset: Int, into data: inout [UInt8])
    /// Takes a write of `data` at `offset`.
    func writeConfiguration(offset: Int, data: [UInt8])
}

/// The saved state of the host bridge: the address latch of configuration mechanism #1
/// (a guest may be paused between writing 0xCF8 and reading 0xCFC).
public struct PCIHostBridgeState: Sendable, Equatable, Codable {
    public var configAddress: UInt32 = 0
    public init() {}
}

/// A PCI host bridge with configuration mechanism #1: the guest writes a 32-bit address to
/// port 0xCF8 (bit 31 enable, bus in bits 23-16, device 15-11, function 10-8, register 7-2)
/// and reads or writes that dword of configuration space at 0xCFC-0xCFF. One bus (0), one
/// function per device; the bridge itself is device 0. A disabled address, another bus, a
/// function other than 0 or an empty slot reads all ones, as a master abort does.
///
/// Placed on the port bus at `PCIHostBridge.base` for `PCIHostBridge.length` ports.
public final class PCIHostBridge: BusDevice {
    public static let base: UInt16 = 0xCF8
    public static let length: UInt64 = 8
    /// Slots (device numbers) on bus 0.
    public static let slotCount = 32

    private var state = PCIHostBridgeState()
    private var slots: [Int: any PCIFunction] = [:]

    public init() {
        slots[0] = HostBridgeFunction()
    }

    /// Places `function` in `slot` (1..<32; 0 is the bridge). A slot holds one function.
    public func attach(_ function: any PCIFunction, slot: Int) {
        precondition(slot > 0 && slot < Self.slotCount && slots[slot] == nil, "PCI slot \(slot) is taken or does not exist")
        slots[slot] = function
    }

    public func saveState() -> PCIHostBridgeState { state }
    public func restoreState(_ state: PCIHostBridgeState) { self.state = state }

    /// The function the address latch selects, with the dword offset.
    private func selected() -> (any PCIFunction, Int)? {
        let a = state.configAddress
        guard a & 0x8000_0000 != 0 else { return nil }
        let bus = (a >> 16) & 0xFF, device = Int((a >> 11) & 0x1F), function = (a >> 8) & 0x7
        guard bus == 0, function == 0, let f = slots[device] else { return nil }
        return (f, Int(a & 0xFC))
    }

    public func read(offset: UInt64, into data: inout [UInt8]) {
        for i in data.indices { data[i] = 0xFF }
        if offset < 4 {
            // The latch is a dword register; narrower reads see the bytes they cover.
            let bytes = LittleEndian.bytes(state.configAddress)
            for i in data.indices where Int(offset) + i < 4 { data[i] = bytes[Int(offset) + i] }
            return
        }
        guard let (function, register) = selected() else { return }
        let within = Int(offset - 4)
        guard within + data.count <= 4 else { return }
        function.readConfiguration(offset: register + within, into: &data)
    }

    public func write(offset: UInt64, data: [UInt8]) -> BusEvent? {
        if offset == 0 && data.count == 4 {
            state.configAddress = UInt32(truncatingIfNeeded: LittleEndian.value(data))
            return nil
        }
        // Narrower writes to 0xCF8-0xCFB are not configuration cycles (on a PC, 0xCF9 is the
        // reset control register, which this machine does not have).
        guard offset >= 4, let (function, register) = selected() else { return nil }
        let within = Int(offset - 4)
        guard within + data.count <= 4 else { return nil }
        function.writeConfiguration(offset: register + within, data: data)
        return nil
    }
}

/// Device 0: the host bridge's own header (class 06 00 00), read-only.
final class HostBridgeFunction: PCIFunction {
    // QEMU's generic PCIe host bridge IDs (Red Hat, 0x0008): no chipset to pretend to be.
    private let header: [UInt8] = {
        var h = [UInt8](repeating: 0, count: 64)
        h.replaceSubrange(0..<2, with: LittleEndian.bytes(UInt16(0x1B36)))
        h.replaceSubrange(2..<4, with: LittleEndian.bytes(UInt16(0x0008)))
        h[0x0B] = 0x06  // bridge
        h[0x0A] = 0x00  // host bridge
        return h
    }()

    func readConfiguration(offset: Int, into data: inout [UInt8]) {
        for i in data.indices { data[i] = offset + i < header.count ? header[offset + i] : 0 }
    }

    func writeConfiguration(offset: Int, data: [UInt8]) {}
}

/// The saved part of a type-0 configuration header that a guest can change.
public struct PCIConfigurationState: Sendable, Equatable, Codable {
    /// I/O space (bit 0), memory space (1), bus master (2), INTx disable (10).
    public var command: UInt16 = 0
    /// Where BAR0 (an I/O BAR) decodes; fixed by the VMM at creation.
    public var bar0: UInt32
    /// The guest wrote all ones to BAR0: reads answer its size until the next write.
    public var bar0Sizing = false
    /// Scratch register for the guest's interrupt routing (nothing routes interrupts here).
    public var interruptLine: UInt8 = 0

    public init(bar0: UInt32) { self.bar0 = bar0 }
}

/// A type-0 configuration header with one I/O BAR, for a device without capabilities.
///
/// BAR0 does not move: the VMM assigns it when it creates the machine (there is no firmware
/// to do so), and a guest cannot relocate it. Writing all ones answers the size probe (the
/// next read gives the size mask); any other write ends the probe and leaves the assignment
/// as it was, which the guest sees when it reads the BAR back, as with a BAR a platform
/// hardwires. So the port bus never changes under a running vCPU, and a saved BAR is a check
/// on the machine being restored rather than a layout to rebuild.
public struct PCIConfigurationHeader: Sendable, Equatable {
    public var vendorID: UInt16
    public var deviceID: UInt16
    public var revision: UInt8
    /// Class, subclass, programming interface (e.g. 0x020000, an Ethernet controller).
    public var classCode: UInt32
    public var subsystemVendorID: UInt16
    public var subsystemID: UInt16
    /// Bytes of I/O space BAR0 decodes (a power of two, at least 4).
    public var bar0Size: UInt32

    public static let commandIOSpace: UInt16 = 1 << 0
    static let commandWritable: UInt16 = 0b0000_0100_0000_0111

    public init(vendorID: UInt16, deviceID: UInt16, revision: UInt8, classCode: UInt32,
                subsystemVendorID: UInt16, subsystemID: UInt16, bar0Size: UInt32) {
        precondition(bar0Size >= 4 && bar0Size & (bar0Size - 1) == 0, "an I/O BAR's size is a power of two")
        self.vendorID = vendorID; self.deviceID = deviceID; self.revision = revision; self.classCode = classCode
        self.subsystemVendorID = subsystemVendorID; self.subsystemID = subsystemID; self.bar0Size = bar0Size
    }

    /// BAR0 as the guest reads it: the address (or the size mask while probed), I/O bit set.
    func bar0Value(_ s: PCIConfigurationState) -> UInt32 {
        (s.bar0Sizing ? ~(bar0Size - 1) : s.bar0) & 0xFFFF_FFFC | 1
    }

    /// The first 64 bytes of configuration space; the rest reads as zero.
    func image(_ s: PCIConfigurationState) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 64)
        func put(_ bytes: [UInt8], _ at: Int) { h.replaceSubrange(at..<at + bytes.count, with: bytes) }
        put(LittleEndian.bytes(vendorID), 0x00)
        put(LittleEndian.bytes(deviceID), 0x02)
        put(LittleEndian.bytes(s.command), 0x04)
        // Status 0: no capabilities list, nothing latched.
        h[0x08] = revision
        put(Array(LittleEndian.bytes(classCode).prefix(3)), 0x09)
        h[0x0E] = 0x00  // header type 0, single function
        put(LittleEndian.bytes(bar0Value(s)), 0x10)
        put(LittleEndian.bytes(subsystemVendorID), 0x2C)
        put(LittleEndian.bytes(subsystemID), 0x2E)
        h[0x3C] = s.interruptLine
        h[0x3D] = 0     // no interrupt pin: this machine has no interrupt controller; guests poll
        return h
    }

    public func read(_ s: PCIConfigurationState, offset: Int, into data: inout [UInt8]) {
        let h = image(s)
        for i in data.indices { data[i] = offset + i < h.count ? h[offset + i] : 0 }
    }

    /// Applies a guest write: the command register, the BAR probe and the interrupt line;
    /// everything else is read-only.
    public func write(_ s: inout PCIConfigurationState, offset: Int, data: [UInt8]) {
        for (i, byte) in data.enumerated() {
            let at = offset + i
            switch at {
            case 0x04, 0x05:
                var bytes = LittleEndian.bytes(s.command)
                bytes[at - 0x04] = byte
                s.command = UInt16(LittleEndian.value(bytes)) & Self.commandWritable
            case 0x3C:
                s.interruptLine = byte
            default:
                break
            }
        }
        // BAR0: merge the written bytes into what the guest reads, then decide on the dword.
        if offset < 0x14 && offset + data.count > 0x10 {
            var bytes = LittleEndian.bytes(bar0Value(s))
            for (i, byte) in data.enumerated() where (0x10..<0x14).contains(offset + i) { bytes[offset + i - 0x10] = byte }
            let written = UInt32(LittleEndian.value(bytes))
            s.bar0Sizing = written | 0x3 == 0xFFFF_FFFF
        }
    }
}
