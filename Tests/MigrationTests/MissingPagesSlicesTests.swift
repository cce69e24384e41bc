import Foundation
@testable import Migration
import Snapshot
import Testing

@Suite("The bitmap of missing pages in slices")
struct MissingPagesSlicesTests {
    /// A bitmap with a recognisable pattern for `pageCount` pages (no bit past the last page).
    func bitmap(pageCount: UInt64) -> Data {
        var words = [UInt64](repeating: 0, count: Int((pageCount + 63) / 64))
        for i in words.indices { words[i] = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 }
        if pageCount % 64 != 0 { words[words.count - 1] &= (1 << (pageCount % 64)) - 1 }
        var data = Data()
        for word in words { withUnsafeBytes(of: word.littleEndian) { data.append(contentsOf: $0) } }
        return data
    }

    @Test("a 4 GiB guest's bitmap goes in four slices, each message within a control section's limit, and comes back whole",
          arguments: [UInt64(1) << 20, (UInt64(1) << 20) + 37, 4096])
    func roundTrip(pageCount: UInt64) throws {
        let whole = bitmap(pageCount: pageCount)
        let slices = MissingPagesSlices.slices(whole)
        #expect(slices.count == max(1, (whole.count + MissingPagesSlices.sliceBytes - 1) / MissingPagesSlices.sliceBytes))
        var assembler = MissingPagesSlices.Assembler(pageCount: pageCount)
        var result: Data?
        for (i, slice) in slices.enumerated() {
            for message in [WireMessage.postcopy(missing: slice), .stillMissing(missing: slice)] {
                let encoded = try message.encoded()
                #expect(UInt64(encoded.count) <= SectionType.control.payloadLimit)
                #expect(try WireMessage.decode(encoded) == message)
            }
            #expect(result == nil, "whole before its last slice")
            result = try assembler.add(slice)
            #expect((result != nil) == (i == slices.count - 1))
        }
        #expect(result == whole)
        #expect(missingPages(fromWire: try #require(result), pageCount: pageCount) != nil)
    }

    @Test("a slice over the size, one more than the bitmap holds, or an empty one is refused before it is kept")
    func hostileSlicesRefused() throws {
        let pageCount: UInt64 = 1 << 20
        var assembler = MissingPagesSlices.Assembler(pageCount: pageCount)
        #expect(throws: MigrationError.self) { try assembler.add(Data(count: MissingPagesSlices.sliceBytes + 1)) }
        #expect(throws: MigrationError.self) { try assembler.add(Data()) }
        #expect(assembler.bytes.isEmpty)
        for _ in 0..<4 { _ = try assembler.add(Data(count: MissingPagesSlices.sliceBytes)) }
        #expect(assembler.bytes.count == assembler.expected)
        #expect(throws: MigrationError.self) { try assembler.add(Data(count: 8)) }
        var small = MissingPagesSlices.Assembler(pageCount: 640)
        #expect(throws: MigrationError.self) { try small.add(Data(count: 88)) }
        #expect(try small.add(Data(count: 80)) != nil)
    }
}
