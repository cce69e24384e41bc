#if canImport(Glibc)
import Glibc
#endif
import CSystemCalls

/// One queue of a Linux tap interface (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`): every `write`
/// is one Ethernet frame entering the host's network from the interface, every `read` one
/// frame the host sends out of it. The interface is made in (or found in) the network
/// namespace of the calling thread; a tap nobody made persistent goes when this closes.
public final class TapDevice: Sendable {
    public let descriptor: OwnedFileDescriptor
    /// The kernel's name of the interface (the one asked for).
    public let name: String

    /// Frames longer than this are not read whole: Ethernet's 1514 plus room for a VLAN tag.
    public static let maximumFrameLength = 1522

    /// Whether `name` can name a network interface: 1 to 15 bytes (IFNAMSIZ less the NUL), not
    /// "." or "..", no '/', ':', blanks or control characters.
    public static func isValidName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        return !bytes.isEmpty && bytes.count < 16 && name != "." && name != ".."
            && !bytes.contains { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 <= 0x20 || $0 == 0x7F }
    }

    /// Opens /dev/net/tun and attaches it to tap `name` (at most 15 bytes).
    public init(name: String) throws(SystemCallError) {
        guard Self.isValidName(name) else { throw SystemCallError("TUNSETIFF(\(name))", errno: EINVAL) }
        let fd = try OwnedFileDescriptor.open("/dev/net/tun", O_RDWR | O_CLOEXEC)
        var actual = [CChar](repeating: 0, count: 16)
        _ = try retryingOnInterrupt("TUNSETIFF(\(name))") { csystemcalls_tun_set_tap(fd.raw, name, &actual) }
        descriptor = fd
        self.name = String(decoding: actual.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Sends one frame into the host's network. A short write is an error (`EMSGSIZE`): a tap
    /// takes a frame whole or not at all.
    public func write(_ frame: [UInt8]) throws(SystemCallError) {
        let written = try retryingOnInterrupt("write(\(name))") { frame.withUnsafeBytes { Glibc.write(descriptor.raw, $0.baseAddress, $0.count) } }
        guard written == frame.count else { throw SystemCallError("write(\(name))", errno: EMSGSIZE) }
    }

    /// The next frame the host sends to this interface, or nil when none came within
    /// `timeoutMilliseconds` (negative: wait for ever).
    public func read(timeoutMilliseconds: Int32) throws(SystemCallError) -> [UInt8]? {
        try readFrame(descriptor, what: name, maximum: Self.maximumFrameLength, timeoutMilliseconds: timeoutMilliseconds)
    }

    public func close() { descriptor.close() }
}

/// Waits up to `timeoutMilliseconds` for `fd` to be readable, then reads one datagram of at most
/// `maximum` bytes (the rest of a longer one is lost, as `read` on a tap or packet socket does).
func readFrame(_ fd: OwnedFileDescriptor, what: String, maximum: Int, timeoutMilliseconds: Int32) throws(SystemCallError) -> [UInt8]? {
    var poller = pollfd(fd: fd.raw, events: Int16(POLLIN), revents: 0)
    let ready = try retryingOnInterrupt("poll(\(what))") { poll(&poller, 1, timeoutMilliseconds) }
    guard ready > 0 else { return nil }
    var buffer = [UInt8](repeating: 0, count: maximum)
    let count = try retryingOnInterrupt("read(\(what))") { buffer.withUnsafeMutableBytes { Glibc.read(fd.raw, $0.baseAddress, $0.count) } }
    return Array(buffer.prefix(count))
}
