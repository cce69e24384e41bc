#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import SystemPackage

/// The one owner of a file descriptor: it is closed exactly once, by `close()` or
/// when the owner goes away, whichever comes first, from any thread.
///
/// Why a class with an atomic flag rather than bare `Int32`s: a number closed twice
/// may by then belong to another file opened meanwhile (fds are reused lowest
/// first), and the second close would silently close that one.
public final class OwnedFileDescriptor: Sendable {
    private let number: Int32
    private let isOpen = Atomic<Bool>(true)

    /// Takes ownership of `raw`, which nobody else may close from now on.
    public init(taking raw: Int32) {
        number = raw
    }

    deinit { close() }

    /// Opens `path` (`open(2)` flags, e.g. `O_RDWR | O_CLOEXEC`), retrying on `EINTR`.
    /// `mode` is used only when `flags` create the file.
    public static func open(_ path: String, _ flags: Int32, mode: mode_t = 0o600) throws(SystemCallError) -> OwnedFileDescriptor {
        do {
            let fd = try FileDescriptor.open(
                path, FileDescriptor.AccessMode(rawValue: flags & O_ACCMODE),
                options: FileDescriptor.OpenOptions(rawValue: flags & ~O_ACCMODE),
                permissions: FilePermissions(rawValue: mode), retryOnInterrupt: true)
            return OwnedFileDescriptor(taking: fd.rawValue)
        } catch let error as Errno {
            throw SystemCallError("open(\(path))", errno: error.rawValue)
        } catch {
            // swift-system throws only `Errno`; anything else would be a bug there.
            throw SystemCallError("open(\(path))", errno: EIO)
        }
    }

    /// The descriptor number, for system calls. Valid while this owner lives and is
    /// open; callers must never close it themselves. After `close()` it is -1, so a
    /// late call fails with `EBADF` instead of touching a reused number.
    public var raw: Int32 { isOpen.load(ordering: .acquiring) ? number : -1 }

    /// Whether `close()` has not run yet.
    public var isClosed: Bool { !isOpen.load(ordering: .acquiring) }

    /// Closes the descriptor; later calls (and `deinit`) do nothing.
    public func close() { close(after: { _ in }) }

    /// Runs `lastUse` with the number, then closes it, only on the first call: for a
    /// socket, `shutdown` before the close wakes a peer or thread blocked on it.
    /// Returns whether this call was the one that closed it.
    @discardableResult
    public func close(after lastUse: (Int32) -> Void) -> Bool {
        guard isOpen.compareExchange(expected: true, desired: false, ordering: .acquiringAndReleasing).exchanged else {
            return false
        }
        lastUse(number)
        // Not retried on EINTR: Linux releases the number even then, and a retry could
        // close a descriptor another thread just opened. Errors here are not actionable.
        try? FileDescriptor(rawValue: number).close()
        return true
    }
}
