#if canImport(Glibc)
import Glibc
#endif
import CSystemCalls

/// Linux network namespaces, entered one thread at a time.
public enum NetworkNamespace {
    /// Moves the calling thread (only it) into the network namespace at `path`, e.g.
    /// `/run/netns/NAME` or `/proc/PID/ns/net`. Sockets and taps it opens afterwards belong to
    /// that namespace for their whole life, whichever thread uses them later.
    public static func enter(path: String) throws(SystemCallError) {
        let fd = try OwnedFileDescriptor.open(path, O_RDONLY | O_CLOEXEC)
        defer { fd.close() }
        _ = try retryingOnInterrupt("setns(\(path), CLONE_NEWNET)") { csystemcalls_setns_net(fd.raw) }
    }
}

/// An `AF_PACKET` raw socket on one interface: a capture of every frame it sends or receives.
public final class PacketSocket: Sendable {
    public let descriptor: OwnedFileDescriptor
    public let interface: String

    /// Opens a capture on `interface` of the calling thread's network namespace.
    public init(interface: String) throws(SystemCallError) {
        let raw = try retryingOnInterrupt("socket(AF_PACKET) on \(interface)") { csystemcalls_packet_socket(interface) }
        descriptor = OwnedFileDescriptor(taking: raw)
        self.interface = interface
    }

    /// The next frame, or nil when none came within `timeoutMilliseconds`.
    public func receive(timeoutMilliseconds: Int32) throws(SystemCallError) -> [UInt8]? {
        try readFrame(descriptor, what: "capture on \(interface)", maximum: 65_536, timeoutMilliseconds: timeoutMilliseconds)
    }

    /// Sends `frame` out of the interface, as the host's own stack would: on a tap, the frame
    /// is what the tap's reader (the guest's card) reads next.
    public func send(_ frame: [UInt8]) throws(SystemCallError) {
        let sent = try retryingOnInterrupt("send(packet socket on \(interface))") {
            frame.withUnsafeBytes { Glibc.send(descriptor.raw, $0.baseAddress, $0.count, 0) }
        }
        guard sent == frame.count else { throw SystemCallError("send(packet socket on \(interface))", errno: EMSGSIZE) }
    }

    public func close() { descriptor.close() }
}
