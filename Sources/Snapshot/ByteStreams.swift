#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

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

/// Writes to a blocking file descriptor it does not own (the caller closes it).
public final class FileDescriptorSink: ByteSink {
    public let fd: Int32

    public init(fd: Int32) { self.fd = fd }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        guard var next = bytes.baseAddress else { return }
        var remaining = bytes.count
        // write(2) may take less than asked (pipes, sockets, signals): loop.
        while remaining > 0 {
            #if canImport(Glibc)
            let n = Glibc.write(fd, next, remaining)
            #else
            let n = Darwin.write(fd, next, remaining)
            #endif
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                throw SnapshotIOError(operation: "write", errno: e)
            }
            // Zero progress would spin forever; no healthy fd does this.
            if n == 0 { throw SnapshotIOError(operation: "write", errno: EIO) }
            next += n
            remaining -= n
        }
    }
}

/// Reads from a blocking file descriptor it does not own (the caller closes it).
public final class FileDescriptorSource: ByteSource {
    public let fd: Int32
    /// Bytes consumed so far; the offset reported when input runs out.
    public private(set) var bytesRead: UInt64 = 0

    public init(fd: Int32) { self.fd = fd }

    public func readExactly(into buffer: UnsafeMutableRawBufferPointer) throws {
        guard var next = buffer.baseAddress else { return }
        var remaining = buffer.count
        while remaining > 0 {
            #if canImport(Glibc)
            let n = Glibc.read(fd, next, remaining)
            #else
            let n = Darwin.read(fd, next, remaining)
            #endif
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                throw SnapshotIOError(operation: "read", errno: e)
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
