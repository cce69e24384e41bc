import GuestMemory

/// How an image starts.
public enum BootMode: String, CaseIterable, Sendable {
    /// Flat binary at 0x10000, 16-bit real mode, CS:IP = 1000:0000.
    case real
    /// Flat binary at 0x10000, 32-bit flat segments, paging off.
    case protected
    /// Flat binary at 0x10000, 64-bit mode, identity-mapped with 2 MiB pages.
    case long
    /// Multiboot v1 kernel (ELF32 or the header's address fields).
    case multiboot
}

/// The processor state the image expects at its first instruction. The VMM
/// turns this into KVM register values; the loader knows nothing of KVM.
public struct BootCPUState: Sendable, Equatable {
    public enum Kind: Sendable, Equatable { case real16, protected32, long64 }
    public var kind: Kind
    public var rip: UInt64
    public var rsp: UInt64
    public var rflags: UInt64 = 0x2
    public var rax: UInt64 = 0
    public var rbx: UInt64 = 0
    public var rsi: UInt64 = 0
    /// Real mode: the segment value loaded into CS, DS, ES, FS and GS (SS is 0).
    public var realModeSegment: UInt16 = 0
    public var gdtBase: UInt64 = BootLayout.gdt
    public var gdtLimit: UInt16 = 0
    /// Long mode: physical address of the PML4.
    public var cr3: UInt64 = 0
}

/// What the loader did.
public struct LoadedImage: Sendable {
    public var mode: BootMode
    public var cpu: BootCPUState
    /// Guest-physical range the image occupies (Multiboot: lowest load address to end of bss).
    public var imageStart: UInt64
    public var imageEnd: UInt64
}

/// Why an image was refused. Each message names the problem and what to do.
public enum LoaderError: Error, Equatable, CustomStringConvertible {
    case emptyImage
    case imageTooLarge(imageSize: UInt64, available: UInt64)
    case notMultiboot
    case badMultibootChecksum(offset: Int)
    case unsupportedMultibootFlags(UInt32)
    case badMultibootAddresses(String)
    case badELF(String)
    case addressOutOfMemory(what: String, start: UInt64, end: UInt64, memory: UInt64)
    case commandLineTooLong(Int)
    case memorySize(UInt64)
    case internalError(String)

    public var description: String {
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case .emptyImage:
            return "the image is empty; give a flat binary or a Multiboot kernel"
        case let .imageTooLarge(s, a):
            return "the image (\(s) bytes) does not fit in guest memory above \(hex(BootLayout.imageBase)) (\(a) bytes free); give the guest more memory or use a smaller image"
        case .notMultiboot:
            return "no Multiboot header in the image's first 8 KiB; for a flat binary, give its boot mode: real, protected or long"
        case let .badMultibootChecksum(o):
            return "the Multiboot header at offset \(o) has a bad checksum (magic + flags + checksum must be 0 mod 2^32); the kernel file is damaged"
        case let .unsupportedMultibootFlags(f):
            return "the Multiboot header requires features this VMM lacks (flags 0x\(String(f, radix: 16))); only page alignment, memory information and address fields are supported"
        case let .badMultibootAddresses(why):
            return "the Multiboot header's address fields are inconsistent: \(why)"
        case let .badELF(why):
            return "the Multiboot kernel is not a loadable ELF32 file: \(why)"
        case let .addressOutOfMemory(what, s, e, m):
            if s < BootLayout.imageBase {
                return "\(what) at \(hex(s))..<\(hex(e)) overlaps the VMM's boot structures below \(hex(BootLayout.imageBase)); link the kernel at 1 MiB or above"
            }
            return "\(what) at \(hex(s))..<\(hex(e)) lies outside guest memory (\(hex(m)) bytes); give the guest more memory"
        case let .commandLineTooLong(n):
            return "the command line is \(n) bytes; at most \(BootLayout.maxCommandLine) are supported"
        case let .internalError(what):
            return "the loader failed unexpectedly (\(what)); please report it with the image"
        case let .memorySize(m):
            return "guest memory of \(m) bytes is not supported: use \(BootLayout.minMemory >> 20) MiB to \(BootLayout.maxMemory >> 30) GiB"
        }
    }
}

/// Loads flat and Multiboot images into guest memory and writes the VMM's boot
/// structures (GDT, page tables, parameter block or Multiboot information).
public enum ImageLoader {
    /// The checks `load` makes before it touches memory (an empty image, a command line too long,
    /// a flat image without a mode), for callers that must refuse bad input before anything else.
    public static func precheck(image: [UInt8], mode: BootMode?, commandLine: String?) throws(LoaderError) {
        guard !image.isEmpty else { throw .emptyImage }
        let length = (commandLine ?? "").utf8.count
        guard length <= BootLayout.maxCommandLine else { throw .commandLineTooLong(length) }
        if mode == nil, try MultibootHeader.find(in: image) == nil { throw .notMultiboot }
    }

    /// Loads `image`. With `mode` nil, a Multiboot kernel is detected by its header;
    /// anything else is refused with a request for `--mode`.
    public static func load(image: [UInt8], mode: BootMode?, commandLine: String?,
                            into memory: GuestMemory) throws(LoaderError) -> LoadedImage {
        guard memory.size >= BootLayout.minMemory, memory.size <= BootLayout.maxMemory else {
            throw .memorySize(memory.size)
        }
        guard !image.isEmpty else { throw .emptyImage }
        let cmdline = Array((commandLine ?? "").utf8)
        guard cmdline.count <= BootLayout.maxCommandLine else { throw .commandLineTooLong(cmdline.count) }

        let resolved: BootMode
        if let mode {
            resolved = mode
        } else if try MultibootHeader.find(in: image) != nil {
            resolved = .multiboot
        } else {
            throw .notMultiboot
        }
        do {
            try memory.write(cmdline + [0], at: GuestAddress(BootLayout.commandLine))
            switch resolved {
            case .real, .protected, .long:
                return try loadFlat(image, mode: resolved, commandLineLength: cmdline.count, memory: memory)
            case .multiboot:
                return try Multiboot.load(image, commandLine: commandLine != nil, memory: memory)
            }
        } catch let error as LoaderError {
            throw error
        } catch {
            // Sizes were checked above, so this is a bug in the loader; say what failed.
            throw .internalError("\(error)")
        }
    }

    static func loadFlat(_ image: [UInt8], mode: BootMode, commandLineLength: Int,
                         memory: GuestMemory) throws -> LoadedImage {
        let available = memory.size - BootLayout.imageBase
        guard UInt64(image.count) <= available else {
            throw LoaderError.imageTooLarge(imageSize: UInt64(image.count), available: available)
        }
        try memory.write(image, at: GuestAddress(BootLayout.imageBase))
        // Parameter block: magic, version, memory size, command line address and length.
        let p = GuestAddress(BootLayout.parameterBlock)
        try memory.zero(at: p, length: 0x100)
        try memory.writeInteger(BootLayout.parameterMagic, at: p)
        try memory.writeInteger(BootLayout.parameterVersion, at: p.adding(4))
        try memory.writeInteger(memory.size, at: p.adding(8))
        try memory.writeInteger(UInt32(BootLayout.commandLine), at: p.adding(16))
        try memory.writeInteger(UInt32(commandLineLength), at: p.adding(20))

        var cpu: BootCPUState
        switch mode {
        case .real:
            cpu = BootCPUState(kind: .real16, rip: 0, rsp: BootLayout.realModeStackTop)
            cpu.realModeSegment = UInt16(BootLayout.imageBase >> 4)
        case .protected:
            cpu = BootCPUState(kind: .protected32, rip: BootLayout.imageBase, rsp: BootLayout.stackTop)
            cpu.gdtLimit = try writeGDT(longMode: false, memory: memory)
        default:
            cpu = BootCPUState(kind: .long64, rip: BootLayout.imageBase, rsp: BootLayout.stackTop)
            cpu.gdtLimit = try writeGDT(longMode: true, memory: memory)
            cpu.cr3 = try writeIdentityPageTables(memory: memory)
        }
        cpu.rsi = BootLayout.parameterBlock
        return LoadedImage(mode: mode, cpu: cpu, imageStart: BootLayout.imageBase,
                           imageEnd: BootLayout.imageBase + UInt64(image.count))
    }

    /// Writes a GDT: null, code at selector 0x08 (32-bit, or 64-bit with L=1), data at 0x10.
    static func writeGDT(longMode: Bool, memory: GuestMemory) throws -> UInt16 {
        let code: UInt64 = longMode ? 0x00AF_9A00_0000_FFFF : 0x00CF_9A00_0000_FFFF
        let data: UInt64 = 0x00CF_9200_0000_FFFF
        let entries: [UInt64] = [0, code, data]
        for (i, e) in entries.enumerated() {
            try memory.writeInteger(e, at: GuestAddress(BootLayout.gdt + UInt64(i * 8)))
        }
        return UInt16(entries.count * 8 - 1)
    }

    /// Identity-maps all of guest memory (rounded up to 2 MiB) with 2 MiB pages.
    static func writeIdentityPageTables(memory: GuestMemory) throws -> UInt64 {
        let present_rw: UInt64 = 0x3
        let large: UInt64 = 0x80
        try memory.zero(at: GuestAddress(BootLayout.pml4), length: BootLayout.parameterBlock - BootLayout.pml4)
        try memory.writeInteger(BootLayout.pdpt | present_rw, at: GuestAddress(BootLayout.pml4))
        let twoMiB: UInt64 = 2 << 20
        let pages = (memory.size + twoMiB - 1) / twoMiB
        let directories = (pages + 511) / 512
        for d in 0..<directories {
            let pd = BootLayout.pageDirectories + d * 0x1000
            try memory.writeInteger(pd | present_rw, at: GuestAddress(BootLayout.pdpt + d * 8))
        }
        for i in 0..<pages {
            try memory.writeInteger((i * twoMiB) | present_rw | large,
                                    at: GuestAddress(BootLayout.pageDirectories + i * 8))
        }
        return BootLayout.pml4
    }
}
