import Foundation
import MachineCore
import Migration
import NetworkFrames
import Synchronization
import SystemCalls

/// Sends a migrated guest's announcement (`Announcement.round`: the RARP, and a gratuitous ARP
/// for its IP) into the host's network on `schedule`, and records when each round went out and
/// how many frames the tap took or refused. As in QEMU (`qemu_announce_self`), the first round
/// goes at once, on the caller's thread, so it is out before the destination replies RUNNING;
/// the later ones go from a timer thread of their own, each the schedule's delay after the
/// previous send.
public final class Announcer: Sendable {
    public let schedule: AnnounceSchedule
    /// The frames of one round.
    public let frames: [[UInt8]]
    private let sink: @Sendable ([UInt8]) throws -> Void

    private struct Shared {
        var started = false
        var cancelled = false
        var finished = false
        var sentMs: [Double] = []
        var framesSent = 0
        var errors = 0
        var lastError: String?
    }
    private let shared = Mutex(Shared())
    private let wakeup = NSCondition()

    /// `sink` takes one Ethernet frame (the tap's writer) and throws when the tap refuses it;
    /// it is called on the thread that starts the announcer (round 1), then on the announcer's.
    public init(schedule: AnnounceSchedule, frames: [[UInt8]], sink: @escaping @Sendable ([UInt8]) throws -> Void) {
        self.schedule = schedule
        self.frames = frames
        self.sink = sink
    }

    /// The announcement of the guest with `mac` (and `ip`, when it has one).
    public convenience init(schedule: AnnounceSchedule, mac: MACAddress, ip: IPv4Address?, sink: @escaping @Sendable ([UInt8]) throws -> Void) {
        self.init(schedule: schedule, frames: Announcement.round(mac: mac, ip: ip), sink: sink)
    }

    /// Starts sending (once; later calls do nothing): round 1 before this returns, the rest
    /// from a thread. `resumedAt` (monotonic ms) is the moment the recorded times count from:
    /// the guest's resume.
    public func start(resumedAt: Double = monotonicMilliseconds()) {
        let first = shared.withLock { s in defer { s.started = true }; return !s.started }
        guard first else { return }
        guard schedule.rounds > 0 else { return finish() }
        sendRound(resumedAt: resumedAt)
        guard schedule.rounds > 1 else { return finish() }
        let delays = schedule.delays
        startOSThread(name: "announce") { [self] in
            for round in 1..<schedule.rounds {
                let deadline = (shared.withLock { $0.sentMs.last } ?? 0) + resumedAt + Double(delays[round - 1])
                guard waitUntil(monotonic: deadline) else { break }
                sendRound(resumedAt: resumedAt)
            }
            finish()
        }
    }

    /// One round: every frame, each failure counted (a refused frame does not stop the others).
    private func sendRound(resumedAt: Double) {
        let sentAt = monotonicMilliseconds()
        var sent = 0, failed = 0
        var lastError: String?
        for frame in frames {
            do {
                try sink(frame)
                sent += 1
            } catch {
                failed += 1
                lastError = "\(error)"
            }
        }
        shared.withLock { s in
            s.sentMs.append(sentAt - resumedAt)
            s.framesSent += sent
            s.errors += failed
            if let lastError { s.lastError = lastError }
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

    /// Where the announcement stands, for the migration reports.
    public var report: AnnounceReport {
        let s = shared.withLock { $0 }
        let state: AnnounceReport.State =
            schedule.rounds == 0 ? .off
            : !s.finished ? .sending
            : s.sentMs.count < schedule.rounds ? .cancelled
            : .finished
        return AnnounceReport(state: state, schedule: AnnounceReport.Schedule(schedule), plannedMs: schedule.offsets,
                              sentMs: s.sentMs, framesPerRound: frames.count, framesSent: s.framesSent,
                              errors: s.errors, lastError: s.lastError)
    }

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

extension AnnounceReport.Schedule {
    public init(_ schedule: AnnounceSchedule) {
        self.init(rounds: schedule.rounds, initialMs: schedule.initialMs, stepMs: schedule.stepMs, maxMs: schedule.maxMs)
    }
}

extension AnnounceReport {
    /// The report of an announcement that was never started: `off` (no rounds) or
    /// `not-connected` (no host side), with nothing sent.
    init(unsent state: State, schedule: AnnounceSchedule, framesPerRound: Int) {
        self.init(state: state, schedule: Schedule(schedule), plannedMs: state == .off ? [] : schedule.offsets,
                  framesPerRound: framesPerRound)
    }
}
