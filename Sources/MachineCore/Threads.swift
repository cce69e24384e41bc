#if canImport(Glibc)
import Glibc
#endif
import Foundation
import SystemCalls

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`. Its handler is
/// empty: the point is only that the blocking ioctl returns EINTR.
enum KickSignal {
    static var number: Int32 { __libc_current_sigrtmin() }

    private static let installed: Bool = {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0
        sigaction(KickSignal.number, &action, nil)
        return true
    }()

    /// Installs the empty handler once per process.
    static func install() { _ = installed }

    /// Unblocks the kick in the calling (vCPU) thread: a parent process or library
    /// may have left it blocked, and a blocked kick never interrupts `KVM_RUN`.
    static func unblockInThisThread() {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, number)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }
}

/// Starts `body` on a dedicated OS thread (never a Swift Task: a blocked `KVM_RUN`
/// would starve the cooperative pool) and returns once the thread is running.
public func startOSThread(name: String, _ body: @escaping @Sendable () -> Void) {
    startNamedThread(name, body)
}

/// Blocks SIGINT and SIGTERM in the calling thread (and the threads it creates
/// afterwards), and handles them on one dedicated thread with `sigwait`.
public enum TerminationSignals {
    /// Call before creating any thread; `handler` runs on the signal thread.
    public static func handle(_ handler: @escaping @Sendable (Int32) -> Void) {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let captured = set
        startOSThread(name: "signals") {
            var set = captured
            while true {
                var signal: Int32 = 0
                if sigwait(&set, &signal) == 0 { handler(signal) }
            }
        }
    }
}
