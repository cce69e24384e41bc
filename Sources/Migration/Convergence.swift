import Foundation

// Whether pre-copy is getting anywhere: fed each round's figures, the estimator measures how
// fast the guest dirties pages and how fast the link sends them, predicts how long the final
// (paused) round would take, and says whether that fits the downtime limit now, will fit after
// a few more rounds, or never will (with why). Pure arithmetic, no clock and no I/O: the sender
// feeds it, and a convergence policy (throttle, switch to post-copy) acts on its verdict.

/// One pre-copy round, as the estimator sees it.
public struct RoundFigures: Sendable, Equatable {
    /// Pages the round sent.
    public var pagesSent: Int
    /// Bytes it put on the link (section headers, checksums and zero-page records included).
    public var bytesSent: UInt64
    /// How long sending took.
    public var seconds: Double
    /// Pages written while it ran (found dirty when it ended): what the next round must send.
    public var pagesDirtied: Int

    public init(pagesSent: Int, bytesSent: UInt64, seconds: Double, pagesDirtied: Int) {
        self.pagesSent = pagesSent
        self.bytesSent = bytesSent
        self.seconds = seconds
        self.pagesDirtied = pagesDirtied
    }
}

/// Why pre-copy will not converge, in words with the figures behind them.
public struct ConvergenceStall: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Codable, Sendable {
        /// Rounds stopped shrinking what is left (a hot working set rewritten each round).
        case notShrinking = "not-shrinking"
        /// The guest dirties pages at least as fast as the link sends them.
        case dirtyFasterThanLink = "dirty-faster-than-link"
        /// It shrinks, but too slowly to fit the limit within the rounds or time left.
        case tooSlowToFit = "too-slow-to-fit"
        /// The time limit came first.
        case timeout
    }
    public var kind: Kind
    public var description: String

    public init(kind: Kind, description: String) {
        self.kind = kind
        self.description = description
    }
}

/// What the estimator makes of the rounds so far.
public enum ConvergenceVerdict: Sendable, Equatable {
    /// No round measured yet.
    case unknown
    /// What is left goes within the downtime limit now.
    case fits
    /// Not yet, but it shrinks fast enough: about `roundsToFit` more rounds (nil until a round
    /// after round 0 measured how fast the guest dirties its working set).
    case converging(roundsToFit: Int?)
    /// It will not fit the limit by going on as it is.
    case stalled(ConvergenceStall)
}

/// Estimates dirty rate and link rate over the last rounds and judges convergence.
///
/// The model: a round that sends P pages at link rate L (bytes/s) takes P·B/L seconds (B bytes a
/// page), during which the guest dirties d pages/s, so the next round has about ρ = d·B/L times
/// as much to send. With ρ < 1 what is left shrinks geometrically until the final round fits the
/// downtime limit; with ρ ≥ 1, or when a hot working set keeps what is left at the same size,
/// it never does. A throttling policy lowers d; the ratio (`dirtyToLinkRatio`) tells by how much.
public struct ConvergenceEstimator: Sendable {
    public struct Parameters: Sendable, Equatable {
        /// The final round must take at most this long.
        public var maxDowntimeMs: Double
        /// Rates are measured over this many recent rounds.
        public var window: Int
        /// Bytes a dirty page costs on the link (dirty pages are rarely zero).
        public var pageBytes: Double
        /// Rounds smaller than this measure latency rather than bandwidth and are left out of
        /// the link rate while larger ones exist.
        public var minimumRatePages: Int
        /// A round counts as shrinking what is left when it leaves fewer than this share of
        /// the pages it sent.
        public var shrinkBelow: Double
        /// Consecutive rounds after round 0 that did not shrink before the verdict is a stall.
        public var stallRounds: Int
        /// More rounds than this to fit the limit is a stall.
        public var maxRoundsToFit: Int

        public init(maxDowntimeMs: Double, window: Int = 3, pageBytes: Double = 4096, minimumRatePages: Int = 256,
                    shrinkBelow: Double = 0.9, stallRounds: Int = 2, maxRoundsToFit: Int = 30) {
            self.maxDowntimeMs = maxDowntimeMs
            self.window = max(1, window)
            self.pageBytes = pageBytes
            self.minimumRatePages = minimumRatePages
            self.shrinkBelow = shrinkBelow
            self.stallRounds = max(1, stallRounds)
            self.maxRoundsToFit = maxRoundsToFit
        }
    }

    public let parameters: Parameters
    /// Every round recorded, round 0 first.
    public private(set) var rounds: [RoundFigures] = []

    public init(parameters: Parameters) { self.parameters = parameters }
    public init(maxDowntimeMs: Double) { self.init(parameters: Parameters(maxDowntimeMs: maxDowntimeMs)) }

    /// Pages a policy holds back for the final round (written in consecutive rounds): not in
    /// any round's figures, but the final round must send them.
    public var heldPages = 0

    public mutating func record(_ round: RoundFigures) { rounds.append(round) }

    /// Pages left for the next (or final) round, held ones included.
    public var pagesLeft: Int { (rounds.last?.pagesDirtied ?? 0) + heldPages }

    /// Bytes per second the link carried over the recent rounds large enough to measure it;
    /// when there are none, the best any round managed (small rounds underestimate the link).
    public var linkRate: Double? {
        let recent = rounds.suffix(parameters.window).filter { $0.pagesSent >= parameters.minimumRatePages && $0.seconds > 0 }
        if !recent.isEmpty {
            return Double(recent.reduce(0) { $0 + $1.bytesSent }) / recent.reduce(0) { $0 + $1.seconds }
        }
        let rates = rounds.filter { $0.seconds > 0 && $0.bytesSent > 0 }.map { Double($0.bytesSent) / $0.seconds }
        return rates.max()
    }

    /// Pages per second the guest dirtied over the recent rounds. Round 0 counts only while it
    /// is the only one: it sends all memory, and its figures say little about a hot working set.
    public var dirtyRate: Double? {
        let later = rounds.count > 1 ? rounds.dropFirst() : rounds[...]
        let recent = later.suffix(parameters.window).filter { $0.seconds > 0 }
        let seconds = recent.reduce(0) { $0 + $1.seconds }
        guard seconds > 0 else { return nil }
        return Double(recent.reduce(0) { $0 + $1.pagesDirtied }) / seconds
    }

    /// ρ: bytes dirtied per byte sent. Below 1 what is left shrinks by about this factor each
    /// round; at 1 or above it never shrinks.
    public var dirtyToLinkRatio: Double? {
        guard let dirty = dirtyRate, let link = linkRate, link > 0 else { return nil }
        return dirty * parameters.pageBytes / link
    }

    /// How long the final round would take if it came now.
    public var predictedFinalRoundMs: Double? {
        guard let link = linkRate, link > 0 else { return nil }
        return Double(pagesLeft) * parameters.pageBytes / link * 1000
    }

    /// The verdict on the rounds so far. `secondsLeft`: time left before the migration's time
    /// limit, if it has one (at or below 0: the limit has come).
    public func verdict(secondsLeft: Double? = nil) -> ConvergenceVerdict {
        guard !rounds.isEmpty, let predicted = predictedFinalRoundMs else { return .unknown }
        let limit = parameters.maxDowntimeMs
        if predicted <= limit { return .fits }
        let left = pagesLeft
        func ms(_ value: Double) -> String { String(format: "%.0f ms", value) }
        let overLimit = "the final round would take \(ms(predicted)) for \(left) pages, over the \(ms(limit)) limit"
        if let secondsLeft, secondsLeft <= 0 {
            return .stalled(ConvergenceStall(kind: .timeout, description: "pre-copy reached its time limit; \(overLimit)"))
        }
        // Rounds after round 0 that did not shrink what is left.
        let later = rounds.dropFirst()
        let last = later.suffix(parameters.stallRounds)
        if last.count == parameters.stallRounds,
           last.allSatisfy({ $0.pagesSent > 0 && Double($0.pagesDirtied) >= parameters.shrinkBelow * Double($0.pagesSent) }) {
            let sent = last.map { String($0.pagesSent) }.joined(separator: ", ")
            let leftBehind = last.map { String($0.pagesDirtied) }.joined(separator: ", ")
            return .stalled(ConvergenceStall(kind: .notShrinking, description:
                "what is left stopped shrinking: the last \(last.count) rounds sent \(sent) pages and left \(leftBehind); \(overLimit)"))
        }
        // Rates need a round after round 0 to say anything about the working set.
        guard !later.isEmpty, let ratio = dirtyToLinkRatio, let dirty = dirtyRate, let link = linkRate else {
            return .converging(roundsToFit: nil)
        }
        func mbs(_ bytesPerSecond: Double) -> String { String(format: "%.1f MB/s", bytesPerSecond / 1e6) }
        if ratio >= 1 {
            return .stalled(ConvergenceStall(kind: .dirtyFasterThanLink, description:
                "the guest dirties \(mbs(dirty * parameters.pageBytes)), the link sends \(mbs(link)); \(overLimit)"))
        }
        // Geometric shrinking: predicted·ρⁿ ≤ limit after n more rounds, which take about
        // predicted·(1 + ρ + … + ρⁿ⁻¹).
        let rounds = ratio <= 0 ? 1 : Int((log(limit / predicted) / log(ratio)).rounded(.up))
        let needsMs = ratio <= 0 ? predicted : predicted * (1 - pow(ratio, Double(rounds))) / (1 - ratio)
        if rounds > parameters.maxRoundsToFit {
            return .stalled(ConvergenceStall(kind: .tooSlowToFit, description: String(format:
                "what is left shrinks by only %.1f%% a round: about %d more rounds to fit; %@", (1 - ratio) * 100, rounds, overLimit)))
        }
        if let secondsLeft, needsMs > secondsLeft * 1000 {
            return .stalled(ConvergenceStall(kind: .tooSlowToFit, description: String(format:
                "about %d more rounds (%.1f s) to fit, with %.1f s left before the time limit; %@", rounds, needsMs / 1000, secondsLeft, overLimit)))
        }
        return .converging(roundsToFit: max(1, rounds))
    }

    /// The figures as the report shows them.
    public func snapshot(secondsLeft: Double? = nil) -> ConvergenceFigures {
        var figures = ConvergenceFigures()
        figures.linkRateBytesPerSecond = linkRate
        figures.dirtyRatePagesPerSecond = dirtyRate
        figures.dirtyToLinkRatio = dirtyToLinkRatio
        figures.predictedFinalRoundMs = predictedFinalRoundMs
        switch verdict(secondsLeft: secondsLeft) {
        case .unknown: figures.verdict = "unknown"
        case .fits: figures.verdict = "fits"
        case .converging: figures.verdict = "converging"
        case let .stalled(stall):
            figures.verdict = "stalled"
            figures.stall = stall.kind
            figures.reason = stall.description
        }
        return figures
    }
}

/// The estimator's view after the last pre-copy round, in the report.
public struct ConvergenceFigures: Codable, Sendable, Equatable {
    /// "unknown", "fits", "converging" or "stalled".
    public var verdict = "unknown"
    public var stall: ConvergenceStall.Kind?
    public var reason: String?
    public var linkRateBytesPerSecond: Double?
    public var dirtyRatePagesPerSecond: Double?
    public var dirtyToLinkRatio: Double?
    public var predictedFinalRoundMs: Double?
    /// The policy (absent in figures the estimator alone made), what it did, round by round,
    /// the throttle it left on at the end of pre-copy and the pages it held for the final round.
    public var policy: ConvergenceMode?
    public var actions: [ConvergenceAction]?
    public var throttlePercent: Int?
    public var hotPagesHeld: Int?

    public init() {}

    enum CodingKeys: String, CodingKey {
        case verdict, stall, reason, policy, actions
        case throttlePercent = "throttle_percent"
        case hotPagesHeld = "hot_pages_held"
        case linkRateBytesPerSecond = "link_rate_bytes_per_s"
        case dirtyRatePagesPerSecond = "dirty_rate_pages_per_s"
        case dirtyToLinkRatio = "dirty_to_link_ratio"
        case predictedFinalRoundMs = "predicted_final_round_ms"
    }
}
