#if canImport(Glibc)
import Glibc
#endif

/// What `stat`/`fstat` says about a file: enough to tell two names of one file apart from
/// two files, and to judge a file before reading it.
public struct FileStatus: Sendable, Equatable {
    public let device: UInt64
    public let inode: UInt64
    /// `st_mode`: type and permission bits.
    public let mode: UInt32
    public let size: Int64

    init(_ s: stat) {
        device = UInt64(s.st_dev)
        inode = UInt64(s.st_ino)
        mode = UInt32(s.st_mode)
        size = Int64(s.st_size)
    }

    public var isRegularFile: Bool { mode & UInt32(S_IFMT) == UInt32(S_IFREG) }

    /// Whether both describe the same file (device and inode), whatever names they were reached by.
    public func isSameFile(as other: FileStatus) -> Bool { device == other.device && inode == other.inode }

    /// The file's type in words, for refusals ("a FIFO", "a character device", ...).
    public var kindDescription: String {
        switch mode & UInt32(S_IFMT) {
        case UInt32(S_IFREG): "a regular file"
        case UInt32(S_IFDIR): "a directory"
        case UInt32(S_IFIFO): "a FIFO"
        case UInt32(S_IFCHR): "a character device"
        case UInt32(S_IFBLK): "a block device"
        case UInt32(S_IFSOCK): "a socket"
        case UInt32(S_IFLNK): "a symbolic link"
        default: "a file of unknown type"
        }
    }

    /// `stat(path)`: follows symbolic links, and so the magic links of `/proc/PID/fd/N` to the
    /// open file itself, without opening it.
    public static func of(path: String) throws(SystemCallError) -> FileStatus {
        var s = stat()
        _ = try retryingOnInterrupt("stat(\(path))") { stat(path, &s) }
        return FileStatus(s)
    }

    /// `fstat(fd)`.
    public static func of(descriptor fd: Int32) throws(SystemCallError) -> FileStatus {
        var s = stat()
        _ = try retryingOnInterrupt("fstat(\(fd))") { fstat(fd, &s) }
        return FileStatus(s)
    }
}

/// Why `readSmallRegularFile` read nothing.
public enum BoundedReadError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The open, fstat or read failed (`ELOOP`: the name is a symbolic link).
    case system(SystemCallError)
    /// A FIFO, device, directory or socket: reading it could block or never end.
    case notRegularFile(path: String, kind: String)
    /// Larger than the caller's limit (a sparse file can claim gigabytes it never stores).
    case tooLarge(path: String, size: Int64, limit: Int)

    public var description: String {
        switch self {
        case .system(let error): "\(error)"
        case let .notRegularFile(path, kind): "\(path) is \(kind), not a regular file"
        case let .tooLarge(path, size, limit): "\(path) is \(size) bytes, more than the \(limit) allowed"
        }
    }
}

/// Reads a small file that someone else may have planted: never more than `limit` bytes, and
/// only from a regular file. O_NOFOLLOW refuses a symbolic link as the last component (a loop
/// too); O_NONBLOCK keeps the open from waiting for a FIFO's writer; the type and size are
/// judged on the opened file (fstat), so the name cannot be swapped between check and read.
public func readSmallRegularFile(_ path: String, limit: Int) throws(BoundedReadError) -> [UInt8] {
    let file: OwnedFileDescriptor
    do { file = try OwnedFileDescriptor.open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC) } catch {
        throw .system(error)
    }
    let status: FileStatus
    do { status = try FileStatus.of(descriptor: file.raw) } catch { throw .system(error) }
    guard status.isRegularFile else { throw .notRegularFile(path: path, kind: status.kindDescription) }
    guard status.size <= Int64(limit) else { throw .tooLarge(path: path, size: status.size, limit: limit) }
    // The file may grow after fstat: one byte past the limit is read to notice, never more.
    var buffer = [UInt8](repeating: 0, count: limit + 1)
    var count = 0
    while count < buffer.count {
        let n: Int
        do {
            n = try retryingOnInterrupt("read(\(path))") {
                buffer.withUnsafeMutableBytes { raw in read(file.raw, raw.baseAddress! + count, raw.count - count) }
            }
        } catch { throw .system(error) }
        if n == 0 { break }
        count += n
    }
    guard count <= limit else { throw .tooLarge(path: path, size: Int64(count), limit: limit) }
    return Array(buffer.prefix(count))
}
