import GuestMemory

/// Encoding, validation and restore of memory section payloads.
///
/// Layout: count u32, reserved u32 (0), `count` u64 entries (page frame number
/// in bits 0..51, bit 63 = zero page, bits 52..62 reserved), then 4096 bytes
/// per non-zero entry in entry order.
public enum MemorySection {
    /// Entry bit that marks a page as all zeros (no data stored).
    public static let zeroPageFlag: UInt64 = 1 << 63
    /// Bits of an entry that hold the page frame number.
    public static let pageFrameMask: UInt64 = (1 << 52) - 1
    /// Entry bits that must be 0 in version 1.
    public static let reservedEntryMask: UInt64 = ~(zeroPageFlag | pageFrameMask)

    /// One page table entry.
    struct Entry {
        var pfn: UInt64
        var isZero: Bool
    }

    /// A structurally valid payload, not yet checked against any guest memory.
    struct Parsed {
        var entries: [Entry]
        /// Payload offset of the first page's data.
        var dataStart: Int
    }

    /// Checks everything that does not depend on guest memory size. Every
    /// size computation is checked, so hostile counts and lengths are refused, not trapped on.
    static func parse(_ payload: [UInt8]) throws(MemorySectionDefect) -> Parsed {
        // withUnsafeBytes rethrows untyped: carry the typed defect out as a value.
        let result: Result<Parsed, MemorySectionDefect> = payload.withUnsafeBytes { raw in
            do throws(MemorySectionDefect) { return .success(try parse(raw)) } catch { return .failure(error) }
        }
        return try result.get()
    }

    /// `parse` over bytes held anywhere (a decrypted chunk is not an array).
    static func parse(_ payload: UnsafeRawBufferPointer) throws(MemorySectionDefect) -> Parsed {
        try parseTable(payload, payloadLength: UInt64(payload.count))
    }

    /// The length of a payload's count, reserved field and table (where its page data begins),
    /// from its first 8 bytes and its declared length: for a reader that takes the table first
    /// and the pages after, straight into guest memory.
    static func tableLength(first8 head: UnsafeRawBufferPointer, payloadLength length: UInt64) throws(MemorySectionDefect) -> Int {
        guard length >= 8, head.count >= 8 else { throw .tooShort(length: length) }
        let count = UInt32(littleEndian: head.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        guard count >= 1, count <= SnapshotFormat.maxPagesPerSection else { throw .countOutOfRange(count: count) }
        let reserved = UInt32(littleEndian: head.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        guard reserved == 0 else { throw .reservedFieldNonZero(value: reserved) }
        // count <= maxPagesPerSection: no overflow.
        let tableEnd = 8 + 8 * UInt64(count)
        guard tableEnd <= length else { throw .tableTruncated(count: count, length: length) }
        return Int(tableEnd)
    }

    /// Checks a payload of `payloadLength` bytes from its head: `payload` holds at least its count,
    /// reserved field and table (the whole payload, or only that much when the pages are read
    /// apart). The data's length is checked against the table, not read.
    static func parseTable(_ payload: UnsafeRawBufferPointer, payloadLength length: UInt64) throws(MemorySectionDefect) -> Parsed {
        let tableEnd = UInt64(try tableLength(first8: payload, payloadLength: length))
        let count = UInt32(littleEndian: payload.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        guard tableEnd <= UInt64(payload.count) else { throw .tableTruncated(count: count, length: UInt64(payload.count)) }

        var entries: [Entry] = []
        entries.reserveCapacity(Int(count))
        var dataPages: UInt64 = 0
        for index in 0..<Int(count) {
            let raw = UInt64(littleEndian: payload.loadUnaligned(fromByteOffset: 8 + 8 * index, as: UInt64.self))
            guard raw & reservedEntryMask == 0 else { throw .reservedEntryBits(index: index, entry: raw) }
            let pfn = raw & pageFrameMask
            if let previous = entries.last?.pfn, pfn <= previous {
                throw .notIncreasing(index: index, pfn: pfn, previous: previous)
            }
            let isZero = raw & zeroPageFlag != 0
            if !isZero { dataPages += 1 }
            entries.append(Entry(pfn: pfn, isZero: isZero))
        }

        let (dataBytes, overflow3) = dataPages.multipliedReportingOverflow(by: SnapshotFormat.pageSize)
        let (expected, overflow4) = tableEnd.addingReportingOverflow(dataBytes)
        guard !overflow3, !overflow4, expected == length else {
            throw .lengthMismatch(expected: overflow3 || overflow4 ? UInt64.max : expected, actual: length)
        }
        return Parsed(entries: entries, dataStart: Int(tableEnd))
    }

    /// Applies a payload whose head `parsed` checked and whose page data is still to be read:
    /// every page's bounds are checked first, then `read` fills each run of consecutive data
    /// pages straight in guest memory, in the order of the data, and zero pages are zeroed.
    /// Malformed or out-of-range tables write nothing; a `read` that throws leaves some of the
    /// section's pages written (the runs read before it, zero pages named before its run's end):
    /// the stream is broken then, and so is the state it was bringing.
    static func apply(_ parsed: Parsed, readingDataWith read: (UnsafeMutableRawBufferPointer) throws -> Void,
                      to memory: GuestMemory) throws -> (pages: Int, zeroPages: Int) {
        var addresses: [GuestAddress] = []
        addresses.reserveCapacity(parsed.entries.count)
        for entry in parsed.entries {
            guard let address = pageAddress(entry.pfn, memorySize: memory.size) else {
                throw SnapshotFormatError.pageOutOfRange(pfn: entry.pfn, memorySize: memory.size)
            }
            addresses.append(address)
        }
        let page = Int(SnapshotFormat.pageSize)
        var zeroPages = 0
        // A run of data pages with consecutive frames: one read for all of them.
        var runStart: GuestAddress?
        var runPages = 0
        func readRun() throws {
            guard let start = runStart else { return }
            try memory.withWritableBytes(at: start, count: runPages * page) { try read($0) }
            runStart = nil
            runPages = 0
        }
        for (entry, address) in zip(parsed.entries, addresses) {
            if entry.isZero {
                // Reading an untouched page maps the shared zero page; writing would allocate one.
                if try !memory.isZeroPage(address) { try memory.zero(at: address, length: SnapshotFormat.pageSize) }
                zeroPages += 1
            } else if let start = runStart, start.raw + UInt64(runPages * page) == address.raw {
                runPages += 1
            } else {
                try readRun()
                runStart = address
                runPages = 1
            }
        }
        try readRun()
        return (parsed.entries.count, zeroPages)
    }

    /// Guest-physical address of `pfn` if the whole page lies inside `memorySize`.
    static func pageAddress(_ pfn: UInt64, memorySize: UInt64) -> GuestAddress? {
        let (address, overflow1) = pfn.multipliedReportingOverflow(by: SnapshotFormat.pageSize)
        let (end, overflow2) = address.addingReportingOverflow(SnapshotFormat.pageSize)
        guard !overflow1, !overflow2, end <= memorySize else { return nil }
        return GuestAddress(address)
    }

    /// One page of a decoded payload: its frame, and where its 4 KiB lie in the payload (nil: zero).
    public struct DecodedPage: Sendable, Equatable {
        public var pfn: UInt64
        public var dataOffset: Int?
    }

    /// Validates a payload (structure, ordering, every page inside `memorySize`) and says where
    /// each page's bytes are, without writing anything: for installing the pages some other way
    /// (a lazy restore's `UFFDIO_COPY`).
    public static func decode(_ payload: [UInt8], memorySize: UInt64, sectionOffset: UInt64?) throws -> [DecodedPage] {
        let parsed: Parsed
        do { parsed = try parse(payload) } catch {
            throw SnapshotFormatError.malformedMemorySection(reason: error, offset: sectionOffset)
        }
        var pages: [DecodedPage] = []
        pages.reserveCapacity(parsed.entries.count)
        var dataOffset = parsed.dataStart
        for entry in parsed.entries {
            guard pageAddress(entry.pfn, memorySize: memorySize) != nil else {
                throw SnapshotFormatError.pageOutOfRange(pfn: entry.pfn, memorySize: memorySize)
            }
            if entry.isZero {
                pages.append(DecodedPage(pfn: entry.pfn, dataOffset: nil))
            } else {
                pages.append(DecodedPage(pfn: entry.pfn, dataOffset: dataOffset))
                dataOffset += Int(SnapshotFormat.pageSize)
            }
        }
        return pages
    }

    /// Validates a memory payload (structure, ordering, bounds against `memory.size`)
    /// and applies it: data pages written, zero pages zeroed. Nothing is written
    /// unless the whole payload is valid, so a refused section leaves memory untouched.
    public static func apply(_ payload: [UInt8], to memory: GuestMemory) throws -> (pages: Int, zeroPages: Int) {
        try apply(payload, to: memory, sectionOffset: nil)
    }

    /// Like `apply(_:to:)`, but errors name the section's stream offset.
    public static func apply(_ section: Section, to memory: GuestMemory) throws -> (pages: Int, zeroPages: Int) {
        guard section.type == .memory else {
            throw SnapshotFormatError.writerMisuse("MemorySection.apply was given a \(section.type) section")
        }
        return try apply(section.payload, to: memory, sectionOffset: section.offset)
    }

    static func apply(_ payload: [UInt8], to memory: GuestMemory, sectionOffset: UInt64?) throws -> (pages: Int, zeroPages: Int) {
        try payload.withUnsafeBytes { try apply($0, to: memory, sectionOffset: sectionOffset) }
    }

    /// `apply` over bytes held anywhere (a decrypted chunk, applied without another copy).
    static func apply(_ payload: UnsafeRawBufferPointer, to memory: GuestMemory, sectionOffset: UInt64?) throws -> (pages: Int, zeroPages: Int) {
        let parsed: Parsed
        do {
            parsed = try parse(payload)
        } catch {
            throw SnapshotFormatError.malformedMemorySection(reason: error, offset: sectionOffset)
        }
        // The pages are in the payload already: "reading" a run copies it from there.
        var dataOffset = parsed.dataStart
        return try apply(parsed, readingDataWith: { run in
            // SAFETY: parse checked that the payload holds every data page the table names.
            run.copyMemory(from: UnsafeRawBufferPointer(rebasing: payload[dataOffset ..< dataOffset + run.count]))
            dataOffset += run.count
        }, to: memory)
    }
}
