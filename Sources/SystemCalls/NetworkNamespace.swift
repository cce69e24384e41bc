#if canImport(Glibc)
import Glibc
#endif
import CSystemCalls

/// Network namespaces, as `ip netns` keeps them (a file under /run/netns per namespace).
public enum NetworkNamespace {
    /// Moves the calling thread (only it) into the network namespace `path` names, e.g.
    /// `/run/netns/NAME`. Sockets and taps it opens from then on belong to that namespace;
    /// descriptors opened before keep theirs.
    public static func enterInThisThread(path: String) throws(SystemCallError) {
        let fd = try OwnedFileDescriptor.open(path, O_RDONLY | O_CLOEXEC)
        _ = try retryingOnInterrupt("setns(\(path), CLONE_NEWNET)") { csystemcalls_setns_net(fd.raw) }
    }
}
