#if canImport(Glibc)
import Glibc
#endif

/// A failed KVM operation: which ioctl (or syscall) and the `errno` it returned.
public struct KVMError: Error, Equatable, CustomStringConvertible {
    /// The ioctl or syscall, e.g. `KVM_CREATE_VM` or `open(/dev/kvm)`.
    public var operation: String
    public var errno: Int32
    /// What the user can do about it, when we know.
    public var hint: String?

    public init(_ operation: String, errno: Int32, hint: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.hint = hint
    }

    /// The symbolic name of the errno, e.g. `ENOENT`.
    public var errnoName: String {
        switch errno {
        case EPERM: "EPERM"; case ENOENT: "ENOENT"; case EINTR: "EINTR"; case EIO: "EIO"
        case ENXIO: "ENXIO"; case E2BIG: "E2BIG"; case EBADF: "EBADF"; case EAGAIN: "EAGAIN"
        case ENOMEM: "ENOMEM"; case EACCES: "EACCES"; case EFAULT: "EFAULT"; case EBUSY: "EBUSY"
        case EEXIST: "EEXIST"; case ENODEV: "ENODEV"; case EINVAL: "EINVAL"; case ENOSPC: "ENOSPC"
        case ENOTTY: "ENOTTY"; case ENOSYS: "ENOSYS"; case EOPNOTSUPP: "EOPNOTSUPP"
        default: "errno \(errno)"
        }
    }

    public var description: String {
        var s = "\(operation) failed: \(errnoName) (\(String(cString: strerror(errno))))"
        if let hint { s += "; \(hint)" }
        return s
    }
}

/// An owned file descriptor, closed exactly once when its owner goes away.
final class OwnedDescriptor: Sendable {
    let raw: Int32
    init(_ raw: Int32) { self.raw = raw }
    deinit { close(raw) }
}

/// The single place that calls `ioctl`: retries on `EINTR` unless asked not to,
/// and turns `-errno` into `KVMError` naming the request.
@inline(__always)
func kvmIoctl(_ fd: Int32, _ name: String, _ request: UInt, _ arg: UInt = 0,
              retryOnInterrupt: Bool = true) throws(KVMError) -> Int32 {
    while true {
        let r = ckvm_ioctl_value(fd, request, arg)
        if r >= 0 { return r }
        if -r == EINTR && retryOnInterrupt { continue }
        throw KVMError(name, errno: -r)
    }
}

@inline(__always)
func kvmIoctl(_ fd: Int32, _ name: String, _ request: UInt, _ pointer: UnsafeMutableRawPointer,
              retryOnInterrupt: Bool = true) throws(KVMError) -> Int32 {
    while true {
        let r = ckvm_ioctl_pointer(fd, request, pointer)
        if r >= 0 { return r }
        if -r == EINTR && retryOnInterrupt { continue }
        throw KVMError(name, errno: -r)
    }
}

import CKVM
