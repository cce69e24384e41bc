#if canImport(Glibc)
import Glibc
#endif
import CSystemCalls

/// Why a tap could not be attached, or a frame not written to it: always names the tap, and
/// says what to do.
public struct TapError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Reason: Equatable, Sendable {
        /// Not a name an interface can have.
        case invalidName
        /// No interface of that name in this network namespace.
        case missing
        /// An interface of that name exists but is not a single-queue tap (a tun, a bridge, a
        /// multi-queue tap).
        case notATap
        /// Another process (another VMM?) has the tap attached.
        case busy
        /// The tap belongs to another user or group, or the process lacks CAP_NET_ADMIN.
        case notPermitted
        /// A frame shorter than an Ethernet header, or longer than `TapDevice.maximumFrameLength`.
        case frameTooShort(length: Int)
        case frameTooLong(length: Int)
        /// Any other failure of a call on the tap.
        case system(SystemCallError)
    }

    public let tap: String
    public let reason: Reason

    public init(tap: String, reason: Reason) {
        self.tap = tap
        self.reason = reason
    }

    public var description: String {
        switch reason {
        case .invalidName:
            "'\(tap)' is not a tap interface name: give 1 to 15 bytes without '/', ':', blanks or control characters"
        case .missing:
            "there is no tap '\(tap)' in this network namespace: create it first (ip tuntap add dev \(tap) mode tap; ip link set \(tap) master BRIDGE up), or name an existing tap"
        case .notATap:
            "'\(tap)' is not a tap this VMM can use: it must be a single-queue tap (ip tuntap add dev \(tap) mode tap), not a tun, a multi-queue tap or another kind of interface"
        case .busy:
            "tap '\(tap)' is already attached by another process (another VMM?): stop that one, or give this guest its own tap"
        case .notPermitted:
            "tap '\(tap)' may not be attached by this process: run as root (CAP_NET_ADMIN) or as the tap's owner (ip tuntap add dev \(tap) mode tap user USER)"
        case let .frameTooShort(length):
            "a frame of \(length) bytes cannot go to tap '\(tap)': a frame needs at least its \(TapDevice.minimumFrameLength)-byte Ethernet header"
        case let .frameTooLong(length):
            "a frame of \(length) bytes cannot go to tap '\(tap)': at most \(TapDevice.maximumFrameLength) bytes (1500 of payload, the header and a VLAN tag) pass"
        case let .system(error):
            "tap '\(tap)': \(error)"
        }
    }
}

/// One queue of a Linux tap interface (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`): every `write`
/// is one Ethernet frame entering the host's network from the interface, every `read` one
/// frame the host sends out of it. The tap must already exist in the network namespace of
/// the calling thread (made by an administrator or a script, and made a port of a bridge
/// there): one that does not is refused, never created, since a tap the VMM made itself would
/// be down and connected to nothing. The descriptor is closed when this goes (or on `close()`).
public final class TapDevice: Sendable {
    public let descriptor: OwnedFileDescriptor
    /// The kernel's name of the interface (the one asked for).
    public let name: String

    /// A frame is at least its Ethernet header (destination, source, EtherType).
    public static let minimumFrameLength = 14
    /// The longest frame either way: Ethernet's 1514 plus room for a VLAN tag. Longer frames
    /// are not written, nor read whole.
    public static let maximumFrameLength = 1522

    /// Whether `name` can name a network interface: 1 to 15 bytes (IFNAMSIZ less the NUL), not
    /// "." or "..", no '/', ':', blanks or control characters.
    public static func isValidName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        return !bytes.isEmpty && bytes.count < 16 && name != "." && name != ".."
            && !bytes.contains { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 <= 0x20 || $0 == 0x7F }
    }

    /// The index of interface `name` in the calling thread's network namespace
    /// (`if_nametoindex`), or nil when there is none.
    public static func interfaceIndex(_ name: String) throws(SystemCallError) -> Int32? {
        do {
            return try retryingOnInterrupt("if_nametoindex(\(name))") { csystemcalls_interface_index(name) }
        } catch where error.errno == ENODEV || error.errno == ENXIO {
            return nil
        }
    }

    /// Opens /dev/net/tun and attaches it to the existing tap `name` (at most 15 bytes).
    public init(name: String) throws(TapError) {
        func failure(_ error: SystemCallError) -> TapError {
            let reason: TapError.Reason = switch error.errno {
            case EINVAL: .notATap
            case EBUSY: .busy
            case EPERM, EACCES: .notPermitted
            default: .system(error)
            }
            return TapError(tap: name, reason: reason)
        }
        guard Self.isValidName(name) else { throw TapError(tap: name, reason: .invalidName) }
        // TUNSETIFF would make a missing tap rather than fail: look first, and compare the
        // index after, so a tap deleted in between is not silently replaced by a new one.
        let index: Int32?
        do { index = try Self.interfaceIndex(name) } catch { throw TapError(tap: name, reason: .system(error)) }
        guard let index else { throw TapError(tap: name, reason: .missing) }
        let fd: OwnedFileDescriptor
        do { fd = try OwnedFileDescriptor.open("/dev/net/tun", O_RDWR | O_CLOEXEC) } catch { throw TapError(tap: name, reason: .system(error)) }
        var actual = [CChar](repeating: 0, count: 16)
        do {
            _ = try retryingOnInterrupt("TUNSETIFF(\(name))") { csystemcalls_tun_set_tap(fd.raw, name, &actual) }
        } catch {
            throw failure(error)
        }
        guard (try? Self.interfaceIndex(name)) == index else {
            fd.close()
            throw TapError(tap: name, reason: .missing)
        }
        descriptor = fd
        self.name = String(decoding: actual.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The tap's flags as the kernel has them for this descriptor (`TUNGETIFF`): `IFF_TAP`,
    /// `IFF_NO_PI`, `IFF_PERSIST`, ...
    public func interfaceFlags() throws(SystemCallError) -> Int32 {
        var attached = [CChar](repeating: 0, count: 16)
        return try retryingOnInterrupt("TUNGETIFF(\(name))") { csystemcalls_tun_get_flags(descriptor.raw, &attached) }
    }

    /// `IFF_TAP` and `IFF_NO_PI`, the flags every `TapDevice` attaches with.
    public static var tapFlags: Int32 { csystemcalls_tun_flag_tap() | csystemcalls_tun_flag_no_pi() }

    /// Sends one frame into the host's network. A frame shorter than an Ethernet header or
    /// longer than `maximumFrameLength` is refused before the call; a short write is an error
    /// too: a tap takes a frame whole or not at all.
    public func write(_ frame: [UInt8]) throws(TapError) {
        guard frame.count >= Self.minimumFrameLength else { throw TapError(tap: name, reason: .frameTooShort(length: frame.count)) }
        guard frame.count <= Self.maximumFrameLength else { throw TapError(tap: name, reason: .frameTooLong(length: frame.count)) }
        let written: Int
        do {
            written = try retryingOnInterrupt("write(\(name))") { frame.withUnsafeBytes { Glibc.write(descriptor.raw, $0.baseAddress, $0.count) } }
        } catch {
            throw TapError(tap: name, reason: .system(error))
        }
        guard written == frame.count else { throw TapError(tap: name, reason: .system(SystemCallError("write(\(name))", errno: EMSGSIZE))) }
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
