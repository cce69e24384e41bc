#if canImport(Glibc)
import Glibc
#endif

/// An `mmap`ed range, unmapped when its owner goes away.
///
/// The base address is kept as an integer so that the owner is `Sendable` without
/// an unchecked promise; the bytes themselves are shared memory (often with the
/// kernel), so whoever reads and writes them coordinates, as with the fd they map.
public final class MemoryMapping: Sendable {
    private let address: UInt
    /// Length in bytes, as mapped.
    public let length: Int

    /// `mmap(nil, length, protection, flags, fd, offset)`. `call` names the mapping in
    /// errors, e.g. `mmap(kvm_run)`. The fd may be closed afterwards; the mapping stays.
    public init(length: Int, protection: Int32, flags: Int32, descriptor: OwnedFileDescriptor?,
                offset: off_t = 0, call: String = "mmap") throws(SystemCallError) {
        let p = mmap(nil, length, protection, flags, descriptor?.raw ?? -1, offset)
        guard let p, p != MAP_FAILED else { throw SystemCallError.last(call) }
        address = UInt(bitPattern: p)
        self.length = length
    }

    deinit {
        // SAFETY: exactly the range this owner mapped; nothing else unmaps it.
        munmap(base, length)
    }

    /// The first byte. Valid while this owner lives.
    public var base: UnsafeMutableRawPointer {
        // SAFETY: mmap never returns address 0 for a successful non-fixed mapping.
        UnsafeMutableRawPointer(bitPattern: address)!
    }

    /// The whole range. Valid while this owner lives.
    public var bytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base, count: length)
    }

    /// `madvise(MADV_DONTNEED)` over `[offset, offset+length)` (page-aligned, inside the mapping):
    /// the pages are dropped, and a private anonymous page reads as missing again (zeros, or a
    /// userfaultfd's fault when the range is registered).
    public func discard(offset: Int, length: Int) throws(SystemCallError) {
        precondition(offset >= 0 && length >= 0 && offset + length <= self.length, "discard outside the mapping")
        guard length > 0 else { return }
        // SAFETY: the range lies inside this owner's mapping (checked above).
        if madvise(base + offset, length, MADV_DONTNEED) != 0 { throw SystemCallError.last("madvise(MADV_DONTNEED)") }
    }
}
