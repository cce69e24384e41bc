import Foundation
import Migration
import Testing

/// Round figures at a steady link: `pages` sent at `bytesPerSecond` (4 KiB each), leaving `left`.
private func round(sent pages: Int, left: Int, bytesPerSecond: Double = 100e6) -> RoundFigures {
    let bytes = UInt64(pages) * 4096
    return RoundFigures(pagesSent: pages, bytesSent: bytes, seconds: Double(bytes) / bytesPerSecond, pagesDirtied: left)
}

private func estimator(_ rounds: [RoundFigures], maxDowntimeMs: Double = 100) -> ConvergenceEstimator {
    var e = ConvergenceEstimator(maxDowntimeMs: maxDowntimeMs)
    for r in rounds { e.record(r) }
    return e
}

private func stall(_ verdict: ConvergenceVerdict) -> ConvergenceStall? {
    if case let .stalled(why) = verdict { return why }
    return nil
}

@Suite("The convergence estimator judges pre-copy from its rounds' figures")
struct ConvergenceTests {
    @Test("no round yet: nothing to say")
    func unknown() {
        #expect(ConvergenceEstimator(maxDowntimeMs: 300).verdict() == .unknown)
        #expect(ConvergenceEstimator(maxDowntimeMs: 300).predictedFinalRoundMs == nil)
    }

    @Test("link rate, dirty rate, their ratio and the final round's time come from the figures")
    func rates() throws {
        // 100 MB/s; round 1 sends 20000 pages in 0.8192 s and 5000 are dirtied meanwhile.
        let e = estimator([round(sent: 100_000, left: 20_000), round(sent: 20_000, left: 5_000)])
        let link = try #require(e.linkRate)
        #expect(abs(link - 100e6) < 1)
        // Round 0 is left out of the dirty rate once a later round exists.
        let dirty = try #require(e.dirtyRate)
        #expect(abs(dirty - 5_000 / 0.8192) < 0.01)
        let ratio = try #require(e.dirtyToLinkRatio)
        #expect(abs(ratio - 0.25) < 1e-9)
        let predicted = try #require(e.predictedFinalRoundMs)
        #expect(abs(predicted - 5_000 * 4096 / 100e6 * 1000) < 1e-6)
        #expect(e.pagesLeft == 5_000)
    }

    @Test("rounds too small to measure the link are left out while larger ones exist; alone, the best of them counts")
    func smallRounds() throws {
        // A large round at 100 MB/s, then a 10-page round that took 10 ms (latency, not bandwidth).
        var e = estimator([round(sent: 50_000, left: 10)])
        e.record(RoundFigures(pagesSent: 10, bytesSent: 40_960, seconds: 0.01, pagesDirtied: 8))
        #expect(abs(try #require(e.linkRate) - 100e6) < 1)
        let small = estimator([RoundFigures(pagesSent: 10, bytesSent: 40_960, seconds: 0.01, pagesDirtied: 8),
                               RoundFigures(pagesSent: 8, bytesSent: 32_768, seconds: 0.004, pagesDirtied: 8)])
        #expect(abs(try #require(small.linkRate) - 32_768 / 0.004) < 1)
    }

    @Test("the link rate follows the recent rounds (a window), not the whole history")
    func window() throws {
        // Three rounds at 10 MB/s after a round 0 at 1 GB/s: the window of 3 sees only the slow link.
        var rounds = [round(sent: 100_000, left: 50_000, bytesPerSecond: 1e9)]
        rounds += [round(sent: 50_000, left: 30_000, bytesPerSecond: 10e6), round(sent: 30_000, left: 20_000, bytesPerSecond: 10e6),
                   round(sent: 20_000, left: 10_000, bytesPerSecond: 10e6)]
        #expect(abs(try #require(estimator(rounds).linkRate) - 10e6) < 1)
    }

    @Test("what is left fitting the downtime limit is the verdict 'fits', whatever came before")
    func fits() {
        // 2000 pages at 100 MB/s: 82 ms, under 100 ms.
        #expect(estimator([round(sent: 100_000, left: 2_000)]).verdict() == .fits)
        #expect(estimator([round(sent: 100_000, left: 2_000)]).verdict(secondsLeft: -1) == .fits)
        #expect(estimator([round(sent: 100_000, left: 0)]).verdict() == .fits)
        #expect(estimator([round(sent: 100_000, left: 3_000)]).verdict() != .fits)
    }

    @Test("shrinking geometrically is converging, with about how many rounds to go")
    func converging() {
        // ρ = 0.25: 20000 → 5000 → 1250 (51 ms) fits 100 ms after one more round.
        let e = estimator([round(sent: 100_000, left: 20_000), round(sent: 20_000, left: 5_000)])
        #expect(e.verdict() == .converging(roundsToFit: 1))
        // After round 0 alone the working set's dirty rate is not known yet.
        #expect(estimator([round(sent: 100_000, left: 20_000)]).verdict() == .converging(roundsToFit: nil))
    }

    @Test("a hot working set that leaves as much as each round sent: stalled by its rates after one round, and not shrinking after two")
    func hotWorkingSet() throws {
        // 16384 pages rewritten whatever the round does: 671 ms, never under 100 ms.
        var rounds = [round(sent: 40_000, left: 16_384), round(sent: 16_384, left: 16_300)]
        // One round says ρ ≈ 0.995: hundreds of rounds to fit.
        let early = try #require(stall(estimator(rounds).verdict()))
        #expect(early.kind == .tooSlowToFit)
        rounds.append(round(sent: 16_300, left: 16_384))
        let why = try #require(stall(estimator(rounds).verdict()))
        #expect(why.kind == .notShrinking)
        #expect(why.description.contains("16384"), "\(why)")
        #expect(why.description.contains("100 ms limit"), "\(why)")
    }

    @Test("a guest dirtying faster than the link sends is a stall as soon as a round after round 0 measured it")
    func dirtyFasterThanLink() throws {
        // Round 1 sends 10000 pages in 0.41 s; 12000 were dirtied meanwhile (ρ = 1.2). One round
        // that grew what is left is enough to say so: the ratio, not the round count, decides.
        let e = estimator([round(sent: 100_000, left: 10_000), round(sent: 10_000, left: 12_000)])
        let why = try #require(stall(e.verdict()))
        #expect(why.kind == .dirtyFasterThanLink)
        #expect(why.description.contains("MB/s"))
        #expect(try #require(e.dirtyToLinkRatio) >= 1)
    }

    @Test("shrinking too slowly to fit within the rounds allowed, or before the time limit, is a stall")
    func tooSlow() throws {
        // ρ = 0.8: from 100000 pages (4.1 s) to under 100 ms takes 17 rounds, about 20 s.
        let e = estimator([round(sent: 200_000, left: 125_000), round(sent: 125_000, left: 100_000)])
        #expect(e.verdict(secondsLeft: 60) == .converging(roundsToFit: 17))
        let late = try #require(stall(e.verdict(secondsLeft: 10)))
        #expect(late.kind == .tooSlowToFit)
        #expect(late.description.contains("17 more rounds"), "\(late)")
        var strict = ConvergenceEstimator(parameters: .init(maxDowntimeMs: 100, maxRoundsToFit: 10))
        strict.record(round(sent: 200_000, left: 125_000))
        strict.record(round(sent: 125_000, left: 100_000))
        #expect(stall(strict.verdict())?.kind == .tooSlowToFit)
    }

    @Test("the time limit reached without fitting is a stall of its own kind")
    func timeout() throws {
        let e = estimator([round(sent: 100_000, left: 20_000)])
        #expect(try #require(stall(e.verdict(secondsLeft: 0))).kind == .timeout)
    }

    @Test("the report's figures carry the verdict and, for a stall, its kind and reason")
    func snapshot() {
        let hot = estimator([round(sent: 40_000, left: 16_384), round(sent: 16_384, left: 16_384), round(sent: 16_384, left: 16_384)])
        let figures = hot.snapshot()
        #expect(figures.verdict == "stalled")
        #expect(figures.stall == .notShrinking)
        #expect(figures.reason?.isEmpty == false)
        #expect(figures.predictedFinalRoundMs != nil && figures.linkRateBytesPerSecond != nil)
        #expect(estimator([round(sent: 100_000, left: 10)]).snapshot().verdict == "fits")
    }

    @Test("settings: postcopy_after_rounds takes a number or \"never\", defaults to never with a switch on stall, and encodes back")
    func settingsRounds() throws {
        func decode(_ json: String) throws -> MigrationSettings {
            try JSONDecoder().decode(MigrationSettings.self, from: Data(json.utf8))
        }
        #expect(try decode(#"{"destination": "h:1"}"#).postcopyAfterRounds == 1)
        #expect(try decode(#"{"destination": "h:1", "postcopy_after_rounds": 0}"#).postcopyAfterRounds == 0)
        #expect(try decode(#"{"destination": "h:1", "postcopy_after_rounds": "never"}"#).postcopyAfterRounds == nil)
        #expect(try decode(#"{"destination": "h:1", "postcopy": true, "postcopy_on_stall": true}"#).postcopyAfterRounds == nil)
        #expect(try decode(#"{"destination": "h:1", "postcopy_on_stall": true, "postcopy_after_rounds": 3}"#).postcopyAfterRounds == 3)
        #expect(throws: DecodingError.self) { try decode(#"{"destination": "h:1", "postcopy_after_rounds": "soon"}"#) }
        #expect(throws: DecodingError.self) { try decode(#"{"destination": "h:1", "postcopy_after_rounds": 1.5}"#) }
        let never = MigrationSettings(destination: "h:1", postcopy: true, postcopyAfterRounds: nil, postcopyOnStall: true)
        let encoded = try JSONEncoder().encode(never)
        #expect(String(decoding: encoded, as: UTF8.self).contains(#""postcopy_after_rounds":"never""#))
        #expect(try JSONDecoder().decode(MigrationSettings.self, from: encoded) == never)
    }
}
