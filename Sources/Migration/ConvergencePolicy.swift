import Foundation
import GuestMemory

// What pre-copy does when the estimator says it will not fit the downtime limit as it goes:
// nothing (`off`), slow the guest (`throttle`), or first send the hot pages last and then slow
// the guest (`adaptive`, the default). Pure decisions on the estimator's figures: the sender
// applies them (the throttle, the pages it holds back) and the report lists them.

/// The convergence policy of a migration (`"convergence"`, `--convergence`).
public enum ConvergenceMode: String, Codable, Sendable, CaseIterable {
    /// Iterate until the predicted final round fits the limit, or the time limit.
    case off
    /// When the rounds stall, hold the vCPUs for a share of the time sized from the dirty/link
    /// ratio, raised while they still stall (what `auto_converge: true` asks for).
    case throttle
    /// When the rounds stall, first hold the hot pages (written in consecutive rounds) for the
    /// final round if they fit it, so that the rounds move the cold ones; then throttle.
    case adaptive
}

/// One thing the policy did, in the report.
public struct ConvergenceAction: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        /// Hot pages are held back for the final round (`pages`), or sent last in each round.
        case hotPagesLast = "hot-pages-last"
        /// The vCPUs are held for `percent` % of the time.
        case throttle
    }
    /// The round after which it was decided (0: after round 0).
    public var round: Int
    public var action: Kind
    public var percent: Int?
    public var pages: Int?
    public var why: String

    public init(round: Int, action: Kind, percent: Int? = nil, pages: Int? = nil, why: String) {
        self.round = round
        self.action = action
        self.percent = percent
        self.pages = pages
        self.why = why
    }
}

/// Decides, after each pre-copy round, what the policy does about a stall.
public struct ConvergencePolicy: Sendable {
    public let mode: ConvergenceMode
    public let maxDowntimeMs: Double
    /// The share of time the vCPUs should be held (0 = not throttled).
    public private(set) var throttlePercent = 0
    /// Whether the hot pages are to be held for the final round (adaptive, when they fit it).
    public private(set) var holdHot = false
    /// Whether hot pages go last in each round (adaptive, once a stall was seen).
    public private(set) var hotLast = false
    public private(set) var actions: [ConvergenceAction] = []
    private var triedHot = false

    /// The throttle aims at this dirty/link ratio: well under 1, so that what is left halves
    /// each round.
    public static let targetRatio = 0.5
    /// Held pages may take at most this share of the limit: the cold pages left need the rest.
    public static let heldShareOfLimit = 0.5
    public static let maxThrottle = 99

    public init(mode: ConvergenceMode, maxDowntimeMs: Double) {
        self.mode = mode
        self.maxDowntimeMs = maxDowntimeMs
    }

    /// Acts on the verdict after round `round`. `hotPages`: pages dirtied in this round and the
    /// one before that are not held yet. Only a stall the rounds' figures show is acted on: a
    /// guest whose rounds shrink or fit is never throttled, and the time limit is no stall to
    /// act on (the migration ends there).
    public mutating func decide(round: Int, estimator: ConvergenceEstimator, verdict: ConvergenceVerdict, hotPages: Int) {
        guard mode != .off, case let .stalled(stall) = verdict, stall.kind != .timeout else { return }
        if mode == .adaptive && !triedHot {
            triedHot = true
            if hotPages > 0, let link = estimator.linkRate, link > 0 {
                hotLast = true
                let heldMs = Double(estimator.heldPages + hotPages) * estimator.parameters.pageBytes / link * 1000
                if heldMs <= maxDowntimeMs * Self.heldShareOfLimit {
                    holdHot = true
                    actions.append(ConvergenceAction(round: round, action: .hotPagesLast, pages: hotPages, why: String(
                        format: "%@; %d pages were written in each of the last two rounds: held for the final round (%.0f ms of the %.0f ms limit) so that the rounds move the cold ones",
                        stall.description, hotPages, heldMs, maxDowntimeMs)))
                    return
                }
                actions.append(ConvergenceAction(round: round, action: .hotPagesLast, pages: hotPages, why: String(
                    format: "%d pages were written in each of the last two rounds: sent last in each round; alone they need %.0f ms, over the %.0f ms limit, so only a slower guest gets there",
                    hotPages, heldMs, maxDowntimeMs)))
            }
        }
        raiseThrottle(round: round, estimator: estimator, stall: stall)
    }

    /// Sizes the throttle from ρ: the measured dirty rate is the guest's at the current throttle,
    /// so the share of time it runs must shrink by ρ / target; by at least half while it stalls
    /// (a hot set rewritten whole each round shows ρ ≈ 1 whatever its real rate).
    private mutating func raiseThrottle(round: Int, estimator: ConvergenceEstimator, stall: ConvergenceStall) {
        guard throttlePercent < Self.maxThrottle else { return }
        let ratio = estimator.dirtyToLinkRatio ?? 1
        let factor = max(ratio / Self.targetRatio, 2)
        let running = Double(100 - throttlePercent) / factor
        let next = min(Self.maxThrottle, max(throttlePercent + 1, Int((100 - running).rounded(.up))))
        throttlePercent = next
        actions.append(ConvergenceAction(round: round, action: .throttle, percent: next, why: String(
            format: "%@; dirty/link ratio %.2f: the guest runs %d %% of the time, aiming at %.2f", stall.description, ratio, 100 - next, Self.targetRatio)))
    }
}

extension DirtyBitmap {
    /// The pages set in both.
    func intersection(_ other: DirtyBitmap) -> DirtyBitmap {
        var result = DirtyBitmap(pageCount: pageCount)
        for i in 0..<min(words.count, other.words.count) where words[i] & other.words[i] != 0 {
            result.merge(word: words[i] & other.words[i], at: i)
        }
        return result
    }

    /// The pages set here and not in `other`.
    func subtracting(_ other: DirtyBitmap) -> DirtyBitmap {
        var result = DirtyBitmap(pageCount: pageCount)
        for i in words.indices {
            let word = i < other.words.count ? words[i] & ~other.words[i] : words[i]
            if word != 0 { result.merge(word: word, at: i) }
        }
        return result
    }
}
