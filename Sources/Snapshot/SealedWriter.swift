import Crypto
import Foundation
import GuestMemory

/// Writes a sealed snapshot file (version 2, `SealedFormat`): every block is sealed with the
/// file's data key as it is written, one memory chunk (up to 512 pages) at a time, through
/// one reused plaintext buffer; nothing of the guest reaches the sink in clear.
public struct SealedWriter<Sink: ByteSink> {
    public var sink: Sink
    /// Bytes handed to the sink so far.
    public private(set) var bytesWritten: UInt64 = 0

    private let key: SymmetricKey
    private let fileID: Data
    private let fileHeader: [UInt8]
    private let envelopeBytes: [UInt8]
    private var entries: [SealedIndexEntry] = []
    private var finished = false
    private var broken = false
    /// One memory chunk's plaintext, reused: the page table, then the pages' data.
    private var chunk: [UInt8] = []

    /// Writes the file header and the envelope. `dataKey` must be fresh for this file (block
    /// nonces are block ordinals) and be the key the envelope wraps.
    public init(sink: Sink, dataKey: SymmetricKey, envelope: SealedEnvelope) throws {
        guard dataKey.bitCount == 256 else { throw SnapshotFormatError.writerMisuse("a sealed file's data key must be 256 bits") }
        self.sink = sink
        key = dataKey
        fileID = envelope.fileID
        envelopeBytes = try StateJSON.encode(envelope)
        guard envelopeBytes.count <= SealedFormat.maxEnvelope else {
            throw SnapshotFormatError.writerMisuse("the envelope is \(envelopeBytes.count) bytes, over \(SealedFormat.maxEnvelope)")
        }
        try envelope.validate()
        fileHeader = SealedFormat.fileHeader(envelopeLength: envelopeBytes.count)
        try emit(fileHeader)
        try emit(envelopeBytes)
    }

    /// A fresh data key and file id for a new file.
    public static func freshKey() -> (key: SymmetricKey, fileID: Data) {
        (SymmetricKey(size: .bits256), SymmetricKey(size: .bits128).withUnsafeBytes { Data($0) })
    }

    /// Seals one description, vcpu or devices block. The description must come first.
    public mutating func writeBlock(_ kind: SealedBlockKind, plaintext: [UInt8]) throws {
        guard kind != .memory, kind != .index else {
            throw SnapshotFormatError.writerMisuse("\(kind) blocks are written by writeMemoryPages and finish")
        }
        try checkOrder(kind)
        guard UInt64(plaintext.count) <= kind.plaintextLimit else {
            throw SnapshotFormatError.writerMisuse("the \(kind) block is \(plaintext.count) bytes, over its limit of \(kind.plaintextLimit)")
        }
        try plaintext.withUnsafeBytes { try seal(kind, $0) }
    }

    /// Seals the pages `pageFrames` (strictly increasing) of `memory` in chunks of up to 512:
    /// all-zero pages as markers, the others' data copied once into the chunk buffer.
    @discardableResult
    public mutating func writeMemoryPages(_ pageFrames: [UInt64], from memory: GuestMemory) throws -> MemoryWriteStats {
        try checkOrder(.memory)
        let start = bytesWritten
        var stats = MemoryWriteStats()
        var previous: UInt64?
        let pageSize = Int(SnapshotFormat.pageSize)
        var chunkStart = 0
        while chunkStart < pageFrames.count {
            let chunkEnd = min(chunkStart + Int(SnapshotFormat.maxPagesPerSection), pageFrames.count)
            let count = chunkEnd - chunkStart
            var table: [UInt8] = []
            table.reserveCapacity(8 + 8 * count)
            table.appendLittleEndian(UInt32(count))
            table.appendLittleEndian(UInt32(0))
            var data: [GuestAddress] = []
            for pfn in pageFrames[chunkStart..<chunkEnd] {
                if let previous, pfn <= previous {
                    throw SnapshotFormatError.writerMisuse("page frames must be strictly increasing: 0x\(hex(pfn)) follows 0x\(hex(previous))")
                }
                previous = pfn
                guard let address = MemorySection.pageAddress(pfn, memorySize: memory.size) else {
                    throw SnapshotFormatError.pageOutOfRange(pfn: pfn, memorySize: memory.size)
                }
                if try memory.isZeroPage(address) {
                    table.appendLittleEndian(pfn | MemorySection.zeroPageFlag)
                    stats.zeroPages += 1
                } else {
                    table.appendLittleEndian(pfn)
                    data.append(address)
                }
            }
            chunk.removeAll(keepingCapacity: true)
            chunk.append(contentsOf: table)
            for address in data {
                try memory.withBytes(at: address, count: pageSize) { chunk.append(contentsOf: $0) }
            }
            try chunk.withUnsafeBytes { plaintext in
                try seal(.memory, plaintext, firstPage: pageFrames[chunkStart], lastPage: pageFrames[chunkEnd - 1])
            }
            stats.pages += count
            stats.sections += 1
            chunkStart = chunkEnd
        }
        stats.bytes = bytesWritten - start
        return stats
    }

    /// Seals the index, writes the signature `sign` makes over the signed digest (header,
    /// envelope, index), and the trailer. Nothing may be written afterwards.
    public mutating func finish(sign: ([UInt8]) throws -> [UInt8]) throws {
        try checkUsable()
        guard entries.contains(where: { $0.kind == .vcpu }), entries.contains(where: { $0.kind == .devices }) else {
            throw SnapshotFormatError.writerMisuse("a sealed file needs its vcpu and devices blocks before the index")
        }
        let index = SealedIndex.encode(entries)
        let indexOffset = bytesWritten
        try index.withUnsafeBytes { try seal(.index, $0) }
        let signature = try sign(SealedFormat.signedDigest(fileHeader: fileHeader, envelope: envelopeBytes, index: index))
        guard signature.count <= SealedFormat.maxSignature else {
            throw SnapshotFormatError.writerMisuse("the signature is \(signature.count) bytes, over \(SealedFormat.maxSignature)")
        }
        let signatureOffset = bytesWritten
        try emit(signature)
        try emit(SealedFormat.trailer(indexOffset: indexOffset, signatureOffset: signatureOffset, signatureLength: signature.count))
        finished = true
    }

    // MARK: - Blocks

    private func checkUsable() throws {
        if finished { throw SnapshotFormatError.writerMisuse("the file is finished; nothing may follow its trailer") }
        if broken { throw SnapshotFormatError.writerMisuse("an earlier write failed; the file is incomplete") }
    }

    private func checkOrder(_ kind: SealedBlockKind) throws {
        try checkUsable()
        if entries.isEmpty, kind != .description {
            throw SnapshotFormatError.writerMisuse("the description block comes first")
        }
        if !entries.isEmpty, kind == .description || entries.contains(where: { $0.kind == kind && kind != .memory }) {
            throw SnapshotFormatError.writerMisuse("a second \(kind) block")
        }
    }

    private mutating func seal(_ kind: SealedBlockKind, _ plaintext: UnsafeRawBufferPointer,
                               firstPage: UInt64 = 0, lastPage: UInt64 = 0) throws {
        let ordinal = UInt32(entries.count)
        let length = UInt64(plaintext.count + SealedFormat.tagSize)
        let header = SealedFormat.blockHeader(kind: kind, ordinal: ordinal, length: length)
        let box = try AES.GCM.seal(plaintext, using: key, nonce: SealedFormat.nonce(ordinal: ordinal),
                                   authenticating: SealedFormat.associatedData(fileID: fileID, header: header))
        let offset = bytesWritten
        try emit(header)
        try box.ciphertext.withUnsafeBytes { try emit($0) }
        let tag = Array(box.tag)
        try emit(tag)
        if kind != .index {
            entries.append(SealedIndexEntry(kind: kind, ordinal: ordinal, offset: offset, length: length,
                                            firstPage: firstPage, lastPage: lastPage, tag: tag))
        }
    }

    private mutating func emit(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try emit($0) }
    }

    private mutating func emit(_ bytes: UnsafeRawBufferPointer) throws {
        do {
            try sink.write(bytes)
        } catch {
            broken = true
            throw error
        }
        bytesWritten += UInt64(bytes.count)
    }
}
