import Foundation
import MachineCore
import NetworkFrames
import Synchronization
import SystemCalls

/// Sends a migrated guest's announcement (`Announcement.round`: the RARP, and a gratuitous ARP
/// for its IP) into the host's network on `schedule`, from a timer thread of its own, and
/// records when each round went out. As in QEMU, the first round goes at once and each later
/// one the schedule's delay after the previous send.
public final class Announcer: Sendable {
    public let schedule: AnnounceSchedule
    /// The frames of one round.
    public let frames: [[UInt8]]
    private let sink: @Sendable ([UInt8]) -> Void

    private struct Shared {
        var started = false
        var cancelled = false
        var finished = false
        var sentMs: [Double] = []
    }
    private let shared = Mutex(Shared())
    private let wakeup = NSCondition()

    /// `sink` takes one Ethernet frame (the tap's writer); it is called on the announcer's thread.
    public init(schedule: AnnounceSchedule, frames: [[UInt8]], sink: @escaping @Sendable ([UInt8]) -> Void) {
        self.schedule = schedule
        self.frames = frames
        self.sink = sink
    }

    /// The announcement of the guest with `mac` (and `ip`, when it has one).
    public convenience init(schedule: AnnounceSchedule, mac: MACAddress, ip: IPv4Address?, sink: @escaping @Sendable ([UInt8]) -> Void) {
        self.init(schedule: schedule, frames: Announcement.round(mac: mac, ip: ip), sink: sink)
    }

    /// Starts sending (once; later calls do nothing). `resumedAt` (monotonic ms) is the moment
    /// the recorded times count from: the guest's resume.
    public func start(resumedAt: Double = monotonicMilliseconds()) {
        let first = shared.withLock { s in defer { s.started = true }; return !s.started }
        guard first else { return }
        guard schedule.rounds > 0 else {
            finish()
            return
        }
        let delays = schedule.delays
        startOSThread(name: "announce") { [self] in
            for round in 0..<schedule.rounds {
                if round > 0 {
                    let deadline = (shared.withLock { $0.sentMs.last } ?? 0) + resumedAt + Double(delays[round - 1])
                    guard waitUntil(monotonic: deadline) else { break }
                }
                let sentAt = monotonicMilliseconds()
                for frame in frames { sink(frame) }
                shared.withLock { $0.sentMs.append(sentAt - resumedAt) }
            }
            finish()
        }
    }

    /// Stops before the next round (the guest ended or moved on); a round being sent completes.
    public func cancel() {
        wakeup.lock(); shared.withLock { $0.cancelled = true }; wakeup.broadcast(); wakeup.unlock()
    }

    /// When each round went out so far, in ms since the resume.
    public var sentMs: [Double] { shared.withLock { $0.sentMs } }

    /// Whether every round went out, or the announcer was cancelled and has stopped.
    public var isFinished: Bool { shared.withLock { $0.finished } }

    /// Waits until finished or `timeout` seconds pass; whether it finished.
    public func waitUntilFinished(timeout: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        wakeup.lock(); defer { wakeup.unlock() }
        while !isFinished { if !wakeup.wait(until: deadline) { return isFinished } }
        return true
    }

    private func finish() {
        wakeup.lock(); shared.withLock { $0.finished = true }; wakeup.broadcast(); wakeup.unlock()
    }

    /// Sleeps until the monotonic clock reaches `deadline` (ms); false if cancelled first.
    private func waitUntil(monotonic deadline: Double) -> Bool {
        wakeup.lock(); defer { wakeup.unlock() }
        while true {
            if shared.withLock({ $0.cancelled }) { return false }
            let remaining = deadline - monotonicMilliseconds()
            if remaining <= 0 { return true }
            _ = wakeup.wait(until: Date().addingTimeInterval(remaining / 1000))
        }
    }
}
