#if canImport(Glibc)
import Glibc
#endif
import CSystemCalls

/// An open tap interface: `/dev/net/tun` attached with TUNSETIFF (IFF_TAP | IFF_NO_PI) to a tap
/// that already exists (`ip tuntap add dev NAME mode tap`). Each read gives one Ethernet frame,
/// each write sends one; non-blocking, so a full queue drops a frame instead of stalling a vCPU.
///
/// Thread-safety: reads and writes may come from different threads (the kernel keeps frames
/// whole); the descriptor is closed once, by `close()` or when the owner goes away.
public final class TapDevice: Sendable {
    public let name: String
    private let descriptor: OwnedFileDescriptor

    /// Whether `name` can name a network interface: 1 to IFNAMSIZ-1 bytes, no '/', no blanks.
    public static func isValidName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        return !bytes.isEmpty && bytes.count < Int(csystemcalls_ifnamsiz()) && name != "." && name != ".."
            && !bytes.contains { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 <= 0x20 || $0 == 0x7F }
    }

    /// Attaches to the tap `name` (in this thread's network namespace). A missing tap, a tap
    /// another process holds, or a name that is not a tap fails with `TUNSETIFF(name)`'s errno.
    public init(name: String, devicePath: String = "/dev/net/tun") throws(SystemCallError) {
        guard Self.isValidName(name) else { throw SystemCallError("TUNSETIFF(\(name))", errno: EINVAL) }
        let fd = try OwnedFileDescriptor.open(devicePath, O_RDWR | O_CLOEXEC | O_NONBLOCK)
        _ = try retryingOnInterrupt("TUNSETIFF(\(name))") { csystemcalls_tunsetiff_tap(fd.raw, name) }
        self.name = name
        descriptor = fd
    }

    /// Waits up to `milliseconds` for a frame; true if one can be read.
    public func waitReadable(milliseconds: Int32) throws(SystemCallError) -> Bool {
        var p = pollfd(fd: descriptor.raw, events: Int16(POLLIN), revents: 0)
        let n = poll(&p, 1, milliseconds)
        if n < 0 {
            if errno == EINTR { return false }
            throw .last("poll(tap \(name))")
        }
        if n > 0 && p.revents & Int16(POLLNVAL | POLLERR) != 0 { throw SystemCallError("poll(tap \(name))", errno: EBADF) }
        return n > 0 && p.revents & Int16(POLLIN) != 0
    }

    /// One frame, or nil when none is waiting.
    public func readFrame(maximumLength: Int = 65_536) throws(SystemCallError) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: maximumLength)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(descriptor.raw, $0.baseAddress, $0.count) }
        if n < 0 {
            if errno == EAGAIN || errno == EINTR { return nil }
            throw .last("read(tap \(name))")
        }
        return Array(buffer[0..<n])
    }

    /// Sends one frame. A full queue (EAGAIN) or a tap that is down (EIO) is an error the
    /// caller counts as a drop.
    public func writeFrame(_ frame: [UInt8]) throws(SystemCallError) {
        let n = frame.withUnsafeBytes { Glibc.write(descriptor.raw, $0.baseAddress, $0.count) }
        if n < 0 { throw .last("write(tap \(name))") }
    }

    /// Detaches from the tap (later reads and writes fail with EBADF); the tap itself stays.
    public func close() { descriptor.close() }
}
