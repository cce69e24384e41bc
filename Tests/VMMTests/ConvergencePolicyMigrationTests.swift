import Foundation
import GuestMemory
import Migration
import MachineCore
import SystemCalls
import Testing
import TestSupport
import VMM

/// The hot sweep: a guest rewriting one byte of each page of a 64 MiB set, over and over, as fast
/// as it runs, behind a link held below what it dirties. Pre-copy alone never gets what is left
/// under the limit (each round leaves the whole set); only a slower guest does.
@Suite("The convergence policy on a real hot sweep", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage),
       .serialized)
struct ConvergencePolicyMigrationTests {
    static let pages = 16384
    static let commandLine = "pages=\(pages) rate=0 mark_us=0 store=byte"
    static let bandwidth: UInt64 = 8_000_000
    /// For the test that must converge: still far below what the unthrottled sweep dirties, but
    /// well above what it dirties at the deepest throttle (about 7 MB/s here), so that whether it
    /// converges within the time limit does not hang on how loaded the machine is. (At 8 MB/s
    /// the throttled sweep left a dirty/link ratio of about 0.9: converged in 480 s in one run,
    /// not within 600 s in the next.)
    static let convergingBandwidth: UInt64 = 32_000_000

    func bootSweep() throws -> AdmittedGuest {
        let machine = try bootDirtier(memory: 128 << 20, commandLine: Self.commandLine)
        #expect(waitUntil(120) { (machine.memory.possiblyNonZeroPages()?.count ?? Int.max) >= Self.pages },
                "the dirtier did not touch its \(Self.pages) pages")
        return machine
    }

    @Test("with convergence off the sweep never fits: abandoned at the timeout, not converged, the guest still running here")
    func offGivesUp() throws {
        let machine = try bootSweep()
        defer { machine.requestStop() }
        let destination = try Destination(listenSeconds: 5)
        let settings = MigrationSettings(destination: destination.address, peer: destination.host, maxBandwidth: Self.bandwidth,
                                         convergence: .off, timeoutSeconds: 25)
        let report = PreCopySender(vm: machine, settings: settings).run { try machine.connect(settings) }
        print("off: rounds \(report.pagesPerRound) convergence \(String(describing: report.convergence))")
        #expect(report.outcome == .failed)
        #expect(!report.converged)
        #expect(report.error?.contains("did not converge") == true, "\(report.error ?? "no error")")
        let convergence = try #require(report.convergence)
        #expect(convergence.policy == .off)
        #expect(convergence.actions?.isEmpty == true, "\(String(describing: convergence.actions))")
        #expect(convergence.verdict == "stalled", "\(convergence)")
        #expect(machine.state == .running)
        #expect(destination.wait())
        #expect(destination.machine == nil)
    }

    @Test("with the default (adaptive) the sweep converges by throttling, and the destination's memory is the source's at its pause")
    func adaptiveConverges() throws {
        let machine = try bootSweep()
        let destination = try ParkedReceiver()
        let source = DigestingSource(machine)
        let settings = MigrationSettings(destination: destination.address, peer: destination.host,
                                         maxBandwidth: Self.convergingBandwidth, timeoutSeconds: 600)
        #expect(settings.convergence == .adaptive)
        let report = PreCopySender(vm: source, settings: settings).run { try machine.connect(settings) }
        print("adaptive: rounds \(report.pagesPerRound) convergence \(String(describing: report.convergence)) downtime \(report.downtimeMs ?? -1)")
        #expect(report.outcome == .completed, "\(report.error ?? "")")
        #expect(report.converged)
        let convergence = try #require(report.convergence)
        #expect(convergence.policy == .adaptive)
        let actions = convergence.actions ?? []
        let throttles = actions.filter { $0.action == .throttle }
        #expect(!throttles.isEmpty, "no throttle: \(actions)")
        #expect(throttles.allSatisfy { ($0.percent ?? 0) > 0 && !$0.why.isEmpty })
        // The set is far over the limit at this link: sent last, not held.
        #expect(actions.first?.action == .hotPagesLast, "\(actions)")
        #expect(convergence.throttlePercent == throttles.last?.percent)
        let arrived = try #require(destination.wait())
        #expect(arrived.error == nil, "\(arrived.error ?? "")")
        #expect(arrived.digest != nil && arrived.digest == source.digestAtPause, "the destination's memory differs from the source's at its pause")
        #expect(machine.state == .paused)
        machine.end(with: .migrated)
    }
}
