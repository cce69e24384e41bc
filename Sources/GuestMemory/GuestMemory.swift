#if canImport(Glibc)
import Glibc
#endif
import SystemCalls

/// A guest-physical address. Its own type so that guest and host addresses never mix.
public struct GuestAddress: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.raw < b.raw }
    public func adding(_ offset: UInt64) -> GuestAddress { GuestAddress(raw &+ offset) }
    public var description: String { "0x" + String(raw, radix: 16) }
}

/// Why a guest memory operation was refused.
public enum GuestMemoryError: Error, Equatable, CustomStringConvertible {
    /// An access of `length` bytes at `address` reaches outside guest RAM of `size` bytes.
    case outOfBounds(address: UInt64, length: UInt64, size: UInt64)
    /// The requested size is zero, not a multiple of the page size, or too large to map.
    case invalidSize(UInt64)
    /// `mmap` failed for a region.
    case mapFailed(size: UInt64, errno: Int32)

    public var description: String {
        switch self {
        case let .outOfBounds(a, l, s):
            return "guest memory access of \(l) bytes at 0x\(String(a, radix: 16)) is outside guest RAM (0x0..<0x\(String(s, radix: 16)))"
        case let .invalidSize(s):
            return "invalid guest memory size \(s) bytes: it must be a non-zero multiple of 4096"
        case let .mapFailed(s, e):
            return "could not map \(s) bytes of guest memory: \(String(cString: strerror(e))); give the guest less memory"
        }
    }
}

/// Guest RAM: a contiguous guest-physical range starting at 0, backed by one or
/// more anonymous host mappings (one KVM memory slot each).
///
/// Every access is bounds-checked by guest-physical address and may span regions.
/// Host pointers stay inside this type, but for buffers lent to a closure for the length of
/// one call (`withBytes`, `withWritableBytes`) over a checked range; the only thing that
/// leaves it is each region's host address as an integer, which KVM needs to register the slot.
///
/// Thread-safety: the mappings never change after `init` and are unmapped in
/// `deinit`; the bytes themselves are shared with the running guest by design,
/// exactly as they are in hardware, so callers coordinate by pausing vCPUs.
// @unchecked: the mappings are immutable after init; their bytes are shared with the guest by design.
public final class GuestMemory: @unchecked Sendable {
    public static let pageSize: UInt64 = 4096
    /// Largest single mapping / memory slot. Larger guests get several slots.
    public static let maxRegionSize: UInt64 = 1 << 30

    /// One backing mapping, registered with KVM as one memory slot.
    public struct Region: Sendable {
        public let slot: UInt32
        public let guestBase: GuestAddress
        public let size: UInt64
        /// Host virtual address of the mapping, for `KVM_SET_USER_MEMORY_REGION` only.
        public let hostAddress: UInt
    }

    public let size: UInt64
    public let regions: [Region]
    /// One owner per region's mapping (unmapped when the memory goes away).
    private let mappings: [MemoryMapping]
    // SAFETY: each pointer is `mappings[i].base`, valid for `regions[i].size` bytes while `mappings` lives.
    private let bases: [UnsafeMutableRawPointer]
    private let regionSize: UInt64
    let vmmWrites = VMMWriteLog()

    /// Maps `size` bytes of zeroed guest RAM.
    public init(size: UInt64, regionSize: UInt64 = GuestMemory.maxRegionSize) throws(GuestMemoryError) {
        guard size > 0, size % Self.pageSize == 0, size <= (1 << 46),
              regionSize > 0, regionSize % Self.pageSize == 0 else { throw .invalidSize(size) }
        var regions: [Region] = []
        var mappings: [MemoryMapping] = []
        var offset: UInt64 = 0
        while offset < size {
            let length = min(regionSize, size - offset)
            let mapping: MemoryMapping
            do {
                // Regions mapped so far are unmapped by their owners if this one fails.
                mapping = try MemoryMapping(length: Int(length), protection: PROT_READ | PROT_WRITE,
                                            flags: MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, descriptor: nil,
                                            call: "mmap(guest memory)")
            } catch {
                throw .mapFailed(size: length, errno: error.errno)
            }
            regions.append(Region(slot: UInt32(regions.count), guestBase: GuestAddress(offset), size: length,
                                  hostAddress: UInt(bitPattern: mapping.base)))
            mappings.append(mapping)
            offset += length
        }
        self.size = size
        self.regions = regions
        self.mappings = mappings
        self.bases = mappings.map(\.base)
        self.regionSize = regionSize
    }

    /// Checks that `[address, address+length)` lies inside guest RAM.
    public func checkRange(_ address: GuestAddress, _ length: UInt64) throws(GuestMemoryError) {
        let (end, overflow) = address.raw.addingReportingOverflow(length)
        guard !overflow, end <= size else {
            throw .outOfBounds(address: address.raw, length: length, size: size)
        }
    }

    /// Calls `body` for each contiguous host piece of a checked guest range.
    private func forEachPiece(_ address: GuestAddress, _ length: UInt64,
                              _ body: (UnsafeMutableRawPointer, Int, Int) throws -> Void) rethrows {
        var done: UInt64 = 0
        while done < length {
            let gpa = address.raw + done
            let index = Int(gpa / regionSize)
            let region = regions[min(index, regions.count - 1)]
            let inRegion = gpa - region.guestBase.raw
            let n = min(length - done, region.size - inRegion)
            // SAFETY: range checked by the caller; piece lies inside one mapping.
            try body(bases[Int(region.slot)] + Int(inRegion), Int(n), Int(done))
            done += n
        }
    }

    /// Copies `bytes` into guest RAM at `address`.
    public func write(_ bytes: some Collection<UInt8>, at address: GuestAddress) throws(GuestMemoryError) {
        let array = Array(bytes)
        // withUnsafeBytes forgets the error type, so carry it out in a Result.
        let result = array.withUnsafeBytes { src in
            Result { () throws(GuestMemoryError) in try write(bytes: src, at: address) }
        }
        try result.get()
    }

    /// Copies raw bytes into guest RAM at `address`, without an intermediate array.
    public func write(bytes source: UnsafeRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        try checkRange(address, UInt64(source.count))
        vmmWrites.mark(address.raw, UInt64(source.count))
        forEachPiece(address, UInt64(source.count)) { dst, n, done in
            dst.copyMemory(from: source.baseAddress! + done, byteCount: n)
        }
    }

    /// Lets `body` fill a checked range of guest RAM in place (a socket read straight into the
    /// pages, with no buffer between), one contiguous host piece per call, in order. The range
    /// counts as written by the VMM, whatever `body` does; a throw leaves it partly written.
    public func withWritableBytes(at address: GuestAddress, count: Int,
                                  _ body: (UnsafeMutableRawBufferPointer) throws -> Void) throws {
        guard count >= 0 else { throw GuestMemoryError.outOfBounds(address: address.raw, length: 0, size: size) }
        try checkRange(address, UInt64(count))
        vmmWrites.mark(address.raw, UInt64(count))
        try forEachPiece(address, UInt64(count)) { dst, n, _ in
            try body(UnsafeMutableRawBufferPointer(start: dst, count: n))
        }
    }

    /// Reads `count` bytes of guest RAM at `address`.
    public func read(at address: GuestAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        try checkRange(address, UInt64(count))
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { dst in
            forEachPiece(address, UInt64(count)) { src, n, done in
                (dst.baseAddress! + done).copyMemory(from: src, byteCount: n)
            }
        }
        return out
    }

    /// Writes a little-endian integer at `address`.
    public func writeInteger<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        try write(withUnsafeBytes(of: value.littleEndian) { Array($0) }, at: address)
    }

    /// Reads a little-endian integer at `address`.
    public func readInteger<T: FixedWidthInteger>(_: T.Type = T.self, at address: GuestAddress) throws(GuestMemoryError) -> T {
        let bytes = try read(at: address, count: MemoryLayout<T>.size)
        var value: T = 0
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes) }
        return T(littleEndian: value)
    }

    /// Fills `[address, address+length)` with zeros.
    public func zero(at address: GuestAddress, length: UInt64) throws(GuestMemoryError) {
        try checkRange(address, length)
        vmmWrites.mark(address.raw, length)
        forEachPiece(address, length) { dst, n, _ in dst.initializeMemory(as: UInt8.self, repeating: 0, count: n) }
    }

    /// Gives `body` read access to a range that lies inside one region (e.g. one page),
    /// without copying. The buffer must not escape `body`.
    public func withBytes<R>(at address: GuestAddress, count: Int,
                             _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        try checkRange(address, UInt64(count))
        let index = Int(address.raw / regionSize)
        let region = regions[min(index, regions.count - 1)]
        let inRegion = address.raw - region.guestBase.raw
        guard inRegion + UInt64(count) <= region.size else {
            throw GuestMemoryError.outOfBounds(address: address.raw, length: UInt64(count), size: size)
        }
        // SAFETY: range checked against this one mapping.
        return try body(UnsafeRawBufferPointer(start: bases[Int(region.slot)] + Int(inRegion), count: count))
    }

    /// Whether the 4 KiB page at `address` (page-aligned) is all zeros.
    public func isZeroPage(_ address: GuestAddress) throws -> Bool {
        try withBytes(at: address, count: Int(Self.pageSize)) { buf in
            let words = buf.bindMemory(to: UInt64.self)
            for w in words where w != 0 { return false }
            return true
        }
    }
}

// MARK: - Pages installed by a userfaultfd (lazy restore, post-copy migration)

extension GuestMemory {
    /// Registers every region with `uffd` in MISSING mode: from now on a missing page faults to
    /// whoever serves `uffd`, for the guest (KVM reads through these very mappings) and for this
    /// process alike. Call before anything touches the memory; nothing here writes to it.
    public func registerMissingPages(with uffd: UserFaultFD) throws(SystemCallError) {
        for region in regions { try uffd.register(address: UInt64(region.hostAddress), length: region.size) }
    }

    /// Undoes `registerMissingPages`: pages still missing read as zeros from now on, and threads
    /// sleeping on them retry.
    public func unregisterMissingPages(from uffd: UserFaultFD) throws(SystemCallError) {
        for region in regions { try uffd.unregister(address: UInt64(region.hostAddress), length: region.size) }
    }

    /// The guest page a host address reported by a fault lies in; nil if it is not guest RAM.
    public func pageFrame(ofHostAddress address: UInt64) -> UInt64? {
        for region in regions {
            let base = UInt64(region.hostAddress)
            if address >= base && address - base < region.size {
                return (region.guestBase.raw + (address - base)) / Self.pageSize
            }
        }
        return nil
    }

    /// Drops the pages `[pfn, pfn+count)` (`MADV_DONTNEED`): each reads as missing again, so with
    /// the memory registered for missing pages the next touch faults to the userfaultfd's server
    /// (post-copy migration discards the pages that changed after they were sent).
    public func discardPages(atPageFrame pfn: UInt64, count: UInt64) throws {
        let (address, o1) = pfn.multipliedReportingOverflow(by: Self.pageSize)
        let (length, o2) = count.multipliedReportingOverflow(by: Self.pageSize)
        guard !o1, !o2 else { throw GuestMemoryError.outOfBounds(address: UInt64.max, length: UInt64.max, size: size) }
        try checkRange(GuestAddress(address), length)
        var done: UInt64 = 0
        while done < length {
            let gpa = address + done
            let index = min(Int(gpa / regionSize), regions.count - 1)
            let inRegion = gpa - regions[index].guestBase.raw
            let n = min(length - done, regions[index].size - inRegion)
            try mappings[index].discard(offset: Int(inRegion), length: Int(n))
            done += n
        }
    }

    /// Calls `body` with the host address and length of each region-bounded piece of the whole
    /// pages `[pfn, pfn+count)`, and the offset of the piece into the range.
    private func forEachHostPiece(pfn: UInt64, count: UInt64,
                                  _ body: (UInt64, UInt64, UInt64) throws(SystemCallError) -> Void) throws {
        let (address, o1) = pfn.multipliedReportingOverflow(by: Self.pageSize)
        let (length, o2) = count.multipliedReportingOverflow(by: Self.pageSize)
        guard !o1, !o2 else { throw GuestMemoryError.outOfBounds(address: UInt64.max, length: UInt64.max, size: size) }
        try checkRange(GuestAddress(address), length)
        var done: UInt64 = 0
        while done < length {
            let gpa = address + done
            let region = regions[min(Int(gpa / regionSize), regions.count - 1)]
            let inRegion = gpa - region.guestBase.raw
            let n = min(length - done, region.size - inRegion)
            try body(UInt64(region.hostAddress) + inRegion, n, done)
            done += n
        }
    }

    /// Installs whole pages at `pfn` from `bytes` (a multiple of the page size) through `uffd`
    /// (`UFFDIO_COPY`): each page appears complete or not at all, and threads waiting on it wake.
    /// Pages already present are left as they are and counted.
    @discardableResult
    public func installPages(_ bytes: UnsafeRawBufferPointer, atPageFrame pfn: UInt64, through uffd: UserFaultFD) throws -> UserFaultInstall {
        guard bytes.count % Int(Self.pageSize) == 0, let source = bytes.baseAddress else {
            throw GuestMemoryError.invalidSize(UInt64(bytes.count))
        }
        var total = UserFaultInstall()
        try forEachHostPiece(pfn: pfn, count: UInt64(bytes.count) / Self.pageSize) { host, n, offset throws(SystemCallError) in
            let r = try uffd.copy(from: source + Int(offset), to: host, length: n)
            total.installedBytes += r.installedBytes
            total.alreadyPresentBytes += r.alreadyPresentBytes
        }
        return total
    }

    /// Maps zero pages over `[pfn, pfn+count)` through `uffd` (`UFFDIO_ZEROPAGE`); present pages stay.
    @discardableResult
    public func installZeroPages(atPageFrame pfn: UInt64, count: UInt64, through uffd: UserFaultFD) throws -> UserFaultInstall {
        var total = UserFaultInstall()
        try forEachHostPiece(pfn: pfn, count: count) { host, n, _ throws(SystemCallError) in
            let r = try uffd.zeroPages(at: host, length: n)
            total.installedBytes += r.installedBytes
            total.alreadyPresentBytes += r.alreadyPresentBytes
        }
        return total
    }

    /// Wakes threads waiting on faults in `[pfn, pfn+count)` (after someone else installed them).
    public func wakePages(atPageFrame pfn: UInt64, count: UInt64, through uffd: UserFaultFD) throws {
        try forEachHostPiece(pfn: pfn, count: count) { host, n, _ throws(SystemCallError) in try uffd.wake(address: host, length: n) }
    }
}
