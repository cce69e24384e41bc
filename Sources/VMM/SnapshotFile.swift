#if canImport(Glibc)
import Glibc
#endif
import Billboard
import Crypto
import Foundation
import GuestMemory
import MachineCore
import Snapshot
import SystemCalls

/// Figures about one snapshot written or restored.
public struct SnapshotStats: Sendable, Codable {
    public var bytes: UInt64
    public var pages: Int
    public var zeroPages: Int
    public var milliseconds: Double
    /// The hosts a sealed file was sealed for (nil: written unsealed, or read).
    public var sealedFor: [String]?
    /// Allowed hosts that got no key (not enrolled peers), and similar things to tell the operator.
    public var warnings: [String]?
}

/// How a snapshot file is written.
public enum SnapshotSealing: Sendable {
    /// Version 1: the state stream in clear, with section checksums and the host's signature.
    /// For debugging: anyone who can read the file reads the guest.
    case unsealed
    /// Version 2 (the default): encrypted with a fresh data key wrapped for each of `hosts`.
    case sealed(writer: String, hosts: [StateSealing.Recipient])
}

/// Snapshot files: the machine state written to a temporary file, synced, then renamed
/// into place; read back in two steps so that admission sits between them.
public enum SnapshotFile {
    /// Writes a paused machine to `path`, with `header` as its machine section and the signature
    /// `sign` makes over the stream (nil: unsigned; a sealed file must be signed).
    public static func write(_ machine: Machine, header: StateHeader, to path: String, sealing: SnapshotSealing = .unsealed,
                             sign: ([UInt8]) throws -> [UInt8]?) throws -> SnapshotStats {
        let t0 = monotonicMilliseconds()
        // A random O_EXCL|O_NOFOLLOW 0600 temporary in the target's directory, renamed into place
        // on commit and removed if anything before that throws (see AtomicFileWriter's rules).
        let target: AtomicFileWriter
        do { target = try AtomicFileWriter(path: path, what: "snapshot") } catch { throw MachineError.io(error.description) }
        let stats: MemoryWriteStats
        let bytes: UInt64
        switch sealing {
        case .unsealed:
            var writer = try StreamWriter(sink: FileDescriptorSink(target.file))
            stats = try MachineStateCodec.writeFull(machine, header: try header.encoded(), to: &writer, sign: sign)
            bytes = writer.bytesWritten
        case let .sealed(writerHost, hosts):
            let (key, fileID) = SealedWriter<FileDescriptorSink>.freshKey()
            let envelope = try SealedEnvelope.seal(dataKey: key, fileID: fileID, writer: writerHost,
                                                   for: hosts.map { ($0.name, $0.agreementKey) })
            var writer = try SealedWriter(sink: FileDescriptorSink(target.file), dataKey: key, envelope: envelope)
            stats = try MachineStateCodec.writeSealed(machine, header: try header.encoded(), to: &writer) { digest in
                guard let signature = try sign(digest) else {
                    throw MachineError.io("a sealed snapshot must be signed by its host")
                }
                return signature
            }
            bytes = writer.bytesWritten
        }
        do { try target.commit() } catch { throw MachineError.io(error.description) }
        var sealedFor: [String]?
        if case let .sealed(_, hosts) = sealing { sealedFor = hosts.map(\.name) }
        return SnapshotStats(bytes: bytes, pages: stats.pages, zeroPages: stats.zeroPages,
                             milliseconds: monotonicMilliseconds() - t0, sealedFor: sealedFor)
    }

    /// How a host opens the sealed files written for it: its entry in the envelope, unwrapped
    /// by its store (the private key never leaves the store).
    public static func unwrapper(for store: BillboardStore) -> (SealedEnvelope) throws -> SymmetricKey {
        { envelope in
            try envelope.dataKey(thisHost: store.hostName, agreementKey: store.stateSealing.agreementKey) {
                try store.stateSealing.openWrappedKey(encapsulatedKey: $0, wrappedKey: $1, info: $2, associatedData: $3,
                                                      ciphersuite: SealedFormat.keyWrapSuite)
            }
        }
    }

    /// A snapshot file opened for restore, its header read and nothing else: the caller admits
    /// the header, reserves a machine, then reads the body into it. Sealed files (version 2) are
    /// opened with `unwrap`, which returns the data key for this host or refuses; unsealed
    /// (version 1) files are read as before.
    public final class Opened {
        public let path: String
        public let header: StateHeader
        /// Whether the file is sealed (version 2).
        public var isSealed: Bool { sealed != nil }
        private let file: OwnedFileDescriptor
        private var stream: StreamReader<FileDescriptorSource>?
        private let sealed: SealedReader<FileRandomAccessSource>?
        /// The sealed file's reader (nil for version 1), for a lazy restore.
        var sealedReader: SealedReader<FileRandomAccessSource>? { sealed }
        private let t0 = monotonicMilliseconds()
        private var fd: Int32 { file.raw }

        public init(path: String, unwrap: ((SealedEnvelope) throws -> SymmetricKey)? = nil) throws {
            self.path = path
            let file: OwnedFileDescriptor
            do { file = try OwnedFileDescriptor.open(path, O_RDONLY | O_CLOEXEC) } catch {
                throw MachineError.io("cannot open snapshot '\(path)': \(error.message)")
            }
            self.file = file
            var magic = [UInt8](repeating: 0, count: 8)
            let n = magic.withUnsafeMutableBytes { pread(file.raw, $0.baseAddress, 8, 0) }
            if n == 8, magic == SealedFormat.magic {
                guard let unwrap else {
                    throw MachineError.io("'\(path)' is a sealed snapshot and no host keys were given to open it")
                }
                let reader = try SealedReader(source: try FileRandomAccessSource(file), unwrap: unwrap)
                header = try StateHeader.decode(try reader.description(), what: "description block")
                sealed = reader
                stream = nil
            } else {
                var reader = try StreamReader(source: FileDescriptorSource(file))
                header = try StateHeader.decode(try StateSequence.readDescription(from: &reader), what: "machine section")
                stream = reader
                sealed = nil
            }
        }

        /// SHA-256 of the whole file, read from this open file (not the path), so it is of the
        /// very bytes being restored even if the path is swapped meanwhile.
        public func sha256() throws -> String {
            var hasher = SHA256()
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var offset: off_t = 0
            while true {
                let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, offset) }
                guard n >= 0 else { throw MachineError.io("cannot read snapshot '\(path)': \(String(cString: strerror(errno)))") }
                if n == 0 { break }
                hasher.update(data: buffer[0..<n])
                offset += off_t(n)
            }
            return hasher.finalize().map { String(format: "%02x", $0) }.joined()
        }

        /// Reads and verifies the rest of the file, applying memory to `memory`; nothing is
        /// applied to vCPUs here (the caller checks the signature first).
        public func readBody(into memory: GuestMemory) throws -> StateBody {
            if let sealed { return try sealed.readBody(into: memory) }
            guard var reader = stream else { throw MachineError.io("the snapshot body was already read") }
            stream = nil
            return try StateSequence.readBody(from: &reader, into: memory)
        }

        /// Figures for a lazy restore, when the guest can start: the file's size, no page read yet.
        public func lazyStats() -> SnapshotStats {
            var st = stat()
            fstat(fd, &st)
            return SnapshotStats(bytes: UInt64(st.st_size), pages: 0, zeroPages: 0, milliseconds: monotonicMilliseconds() - t0)
        }

        /// Figures for a restore that read the whole file.
        public func stats(_ body: StateBody) -> SnapshotStats {
            var st = stat()
            fstat(fd, &st)
            return SnapshotStats(bytes: UInt64(st.st_size), pages: body.pages, zeroPages: body.zeroPages,
                                 milliseconds: monotonicMilliseconds() - t0)
        }
    }
}

/// SHA-256 of all guest RAM, for tests and the API: proves two processes hold the same memory.
extension Machine {
    public func memoryDigest() throws -> String {
        try MemoryDigest.sha256(memory)
    }
}
