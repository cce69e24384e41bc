import Synchronization

/// One bit per 4 KiB guest page: which pages changed.
public struct DirtyBitmap: Sendable, Equatable {
    public private(set) var words: [UInt64]
    public let pageCount: UInt64

    public init(pageCount: UInt64) {
        self.pageCount = pageCount
        self.words = [UInt64](repeating: 0, count: Int((pageCount + 63) / 64))
    }

    /// Marks page frame `pfn`; frames outside the bitmap are ignored.
    public mutating func set(_ pfn: UInt64) {
        guard pfn < pageCount else { return }
        words[Int(pfn / 64)] |= 1 << (pfn % 64)
    }

    public func contains(_ pfn: UInt64) -> Bool {
        pfn < pageCount && words[Int(pfn / 64)] & (1 << (pfn % 64)) != 0
    }

    /// ORs a KVM-style bitmap word in at word index `index`.
    public mutating func merge(word: UInt64, at index: Int) {
        guard index < words.count else { return }
        words[index] |= word
    }

    public mutating func formUnion(_ other: DirtyBitmap) {
        for i in 0..<min(words.count, other.words.count) { words[i] |= other.words[i] }
    }

    public mutating func removeAll() {
        for i in words.indices { words[i] = 0 }
    }

    /// Number of dirty pages.
    public var count: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }

    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    /// The dirty page frame numbers, ascending.
    public var pageFrames: [UInt64] {
        var out: [UInt64] = []
        out.reserveCapacity(count)
        for (i, w) in words.enumerated() where w != 0 {
            var word = w
            while word != 0 {
                let bit = UInt64(word.trailingZeroBitCount)
                out.append(UInt64(i) * 64 + bit)
                word &= word - 1
            }
        }
        return out
    }

    /// Every page set.
    public static func all(pageCount: UInt64) -> DirtyBitmap {
        var b = DirtyBitmap(pageCount: pageCount)
        for i in b.words.indices { b.words[i] = ~0 }
        let tail = pageCount % 64
        if tail != 0 { b.words[b.words.count - 1] = (1 << tail) - 1 }
        return b
    }
}

/// Tells which guest pages changed since they were last collected.
///
/// Implementations live in the KVM layer (`KVM_GET_DIRTY_LOG` bitmaps, dirty rings).
/// The protocol is here so that migration code depends on guest memory only.
public protocol DirtyTracker: AnyObject, Sendable {
    /// A short name for reports: "bitmap" or "ring".
    var name: String { get }
    /// Starts logging guest writes (a migration begins).
    func enable() throws
    /// Stops logging (the migration ended, either way).
    func disable() throws
    /// Pages written since the last `collect`, by the guest or (through
    /// `GuestMemory`) by the VMM. With manual protection, the pages stay
    /// unprotected until `rearm` is called for them.
    func collect() throws -> DirtyBitmap
    /// Re-protects pages about to be sent, so that later writes are logged again.
    /// Called before reading the pages, never after. `firstPage` is 64-aligned.
    func rearm(firstPage: UInt64, mask: UInt64) throws
}

/// Pages the VMM itself wrote while tracking was on (devices, parameter pages):
/// KVM's log sees only the guest's writes.
final class VMMWriteLog: Sendable {
    private let state: Mutex<DirtyBitmap?> = Mutex(nil)

    func start(pageCount: UInt64) { state.withLock { $0 = DirtyBitmap(pageCount: pageCount) } }
    func stop() { state.withLock { $0 = nil } }

    func mark(_ address: UInt64, _ length: UInt64) {
        guard length > 0 else { return }
        state.withLock { bitmap in
            guard bitmap != nil else { return }
            var pfn = address / GuestMemory.pageSize
            let last = (address + length - 1) / GuestMemory.pageSize
            while pfn <= last { bitmap!.set(pfn); pfn += 1 }
        }
    }

    func take() -> DirtyBitmap? {
        state.withLock { bitmap in
            guard let current = bitmap else { return nil }
            bitmap = DirtyBitmap(pageCount: current.pageCount)
            return current
        }
    }
}

extension GuestMemory {
    /// Starts recording the pages the VMM writes through this type.
    public func startLoggingVMMWrites() { vmmWrites.start(pageCount: size / Self.pageSize) }
    /// Stops recording.
    public func stopLoggingVMMWrites() { vmmWrites.stop() }
    /// Pages the VMM wrote since the last call (nil when not logging).
    public func takeVMMWrites() -> DirtyBitmap? { vmmWrites.take() }
    /// Number of 4 KiB pages.
    public var pageCount: UInt64 { size / Self.pageSize }
}

#if canImport(Glibc)
import Glibc
#endif

extension GuestMemory {
    /// Pages that may hold data: those resident in the host (`mincore`). A page of
    /// an anonymous mapping that was never touched reads as zero, so it need not
    /// be read, hashed or sent. Returns nil (every page may hold data) when swap
    /// is active, because a swapped-out page is not resident yet not zero.
    public func possiblyNonZeroPages() -> DirtyBitmap? {
        guard !Self.swapActive() else { return nil }
        var bitmap = DirtyBitmap(pageCount: pageCount)
        let hostPage = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        guard hostPage == Self.pageSize else { return nil }
        for region in regions {
            let pages = Int(region.size / Self.pageSize)
            var vector = [UInt8](repeating: 0, count: pages)
            // SAFETY: the region's mapping is `region.size` bytes long for this object's life.
            let rc = vector.withUnsafeMutableBufferPointer {
                mincore(UnsafeMutableRawPointer(bitPattern: region.hostAddress), Int(region.size), $0.baseAddress)
            }
            guard rc == 0 else { return nil }
            let base = region.guestBase.raw / Self.pageSize
            for i in 0..<pages where vector[i] & 1 != 0 { bitmap.set(base + UInt64(i)) }
        }
        return bitmap
    }

    /// Whether any swap area is in use (`/proc/swaps` lists more than its header).
    static func swapActive() -> Bool {
        guard let f = fopen("/proc/swaps", "r") else { return true }
        defer { fclose(f) }
        var lines = 0
        var buffer = [CChar](repeating: 0, count: 512)
        while fgets(&buffer, Int32(buffer.count), f) != nil { lines += 1 }
        return lines > 1
    }
}
