import Devices
import NetworkFrames
import Testing

/// Guest RAM as an array, with the same refusals as the machine's memory.
final class ArrayMemory: DeviceMemory {
    var bytes: [UInt8]
    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    func contains(_ address: UInt64, length: UInt64) -> Bool {
        let (end, overflow) = address.addingReportingOverflow(length)
        return !overflow && end <= UInt64(bytes.count)
    }
    func read(_ address: UInt64, count: Int) -> [UInt8]? {
        guard contains(address, length: UInt64(count)) else { return nil }
        return Array(bytes[Int(address)..<Int(address) + count])
    }
    func write(_ data: [UInt8], at address: UInt64) -> Bool {
        guard contains(address, length: UInt64(data.count)) else { return false }
        bytes.replaceSubrange(Int(address)..<Int(address) + data.count, with: data)
        return true
    }

    func put<T: FixedWidthInteger>(_ value: T, at address: UInt64) {
        _ = write((0..<MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }, at: address)
    }
    func get<T: FixedWidthInteger>(_: T.Type, at address: UInt64) -> T {
        read(address, count: MemoryLayout<T>.size)!.enumerated().reduce(T(0)) { $0 | T($1.element) << (8 * $1.offset) }
    }
}

/// A minimal legacy driver, as a guest would be, reaching the device through the port bus.
struct TestDriver {
    static let bar: UInt16 = 0xC000
    static let slot = 1
    let bus = Bus(name: "port I/O")
    let bridge = PCIHostBridge()
    let memory = ArrayMemory(size: 1 << 20)
    let device: VirtioNet
    let sent: Sent
    // Queue pages in the fake RAM.
    static let rxPFN: UInt32 = 0x10, txPFN: UInt32 = 0x20
    static let queueSize: UInt64 = 256

    // @unchecked: each test uses its sink from one thread only.
    final class Sent: @unchecked Sendable { var frames: [[UInt8]] = [] }

    init() throws {
        let sent = Sent()
        self.sent = sent
        device = VirtioNet(mac: MACAddress(parsing: "52:54:00:12:34:56")!, bar0: Self.bar, memory: memory) { sent.frames.append($0) }
        bridge.attach(device, slot: Self.slot)
        try bus.insert(bridge, named: "PCI", base: UInt64(PCIHostBridge.base), length: PCIHostBridge.length)
        try bus.insert(device, named: "virtio-net", base: UInt64(Self.bar), length: UInt64(VirtioNet.registerSpace))
    }

    func out32(_ port: UInt16, _ v: UInt32) { _ = bus.write(UInt64(port), data: (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) }) }
    func out16(_ port: UInt16, _ v: UInt16) { _ = bus.write(UInt64(port), data: [UInt8(v & 0xFF), UInt8(v >> 8)]) }
    func out8(_ port: UInt16, _ v: UInt8) { _ = bus.write(UInt64(port), data: [v]) }
    func inN(_ port: UInt16, _ width: Int) -> UInt32 {
        bus.read(UInt64(port), width: width).enumerated().reduce(0) { $0 | UInt32($1.element) << (8 * $1.offset) }
    }

    func configRead(slot: Int, _ register: Int, width: Int = 4) -> UInt32 {
        out32(0xCF8, 0x8000_0000 | UInt32(slot) << 11 | UInt32(register & 0xFC))
        return inN(0xCFC + UInt16(register & 3), width)
    }
    func configWrite(slot: Int, _ register: Int, _ value: UInt32) {
        out32(0xCF8, 0x8000_0000 | UInt32(slot) << 11 | UInt32(register & 0xFC))
        out32(0xCFC, value)
    }

    /// Enables I/O decoding, resets, negotiates, places both queues, DRIVER_OK.
    func bringUp() {
        configWrite(slot: Self.slot, 0x04, 1)
        out8(Self.bar + 0x12, 0)
        out8(Self.bar + 0x12, VirtioNet.Status.acknowledge | VirtioNet.Status.driver)
        out32(Self.bar + 0x04, inN(Self.bar, 4) & VirtioNet.Feature.mac)
        out16(Self.bar + 0x0E, 0); out32(Self.bar + 0x08, Self.rxPFN)
        out16(Self.bar + 0x0E, 1); out32(Self.bar + 0x08, Self.txPFN)
        out8(Self.bar + 0x12, VirtioNet.Status.acknowledge | VirtioNet.Status.driver | VirtioNet.Status.driverOK)
    }

    static func desc(_ pfn: UInt32) -> UInt64 { UInt64(pfn) * 4096 }
    static func avail(_ pfn: UInt32) -> UInt64 { desc(pfn) + 16 * queueSize }
    static func used(_ pfn: UInt32) -> UInt64 { (avail(pfn) + 6 + 2 * queueSize + 4095) / 4096 * 4096 }

    func setDescriptor(_ pfn: UInt32, _ index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16 = 0) {
        let at = Self.desc(pfn) + 16 * UInt64(index)
        memory.put(address, at: at); memory.put(length, at: at + 8); memory.put(flags, at: at + 12); memory.put(next, at: at + 14)
    }

    /// Makes `head` available and moves the available index by `advance` (1 unless testing).
    func offer(_ pfn: UInt32, head: UInt16, advance: UInt16 = 1) {
        let idx = memory.get(UInt16.self, at: Self.avail(pfn) + 2)
        memory.put(head, at: Self.avail(pfn) + 4 + 2 * UInt64(idx % UInt16(Self.queueSize)))
        memory.put(idx &+ advance, at: Self.avail(pfn) + 2)
    }
    func usedIndex(_ pfn: UInt32) -> UInt16 { memory.get(UInt16.self, at: Self.used(pfn) + 2) }
    func usedElement(_ pfn: UInt32, _ i: UInt16) -> (id: UInt32, length: UInt32) {
        let at = Self.used(pfn) + 4 + 8 * UInt64(i % UInt16(Self.queueSize))
        return (memory.get(UInt32.self, at: at), memory.get(UInt32.self, at: at + 4))
    }
    func notifyTX() { out16(Self.bar + 0x10, 1) }
    var status: UInt8 { UInt8(inN(Self.bar + 0x12, 1)) }
}

@Suite("The PCI host bridge and a legacy virtio-net device")
struct VirtioNetTests {
    static let needsReset = VirtioNet.Status.needsReset

    @Test("configuration space through 0xCF8/0xCFC: IDs, class, subsystem; empty slots and disabled cycles read all ones")
    func configurationSpace() throws {
        let d = try TestDriver()
        #expect(d.configRead(slot: 1, 0x00) == 0x1000_1AF4)
        #expect(d.configRead(slot: 1, 0x08) >> 8 == 0x02_00_00)
        #expect(d.configRead(slot: 1, 0x2C) == 0x0001_1AF4)
        #expect(d.configRead(slot: 1, 0x02, width: 2) == 0x1000)
        #expect(d.configRead(slot: 0, 0x08) >> 8 == 0x06_00_00, "device 0 is a host bridge")
        #expect(d.configRead(slot: 5, 0x00) == 0xFFFF_FFFF)
        d.out32(0xCF8, 1 << 11)  // enable bit clear
        #expect(d.inN(0xCFC, 4) == 0xFFFF_FFFF)
        #expect(d.inN(0xCF8, 4) == 1 << 11, "the address latch reads back")
        d.out32(0xCF8, 0x8001_0800)  // bus 1
        #expect(d.inN(0xCFC, 4) == 0xFFFF_FFFF)
    }

    @Test("BAR0 is an I/O BAR the VMM placed: the size probe answers 32 bytes, and the guest cannot move it")
    func barProbeAndFixedPlacement() throws {
        let d = try TestDriver()
        #expect(d.configRead(slot: 1, 0x10) == UInt32(TestDriver.bar) | 1)
        d.configWrite(slot: 1, 0x10, 0xFFFF_FFFF)
        #expect(d.configRead(slot: 1, 0x10) == 0xFFFF_FFE1)
        d.configWrite(slot: 1, 0x10, 0xD000)
        #expect(d.configRead(slot: 1, 0x10) == UInt32(TestDriver.bar) | 1, "a move is not taken")
        #expect(d.device.saveState().pci.bar0 == UInt32(TestDriver.bar))
        #expect(d.configRead(slot: 1, 0x14) == 0, "no other BAR")
    }

    @Test("the registers float until the command register enables I/O space")
    func commandRegisterGatesIO() throws {
        let d = try TestDriver()
        #expect(d.inN(TestDriver.bar, 4) == 0xFFFF_FFFF)
        d.configWrite(slot: 1, 0x04, 0xFFFF)
        #expect(d.configRead(slot: 1, 0x04, width: 2) == 0x0407, "only I/O, memory, bus master, INTx disable stick")
        #expect(d.inN(TestDriver.bar, 4) == VirtioNet.Feature.mac | VirtioNet.Feature.status)
    }

    @Test("feature negotiation keeps only offered bits; the MAC and link status are in the device configuration, read-only")
    func features() throws {
        let d = try TestDriver()
        d.configWrite(slot: 1, 0x04, 1)
        d.out32(TestDriver.bar + 0x04, 0xFFFF_FFFF)
        #expect(d.inN(TestDriver.bar + 0x04, 4) == VirtioNet.Feature.mac | VirtioNet.Feature.status)
        #expect((0..<6).map { UInt8(d.inN(TestDriver.bar + 0x14 + UInt16($0), 1)) } == [0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
        d.out8(TestDriver.bar + 0x14, 0xFF)
        #expect(d.inN(TestDriver.bar + 0x14, 1) == 0x52)
        #expect(d.inN(TestDriver.bar + 0x1A, 2) == 1, "link up")
        d.out16(TestDriver.bar + 0x0E, 0)
        #expect(d.inN(TestDriver.bar + 0x0C, 2) == 256)
        d.out16(TestDriver.bar + 0x0E, 2)
        #expect(d.inN(TestDriver.bar + 0x0C, 2) == 0, "no third queue")
    }

    @Test("a frame the guest transmits in two descriptors (header, data) goes out without the header; the ISR reads once")
    func transmit() throws {
        let d = try TestDriver()
        d.bringUp()
        let frame: [UInt8] = (0..<60).map { UInt8($0) }
        _ = d.memory.write([UInt8](repeating: 0, count: 10), at: 0x40000)
        _ = d.memory.write(frame, at: 0x41000)
        d.setDescriptor(TestDriver.txPFN, 3, address: 0x40000, length: 10, flags: 1, next: 7)
        d.setDescriptor(TestDriver.txPFN, 7, address: 0x41000, length: 60, flags: 0)
        d.offer(TestDriver.txPFN, head: 3)
        d.notifyTX()
        #expect(d.sent.frames == [frame])
        #expect(d.usedIndex(TestDriver.txPFN) == 1)
        #expect(d.usedElement(TestDriver.txPFN, 0).id == 3)
        #expect(d.inN(TestDriver.bar + 0x13, 1) == 1)
        #expect(d.inN(TestDriver.bar + 0x13, 1) == 0, "reading the ISR cleared it")
        #expect(!d.device.isBroken)
    }

    @Test("a frame from the host fills the next posted receive buffer after a zero header; none posted is a drop")
    func receive() throws {
        let d = try TestDriver()
        d.device.setHeld(false)
        #expect(d.device.receive([1, 2, 3]) == .notReady, "before DRIVER_OK")
        d.bringUp()
        #expect(d.device.receive([1, 2, 3]) == .noBuffer)
        _ = d.memory.write([UInt8](repeating: 0xEE, count: 2048), at: 0x50000)
        d.setDescriptor(TestDriver.rxPFN, 0, address: 0x50000, length: 1526, flags: 2)
        d.offer(TestDriver.rxPFN, head: 0)
        let frame: [UInt8] = (0..<100).map { UInt8(255 - $0) }
        #expect(d.device.receive(frame) == .delivered)
        #expect(d.usedIndex(TestDriver.rxPFN) == 1)
        #expect(d.usedElement(TestDriver.rxPFN, 0) == (0, 110))
        #expect(d.memory.read(0x50000, count: 110)! == [UInt8](repeating: 0, count: 10) + frame)
        #expect(d.memory.read(0x50000 + 110, count: 1)! == [0xEE], "nothing written past the packet")
        #expect(d.device.statistics.framesReceived == 1 && d.device.statistics.receiveDrops == 2)
    }

    @Test("held (the machine paused), the device writes nothing to guest memory")
    func heldWritesNothing() throws {
        let d = try TestDriver()
        d.bringUp()
        d.setDescriptor(TestDriver.rxPFN, 0, address: 0x50000, length: 1526, flags: 2)
        d.offer(TestDriver.rxPFN, head: 0)
        let before = d.memory.bytes
        #expect(d.device.receive([1, 2, 3]) == .held, "a new device is held until the machine runs")
        #expect(d.memory.bytes == before)
        d.device.setHeld(false)
        #expect(d.device.receive([1, 2, 3]) == .delivered)
        d.device.setHeld(true)
        let after = d.memory.bytes
        #expect(d.device.receive([4]) == .held)
        #expect(d.memory.bytes == after)
    }

    @Test("a receive buffer too small for the frame goes back empty, and the frame is dropped")
    func smallBuffer() throws {
        let d = try TestDriver()
        d.device.setHeld(false)
        d.bringUp()
        d.setDescriptor(TestDriver.rxPFN, 0, address: 0x50000, length: 20, flags: 2)
        d.offer(TestDriver.rxPFN, head: 0)
        #expect(d.device.receive([UInt8](repeating: 1, count: 60)) == .bufferTooSmall)
        #expect(d.usedElement(TestDriver.rxPFN, 0) == (0, 0))
        #expect(!d.device.isBroken)
    }

    /// Sends one hostile transmit chain and checks the device is broken, sent nothing, and
    /// stays broken (a second notify does nothing) until a reset.
    func expectBroken(_ d: TestDriver, _ what: String) {
        d.notifyTX()
        #expect(d.sent.frames.isEmpty, "\(what): nothing may be sent")
        #expect(d.status & Self.needsReset != 0, "\(what): DEVICE_NEEDS_RESET")
        #expect(d.device.brokenReason != nil)
        #expect(d.inN(TestDriver.bar + 0x13, 1) & 2 != 0, "\(what): a configuration change is signalled")
        d.out8(TestDriver.bar + 0x12, VirtioNet.Status.driverOK)
        #expect(d.status & Self.needsReset != 0, "only a reset clears it")
        d.out8(TestDriver.bar + 0x12, 0)
        #expect(d.status == 0 && d.device.brokenReason == nil)
    }

    @Test("a descriptor chain that loops marks the device broken")
    func loopingChain() throws {
        let d = try TestDriver()
        d.bringUp()
        d.setDescriptor(TestDriver.txPFN, 0, address: 0x40000, length: 10, flags: 1, next: 1)
        d.setDescriptor(TestDriver.txPFN, 1, address: 0x40000, length: 10, flags: 1, next: 0)
        d.offer(TestDriver.txPFN, head: 0)
        expectBroken(d, "loop")
    }

    @Test("a buffer outside guest memory, a huge length, an index past the queue: each marks the device broken")
    func outOfRange() throws {
        let cases: [(String, (TestDriver) -> Void)] = [
            ("address past RAM", { $0.setDescriptor(TestDriver.txPFN, 0, address: 0xFFFF_FFFF_FFFF_FFF0, length: 64, flags: 0) }),
            ("length near 2^32", { $0.setDescriptor(TestDriver.txPFN, 0, address: 0x40000, length: 0xFFFF_FFF0, flags: 0) }),
            ("end past RAM", { $0.setDescriptor(TestDriver.txPFN, 0, address: (1 << 20) - 20, length: 64, flags: 0) }),
            ("next past the queue", { $0.setDescriptor(TestDriver.txPFN, 0, address: 0x40000, length: 10, flags: 1, next: 300) }),
            ("a writable buffer to transmit", { $0.setDescriptor(TestDriver.txPFN, 0, address: 0x40000, length: 64, flags: 2) }),
            ("an indirect descriptor", { $0.setDescriptor(TestDriver.txPFN, 0, address: 0x40000, length: 64, flags: 4) }),
        ]
        for (what, setUp) in cases {
            let d = try TestDriver()
            d.bringUp()
            setUp(d)
            d.offer(TestDriver.txPFN, head: 0)
            expectBroken(d, what)
        }
        let d = try TestDriver()
        d.bringUp()
        d.offer(TestDriver.txPFN, head: 999)
        expectBroken(d, "head past the queue")
    }

    @Test("an available index racing more than the queue size ahead marks the device broken, on either queue")
    func availIndexRacesAhead() throws {
        let d = try TestDriver()
        d.bringUp()
        d.setDescriptor(TestDriver.txPFN, 0, address: 0x40000, length: 64, flags: 0)
        d.offer(TestDriver.txPFN, head: 0, advance: 257)
        expectBroken(d, "avail index")

        let r = try TestDriver()
        r.device.setHeld(false)
        r.bringUp()
        r.offer(TestDriver.rxPFN, head: 0, advance: 0x8000)
        #expect(r.device.receive([1, 2, 3]) == .broken)
        #expect(r.device.isBroken)
        #expect(r.device.receive([1, 2, 3]) == .notReady, "a broken device takes no more frames")
    }

    @Test("a queue placed past the end of guest memory marks the device broken at once")
    func queueOutsideMemory() throws {
        let d = try TestDriver()
        d.configWrite(slot: 1, 0x04, 1)
        d.out16(TestDriver.bar + 0x0E, 0)
        d.out32(TestDriver.bar + 0x08, 0xFFFF_FFFF)
        #expect(d.status & Self.needsReset != 0)
    }

    @Test("saved state round-trips into a fresh device, which goes on where the first stopped; foreign state is refused")
    func stateRoundTrip() throws {
        let d = try TestDriver()
        d.device.setHeld(false)
        d.bringUp()
        d.setDescriptor(TestDriver.rxPFN, 0, address: 0x50000, length: 1526, flags: 2)
        d.setDescriptor(TestDriver.rxPFN, 1, address: 0x51000, length: 1526, flags: 2)
        d.offer(TestDriver.rxPFN, head: 0)
        d.offer(TestDriver.rxPFN, head: 1)
        #expect(d.device.receive([7, 7]) == .delivered)
        let saved = d.device.saveState()
        #expect(saved.queues[0].lastAvailIndex == 1 && saved.queues[0].usedIndex == 1 && saved.pci.command == 1)

        let copy = VirtioNet(mac: MACAddress(parsing: "52:54:00:12:34:56")!, bar0: TestDriver.bar, memory: d.memory) { _ in }
        try copy.restoreState(saved)
        #expect(copy.saveState() == saved)
        copy.setHeld(false)
        #expect(copy.receive([8, 8]) == .delivered)
        #expect(d.usedElement(TestDriver.rxPFN, 1) == (1, 12))

        let otherMAC = VirtioNet(mac: MACAddress(parsing: "52:54:00:00:00:01")!, bar0: TestDriver.bar, memory: d.memory) { _ in }
        #expect(throws: VirtioNetStateError.self) { try otherMAC.restoreState(saved) }
        let otherBAR = VirtioNet(mac: MACAddress(parsing: "52:54:00:12:34:56")!, bar0: 0xD000, memory: d.memory) { _ in }
        #expect(throws: VirtioNetStateError.self) { try otherBAR.restoreState(saved) }
    }
}
