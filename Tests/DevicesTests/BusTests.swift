import Testing
import Devices

@Suite("Buses map address ranges to devices")
struct BusTests {
    /// A device that remembers what it was given and answers reads with its offset.
    final class Probe: BusDevice {
        var writes: [(UInt64, [UInt8])] = []
        func read(offset: UInt64, into data: inout [UInt8]) {
            for i in data.indices { data[i] = UInt8(truncatingIfNeeded: offset) &+ UInt8(i) }
        }
        func write(offset: UInt64, data: [UInt8]) -> BusEvent? {
            writes.append((offset, data))
            return nil
        }
    }

    @Test("an access reaches the device at its offset inside the range")
    func routesByRange() throws {
        let bus = Bus(name: "port I/O")
        let a = Probe(), b = Probe()
        try bus.insert(a, named: "a", base: 0x3F8, length: 8)
        try bus.insert(b, named: "b", base: 0xCF8, length: 8)
        #expect(bus.read(0x3FA, width: 1) == [2])
        #expect(bus.read(0xCFC, width: 4) == [4, 5, 6, 7])
        _ = bus.write(0xCF9, data: [0xAA])
        #expect(b.writes.count == 1 && b.writes[0].0 == 1 && b.writes[0].1 == [0xAA])
        #expect(a.writes.isEmpty)
        #expect(bus.ranges.map(\.name) == ["a", "b"])
    }

    @Test("nothing there: reads float high and writes are dropped, as on a PC bus")
    func emptyAddressReadsOnes() {
        let bus = Bus(name: "MMIO")
        #expect(bus.read(0xFEE0_0000, width: 4) == [0xFF, 0xFF, 0xFF, 0xFF])
        #expect(bus.write(0xFEE0_0000, data: [1]) == nil)
    }

    @Test("overlapping ranges and empty ranges are refused, naming the device in the way")
    func overlapRefused() throws {
        let bus = Bus(name: "port I/O")
        try bus.insert(Probe(), named: "COM1", base: 0x3F8, length: 8)
        #expect(throws: BusError.overlap(bus: "port I/O", base: 0x3FF, length: 2, existing: "COM1")) {
            try bus.insert(Probe(), named: "other", base: 0x3FF, length: 2)
        }
        #expect(throws: BusError.emptyRange(bus: "port I/O", device: "nothing")) {
            try bus.insert(Probe(), named: "nothing", base: 0x80, length: 0)
        }
        // Adjacent is fine.
        try bus.insert(Probe(), named: "next", base: 0x400, length: 1)
    }

    @Test("the exit port asks the machine to end with the byte written")
    func exitPortEvent() throws {
        let bus = Bus(name: "port I/O")
        try bus.insert(DebugExitPort(), named: "exit port", base: UInt64(DebugExitPort.port), length: 1)
        #expect(bus.write(UInt64(DebugExitPort.port), data: [42]) == .exitRequested(status: 42))
    }

    @Test("the beacon port hands the guest's message to its listener")
    func beaconPortDeliversMessage() throws {
        var slot = [UInt8](repeating: 0, count: BeaconBlock.messageSize)
        slot[0] = 0x11; slot[8] = 3
        let port = BeaconPort(readSlot: { slot })
        nonisolated(unsafe) var seen: [BeaconMessage] = []  // written and read on this test's thread only
        port.onBeacon { seen.append($0) }
        _ = port.write(offset: 0, data: [1])
        #expect(seen == [BeaconMessage(token: 0x11, counter: 3)])
    }
}
