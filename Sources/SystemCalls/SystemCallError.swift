#if canImport(Glibc)
import Glibc
#endif
import CSystemCalls

/// A failed system call: which call (with what it was given, when that helps) and
/// the `errno` it returned. Every layer names failures the same way through this.
public struct SystemCallError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The call, e.g. `open(/dev/kvm)`, `KVM_CREATE_VM` or `mmap`.
    public var call: String
    public var errno: Int32

    public init(_ call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    /// The error of the call that just failed, from the thread's `errno`.
    public static func last(_ call: String) -> SystemCallError {
        SystemCallError(call, errno: Glibc.errno)
    }

    /// The symbolic name, e.g. `ENOENT`.
    public var errnoName: String { Self.name(ofErrno: errno) }

    /// The C library's text for the errno, e.g. "No such file or directory".
    public var message: String { String(cString: strerror(errno)) }

    public var description: String { "\(call) failed: \(errnoName) (\(message))" }

    /// glibc's name for `code` (`strerrorname_np`), so no table here can drift from
    /// the C library; `errno N` for a value glibc does not know.
    public static func name(ofErrno code: Int32) -> String {
        guard let name = csystemcalls_errno_name(code) else { return "errno \(code)" }
        return String(cString: name)
    }
}

/// Runs a C call until it is not interrupted by a signal (`EINTR`). A negative
/// result is a failure with `errno` set, the C convention; it is thrown naming
/// `call`. Returns the call's non-negative result.
@inline(__always)
public func retryingOnInterrupt<Result: FixedWidthInteger>(
    _ call: @autoclosure () -> String, _ body: () -> Result
) throws(SystemCallError) -> Result {
    while true {
        let result = body()
        if result >= 0 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SystemCallError(call(), errno: code)
    }
}
