#if canImport(Glibc)
import Glibc
#endif
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
}

/// Snapshot files: the machine state stream written to a temporary file, synced, then renamed
/// into place; read back in two steps so that admission sits between them.
public enum SnapshotFile {
    /// Writes a paused machine to `path`, with `header` as its machine section and the signature
    /// `sign` makes over the stream (nil: unsigned).
    public static func write(_ machine: Machine, header: StateHeader, to path: String,
                             sign: ([UInt8]) throws -> [UInt8]?) throws -> SnapshotStats {
        let t0 = monotonicMilliseconds()
        // A random O_EXCL|O_NOFOLLOW 0600 temporary in the target's directory, renamed into place
        // on commit and removed if anything before that throws (see AtomicFileWriter's rules).
        let target: AtomicFileWriter
        do { target = try AtomicFileWriter(path: path, what: "snapshot") } catch { throw MachineError.io(error.description) }
        var writer = try StreamWriter(sink: FileDescriptorSink(target.file))
        let stats = try MachineStateCodec.writeFull(machine, header: try header.encoded(), to: &writer, sign: sign)
        do { try target.commit() } catch { throw MachineError.io(error.description) }
        return SnapshotStats(bytes: writer.bytesWritten, pages: stats.pages, zeroPages: stats.zeroPages,
                             milliseconds: monotonicMilliseconds() - t0)
    }

    /// A snapshot file opened for restore, its header read and nothing else: the caller admits
    /// the header, reserves a machine, then reads the body into it.
    public final class Opened {
        public let path: String
        public let header: StateHeader
        private let file: OwnedFileDescriptor
        private var reader: StreamReader<FileDescriptorSource>
        private let t0 = monotonicMilliseconds()
        private var fd: Int32 { file.raw }

        public init(path: String) throws {
            self.path = path
            do { file = try OwnedFileDescriptor.open(path, O_RDONLY | O_CLOEXEC) } catch {
                throw MachineError.io("cannot open snapshot '\(path)': \(error.message)")
            }
            var reader = try StreamReader(source: FileDescriptorSource(file))
            header = try StateHeader.decode(try StateSequence.readDescription(from: &reader), what: "machine section")
            self.reader = reader
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
            try StateSequence.readBody(from: &reader, into: memory)
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
