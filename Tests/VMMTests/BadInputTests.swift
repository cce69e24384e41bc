import Foundation
import Testing
import VMM

@Suite("Bad input gets a clear error")
struct BadInputTests {
    @Test("memory sizes: malformed, too small and too large are refused; good ones parse",
          arguments: ["", "abc", "12Q", "0", "512K", "8G", "99999999999999999999G", "1M1", "100000001"])
    func badMemorySizes(_ text: String) {
        #expect(throws: MemorySize.ParseError.self) { try MemorySize.parse(text) }
    }

    @Test("memory sizes with units parse to bytes")
    func goodMemorySizes() throws {
        #expect(try MemorySize.parse("64M") == 64 << 20)
        #expect(try MemorySize.parse("1g") == 1 << 30)
        #expect(try MemorySize.parse("4G") == 4 << 30)
        #expect(try MemorySize.parse("2048KiB") == 2 << 20)
        #expect(try MemorySize.parse("1048576") == 1 << 20)
    }
}
