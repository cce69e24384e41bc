import SystemCalls

/// A failed KVM operation: which ioctl (or syscall) and the `errno` it returned.
/// The same naming as `SystemCallError`, plus what the user can do about it.
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

    /// The failed system call, with a hint.
    public init(_ error: SystemCallError, hint: String? = nil) {
        self.init(error.call, errno: error.errno, hint: hint)
    }

    /// The failure as a plain system call error (no hint).
    public var systemCallError: SystemCallError { SystemCallError(operation, errno: errno) }

    /// The symbolic name of the errno, e.g. `ENOENT`, from the C library.
    public var errnoName: String { systemCallError.errnoName }

    public var description: String {
        var s = systemCallError.description
        if let hint { s += "; \(hint)" }
        return s
    }
}
