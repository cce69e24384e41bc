import Crypto
import Foundation
import GuestMemory
import Testing
@testable import Snapshot

/// A host's keys as a test holds them: the private key stands in for the Billboard store.
private struct TestHost {
    let name: String
    let key = Curve25519.KeyAgreement.PrivateKey()

    /// The unwrap a VMM on this host would do.
    func unwrap(_ envelope: SealedEnvelope) throws -> SymmetricKey {
        try envelope.dataKey(thisHost: name, agreementKey: key.publicKey) { encapsulated, wrapped, info, aad in
            var recipient = try HPKE.Recipient(privateKey: key, ciphersuite: SealedFormat.keyWrapSuite, info: info,
                                               encapsulatedKey: encapsulated)
            return try recipient.open(wrapped, authenticating: aad)
        }
    }
}

private let canary = Array("CANARY-7f3e9a1c5b2d4e6f8091".utf8)
private let describedJSON = Array(#"{"commandLine":"secret=CANARY-7f3e9a1c5b2d4e6f8091","memoryBytes":4194304}"#.utf8)

/// A sealed file of a 4 MiB guest: pages 0..<700 written (two chunks: 512 + 188) with the
/// canary in page 3, zero pages among them, sealed for `hosts`. Returns the bytes and what was signed.
private func sealedFile(for hosts: [TestHost], memory: GuestMemory) throws -> (bytes: [UInt8], signed: [UInt8]) {
    try fillPages(memory, Array(0..<700).filter { $0 % 7 != 0 })
    try memory.write(canary, at: GuestAddress(3 * 4096 + 100))
    let (key, fileID) = SealedWriter<BufferSink>.freshKey()
    let envelope = try SealedEnvelope.seal(dataKey: key, fileID: fileID, writer: hosts[0].name,
                                           for: hosts.map { ($0.name, $0.key.publicKey) })
    var writer = try SealedWriter(sink: BufferSink(), dataKey: key, envelope: envelope)
    try writer.writeBlock(.description, plaintext: describedJSON)
    let stats = try writer.writeMemoryPages(Array(0..<700), from: memory)
    #expect(stats.pages == 700 && stats.zeroPages == 100 && stats.sections == 2)
    try writer.writeBlock(.vcpu, plaintext: vcpuJSON)
    try writer.writeBlock(.devices, plaintext: devicesJSON)
    var signed: [UInt8] = []
    try writer.finish { digest in signed = digest; return Array("signature-bytes".utf8) }
    return (writer.sink.bytes, signed)
}

private func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
    guard haystack.count >= needle.count else { return false }
    return (0...(haystack.count - needle.count)).contains { i in haystack[i..<(i + needle.count)].elementsEqual(needle) }
}

@Suite("Sealed snapshot files (version 2)")
struct SealedFileTests {
    @Test("a sealed file reads back whole on every host it is sealed for, and no guest byte is in it in clear")
    func roundTrip() throws {
        let a = TestHost(name: "a"), b = TestHost(name: "b")
        let memory = try GuestMemory(size: 4 << 20)
        let (bytes, signed) = try sealedFile(for: [a, b], memory: memory)
        #expect(!contains(bytes, canary), "the canary from guest memory and the command line is in the file")
        #expect(!contains(bytes, Array("secret=".utf8)))
        for host in [a, b] {
            let reader = try SealedReader(source: BufferRandomAccessSource(bytes), unwrap: host.unwrap)
            #expect(try reader.description() == describedJSON)
            let target = try GuestMemory(size: 4 << 20)
            let body = try reader.readBody(into: target)
            #expect(body.vcpus == vcpuJSON && body.devices == devicesJSON)
            #expect(body.signature == Array("signature-bytes".utf8))
            #expect(body.signedDigest == signed)
            #expect(body.pages == 700 && body.zeroPages == 100 && body.memorySections == 2)
            #expect(try target.read(at: GuestAddress(0), count: 4 << 20) == memory.read(at: GuestAddress(0), count: 4 << 20))
        }
    }

    @Test("a host the file is not sealed for is refused with the hosts it is sealed for named")
    func otherHostRefused() throws {
        let a = TestHost(name: "a"), c = TestHost(name: "c")
        let (bytes, _) = try sealedFile(for: [a], memory: try GuestMemory(size: 4 << 20))
        #expect(throws: SealedFileError.notARecipient(thisHost: "c", recipients: ["a"])) {
            try SealedReader(source: BufferRandomAccessSource(bytes), unwrap: c.unwrap)
        }
        // Claiming another host's entry (its public key, but not its private key) opens nothing.
        let impostor = { (envelope: SealedEnvelope) throws -> SymmetricKey in
            try envelope.dataKey(thisHost: "c", agreementKey: a.key.publicKey) { encapsulated, wrapped, info, aad in
                var recipient = try HPKE.Recipient(privateKey: c.key, ciphersuite: SealedFormat.keyWrapSuite, info: info,
                                                   encapsulatedKey: encapsulated)
                return try recipient.open(wrapped, authenticating: aad)
            }
        }
        #expect(throws: SealedFileError.self) { try SealedReader(source: BufferRandomAccessSource(bytes), unwrap: impostor) }
    }

    @Test("one flipped bit anywhere is refused by the reader, or changes what the signature check sees")
    func everyRegionIsAuthenticated() throws {
        let a = TestHost(name: "a")
        let (bytes, signed) = try sealedFile(for: [a], memory: try GuestMemory(size: 4 << 20))
        let reader = try SealedReader(source: BufferRandomAccessSource(bytes), unwrap: a.unwrap)
        // Every byte outside page data, and every 997th byte inside it.
        let chunkData = reader.entries.filter { $0.kind == .memory }.map { Int($0.offset) + 64..<Int($0.offset + 16 + $0.length) - 16 }
        var positions: [Int] = []
        for i in 0..<bytes.count {
            let inData = chunkData.contains { $0.contains(i) }
            if !inData || i % 997 == 0 { positions.append(i) }
        }
        var unnoticed: [Int] = []
        var leftToTheSignature = 0
        for position in positions {
            var damaged = bytes
            damaged[position] ^= 0x10
            do {
                let r = try SealedReader(source: BufferRandomAccessSource(damaged), unwrap: a.unwrap)
                _ = try r.description()
                let body = try r.readBody(into: try GuestMemory(size: 4 << 20))
                // Read whole: then the signature's bytes or what it signs must differ, so that
                // the VMM's check of the writer host's signature refuses the file.
                if body.signature == Array("signature-bytes".utf8) && body.signedDigest == signed {
                    unnoticed.append(position)
                } else {
                    leftToTheSignature += 1
                }
            } catch is SealedFileError {
            } catch is SnapshotFormatError {
            }
        }
        #expect(unnoticed.isEmpty, "flips at \(unnoticed.prefix(20)) went unnoticed")
        // Only the signature bytes and the envelope's plaintext (both outside the cipher) are left to it.
        let envelopeEnd = SealedFormat.fileHeaderSize + Int(bytes.loadLittleEndian(UInt32.self, at: 16))
        #expect(leftToTheSignature <= (envelopeEnd - SealedFormat.fileHeaderSize) + SealedFormat.maxSignature)
    }

    @Test("a file cut short anywhere, or with bytes appended, is refused")
    func truncatedOrExtended() throws {
        let a = TestHost(name: "a")
        let (bytes, _) = try sealedFile(for: [a], memory: try GuestMemory(size: 4 << 20))
        for length in [0, 7, 24, 100, bytes.count / 2, bytes.count - 33, bytes.count - 1] {
            #expect(throws: SealedFileError.self, "cut to \(length)") {
                let r = try SealedReader(source: BufferRandomAccessSource(Array(bytes.prefix(length))), unwrap: a.unwrap)
                _ = try r.readBody(into: try GuestMemory(size: 4 << 20))
            }
        }
        #expect(throws: SealedFileError.self) {
            try SealedReader(source: BufferRandomAccessSource(bytes + [0]), unwrap: a.unwrap)
        }
    }

    @Test("two memory chunks swapped, or a block copied from another file of the same host, are refused")
    func blocksAreBoundToTheirPlaceAndFile() throws {
        let a = TestHost(name: "a")
        let (bytes, _) = try sealedFile(for: [a], memory: try GuestMemory(size: 4 << 20))
        let (other, _) = try sealedFile(for: [a], memory: try GuestMemory(size: 4 << 20))
        let reader = try SealedReader(source: BufferRandomAccessSource(bytes), unwrap: a.unwrap)
        // The vcpu block of another file, same length, same place: sealed with another key.
        let vcpu = try #require(reader.entries.first { $0.kind == .vcpu })
        var spliced = bytes
        let range = Int(vcpu.offset)..<Int(vcpu.offset + 16 + vcpu.length)
        spliced.replaceSubrange(range, with: other[range])
        #expect(throws: SealedFileError.self) {
            let r = try SealedReader(source: BufferRandomAccessSource(spliced), unwrap: a.unwrap)
            _ = try r.readBody(into: try GuestMemory(size: 4 << 20))
        }
        // The description and vcpu blocks' ciphertexts exchanged is caught by the tags the index names.
        let description = reader.entries[0]
        var swapped = bytes
        let d = Int(description.offset + 16)..<Int(description.offset + 16 + description.length)
        let v = Int(vcpu.offset + 16)..<Int(vcpu.offset + 16 + min(vcpu.length, description.length))
        swapped.replaceSubrange(d.lowerBound..<(d.lowerBound + v.count), with: bytes[v])
        #expect(throws: SealedFileError.self) {
            let r = try SealedReader(source: BufferRandomAccessSource(swapped), unwrap: a.unwrap)
            _ = try r.description()
        }
    }

    @Test("one chunk can be found by page and decrypted alone, as a lazy restore would on a page fault")
    func randomAccessToOneChunk() throws {
        let a = TestHost(name: "a")
        let memory = try GuestMemory(size: 4 << 20)
        let (bytes, _) = try sealedFile(for: [a], memory: memory)
        let reader = try SealedReader(source: BufferRandomAccessSource(bytes), unwrap: a.unwrap)
        let entry = try #require(reader.chunk(containing: 600))
        #expect(entry.firstPage == 512 && entry.lastPage == 699)
        #expect(reader.chunk(containing: 800) == nil)
        let target = try GuestMemory(size: 4 << 20)
        let applied = try reader.readChunk(entry, into: target)
        #expect(applied.pages == 188)
        #expect(try target.read(at: GuestAddress(600 * 4096), count: 4096) == memory.read(at: GuestAddress(600 * 4096), count: 4096))
        #expect(try target.isZeroPage(GuestAddress(3 * 4096)), "the first chunk was not read")
    }

    @Test("an envelope that claims more than its limit is refused before anything is allocated for it")
    func hugeEnvelopeRefused() throws {
        var header = SealedFormat.fileHeader(envelopeLength: 0)
        header.replaceSubrange(16..<20, with: [0xFF, 0xFF, 0xFF, 0x7F])
        #expect(throws: SealedFileError.malformed("the envelope claims 2147483647 bytes, over the limit of \(SealedFormat.maxEnvelope)")) {
            _ = try SealedReader<BufferRandomAccessSource>.readEnvelope(from: BufferRandomAccessSource(header + [UInt8](repeating: 0, count: 64)))
        }
    }

    @Test("random mutations of a sealed file never crash the reader", .timeLimit(.minutes(2)))
    func mutationFuzz() throws {
        let a = TestHost(name: "a")
        let (bytes, _) = try sealedFile(for: [a], memory: try GuestMemory(size: 4 << 20))
        var rng = SplitMix64(seed: UInt64(environment("SEALED_FUZZ_SEED") ?? "") ?? UInt64.random(in: 0...UInt64.max))
        let seed = rng.state
        var accepted = 0
        for _ in 0..<300 {
            var damaged = bytes
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let at = Int.random(in: 0..<damaged.count, using: &rng)
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: damaged[at] = UInt8.random(in: 0...255, using: &rng)
                case 1: damaged.removeSubrange(at..<min(damaged.count, at + Int.random(in: 1...64, using: &rng)))
                default: damaged.insert(contentsOf: [UInt8](repeating: 0xFF, count: 8), at: at)
                }
                if damaged.isEmpty { damaged = [0] }
            }
            do {
                let r = try SealedReader(source: BufferRandomAccessSource(damaged), unwrap: a.unwrap)
                _ = try r.readBody(into: try GuestMemory(size: 4 << 20))
                accepted += 1
            } catch is SealedFileError {
            } catch is SnapshotFormatError {
            }
        }
        // Only mutations confined to the opaque signature bytes can be read (the VMM's
        // signature check refuses them); anything else accepted is a hole.
        #expect(accepted <= 30, "seed \(seed): \(accepted) mutated files were read")
    }
}
