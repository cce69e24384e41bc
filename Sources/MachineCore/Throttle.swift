#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Slows a guest by holding its vCPUs for a share of each period, from its own thread. A hold
/// is not a pause: the owner's pause, snapshots and the epoch know nothing of it.
// @unchecked: `percent` and `running` are guarded by `condition`.
final class Throttle: @unchecked Sendable {
    private let condition = NSCondition()
    private var percent = 0        // guarded by condition
    private var running = false    // guarded by condition
    static let periodMs = 20.0

    func set(percent newValue: Int, machine: Machine) {
        condition.lock()
        percent = max(0, min(99, newValue))
        if percent > 0 && !running {
            running = true
            condition.unlock()
            startOSThread(name: "throttle") { [self] in loop(machine) }
            return
        }
        // Turning it off waits until the loop has resumed the guest and left.
        while percent == 0 && running { condition.wait() }
        condition.unlock()
    }

    private func loop(_ machine: Machine) {
        while true {
            condition.lock()
            let p = percent
            if p == 0 {
                running = false
                condition.broadcast()
                condition.unlock()
                return
            }
            condition.unlock()
            let held = Self.periodMs * Double(p) / 100
            guard machine.hold() else {
                condition.lock(); running = false; percent = 0; condition.broadcast(); condition.unlock()
                return
            }
            usleep(UInt32(held * 1000))
            machine.releaseHold()
            usleep(UInt32((Self.periodMs - held) * 1000))
        }
    }
}
