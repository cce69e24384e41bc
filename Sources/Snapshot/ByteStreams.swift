#if canImport(Glibc)
import Glibc
#endif
import SystemCalls

/// Where a stream writer puts its bytes (file, socket, memory).
public protocol ByteSink {
    /// Writes all of `bytes` or throws.
    mutating func write(_ bytes: UnsafeRawBufferPointer) throws
}

/// Where a stream reader gets its bytes.
public protocol ByteSource {
    /// Fills all of `buffer` or throws. At end of input it throws
    /// `SnapshotFormatError.truncated(offset:needed:)` with the offset (counted
    /// from the source's start) where input ran out and how many bytes were still missing.
    mutating func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws
}

/// Writes to a blocking file descriptor.
///
/// Made from an `OwnedFileDescriptor`, the sink keeps that owner alive, so the fd
/// cannot be closed under it. Made from a raw number (`init(fd:)`), it only borrows
/// it: the caller keeps it open for as long as the sink is used and closes it.
public final class FileDescriptorSink: ByteSink {
    public let fd: Int32
    /// Keeps the descriptor open while the sink exists, when the sink was given its owner.
    private let owner: OwnedFileDescriptor?

    /// Writes to `descriptor`, keeping it open while the sink exists.
    public init(_ descriptor: OwnedFileDescriptor) {
        fd = descriptor.raw
        owner = descriptor
    }

    /// Borrows `fd`; the caller closes it, after the last write.
    public init(fd: Int32) {
        self.fd = fd
        owner = nil
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        guard var next = bytes.baseAddress else { return }
        var remaining = bytes.count
        // write(2) may take less than asked (pipes, sockets, signals): loop.
        while remaining > 0 {
            let n: Int
            do {
                n = try retryingOnInterrupt("write") { Glibc.write(fd, next, remaining) }
            } catch {
                throw SnapshotIOError(operation: error.call, errno: error.errno)
            }
            // Zero progress would spin forever; no healthy fd does this.
            if n == 0 { throw SnapshotIOError(operation: "write", errno: EIO) }
            next += n
            remaining -= n
        }
    }
}

/// Reads from a blocking file descriptor. Ownership as for `FileDescriptorSink`:
/// given an `OwnedFileDescriptor` it keeps it open; given a raw number it borrows it.
public final class FileDescriptorSource: ByteSource {
    public let fd: Int32
    /// Keeps the descriptor open while the source exists, when the source was given its owner.
    private let owner: OwnedFileDescriptor?
    /// Bytes consumed so far; the offset reported when input runs out.
    public private(set) var bytesRead: UInt64 = 0

    /// Reads from `descriptor`, keeping it open while the source exists.
    public init(_ descriptor: OwnedFileDescriptor) {
        fd = descriptor.raw
        owner = descriptor
    }

    /// Borrows `fd`; the caller closes it, after the last read.
    public init(fd: Int32) {
        self.fd = fd
        owner = nil
    }

    public func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws {
        guard var next = buffer.baseAddress else { return }
        var remaining = buffer.count
        while remaining > 0 {
            let n: Int
            do {
                n = try retryingOnInterrupt("read") { Glibc.read(fd, next, remaining) }
            } catch {
                throw SnapshotIOError(operation: error.call, errno: error.errno)
            }
            if n == 0 {
                throw SnapshotFormatError.truncated(offset: bytesRead, needed: UInt64(remaining))
            }
            next += n
            remaining -= n
            bytesRead += UInt64(n)
        }
    }
}

/// Collects a stream in memory (tests, fuzzing, small control messages).
public struct BufferSink: ByteSink, Sendable {
    public var bytes: [UInt8]

    public init() { bytes = [] }

    public mutating func write(_ bytes: UnsafeRawBufferPointer) throws {
        self.bytes.append(contentsOf: bytes)
    }
}

/// Reads a stream held in memory.
public struct BufferSource: ByteSource, Sendable {
    public let bytes: [UInt8]
    /// Index of the next byte to read.
    public private(set) var position: Int = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public mutating func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws {
        let available = bytes.count - position
        guard buffer.count <= available else {
            // Consume what there is, as a file descriptor would, then report where it ran out.
            position = bytes.count
            throw SnapshotFormatError.truncated(offset: UInt64(bytes.count), needed: UInt64(buffer.count - available))
        }
        bytes.withUnsafeBytes { src in
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[position..<position + buffer.count]))
        }
        position += buffer.count
    }
}
