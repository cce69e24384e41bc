import Foundation
import Synchronization
import SystemCalls

/// How the two sides of a post-copy migration tell a live link from a dead one. After the switch
/// neither side may wait out a transport timeout (half a minute) with a guest whose pages are on
/// the other side: the destination asks for a heartbeat on the page channel whenever it has
/// heard nothing for `heartbeatSeconds`, the source answers at once, and each side gives the
/// link up once it has heard nothing for `silenceSeconds`. A cut link or a dead peer process
/// (its sockets close) is usually noticed at once; a link that only goes quiet within
/// `silenceSeconds`.
public struct PostCopyLiveness: Sendable, Equatable {
    public var heartbeatSeconds: Double
    public var silenceSeconds: Double

    public init(heartbeatSeconds: Double = 1, silenceSeconds: Double = 5) {
        self.heartbeatSeconds = heartbeatSeconds
        self.silenceSeconds = silenceSeconds
    }

    public static let standard = PostCopyLiveness()
}

/// When the other side was last heard from (monotonic ms): any section on a post-copy connection.
final class LinkClock: Sendable {
    private let last = Mutex(monotonicMilliseconds())
    func heard() { last.withLock { $0 = monotonicMilliseconds() } }
    /// Seconds since the other side was last heard from.
    var silentSeconds: Double { (monotonicMilliseconds() - last.withLock { $0 }) / 1000 }
}

/// A thread that calls `onSilence` once, when `clock` has been silent for the liveness limit,
/// unless stopped first.
final class SilenceWatch: Sendable {
    private let stopped = Mutex(false)

    init(clock: LinkClock, liveness: PostCopyLiveness, name: String, onSilence: @escaping @Sendable (Double) -> Void) {
        let thread = Thread { [self] in
            let tick = UInt32(min(max(liveness.heartbeatSeconds / 4, 0.01), 0.25) * 1_000_000)
            while !stopped.withLock({ $0 }) {
                let silent = clock.silentSeconds
                if silent >= liveness.silenceSeconds {
                    if !stopped.withLock({ $0 }) { onSilence(silent) }
                    return
                }
                usleep(tick)
            }
        }
        thread.name = name
        thread.start()
    }

    func stop() { stopped.withLock { $0 = true } }
}
