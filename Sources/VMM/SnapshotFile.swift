#if canImport(Glibc)
import Glibc
#endif
import Crypto
import Foundation
import GuestMemory
import Billboard
import KVM
import Snapshot

/// Figures about one snapshot written or restored.
public struct SnapshotStats: Sendable, Codable {
    public var bytes: UInt64
    public var pages: Int
    public var zeroPages: Int
    public var milliseconds: Double
}

/// Writes a paused machine to the stream, and builds a machine from one.
/// The same sections serve snapshot files and the migration stream.
public enum MachineStream {
    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    /// Writes machine, vCPU, device and memory sections (every page; zero pages as markers).
    public static func writeFullState<S: ByteSink>(_ machine: Machine, to writer: inout StreamWriter<S>,
                                                  description: MachineDescription? = nil) throws -> (pages: Int, zeroPages: Int) {
        let (vcpus, devices) = try machine.captureState()
        try writer.writeSection(.machine, payload: Array(try encoder.encode(description ?? machine.machineDescription)))
        // Untouched pages read as zero: they need no entry at all (restore starts from zeroed memory).
        let pages = machine.memory.possiblyNonZeroPages()?.pageFrames ?? Array(0..<machine.memory.pageCount)
        let stats = try writer.writeMemoryPages(pages, from: machine.memory)
        try writer.writeSection(.vcpu, payload: Array(try encoder.encode(vcpus)))
        try writer.writeSection(.devices, payload: Array(try encoder.encode(devices)))
        return (stats.pages, stats.zeroPages)
    }

    /// Reads a full-state stream into a new machine that is restored but not started.
    /// Nothing is applied to vCPUs until every section, and the end digest, has been verified.
    /// `admit` sees the machine description before any memory is reserved.
    static func readMachine<S: ByteSource>(from reader: inout StreamReader<S>, kvm: KVMSystem? = nil,
                                                  requestedMemory: UInt64? = nil,
                                                  admit: (MachineDescription) throws -> GuestSession,
                                                  verifySignature: @escaping (StateSignature?, [UInt8]) throws -> Void,
                                                  serialOutput: @escaping (UInt8) -> Void) throws -> (Machine, MachineDescription, pages: Int, zeroPages: Int) {
        guard let first = try reader.nextSection() else { throw SnapshotError.sectionOrder("the stream is empty") }
        guard first.type == .machine else {
            throw SnapshotError.sectionOrder("the first section must describe the machine, found \(first.type)")
        }
        let description: MachineDescription
        do { description = try JSONDecoder().decode(MachineDescription.self, from: Data(first.payload)) } catch {
            throw SnapshotError.malformed("machine section: \(error)")
        }
        if let requestedMemory, requestedMemory != description.memorySize {
            throw SnapshotError.memoryMismatch(snapshot: description.memorySize, requested: requestedMemory)
        }
        guard !description.inKernelIRQChip else { throw SnapshotError.inKernelIRQChip }
        // No admission, no machine: the session is the proof.
        _ = try admit(description)
        let machine = try Machine(configuration: description.configuration, kvm: kvm, serialOutput: serialOutput)
        var vcpus: [VCPUState]?
        var devices: DeviceState?
        var pages = 0, zeroPages = 0
        var ended = false
        var signed = false
        while let section = try reader.nextSection() {
            if signed && section.type != .end {
                throw SnapshotError.sectionOrder("a \(section.type) section follows the signature, which must be last")
            }
            switch section.type {
            case .signature:
                let signature: StateSignature
                do { signature = try JSONDecoder().decode(StateSignature.self, from: Data(section.payload)) } catch {
                    throw SnapshotError.malformed("signature section: \(error)")
                }
                try verifySignature(signature, reader.digestBeforeLastSection)
                signed = true
            case .memory:
                let r = try MemorySection.apply(section.payload, to: machine.memory)
                pages += r.pages
                zeroPages += r.zeroPages
            case .vcpu:
                guard vcpus == nil else { throw SnapshotError.sectionOrder("two vCPU sections") }
                do { vcpus = try JSONDecoder().decode([VCPUState].self, from: Data(section.payload)) } catch {
                    throw SnapshotError.malformed("vCPU section: \(error)")
                }
            case .devices:
                guard devices == nil else { throw SnapshotError.sectionOrder("two device sections") }
                do { devices = try JSONDecoder().decode(DeviceState.self, from: Data(section.payload)) } catch {
                    throw SnapshotError.malformed("device section: \(error)")
                }
            case .end:
                ended = true
            default:
                throw SnapshotError.sectionOrder("unexpected \(section.type) section at offset \(section.offset)")
            }
        }
        guard ended else { throw SnapshotError.sectionOrder("the stream has no end section") }
        if !signed { try verifySignature(nil, []) }
        guard let vcpus else { throw SnapshotError.sectionOrder("no vCPU section") }
        guard let devices else { throw SnapshotError.sectionOrder("no device section") }
        try machine.restoreState(vcpus: vcpus, devices: devices, description: description)
        return (machine, description, pages, zeroPages)
    }
}

/// Snapshot files: the stream written to a temporary file, synced, then renamed into place.
public enum SnapshotFile {
    /// Writes a paused machine to `path`.
    public static func write(_ machine: Machine, to path: String) throws -> SnapshotStats {
        let t0 = monotonicMilliseconds()
        let temporary = path + ".partial"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw MachineError.io("cannot create snapshot file '\(temporary)': \(String(cString: strerror(errno)))")
        }
        var closed = false
        defer { if !closed { close(fd); unlink(temporary) } }
        var writer = try StreamWriter(sink: FileDescriptorSink(fd: fd))
        let (pages, zeroPages) = try MachineStream.writeFullState(machine, to: &writer)
        if let session = machine.session {
            session.noteSnapshot()
            // Signed by the host key: an edited snapshot, even with recomputed checksums, is refused.
            let signature = try session.store.stateSignatures.sign(digest: writer.digestSoFar)
            try writer.writeSection(.signature, payload: Array(try MachineStream.encoder.encode(signature)))
        }
        try writer.finish()
        guard fsync(fd) == 0 else { throw MachineError.io("fsync of '\(temporary)' failed: \(String(cString: strerror(errno)))") }
        close(fd)
        closed = true
        guard rename(temporary, path) == 0 else {
            unlink(temporary)
            throw MachineError.io("cannot rename snapshot into '\(path)': \(String(cString: strerror(errno)))")
        }
        return SnapshotStats(bytes: writer.bytesWritten, pages: pages, zeroPages: zeroPages,
                             milliseconds: monotonicMilliseconds() - t0)
    }

    /// Builds a paused, fully restored machine from the file at `path`.
    /// `admit` sees the machine description (and the guest identity) before memory is reserved and
    /// must return the Billboard session that admitted it; `verifySignature` must accept the
    /// signature section (it is called with nil when there is none).
    static func read(_ path: String, kvm: KVMSystem? = nil, requestedMemory: UInt64? = nil,
                            admit: (MachineDescription, _ fileSHA256: @escaping () throws -> String) throws -> GuestSession,
                            verifySignature: @escaping (StateSignature?, [UInt8]) throws -> Void,
                            serialOutput: @escaping (UInt8) -> Void) throws -> (Machine, MachineDescription, SnapshotStats) {
        let t0 = monotonicMilliseconds()
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw MachineError.io("cannot open snapshot '\(path)': \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        var reader = try StreamReader(source: FileDescriptorSource(fd: fd))
        // The file's digest (for an authorised rollback) comes from this open file, so it is of the
        // very bytes being restored even if the path is swapped meanwhile.
        let fileSHA256 = { try sha256(fd: fd, path: path) }
        let (machine, description, pages, zeroPages) = try MachineStream.readMachine(
            from: &reader, kvm: kvm, requestedMemory: requestedMemory, admit: { try admit($0, fileSHA256) },
            verifySignature: verifySignature,
            serialOutput: serialOutput)
        return (machine, description, SnapshotStats(bytes: UInt64(st.st_size), pages: pages, zeroPages: zeroPages,
                                                    milliseconds: monotonicMilliseconds() - t0))
    }
}

/// SHA-256 of a whole open file, read with pread (the fd's offset is left alone).
func sha256(fd: Int32, path: String) throws -> String {
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

/// SHA-256 of all guest RAM, for tests and the API: proves two processes hold the same memory.
extension Machine {
    public func memoryDigest() throws -> String {
        try MemoryDigest.sha256(memory)
    }
}
