import Testing
import GuestMemory
import Loader

/// Builds a minimal ELF32 Multiboot kernel with one PT_LOAD segment at `paddr`.
func makeMultibootELF(paddr: UInt32, size: UInt32 = 0x100, entryOffset: UInt32 = 0,
                      elfClass: UInt8 = 1, corruptChecksum: Bool = false) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: 0x1000 + Int(size))
    func put32(_ v: UInt32, _ o: Int) { for i in 0..<4 { b[o + i] = UInt8((v >> (8 * UInt32(i))) & 0xFF) } }
    func put16(_ v: UInt16, _ o: Int) { b[o] = UInt8(v & 0xFF); b[o + 1] = UInt8(v >> 8) }
    b[0...3] = [0x7F, 0x45, 0x4C, 0x46]
    b[4] = elfClass; b[5] = 1; b[6] = 1
    put16(2, 16); put16(3, 18); put32(1, 20)
    put32(paddr + entryOffset, 24)   // e_entry
    put32(52, 28)                    // e_phoff
    put16(52, 40); put16(32, 42); put16(1, 44)
    // Program header: PT_LOAD, offset 0x1000, vaddr = paddr = paddr, filesz = memsz = size.
    put32(1, 52); put32(0x1000, 56); put32(paddr, 60); put32(paddr, 64); put32(size, 68); put32(size, 72); put32(5, 76)
    // Multiboot header at file offset 0x100 (inside the first 8 KiB).
    let flags: UInt32 = 0x3
    put32(MultibootHeader.magic, 0x100); put32(flags, 0x104)
    put32(0 &- MultibootHeader.magic &- flags &+ (corruptChecksum ? 1 : 0), 0x108)
    // Code: out 0xf4 with status 7.
    b[0x1000...0x1003] = [0xB0, 0x07, 0xE6, 0xF4]
    return b
}

@Suite("The loader refuses bad images with a clear error")
struct LoaderInputTests {
    func loaderError(_ image: [UInt8], mode: BootMode? = nil, memory: UInt64 = 64 << 20,
                     commandLine: String? = nil) throws -> LoaderError? {
        let mem = try GuestMemory(size: memory)
        do {
            _ = try ImageLoader.load(image: image, mode: mode, commandLine: commandLine, into: mem)
            return nil
        } catch {
            return error
        }
    }

    @Test("an image without a Multiboot header and without a mode is refused, asking for the boot mode")
    func flatNeedsMode() throws {
        let e = try loaderError([0x90, 0xF4])
        #expect(e == .notMultiboot)
        // The loader names no flag; the CLI adds --mode (CLITests.flatWithoutMode).
        #expect(e?.description.contains("boot mode: real, protected or long") == true)
    }

    @Test("an empty image is refused")
    func emptyImage() throws {
        #expect(try loaderError([], mode: .protected) == .emptyImage)
    }

    @Test("a flat image larger than guest memory above 0x10000 is refused")
    func flatTooLarge() throws {
        let e = try loaderError([UInt8](repeating: 0x90, count: (1 << 20) - 0x10000 + 1), mode: .real, memory: 1 << 20)
        guard case .imageTooLarge = e else { Issue.record("got \(String(describing: e))"); return }
        // The loader names no flag; the CLI adds --memory.
        #expect(e!.description.contains("give the guest more memory"))
    }

    @Test("a Multiboot header with a bad checksum is refused")
    func badChecksum() throws {
        let e = try loaderError(makeMultibootELF(paddr: 0x100000, corruptChecksum: true))
        #expect(e == .badMultibootChecksum(offset: 0x100))
        #expect(e!.description.contains("checksum"))
    }

    @Test("a Multiboot kernel loading outside guest memory is refused, naming the address")
    func loadOutsideMemory() throws {
        let e = try loaderError(makeMultibootELF(paddr: 0x0800_0000), memory: 64 << 20)
        guard case .addressOutOfMemory = e else { Issue.record("got \(String(describing: e))"); return }
        #expect(e!.description.contains("0x8000000"))
        #expect(e!.description.contains("outside guest memory"))
    }

    @Test("a Multiboot kernel loading over the VMM's boot structures is refused")
    func loadBelowImageBase() throws {
        let e = try loaderError(makeMultibootELF(paddr: 0x8000))
        guard case .addressOutOfMemory = e else { Issue.record("got \(String(describing: e))"); return }
        #expect(e!.description.contains("boot structures"))
    }

    @Test("a Multiboot kernel in ELF64 is refused: Multiboot v1 is 32-bit")
    func elf64Refused() throws {
        let e = try loaderError(makeMultibootELF(paddr: 0x100000, elfClass: 2))
        guard case let .badELF(why) = e else { Issue.record("got \(String(describing: e))"); return }
        #expect(why.contains("ELF32"))
    }

    @Test("a Multiboot header requiring unsupported features is refused")
    func unsupportedFlags() throws {
        var image = makeMultibootELF(paddr: 0x100000)
        let flags: UInt32 = 0x3 | (1 << 5)
        let checksum = 0 &- MultibootHeader.magic &- flags
        for i in 0..<4 { image[0x104 + i] = UInt8((flags >> (8 * UInt32(i))) & 0xFF) }
        for i in 0..<4 { image[0x108 + i] = UInt8((checksum >> (8 * UInt32(i))) & 0xFF) }
        #expect(try loaderError(image) == .unsupportedMultibootFlags(flags))
    }

    @Test("a command line longer than the boot area holds is refused")
    func commandLineTooLong() throws {
        let e = try loaderError(makeMultibootELF(paddr: 0x100000), commandLine: String(repeating: "x", count: 5000))
        #expect(e == .commandLineTooLong(5000))
    }
}
