import GuestMemory

/// Where the VMM puts its own boot structures. All of them lie below
/// `imageBase`, so every byte from the image upwards belongs to the guest.
public enum BootLayout {
    /// Global descriptor table (four 8-byte entries).
    public static let gdt: UInt64 = 0x0800
    /// The beacon block (see `Devices.BeaconBlock`): in the free space after the GDT, below the page tables.
    public static let beaconBlock: UInt64 = 0x0F00
    /// Long-mode page tables: PML4, PDPT, then one page directory per GiB.
    public static let pml4: UInt64 = 0x1000
    public static let pdpt: UInt64 = 0x2000
    public static let pageDirectories: UInt64 = 0x3000
    /// Flat images: the parameter block. Multiboot: the Multiboot information.
    public static let parameterBlock: UInt64 = 0x7000
    /// Multiboot memory map entries.
    public static let memoryMap: UInt64 = 0x7100
    /// Command line, NUL-terminated, at most `maxCommandLine` bytes before the NUL.
    public static let commandLine: UInt64 = 0x7800
    public static let maxCommandLine = 2047
    /// Initial stack pointer (the stack grows down into 0x8000..<0x10000).
    public static let stackTop: UInt64 = 0x10000
    /// Real-mode stack top (SS = 0).
    public static let realModeStackTop: UInt64 = 0xFFF0
    /// Flat images load here and start at their first byte.
    public static let imageBase: UInt64 = 0x10000

    /// Smallest and largest guest RAM the loader supports. The page tables
    /// below 0x10000 hold four page directories, so long mode maps 4 GiB at most,
    /// and Multiboot's 32-bit fields end there too.
    public static let minMemory: UInt64 = 1 << 20
    public static let maxMemory: UInt64 = 4 << 30

    /// Magic of the flat-image parameter block ("VMMP").
    public static let parameterMagic: UInt32 = 0x504D_4D56
    public static let parameterVersion: UInt32 = 1
}
