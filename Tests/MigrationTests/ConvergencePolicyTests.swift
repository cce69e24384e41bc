import Foundation
import Migration
import Testing

/// Round figures at a steady 100 MB/s link (4 KiB pages): `pages` sent, leaving `left`.
private func round(sent pages: Int, left: Int) -> RoundFigures {
    let bytes = UInt64(pages) * 4096
    return RoundFigures(pagesSent: pages, bytesSent: bytes, seconds: Double(bytes) / 100e6, pagesDirtied: left)
}

/// Feeds the rounds one by one to an estimator and a policy, as the sender does (`hot`: the
/// hot pages it would count after each round), and returns the policy.
private func run(_ mode: ConvergenceMode, _ rounds: [RoundFigures], hot: [Int]? = nil, maxDowntimeMs: Double = 100,
                 secondsLeft: Double = 60) -> (ConvergencePolicy, [ConvergenceVerdict]) {
    var estimator = ConvergenceEstimator(maxDowntimeMs: maxDowntimeMs)
    var policy = ConvergencePolicy(mode: mode, maxDowntimeMs: maxDowntimeMs)
    var verdicts: [ConvergenceVerdict] = []
    for (index, figures) in rounds.enumerated() {
        estimator.record(figures)
        let verdict = estimator.verdict(secondsLeft: secondsLeft)
        verdicts.append(verdict)
        policy.decide(round: index, estimator: estimator, verdict: verdict, hotPages: hot?[index] ?? 0)
        if policy.holdHot && estimator.heldPages == 0 { estimator.heldPages = hot?[index] ?? 0 }
    }
    return (policy, verdicts)
}

@Suite("The convergence policy acts on the estimator's verdict, round by round")
struct ConvergencePolicyTests {
    // 20000 pages of a 100000-page guest, then a shrinking rest: 5000, 1250 (51 ms < 100 ms).
    let cold = [round(sent: 100_000, left: 20_000), round(sent: 20_000, left: 5_000), round(sent: 5_000, left: 1_250)]
    // 16384 pages rewritten whole each round: 671 ms at 100 MB/s, never under 100 ms.
    let hotSweep = [round(sent: 40_000, left: 16_384), round(sent: 16_384, left: 16_384), round(sent: 16_384, left: 16_384),
                    round(sent: 16_384, left: 16_384), round(sent: 16_384, left: 16_384)]

    @Test("a guest whose rounds shrink is never throttled nor reordered, whatever the policy", arguments: ConvergenceMode.allCases)
    func coldGuest(_ mode: ConvergenceMode) {
        let (policy, verdicts) = run(mode, cold, hot: [0, 4_000, 1_000])
        #expect(policy.actions.isEmpty, "\(policy.actions)")
        #expect(policy.throttlePercent == 0 && !policy.holdHot && !policy.hotLast)
        #expect(verdicts.last == .fits)
    }

    @Test("off does nothing about a stall")
    func off() {
        let (policy, verdicts) = run(.off, hotSweep, hot: [0, 16_384, 16_384, 16_384, 16_384])
        #expect(policy.actions.isEmpty)
        #expect(policy.throttlePercent == 0)
        #expect(verdicts.dropFirst().allSatisfy { if case .stalled = $0 { true } else { false } })
    }

    @Test("a hot set too large for the limit: adaptive sends it last and throttles at once, harder each stalled round, up to 99 %")
    func adaptiveHotSweep() throws {
        let (policy, _) = run(.adaptive, hotSweep, hot: [0, 16_384, 16_384, 16_384, 16_384])
        let first = try #require(policy.actions.first)
        #expect(first.action == .hotPagesLast && first.pages == 16_384 && first.round == 1)
        #expect(first.why.contains("over the 100 ms limit"), "\(first.why)")
        #expect(!policy.holdHot && policy.hotLast)
        let throttles = policy.actions.filter { $0.action == .throttle }
        #expect(throttles.map(\.round) == [1, 2, 3, 4])
        let percents = throttles.compactMap(\.percent)
        #expect(percents == percents.sorted() && Set(percents).count == percents.count, "\(percents)")
        // ρ ≈ 1 (the set saturates each round): the time the guest runs halves each round.
        #expect(percents.first == 50, "\(percents)")
        #expect(percents.allSatisfy { $0 <= 99 })
        #expect(policy.throttlePercent == percents.last)
    }

    @Test("throttle never reorders, and is sized from the dirty/link ratio: a guest dirtying 4x the link is held longer from the first stall")
    func throttleSizedByRatio() throws {
        let (policy, _) = run(.throttle, hotSweep, hot: [0, 16_384, 16_384, 16_384, 16_384])
        #expect(!policy.hotLast && !policy.holdHot)
        #expect(policy.actions.allSatisfy { $0.action == .throttle })
        #expect(policy.actions.first?.percent == 50)
        // Round 1 sends 10000 pages and 40000 are written meanwhile: ρ = 4, so the guest may run
        // at most 1/8 of the time.
        let (fast, _) = run(.throttle, [round(sent: 100_000, left: 10_000), round(sent: 10_000, left: 40_000)])
        let percent = try #require(fast.actions.first?.percent)
        #expect(percent >= 87, "\(fast.actions)")
        #expect(fast.actions.first?.why.contains("dirty/link ratio 4.00") == true, "\(String(describing: fast.actions.first))")
    }

    @Test("a small hot set among cold pages: adaptive holds it for the final round first, then throttles if it still stalls")
    func adaptiveHoldsSmallHotSet() throws {
        // 1000 hot pages (41 ms, within half the 100 ms limit) and a cold rest that stops shrinking.
        let stuck = [round(sent: 100_000, left: 30_000), round(sent: 30_000, left: 29_000), round(sent: 29_000, left: 28_800),
                     round(sent: 28_000, left: 27_900)]
        let (policy, _) = run(.adaptive, stuck, hot: [0, 1_000, 1_000, 1_000])
        let first = try #require(policy.actions.first)
        #expect(first.action == .hotPagesLast && first.pages == 1_000)
        #expect(first.why.contains("held for the final round"), "\(first.why)")
        #expect(policy.holdHot)
        // Holding them once is all reordering does; the next stall throttles.
        #expect(policy.actions.dropFirst().allSatisfy { $0.action == .throttle })
        #expect(policy.throttlePercent > 0)
    }

    @Test("the time limit is no stall to act on: the migration ends there")
    func timeoutNoAction() {
        let (policy, verdicts) = run(.adaptive, Array(hotSweep.prefix(2)), hot: [0, 16_384], secondsLeft: 0)
        #expect(policy.actions.isEmpty)
        #expect(verdicts.last.map { if case let .stalled(why) = $0 { why.kind == .timeout } else { false } } == true)
    }

    @Test("held pages count in the final round the estimator predicts")
    func heldPagesPredicted() throws {
        var estimator = ConvergenceEstimator(maxDowntimeMs: 100)
        estimator.record(round(sent: 100_000, left: 100))
        #expect(estimator.verdict() == .fits)
        estimator.heldPages = 4_000
        #expect(estimator.pagesLeft == 4_100)
        #expect(estimator.verdict() != .fits)
    }

    @Test("settings: convergence defaults to adaptive; auto_converge: true means throttle; the two contradicting are refused; a bad name too")
    func settings() throws {
        func decode(_ json: String) throws -> MigrationSettings {
            try JSONDecoder().decode(MigrationSettings.self, from: Data(json.utf8))
        }
        #expect(try decode(#"{"destination": "h:1"}"#).convergence == .adaptive)
        #expect(try decode(#"{"destination": "h:1", "auto_converge": false}"#).convergence == .adaptive)
        #expect(try decode(#"{"destination": "h:1", "auto_converge": true}"#).convergence == .throttle)
        #expect(try decode(#"{"destination": "h:1", "auto_converge": true, "convergence": "throttle"}"#).convergence == .throttle)
        #expect(try decode(#"{"destination": "h:1", "convergence": "off"}"#).convergence == .off)
        #expect(throws: DecodingError.self) { try decode(#"{"destination": "h:1", "auto_converge": true, "convergence": "off"}"#) }
        #expect(throws: DecodingError.self) { try decode(#"{"destination": "h:1", "convergence": "fast"}"#) }
        #expect(MigrationSettings.convergenceConflict(convergence: "adaptive", autoConverge: true)?.contains("give only") == true)
        #expect(MigrationSettings(destination: "h:1", autoConverge: true).convergence == .throttle)
        #expect(MigrationSettings(destination: "h:1").convergence == .adaptive)
        let off = MigrationSettings(destination: "h:1", convergence: .off)
        #expect(try JSONDecoder().decode(MigrationSettings.self, from: JSONEncoder().encode(off)) == off)
    }
}
