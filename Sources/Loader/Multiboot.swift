import GuestMemory

/// A Multiboot v1 header found in an image.
public struct MultibootHeader: Equatable, Sendable {
    public static let magic: UInt32 = 0x1BAD_B002
    public static let bootloaderMagic: UInt32 = 0x2BAD_B002
    /// The header must lie, 4-byte aligned, within the first 8 KiB.
    public static let searchLimit = 8192

    public var offset: Int
    public var flags: UInt32
    public var headerAddress: UInt32 = 0
    public var loadAddress: UInt32 = 0
    public var loadEndAddress: UInt32 = 0
    public var bssEndAddress: UInt32 = 0
    public var entryAddress: UInt32 = 0

    /// Bit 16: the address fields are valid (the "a.out kludge").
    public var hasAddressFields: Bool { flags & (1 << 16) != 0 }

    /// Finds the header; nil if there is none. A header with a bad checksum is an error.
    public static func find(in image: [UInt8]) throws(LoaderError) -> MultibootHeader? {
        let limit = min(image.count, searchLimit)
        var offset = 0
        while offset + 12 <= limit {
            if le32(image, offset) == magic {
                let flags = le32(image, offset + 4)
                let checksum = le32(image, offset + 8)
                guard magic &+ flags &+ checksum == 0 else { throw .badMultibootChecksum(offset: offset) }
                var h = MultibootHeader(offset: offset, flags: flags)
                if h.hasAddressFields {
                    guard offset + 32 <= image.count else {
                        throw .badMultibootAddresses("the header is cut short at the end of the file")
                    }
                    h.headerAddress = le32(image, offset + 12)
                    h.loadAddress = le32(image, offset + 16)
                    h.loadEndAddress = le32(image, offset + 20)
                    h.bssEndAddress = le32(image, offset + 24)
                    h.entryAddress = le32(image, offset + 28)
                }
                return h
            }
            offset += 4
        }
        return nil
    }
}

func le32(_ b: [UInt8], _ o: Int) -> UInt32 {
    UInt32(b[o]) | UInt32(b[o + 1]) << 8 | UInt32(b[o + 2]) << 16 | UInt32(b[o + 3]) << 24
}

func le16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }

/// Loads Multiboot v1 kernels by the specification.
enum Multiboot {
    /// Flags bits 0..15 are requirements. We honour 0 (page-aligned modules: we load
    /// none) and 1 (memory information), and ignore 2 (video mode: there is no display,
    /// so no framebuffer information is given, which the specification allows).
    static let supportedRequirements: UInt32 = 0b111

    static func load(_ image: [UInt8], commandLine: Bool, memory: GuestMemory) throws -> LoadedImage {
        guard let header = try MultibootHeader.find(in: image) else { throw LoaderError.notMultiboot }
        let required = header.flags & 0xFFFF
        guard required & ~supportedRequirements == 0 else {
            throw LoaderError.unsupportedMultibootFlags(header.flags)
        }
        let (start, end, entry): (UInt64, UInt64, UInt64)
        if header.hasAddressFields {
            (start, end, entry) = try loadWithAddressFields(image, header, memory)
        } else {
            (start, end, entry) = try loadELF32(image, memory)
        }
        try writeInformation(commandLine: commandLine, memory: memory)
        var cpu = BootCPUState(kind: .protected32, rip: entry, rsp: BootLayout.stackTop)
        cpu.rax = UInt64(MultibootHeader.bootloaderMagic)
        cpu.rbx = BootLayout.parameterBlock
        cpu.gdtLimit = try ImageLoader.writeGDT(longMode: false, memory: memory)
        return LoadedImage(mode: .multiboot, cpu: cpu, imageStart: start, imageEnd: end)
    }

    static func checkPlacement(_ what: String, _ start: UInt64, _ end: UInt64, _ memory: GuestMemory) throws {
        guard start >= BootLayout.imageBase, end >= start, end <= memory.size else {
            throw LoaderError.addressOutOfMemory(what: what, start: start, end: end, memory: memory.size)
        }
    }

    static func loadWithAddressFields(_ image: [UInt8], _ h: MultibootHeader,
                                      _ memory: GuestMemory) throws -> (UInt64, UInt64, UInt64) {
        // The file offset of the header corresponds to header_addr; load_addr maps back
        // to an earlier offset in the file.
        guard h.loadAddress <= h.headerAddress else {
            throw LoaderError.badMultibootAddresses("load_addr 0x\(String(h.loadAddress, radix: 16)) is above header_addr 0x\(String(h.headerAddress, radix: 16))")
        }
        let skip = UInt64(h.headerAddress - h.loadAddress)
        guard skip <= UInt64(h.offset) else {
            throw LoaderError.badMultibootAddresses("header_addr - load_addr is larger than the header's offset in the file")
        }
        let fileStart = UInt64(h.offset) - skip
        let loadEnd: UInt64 = h.loadEndAddress == 0
            ? UInt64(h.loadAddress) + UInt64(image.count) - fileStart
            : UInt64(h.loadEndAddress)
        guard loadEnd >= UInt64(h.loadAddress), fileStart + (loadEnd - UInt64(h.loadAddress)) <= UInt64(image.count) else {
            throw LoaderError.badMultibootAddresses("load_end_addr 0x\(String(loadEnd, radix: 16)) reaches past the end of the file")
        }
        let bssEnd = h.bssEndAddress == 0 ? loadEnd : UInt64(h.bssEndAddress)
        guard bssEnd >= loadEnd else {
            throw LoaderError.badMultibootAddresses("bss_end_addr is below load_end_addr")
        }
        try checkPlacement("the kernel", UInt64(h.loadAddress), bssEnd, memory)
        guard UInt64(h.entryAddress) >= UInt64(h.loadAddress), UInt64(h.entryAddress) < loadEnd else {
            throw LoaderError.badMultibootAddresses("entry_addr 0x\(String(h.entryAddress, radix: 16)) is outside the loaded range")
        }
        let length = Int(loadEnd - UInt64(h.loadAddress))
        try memory.write(image[Int(fileStart)..<Int(fileStart) + length], at: GuestAddress(UInt64(h.loadAddress)))
        try memory.zero(at: GuestAddress(loadEnd), length: bssEnd - loadEnd)
        return (UInt64(h.loadAddress), bssEnd, UInt64(h.entryAddress))
    }

    static func loadELF32(_ image: [UInt8], _ memory: GuestMemory) throws -> (UInt64, UInt64, UInt64) {
        func bad(_ why: String) -> LoaderError { .badELF(why) }
        guard image.count >= 52, image[0] == 0x7F, image[1] == 0x45, image[2] == 0x4C, image[3] == 0x46 else {
            throw bad("no ELF magic, and the Multiboot header has no address fields (flag bit 16)")
        }
        guard image[4] == 1 else { throw bad("it is not ELF32 (class \(image[4])); Multiboot v1 kernels are 32-bit") }
        guard image[5] == 1 else { throw bad("it is not little-endian") }
        guard le16(image, 18) == 3 else { throw bad("machine \(le16(image, 18)) is not i386 (3)") }
        let entry = UInt64(le32(image, 24))
        let phoff = Int(le32(image, 28))
        let phentsize = Int(le16(image, 42))
        let phnum = Int(le16(image, 44))
        guard phentsize >= 32, phnum > 0, phnum <= 64,
              phoff <= image.count, phnum * phentsize <= image.count - phoff else {
            throw bad("its program header table is missing or runs past the end of the file")
        }
        var lowest = UInt64.max, highest: UInt64 = 0, loaded = 0
        for i in 0..<phnum {
            let o = phoff + i * phentsize
            guard le32(image, o) == 1 else { continue } // PT_LOAD only
            let offset = UInt64(le32(image, o + 4))
            let paddr = UInt64(le32(image, o + 12))
            let filesz = UInt64(le32(image, o + 16))
            let memsz = UInt64(le32(image, o + 20))
            guard filesz <= memsz else { throw bad("segment \(i) has p_filesz larger than p_memsz") }
            guard offset + filesz <= UInt64(image.count) else { throw bad("segment \(i) runs past the end of the file") }
            try checkPlacement("ELF segment \(i)", paddr, paddr + memsz, memory)
            try memory.write(image[Int(offset)..<Int(offset + filesz)], at: GuestAddress(paddr))
            try memory.zero(at: GuestAddress(paddr + filesz), length: memsz - filesz)
            lowest = min(lowest, paddr)
            highest = max(highest, paddr + memsz)
            loaded += 1
        }
        guard loaded > 0 else { throw bad("it has no loadable (PT_LOAD) segment") }
        guard entry >= lowest, entry < highest else {
            throw bad("its entry point 0x\(String(entry, radix: 16)) is outside its loaded segments")
        }
        return (lowest, highest, entry)
    }

    /// Writes the Multiboot information: memory bounds, the memory map and,
    /// when given, the command line.
    static func writeInformation(commandLine: Bool, memory: GuestMemory) throws {
        let info = GuestAddress(BootLayout.parameterBlock)
        try memory.zero(at: info, length: 0x100)
        var flags: UInt32 = (1 << 0) | (1 << 6) | (1 << 9)
        if commandLine { flags |= 1 << 2 }
        let memLowerKiB: UInt32 = 640
        let memUpperKiB = UInt32(min((memory.size - (1 << 20)) / 1024, UInt64(UInt32.max)))
        try memory.writeInteger(flags, at: info)
        try memory.writeInteger(memLowerKiB, at: info.adding(4))
        try memory.writeInteger(memUpperKiB, at: info.adding(8))
        try memory.writeInteger(UInt32(BootLayout.commandLine), at: info.adding(16))
        // Memory map: conventional RAM, the legacy hole (reserved, as on a PC), then RAM above 1 MiB.
        let entries: [(UInt64, UInt64, UInt32)] = [
            (0, 0xA0000, 1),
            (0xA0000, 0x60000, 2),
            (0x100000, memory.size - 0x100000, 1),
        ]
        var at = GuestAddress(BootLayout.memoryMap)
        for (base, length, type) in entries {
            try memory.writeInteger(UInt32(20), at: at) // size of the entry, excluding this field
            try memory.writeInteger(base, at: at.adding(4))
            try memory.writeInteger(length, at: at.adding(12))
            try memory.writeInteger(type, at: at.adding(20))
            at = at.adding(24)
        }
        try memory.writeInteger(UInt32(entries.count * 24), at: info.adding(44))
        try memory.writeInteger(UInt32(BootLayout.memoryMap), at: info.adding(48))
        // Boot loader name (flag 9), placed after the map.
        let name = Array("swift-vmm".utf8) + [0]
        try memory.write(name, at: at)
        try memory.writeInteger(UInt32(at.raw), at: info.adding(64))
    }
}
