import Crypto
import GuestMemory

/// What `StreamWriter.writeMemoryPages` wrote.
public struct MemoryWriteStats: Sendable, Equatable {
    /// Page entries written, zero pages included.
    public var pages: Int
    /// Entries written as zero-page markers, without data.
    public var zeroPages: Int
    /// Stream bytes written, framing and checksums included.
    public var bytes: UInt64
    /// Memory sections written.
    public var sections: Int

    public init(pages: Int = 0, zeroPages: Int = 0, bytes: UInt64 = 0, sections: Int = 0) {
        self.pages = pages
        self.zeroPages = zeroPages
        self.bytes = bytes
        self.sections = sections
    }
}

/// Writes a version 1 snapshot stream: header, sections, end section.
///
/// Every byte goes through one path that feeds both the section checksum and
/// the running stream digest, so what is hashed is exactly what is written.
public struct StreamWriter<Sink: ByteSink> {
    public var sink: Sink
    /// Bytes handed to the sink so far.
    public private(set) var bytesWritten: UInt64 = 0

    private var streamHasher = SHA256()
    private var sectionHasher = SHA256()
    private var finished = false
    // A failed sink write may leave a partial section behind; nothing valid can follow.
    private var broken = false

    /// How each section is protected (named in the stream header).
    public let integrity: SectionIntegrity

    /// Writes the stream header.
    public init(sink: Sink, integrity: SectionIntegrity = .sha256Checksums) throws {
        self.sink = sink
        self.integrity = integrity
        var header = SnapshotFormat.magic
        header.appendLittleEndian(SnapshotFormat.version)
        header.appendLittleEndian(integrity.headerFlags)
        try header.withUnsafeBytes { try emit($0) }
    }

    /// SHA-256 of every stream byte written so far (what a signature section signs); empty for
    /// a stream without a digest (inside an authenticated channel).
    public var digestSoFar: [UInt8] { integrity.hasStreamDigest ? streamHasher.finalize().withUnsafeBytes { Array($0) } : [] }

    /// Writes one section with `payload`. The end section is written by `finish()`;
    /// memory payloads are validated so the writer never produces a stream the reader refuses.
    public mutating func writeSection(_ type: SectionType, payload: [UInt8]) throws {
        try checkUsable()
        guard type != .end else {
            throw SnapshotFormatError.writerMisuse("the end section is written by finish(), not writeSection")
        }
        let length = UInt64(payload.count)
        guard length <= type.payloadLimit else {
            throw SnapshotFormatError.sectionTooLarge(type: type, length: length, limit: type.payloadLimit, offset: bytesWritten)
        }
        if type == .memory {
            do {
                _ = try MemorySection.parse(payload)
            } catch {
                throw SnapshotFormatError.malformedMemorySection(reason: error, offset: bytesWritten)
            }
        }
        try beginSection(type, length: length)
        try payload.withUnsafeBytes { try emit($0) }
        try endSection()
    }

    /// Writes one or more memory sections (at most 512 entries each) for
    /// `pageFrames`, which must be strictly increasing. All-zero pages become
    /// markers without data. Every frame is checked against `memory.size`
    /// before anything is written.
    ///
    /// With checksums, page data passes through one reused 4 KiB buffer: the guest may be
    /// running (pre-copy migration), and hashing and writing one stable copy keeps the
    /// checksum consistent with the bytes sent. Without (an authenticated channel) the sink
    /// takes the page from guest memory directly; a page the guest changes meanwhile is in
    /// the next round's dirty log either way.
    @discardableResult
    public mutating func writeMemoryPages(_ pageFrames: [UInt64], from memory: GuestMemory) throws -> MemoryWriteStats {
        try checkUsable()
        var addresses: [GuestAddress] = []
        addresses.reserveCapacity(pageFrames.count)
        for (index, pfn) in pageFrames.enumerated() {
            if index > 0, pfn <= pageFrames[index - 1] {
                throw SnapshotFormatError.writerMisuse("page frames must be strictly increasing: 0x\(hex(pfn)) follows 0x\(hex(pageFrames[index - 1]))")
            }
            guard let address = MemorySection.pageAddress(pfn, memorySize: memory.size) else {
                throw SnapshotFormatError.pageOutOfRange(pfn: pfn, memorySize: memory.size)
            }
            addresses.append(address)
        }

        let start = bytesWritten
        var stats = MemoryWriteStats()
        var page = [UInt8](repeating: 0, count: Int(SnapshotFormat.pageSize))
        var chunkStart = 0
        while chunkStart < pageFrames.count {
            let chunkEnd = min(chunkStart + Int(SnapshotFormat.maxPagesPerSection), pageFrames.count)
            // Classify first: the section length must be known before its header is written.
            var table: [UInt8] = []
            table.reserveCapacity(8 + 8 * (chunkEnd - chunkStart))
            table.appendLittleEndian(UInt32(chunkEnd - chunkStart))
            table.appendLittleEndian(UInt32(0))
            var dataPages: [GuestAddress] = []
            for i in chunkStart..<chunkEnd {
                if try memory.isZeroPage(addresses[i]) {
                    table.appendLittleEndian(pageFrames[i] | MemorySection.zeroPageFlag)
                    stats.zeroPages += 1
                } else {
                    table.appendLittleEndian(pageFrames[i])
                    dataPages.append(addresses[i])
                }
            }
            let length = UInt64(table.count) + UInt64(dataPages.count) * SnapshotFormat.pageSize
            try beginSection(.memory, length: length)
            try table.withUnsafeBytes { try emit($0) }
            for address in dataPages {
                if integrity == .channelAuthenticated {
                    // Nothing hashes the page: it goes from guest memory to the sink in one copy.
                    try memory.withBytes(at: address, count: page.count) { try emit($0) }
                    continue
                }
                try memory.withBytes(at: address, count: page.count) { guest in
                    page.withUnsafeMutableBytes { $0.copyMemory(from: guest) }
                }
                try page.withUnsafeBytes { try emit($0) }
            }
            try endSection()
            stats.pages += chunkEnd - chunkStart
            stats.sections += 1
            chunkStart = chunkEnd
        }
        stats.bytes = bytesWritten - start
        return stats
    }

    /// Writes the end section: the SHA-256 of every byte before its header.
    /// Nothing may be written afterwards.
    public mutating func finish() throws {
        try checkUsable()
        let digest = integrity.hasStreamDigest ? streamHasher.finalize().withUnsafeBytes { Array($0) } : []
        finished = true
        sectionHasher = SHA256()
        let header = encodeSectionHeader(type: SectionType.end.rawValue, flags: 0, length: UInt64(digest.count))
        try header.withUnsafeBytes { try emit($0, hashStream: false) }
        try digest.withUnsafeBytes { try emit($0, hashStream: false) }
        guard integrity.trailerSize > 0 else { return }
        let checksum = sectionHasher.finalize().withUnsafeBytes { Array($0) }
        try checksum.withUnsafeBytes { try emit($0, hashSection: false, hashStream: false) }
    }

    // MARK: - Framing

    private func checkUsable() throws {
        if finished { throw SnapshotFormatError.writerMisuse("the end section was already written; nothing may follow it") }
        if broken { throw SnapshotFormatError.writerMisuse("an earlier write failed; the stream is incomplete") }
    }

    private mutating func beginSection(_ type: SectionType, length: UInt64) throws {
        sectionHasher = SHA256()
        let header = encodeSectionHeader(type: type.rawValue, flags: 0, length: length)
        try header.withUnsafeBytes { try emit($0) }
    }

    private mutating func endSection() throws {
        guard integrity.trailerSize > 0 else { return }
        let checksum = sectionHasher.finalize().withUnsafeBytes { Array($0) }
        try checksum.withUnsafeBytes { try emit($0, hashSection: false) }
    }

    private mutating func emit(_ bytes: UnsafeRawBufferPointer, hashSection: Bool = true, hashStream: Bool = true) throws {
        if hashSection && integrity.trailerSize > 0 { sectionHasher.update(bufferPointer: bytes) }
        if hashStream && integrity.hasStreamDigest { streamHasher.update(bufferPointer: bytes) }
        do {
            try sink.write(bytes)
        } catch {
            broken = true
            throw error
        }
        bytesWritten += UInt64(bytes.count)
    }
}
