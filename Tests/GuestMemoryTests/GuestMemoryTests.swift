import Testing
import GuestMemory

@Suite("Guest memory is bounds-checked by guest-physical address")
struct GuestMemoryTests {
    @Test("reads and writes inside guest RAM round-trip")
    func roundTrip() throws {
        let m = try GuestMemory(size: 1 << 20)
        try m.write([1, 2, 3, 4], at: GuestAddress(0x1000))
        #expect(try m.read(at: GuestAddress(0x1000), count: 4) == [1, 2, 3, 4])
        try m.writeInteger(UInt64(0x1122_3344_5566_7788), at: GuestAddress((1 << 20) - 8))
        #expect(try m.readInteger(UInt64.self, at: GuestAddress((1 << 20) - 8)) == 0x1122_3344_5566_7788)
    }

    @Test("an access past the end is refused, even by one byte")
    func pastTheEnd() throws {
        let m = try GuestMemory(size: 1 << 20)
        #expect(throws: GuestMemoryError.outOfBounds(address: (1 << 20) - 3, length: 4, size: 1 << 20)) {
            try m.write([1, 2, 3, 4], at: GuestAddress((1 << 20) - 3))
        }
        #expect(throws: GuestMemoryError.self) { try m.read(at: GuestAddress(1 << 20), count: 1) }
    }

    @Test("an address whose end overflows 2^64 is refused, not wrapped")
    func overflowingAddress() throws {
        let m = try GuestMemory(size: 1 << 20)
        #expect(throws: GuestMemoryError.self) { try m.read(at: GuestAddress(UInt64.max - 1), count: 4) }
        #expect(throws: GuestMemoryError.self) { try m.zero(at: GuestAddress(8), length: UInt64.max) }
    }

    @Test("sizes that are zero or not page multiples are refused")
    func badSizes() {
        #expect(throws: GuestMemoryError.invalidSize(0)) { try GuestMemory(size: 0) }
        #expect(throws: GuestMemoryError.invalidSize(4097)) { try GuestMemory(size: 4097) }
    }

    @Test("memory larger than one region spans several slots, and accesses cross region borders")
    func crossRegion() throws {
        let m = try GuestMemory(size: 256 << 10, regionSize: 64 << 10)
        #expect(m.regions.count == 4)
        #expect(m.regions.map(\.slot) == [0, 1, 2, 3])
        #expect(m.regions[3].guestBase == GuestAddress(192 << 10))
        let bytes = (0..<100).map { UInt8($0) }
        try m.write(bytes, at: GuestAddress((64 << 10) - 50))
        #expect(try m.read(at: GuestAddress((64 << 10) - 50), count: 100) == bytes)
        #expect(try m.isZeroPage(GuestAddress(128 << 10)))
        #expect(try !m.isZeroPage(GuestAddress(60 << 10)))
    }
}
