import CSystemCalls
import Foundation

/// Starts `body` on a dedicated OS thread named `name` where the kernel shows it
/// (`/proc/PID/task/TID/comm`, `top -H`, `perf`), not only inside Foundation: on Linux
/// `Thread.name` set before `start()` never reaches the kernel, so every thread would be
/// called after the executable and a benchmark could not tell a vCPU thread from a
/// migration thread. Names longer than the kernel's 15 bytes are cut.
public func startNamedThread(_ name: String, stackSize: Int = 1 << 20, _ body: @escaping @Sendable () -> Void) {
    let kernelName = String(decoding: Array(name.utf8.prefix(15)), as: UTF8.self)
    let thread = Thread {
        // pthread_setname_np fails only for a name over 15 bytes, which is cut above; the
        // name is for people and tools, so a failure is not worth stopping a thread for.
        _ = csystemcalls_name_this_thread(kernelName)
        body()
    }
    thread.name = name
    thread.stackSize = stackSize
    thread.start()
}
