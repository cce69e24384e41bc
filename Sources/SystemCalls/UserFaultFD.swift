#if canImport(Glibc)
import Glibc
#endif
import CSystemCalls

/// One page fault a `UserFaultFD` reported: a thread (a vCPU inside `KVM_RUN`, or any thread of
/// this process) touched a missing page of a registered range and sleeps until it is installed.
public struct UserFault: Sendable, Equatable {
    /// The faulting host address (page-aligned by the kernel unless UFFD_FEATURE_EXACT_ADDRESS).
    public var address: UInt64
    /// Whether the access was a write.
    public var isWrite: Bool

    public init(address: UInt64, isWrite: Bool) {
        self.address = address
        self.isWrite = isWrite
    }
}

/// What an install (`copy`, `zeroPages`) did: pages it installed, and pages that were already
/// there (`EEXIST`: someone else installed them first, which is not an error when two threads
/// race to serve the same page).
public struct UserFaultInstall: Sendable, Equatable {
    public var installedBytes: UInt64 = 0
    public var alreadyPresentBytes: UInt64 = 0
    public init() {}
}

/// A userfaultfd (`userfaultfd(2)`): missing-page faults in the ranges registered with it are
/// reported here instead of being filled with zeros, and the faulting thread sleeps until a page
/// is installed (`copy`, `zeroPages`) or it is woken (`wake`).
///
/// Only MISSING mode, on private anonymous memory, is used. Nothing here knows where pages come
/// from: a snapshot file, a migration source, anything (see the `PageFaults` module's server).
///
/// Every ioctl is wrapped once here and fails with a `SystemCallError` naming it.
public final class UserFaultFD: Sendable {
    public static let pageSize: UInt64 = 4096
    /// The descriptor: poll it for `POLLIN` (non-blocking, close-on-exec).
    public let descriptor: OwnedFileDescriptor
    /// The features the kernel agreed to in the `UFFDIO_API` handshake.
    public let features: UInt64

    /// Creates the descriptor (`userfaultfd(O_CLOEXEC|O_NONBLOCK)`, falling back to
    /// `/dev/userfaultfd` where the system call is refused) and does the `UFFDIO_API` handshake.
    /// Kernel faults (KVM reading guest memory) must be reportable, so user-mode-only is not asked.
    public init(requiredFeatures: UInt64 = 0) throws(SystemCallError) {
        var raw = csystemcalls_userfaultfd(O_CLOEXEC | O_NONBLOCK)
        if raw < 0 {
            let first = SystemCallError.last("userfaultfd")
            guard first.errno == EPERM || first.errno == ENOSYS else { throw first }
            // USERFAULTFD_IOC_NEW on the device gives the same descriptor to whoever may open it.
            let device = try OwnedFileDescriptor.open("/dev/userfaultfd", O_RDWR | O_CLOEXEC)
            raw = csystemcalls_ioctl_pointer(device.raw, Self.iocNew, nil)
            if raw < 0 { throw SystemCallError.last("USERFAULTFD_IOC_NEW") }
            _ = fcntl(raw, F_SETFL, O_NONBLOCK)
            _ = fcntl(raw, F_SETFD, FD_CLOEXEC)
        }
        descriptor = OwnedFileDescriptor(taking: raw)
        var api = uffdio_api(api: csystemcalls_uffd_api_version(), features: requiredFeatures, ioctls: 0)
        _ = try Self.control(descriptor, csystemcalls_uffdio_api(), "UFFDIO_API", &api)
        guard api.features & requiredFeatures == requiredFeatures else {
            throw SystemCallError("UFFDIO_API (features 0x\(String(requiredFeatures, radix: 16)))", errno: EINVAL)
        }
        features = api.features
    }

    /// `_IO(0xAA, 0x00)`: the device's one ioctl, giving a new userfaultfd.
    private static let iocNew: UInt = 0xAA00

    /// One ioctl with a pointer argument, retried on `EINTR`.
    @discardableResult
    private static func control<Argument>(_ fd: OwnedFileDescriptor, _ request: UInt, _ name: String,
                                          _ argument: inout Argument) throws(SystemCallError) -> Int32 {
        try retryingOnInterrupt(name) { withUnsafeMutablePointer(to: &argument) { csystemcalls_ioctl_pointer(fd.raw, request, $0) } }
    }

    /// Registers `[address, address+length)` (page-aligned, whole VMAs of anonymous memory) in
    /// MISSING mode. Refused (`ENOTSUP`) if the range would not allow `UFFDIO_COPY` and
    /// `UFFDIO_ZEROPAGE`.
    public func register(address: UInt64, length: UInt64) throws(SystemCallError) {
        var r = uffdio_register(range: uffdio_range(start: address, len: length),
                                mode: csystemcalls_uffdio_register_mode_missing(), ioctls: 0)
        try Self.control(descriptor, csystemcalls_uffdio_register(), "UFFDIO_REGISTER", &r)
        let needed: UInt64 = (1 << UInt64(csystemcalls_uffdio_copy_bit())) | (1 << UInt64(csystemcalls_uffdio_zeropage_bit()))
        guard r.ioctls & needed == needed else { throw SystemCallError("UFFDIO_REGISTER (no UFFDIO_COPY or UFFDIO_ZEROPAGE)", errno: ENOTSUP) }
    }

    /// Unregisters a range: its missing pages fault as ordinary memory again (zeros), and threads
    /// sleeping on them are woken to retry.
    public func unregister(address: UInt64, length: UInt64) throws(SystemCallError) {
        var r = uffdio_range(start: address, len: length)
        try Self.control(descriptor, csystemcalls_uffdio_unregister(), "UFFDIO_UNREGISTER", &r)
    }

    /// Wakes threads sleeping on faults in the range (they retry the access; a page still missing
    /// faults again).
    public func wake(address: UInt64, length: UInt64) throws(SystemCallError) {
        var r = uffdio_range(start: address, len: length)
        try Self.control(descriptor, csystemcalls_uffdio_wake(), "UFFDIO_WAKE", &r)
    }

    /// Installs `length` bytes from `source` at `address` atomically (`UFFDIO_COPY`: a page is
    /// either missing or complete, never half-written) and wakes threads waiting on them. Pages
    /// already present are skipped and counted (`EEXIST`); `EAGAIN` (the mappings changing) is
    /// retried from where the kernel stopped.
    public func copy(from source: UnsafeRawPointer, to address: UInt64, length: UInt64) throws(SystemCallError) -> UserFaultInstall {
        try install("UFFDIO_COPY", length: length) { done in
            var c = uffdio_copy(dst: address + done, src: UInt64(UInt(bitPattern: source + Int(done))), len: length - done,
                                mode: 0, copy: 0)
            let result = withUnsafeMutablePointer(to: &c) { csystemcalls_ioctl_pointer(descriptor.raw, csystemcalls_uffdio_copy(), $0) }
            return (result, c.copy)
        }
    }

    /// Maps the zero page over `length` bytes at `address` (`UFFDIO_ZEROPAGE`: nothing allocated
    /// until the guest writes) and wakes waiters; present pages skipped, as for `copy`.
    public func zeroPages(at address: UInt64, length: UInt64) throws(SystemCallError) -> UserFaultInstall {
        try install("UFFDIO_ZEROPAGE", length: length) { done in
            var z = uffdio_zeropage(range: uffdio_range(start: address + done, len: length - done), mode: 0, zeropage: 0)
            let result = withUnsafeMutablePointer(to: &z) { csystemcalls_ioctl_pointer(descriptor.raw, csystemcalls_uffdio_zeropage(), $0) }
            return (result, z.zeropage)
        }
    }

    /// The retry loop both installs share: `attempt(done)` issues the ioctl for the bytes from
    /// `done` on and returns its result and the kernel's progress field (bytes, or -errno).
    /// Progress counts even when the call fails; `EEXIST` skips one present page; `EINTR` and
    /// `EAGAIN` retry from where the kernel stopped.
    private func install(_ call: String, length: UInt64,
                         attempt: (UInt64) -> (result: Int32, progress: Int64)) throws(SystemCallError) -> UserFaultInstall {
        var outcome = UserFaultInstall()
        var done: UInt64 = 0
        while done < length {
            let (result, progress) = attempt(done)
            let code = result < 0 ? Glibc.errno : 0
            let progressed = progress > 0 ? UInt64(progress) : 0
            outcome.installedBytes += progressed
            done += progressed
            if result >= 0 { continue }
            switch code {
            case EINTR, EAGAIN: continue
            case EEXIST:
                outcome.alreadyPresentBytes += Self.pageSize
                done += Self.pageSize
            default: throw SystemCallError(call, errno: code)
            }
        }
        return outcome
    }

    /// The page faults waiting to be read, at most `limit`; empty when none is (non-blocking).
    /// Events other than page faults (none are asked for in the handshake) are skipped.
    public func readFaults(limit: Int = 64) throws(SystemCallError) -> [UserFault] {
        let size = Int(csystemcalls_uffd_msg_size())
        var buffer = [UInt8](repeating: 0, count: size * limit)
        let n = buffer.withUnsafeMutableBytes { read(descriptor.raw, $0.baseAddress, $0.count) }
        if n < 0 {
            let code = Glibc.errno
            if code == EAGAIN || code == EINTR { return [] }
            throw SystemCallError("read(userfaultfd)", errno: code)
        }
        let flagsAt = Int(csystemcalls_uffd_msg_pagefault_flags_offset())
        let addressAt = Int(csystemcalls_uffd_msg_pagefault_address_offset())
        var faults: [UserFault] = []
        for start in stride(from: 0, to: n - size + 1, by: size) where buffer[start] == csystemcalls_uffd_event_pagefault() {
            let flags = buffer.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: start + flagsAt, as: UInt64.self) }
            let address = buffer.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: start + addressAt, as: UInt64.self) }
            faults.append(UserFault(address: address, isWrite: flags & csystemcalls_uffd_pagefault_flag_write() != 0))
        }
        return faults
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) until a fault can be read or `other`
    /// (e.g. a stop pipe) is readable. Returns which of the two is ready.
    public func waitForFaults(orReadable other: OwnedFileDescriptor?, timeoutMilliseconds: Int32) throws(SystemCallError)
        -> (faults: Bool, other: Bool) {
        var fds = [pollfd(fd: descriptor.raw, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: other?.raw ?? -1, events: Int16(POLLIN), revents: 0)]
        let n = poll(&fds, nfds_t(fds.count), timeoutMilliseconds)
        if n < 0 {
            if Glibc.errno == EINTR { return (false, false) }
            throw SystemCallError.last("poll(userfaultfd)")
        }
        let ready = Int16(POLLIN | POLLERR | POLLHUP)
        return (fds[0].revents & ready != 0, fds[1].revents & ready != 0)
    }
}
