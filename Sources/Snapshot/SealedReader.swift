#if canImport(Glibc)
import Glibc
#endif
import Crypto
import Foundation
import GuestMemory
import Synchronization
import SystemCalls

/// Bytes read by offset: a sealed file is read from its trailer and index first, then block by block.
public protocol RandomAccessSource: Sendable {
    /// Total length in bytes.
    var size: UInt64 { get }
    /// Exactly `count` bytes at `offset`, or throws (`SealedFileError.truncated` past the end).
    func read(at offset: UInt64, count: Int) throws -> [UInt8]
}

/// A file read with `pread`, keeping its descriptor open while it exists.
public final class FileRandomAccessSource: RandomAccessSource, Sendable {
    public let size: UInt64
    private let file: OwnedFileDescriptor

    public init(_ file: OwnedFileDescriptor) throws {
        var st = stat()
        guard fstat(file.raw, &st) == 0 else { throw SnapshotIOError(operation: "fstat", errno: errno) }
        self.file = file
        size = UInt64(st.st_size)
    }

    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= size else {
            throw SealedFileError.truncated("\(count) bytes at offset \(offset) lie past the end of the \(size)-byte file")
        }
        // Uninitialised: a chunk is 2 MiB, and zero-filling it first would be one more pass.
        return try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            var done = 0
            while done < count {
                let n: Int
                do {
                    n = try retryingOnInterrupt("pread") {
                        pread(file.raw, buffer.baseAddress! + done, count - done, off_t(offset) + off_t(done))
                    }
                } catch let error as SystemCallError {
                    throw SnapshotIOError(operation: error.call, errno: error.errno)
                }
                if n == 0 { throw SealedFileError.truncated("the file ended at offset \(offset + UInt64(done)) while reading") }
                done += n
            }
            initialized = count
        }
    }
}

/// Bytes in memory (tests and the fuzzer).
public struct BufferRandomAccessSource: RandomAccessSource {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var size: UInt64 { UInt64(bytes.count) }
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= size else {
            throw SealedFileError.truncated("\(count) bytes at offset \(offset) lie past the end of the \(size)-byte file")
        }
        return Array(bytes[Int(offset)..<Int(end)])
    }
}

/// Reads a sealed snapshot file (version 2). Opening reads the header and envelope only
/// (`readEnvelope`); with the data key, `init` reads the trailer, the index and the signature
/// and checks that the index accounts for every byte of the file. Then `description()`,
/// `readBody(into:)` (front to back) or `readChunk(containing:)` (one chunk, for a lazy
/// restore) decrypt blocks, each checked against the tag the signed index names.
public final class SealedReader<Source: RandomAccessSource> {
    public let envelope: SealedEnvelope
    /// The signature's bytes as written (the VMM decodes and verifies them).
    public let signature: [UInt8]
    /// What the signature signs: SHA-256 of the domain, file header, envelope and index.
    public let signedDigest: [UInt8]
    /// Every block before the index, in file order.
    public let entries: [SealedIndexEntry]
    private let source: Source
    private let key: SymmetricKey

    /// Reads and checks the file header and envelope; nothing else is trusted or read yet.
    public static func readEnvelope(from source: Source) throws -> (envelope: SealedEnvelope, header: [UInt8], bytes: [UInt8]) {
        guard source.size >= UInt64(SealedFormat.fileHeaderSize) else {
            throw SealedFileError.truncated("the file is \(source.size) bytes, shorter than the \(SealedFormat.fileHeaderSize)-byte header")
        }
        let header = try source.read(at: 0, count: SealedFormat.fileHeaderSize)
        guard Array(header[0..<8]) == SealedFormat.magic else { throw SealedFileError.malformed("it does not start with SVMMSEAL") }
        let version = header.loadLittleEndian(UInt32.self, at: 8)
        guard version == SealedFormat.version else {
            throw SealedFileError.malformed("version \(version); this VMM reads sealed version \(SealedFormat.version)")
        }
        guard header.loadLittleEndian(UInt32.self, at: 12) == 0, header.loadLittleEndian(UInt32.self, at: 20) == 0 else {
            throw SealedFileError.malformed("the header's flags or reserved field is not 0")
        }
        let length = Int(header.loadLittleEndian(UInt32.self, at: 16))
        guard length <= SealedFormat.maxEnvelope else {
            throw SealedFileError.malformed("the envelope claims \(length) bytes, over the limit of \(SealedFormat.maxEnvelope)")
        }
        let bytes = try source.read(at: UInt64(SealedFormat.fileHeaderSize), count: length)
        let envelope: SealedEnvelope
        do { envelope = try StateJSON.decode(SealedEnvelope.self, from: bytes, what: "envelope") } catch {
            throw SealedFileError.malformed("the envelope is not valid: \(error)")
        }
        try envelope.validate()
        return (envelope, header, bytes)
    }

    /// Opens the file with `unwrap`, which finds this host's entry in the envelope and returns
    /// the data key (or throws `notARecipient`). Reads and authenticates the index, and checks
    /// that header, envelope, blocks, index, signature and trailer tile the file exactly.
    public init(source: Source, unwrap: (SealedEnvelope) throws -> SymmetricKey) throws {
        self.source = source
        let (envelope, header, envelopeBytes) = try Self.readEnvelope(from: source)
        self.envelope = envelope
        key = try unwrap(envelope)
        let firstBlock = UInt64(SealedFormat.fileHeaderSize + envelopeBytes.count)

        guard source.size >= firstBlock + UInt64(SealedFormat.trailerSize) else {
            throw SealedFileError.truncated("the file ends before its trailer")
        }
        let trailerOffset = source.size - UInt64(SealedFormat.trailerSize)
        let trailer = try source.read(at: trailerOffset, count: SealedFormat.trailerSize)
        guard Array(trailer[24..<32]) == SealedFormat.trailerMagic else {
            throw SealedFileError.truncated("the file does not end with the SVMMSEND trailer (cut short, or something appended)")
        }
        let indexOffset = trailer.loadLittleEndian(UInt64.self, at: 0)
        let signatureOffset = trailer.loadLittleEndian(UInt64.self, at: 8)
        let signatureLength = Int(trailer.loadLittleEndian(UInt32.self, at: 16))
        guard trailer.loadLittleEndian(UInt32.self, at: 20) == 0 else { throw SealedFileError.malformed("the trailer's reserved field is not 0") }
        guard signatureLength <= SealedFormat.maxSignature,
              signatureOffset + UInt64(signatureLength) == trailerOffset,
              indexOffset >= firstBlock, indexOffset + UInt64(SealedFormat.blockHeaderSize) <= signatureOffset else {
            throw SealedFileError.malformed("the trailer's offsets (index \(indexOffset), signature \(signatureOffset)+\(signatureLength)) do not fit the \(source.size)-byte file")
        }
        signature = try source.read(at: signatureOffset, count: signatureLength)

        // The index block: its header must say index and end exactly where the signature starts.
        let indexHeader = try source.read(at: indexOffset, count: SealedFormat.blockHeaderSize)
        let indexLength = indexHeader.loadLittleEndian(UInt64.self, at: 8)
        guard indexHeader.loadLittleEndian(UInt32.self, at: 0) == SealedBlockKind.index.rawValue,
              indexLength >= UInt64(SealedFormat.tagSize), indexLength - UInt64(SealedFormat.tagSize) <= SealedBlockKind.index.plaintextLimit,
              indexOffset + UInt64(SealedFormat.blockHeaderSize) + indexLength == signatureOffset else {
            throw SealedFileError.malformed("the block at the index offset \(indexOffset) is not an index that ends where the signature starts")
        }
        let sealedIndex = try source.read(at: indexOffset + UInt64(SealedFormat.blockHeaderSize), count: Int(indexLength))
        let index = Array(try Self.open(sealedIndex, header: indexHeader, key: key, fileID: envelope.fileID,
                                        ordinal: indexHeader.loadLittleEndian(UInt32.self, at: 4), what: "the index"))
        entries = try SealedIndex.decode(index)
        guard indexHeader.loadLittleEndian(UInt32.self, at: 4) == UInt32(entries.count) else {
            throw SealedFileError.malformed("the index block's ordinal is not the number of blocks before it")
        }
        try Self.checkTiling(entries, firstBlock: firstBlock, indexOffset: indexOffset)
        signedDigest = SealedFormat.signedDigest(fileHeader: header, envelope: envelopeBytes, index: index)
    }

    /// The blocks follow one another from the envelope to the index with no gap, in ordinal
    /// order; description first, vcpu and devices once each; memory chunks in increasing,
    /// non-overlapping page order.
    private static func checkTiling(_ entries: [SealedIndexEntry], firstBlock: UInt64, indexOffset: UInt64) throws {
        var next = firstBlock
        var lastPage: UInt64?
        var seen: Set<UInt32> = []
        for (i, entry) in entries.enumerated() {
            guard entry.ordinal == UInt32(i), entry.offset == next else {
                throw SealedFileError.malformed("index entry \(i) is at offset \(entry.offset) with ordinal \(entry.ordinal); expected \(next) and \(i)")
            }
            guard entry.length >= UInt64(SealedFormat.tagSize),
                  entry.length - UInt64(SealedFormat.tagSize) <= entry.kind.plaintextLimit else {
                throw SealedFileError.malformed("index entry \(i): a \(entry.kind) block of \(entry.length) bytes is outside its limits")
            }
            if i == 0, entry.kind != .description { throw SealedFileError.malformed("the first block is \(entry.kind), not the description") }
            if entry.kind == .memory {
                guard entry.firstPage <= entry.lastPage, lastPage.map({ entry.firstPage > $0 }) ?? true else {
                    throw SealedFileError.malformed("index entry \(i): memory pages \(entry.firstPage)...\(entry.lastPage) are out of order")
                }
                lastPage = entry.lastPage
            } else {
                guard seen.insert(entry.kind.rawValue).inserted else { throw SealedFileError.malformed("a second \(entry.kind) block") }
            }
            next = entry.offset + UInt64(SealedFormat.blockHeaderSize) + entry.length
        }
        guard next == indexOffset else {
            throw SealedFileError.malformed("the blocks end at \(next) but the index starts at \(indexOffset)")
        }
        guard seen.contains(SealedBlockKind.vcpu.rawValue), seen.contains(SealedBlockKind.devices.rawValue) else {
            throw SealedFileError.malformed("the file has no vcpu or no devices block")
        }
    }

    /// Decrypts one block and checks its tag is the one the index names.
    public func readBlock(_ entry: SealedIndexEntry) throws -> [UInt8] {
        Array(try readBlockData(entry))
    }

    /// `readBlock`, as the cipher returns it (no copy into an array).
    func readBlockData(_ entry: SealedIndexEntry) throws -> Data {
        let header = try source.read(at: entry.offset, count: SealedFormat.blockHeaderSize)
        guard header == SealedFormat.blockHeader(kind: entry.kind, ordinal: entry.ordinal, length: entry.length) else {
            throw SealedFileError.malformed("the block header at offset \(entry.offset) differs from the index")
        }
        let sealed = try source.read(at: entry.offset + UInt64(SealedFormat.blockHeaderSize), count: Int(entry.length))
        guard Array(sealed.suffix(SealedFormat.tagSize)) == entry.tag else {
            throw SealedFileError.authenticationFailed("the \(entry.kind) block \(entry.ordinal) is not the one the signed index names")
        }
        return try Self.open(sealed, header: header, key: key, fileID: envelope.fileID, ordinal: entry.ordinal,
                             what: "\(entry.kind) block \(entry.ordinal)")
    }

    private static func open(_ sealed: [UInt8], header: [UInt8], key: SymmetricKey, fileID: Data, ordinal: UInt32,
                             what: String) throws -> Data {
        let split = sealed.count - SealedFormat.tagSize
        do {
            let box = try AES.GCM.SealedBox(nonce: SealedFormat.nonce(ordinal: ordinal),
                                            ciphertext: sealed[0..<split], tag: sealed[split...])
            return try AES.GCM.open(box, using: key, authenticating: SealedFormat.associatedData(fileID: fileID, header: header))
        } catch {
            throw SealedFileError.authenticationFailed(what)
        }
    }

    /// The description block's plaintext (the machine section's JSON).
    public func description() throws -> [UInt8] { try readBlock(entries[0]) }

    /// The memory chunk that holds page frame `pfn`, if any (a page in no chunk is zero).
    public func chunk(containing pfn: UInt64) -> SealedIndexEntry? {
        entries.first { $0.kind == .memory && $0.firstPage <= pfn && pfn <= $0.lastPage }
    }

    /// The memory chunks, in page order (what a lazy restore fetches one at a time).
    public var memoryChunks: [SealedIndexEntry] { entries.filter { $0.kind == .memory } }

    /// Decrypts and checks one memory chunk without writing it anywhere: its plaintext payload and
    /// where each page lies in it. Nothing of a chunk that fails is returned.
    public func openChunk(_ entry: SealedIndexEntry, memorySize: UInt64) throws -> (payload: [UInt8], pages: [MemorySection.DecodedPage]) {
        guard entry.kind == .memory else { throw SnapshotFormatError.writerMisuse("openChunk was given a \(entry.kind) block") }
        let payload = try readBlock(entry)
        let pages = try MemorySection.decode(payload, memorySize: memorySize, sectionOffset: entry.offset)
        guard pages.first?.pfn == entry.firstPage, pages.last?.pfn == entry.lastPage else {
            throw SealedFileError.malformed("memory block \(entry.ordinal) holds other pages than its index entry says")
        }
        return (payload, pages)
    }

    /// Decrypts one memory chunk and applies it to `memory`.
    @discardableResult
    public func readChunk(_ entry: SealedIndexEntry, into memory: GuestMemory) throws -> (pages: Int, zeroPages: Int) {
        guard entry.kind == .memory else { throw SnapshotFormatError.writerMisuse("readChunk was given a \(entry.kind) block") }
        let payload = try readBlockData(entry)
        return try payload.withUnsafeBytes { raw in
            let parsed: MemorySection.Parsed
            do throws(MemorySectionDefect) { parsed = try MemorySection.parse(raw) } catch {
                throw SnapshotFormatError.malformedMemorySection(reason: error, offset: entry.offset)
            }
            guard parsed.entries.first?.pfn == entry.firstPage, parsed.entries.last?.pfn == entry.lastPage else {
                throw SealedFileError.malformed("memory block \(entry.ordinal) holds other pages than its index entry says")
            }
            return try MemorySection.apply(raw, to: memory, sectionOffset: entry.offset)
        }
    }

    /// Reads every block front to back: memory chunks applied to `memory`, vcpu and devices
    /// returned with the signature and what it signs (the caller verifies the signature
    /// before applying any vCPU state).
    public func readBody(into memory: GuestMemory) throws -> StateBody {
        var body = StateBody(vcpus: [], devices: [], signature: signature, signedDigest: signedDigest)
        var chunks: [SealedIndexEntry] = []
        for entry in entries.dropFirst() {
            switch entry.kind {
            case .memory: chunks.append(entry)
            case .vcpu: body.vcpus = try readBlock(entry)
            case .devices: body.devices = try readBlock(entry)
            case .description, .index:
                throw SealedFileError.malformed("a \(entry.kind) block at ordinal \(entry.ordinal)")
            }
        }
        // Chunks hold disjoint pages, and each is checked whole before any of its pages is
        // written, so two workers read, decrypt and apply them side by side: decryption on one
        // core overlaps the other's reads and writes. A failure anywhere fails the restore.
        let memoryChunks = chunks
        let workers = min(2, max(1, memoryChunks.count))
        let results = Mutex<(pages: Int, zeroPages: Int, error: (any Error)?)>((0, 0, nil))
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            for index in stride(from: worker, to: memoryChunks.count, by: workers) {
                if results.withLock({ $0.error != nil }) { return }
                do {
                    let applied = try readChunk(memoryChunks[index], into: memory)
                    results.withLock { $0.pages += applied.pages; $0.zeroPages += applied.zeroPages }
                } catch {
                    results.withLock { if $0.error == nil { $0.error = error } }
                    return
                }
            }
        }
        let outcome = results.withLock { $0 }
        if let error = outcome.error { throw error }
        body.pages = outcome.pages
        body.zeroPages = outcome.zeroPages
        body.memorySections = memoryChunks.count
        return body
    }
}

// @unchecked: every stored property is a `let` set in `init`, and reading goes through the
// source's offset reads (pread), which need no shared cursor: readers on two threads share nothing mutable.
extension SealedReader: @unchecked Sendable {}
