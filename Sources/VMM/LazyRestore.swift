import Foundation
import GuestMemory
import MachineCore
import PageFaults
import Snapshot

/// The memory chunks of a sealed snapshot file as a `PageSource`: a unit is one chunk, found by
/// page number through the signed index, read, checked against the index's tag and decrypted
/// only when a fault (or the filler) asks for it.
// @unchecked: the reader is immutable after init and reads with pread (safe from several threads).
final class SealedPageSource: PageSource, @unchecked Sendable {
    private let reader: SealedReader<FileRandomAccessSource>
    private let chunks: [SealedIndexEntry]
    private let memorySize: UInt64

    init(reader: SealedReader<FileRandomAccessSource>, memorySize: UInt64) {
        self.reader = reader
        chunks = reader.memoryChunks
        self.memorySize = memorySize
    }

    var unitCount: Int { chunks.count }

    /// Binary search: chunks are in increasing, non-overlapping page order (the reader checked).
    func unit(containing pfn: UInt64) -> Int? {
        var low = 0, high = chunks.count
        while low < high {
            let mid = (low + high) / 2
            if chunks[mid].lastPage < pfn { low = mid + 1 } else { high = mid }
        }
        guard low < chunks.count, chunks[low].firstPage <= pfn else { return nil }
        return low
    }

    func fetch(unit: Int) throws -> PageBatch {
        let (payload, pages) = try reader.openChunk(chunks[unit], memorySize: memorySize)
        var batch = PageBatch(bytes: payload)
        for page in pages {
            if let offset = page.dataOffset { batch.appendData(page: page.pfn, offset: offset) } else { batch.appendZero(page: page.pfn) }
        }
        return batch
    }
}

extension SnapshotFile.Opened {
    /// A lazy restore's reading: the vcpu and devices blocks (with the signature and what it
    /// signs, for the caller to verify before anything runs), and the memory as a page source
    /// to be read on fault. Only sealed files: a version 1 stream has no index, so finding a page
    /// would mean reading the file through, which is what an eager restore does.
    func lazyBody(memorySize: UInt64) throws -> (StateBody, SealedPageSource) {
        guard let sealed = sealedReader else {
            throw MachineError.io("--lazy needs a sealed snapshot; '\(path)' is unsealed (version 1), which has no index to find a page by: restore it without --lazy")
        }
        var body = StateBody(vcpus: [], devices: [], signature: sealed.signature, signedDigest: sealed.signedDigest)
        for entry in sealed.entries where entry.kind == .vcpu || entry.kind == .devices {
            if entry.kind == .vcpu { body.vcpus = try sealed.readBlock(entry) } else { body.devices = try sealed.readBlock(entry) }
        }
        body.memorySections = sealed.memoryChunks.count
        return (body, SealedPageSource(reader: sealed, memorySize: memorySize))
    }
}
