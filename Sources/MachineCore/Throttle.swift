#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Slows a guest by holding its vCPUs for a share of the time, from its own thread. A hold
/// is not a pause: the owner's pause, snapshots and the epoch know nothing of it.
// @unchecked: `percent` and `running` are guarded by `condition`.
final class Throttle: @unchecked Sendable {
    private let condition = NSCondition()
    private var percent = 0        // guarded by condition
    private var running = false    // guarded by condition
    /// The guest runs this long between holds; the hold lasts runMs·p/(100−p) (QEMU's way: at
    /// 99 % a 495 ms hold). A fixed 20 ms period left 0.2 ms of running at 99 %, which the
    /// scheduler's overshoot of so short a sleep made several times longer.
    static let runMs = 5.0

    func set(percent newValue: Int, machine: Machine) {
        condition.lock()
        percent = max(0, min(99, newValue))
        // A hold in progress ends early when the throttle is turned off.
        condition.broadcast()
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
            let heldMs = Self.runMs * Double(p) / Double(100 - p)
            guard machine.hold() else {
                condition.lock(); running = false; percent = 0; condition.broadcast(); condition.unlock()
                return
            }
            condition.lock()
            let until = Date(timeIntervalSinceNow: heldMs / 1000)
            while percent != 0 && condition.wait(until: until) {}
            let off = percent == 0
            condition.unlock()
            machine.releaseHold()
            if !off { usleep(UInt32(Self.runMs * 1000)) }
        }
    }
}
