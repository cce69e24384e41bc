import Foundation
import Synchronization
import SystemCalls
import Testing

@Suite("Threads named where the kernel shows them")
struct NamedThreadTests {
    /// The kernel's name (comm) of the calling thread.
    private func kernelName() -> String? {
        (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8))?.trimmingCharacters(in: .newlines)
    }

    @Test("a thread started by startNamedThread has its name in /proc/thread-self/comm, cut to 15 bytes")
    func nameReachesTheKernel() {
        for (name, expected) in [("vcpu0", "vcpu0"), ("net-rx-a-long-tap-name", "net-rx-a-long-t")] {
            let seen = Mutex<String?>(nil)
            let done = DispatchSemaphore(value: 0)
            startNamedThread(name) {
                seen.withLock { $0 = kernelName() }
                done.signal()
            }
            done.wait()
            #expect(seen.withLock { $0 } == expected)
        }
    }
}
