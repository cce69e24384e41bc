import Foundation
import Testing
import TestSupport
import MachineCore
import VMM

/// kill -9 of either side at a random moment of a migration, as a crash or an operator would.
/// `make test` runs a few rounds; `make soak` runs `KILL_SOAK_ROUNDS` (50) and prints a tally.
@Suite("kill -9 during a migration", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .serialized)
struct KillDuringMigrationTests {
    static var rounds: Int { Int(ProcessInfo.processInfo.environment["KILL_SOAK_ROUNDS"] ?? "") ?? 3 }

    /// Whether `vmm` reports its guest running.
    func running(_ vmm: VMMProcess) -> Bool { stillRunning(vmm) }

    @Test("never two running copies; the survivor runs or can be resumed, and a killed copy's lease is recoverable")
    func killEitherSide() throws {
        var tally: [String: Int] = [:]
        for round in 0..<Self.rounds {
            let outcome = try oneRound(seed: round)
            tally[outcome, default: 0] += 1
        }
        print("kill -9 soak, \(Self.rounds) rounds: " + tally.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
    }

    func oneRound(seed: Int) throws -> String {
        let store = try TestBillboard(host: "kill\(seed)")
        // The dirtier keeps 8 MiB busy, so under the bandwidth cap below a migration lasts about
        // two seconds and a kill can land in any of its phases.
        let counter = try Fixtures.guest("dirtier.elf")
        let cmdline = "pages=2048 rate=0 mark_us=0"
        let registration = try store.register(counter, cmdline: cmdline)
        let leaseTimeout = ["--lease-timeout", "2", "--scan-interval", "1"]
        let sourceSocket = temporaryPath("kill-src") + ".sock"
        let source = try VMMProcess(["run", counter, "--cmdline", cmdline, "--api-socket", sourceSocket] + registration + leaseTimeout,
                                    socket: sourceSocket)
        try source.waitForSocket()
        let port = try freePort()
        let destinationSocket = temporaryPath("kill-dst") + ".sock"
        let destination = try VMMProcess(["receive", "--listen", "127.0.0.1:\(port)", "--api-socket", destinationSocket,
                                          "--listen-timeout", "30"] + store.storeArguments + leaseTimeout, socket: destinationSocket)
        #expect(destination.waitUntilListening(), "vmm receive did not listen: \(destination.errorText)")
        // A bandwidth cap stretches the migration so that a kill can land in any phase.
        let start = try source.call(.PUT, "/vm/migrate",
                                    "{\"destination\": \"127.0.0.1:\(port)\", \"peer\": \"\(store.host)\", \"max_bandwidth\": 5000000, \"timeout_s\": 20}")
        #expect(start.status == 202, "\(start.body)")
        usleep(UInt32.random(in: 0...2_500_000))
        let killSource = Bool.random()
        let victim = killSource ? source : destination
        kill(victim.process.processIdentifier, SIGKILL)
        _ = victim.wait(timeout: 10)

        // Never two running copies, sampled while things settle.
        for _ in 0..<30 {
            #expect(!(running(source) && running(destination)), "two running copies of the guest")
            usleep(100_000)
        }
        let survivor = killSource ? destination : source
        let phase = (try? source.call(.GET, "/vm/migration").json?["phase"] as? String) ?? "source gone"
        var outcome = (killSource ? "source killed" : "destination killed") + " (\(phase))"
        if running(survivor) {
            outcome += ", survivor runs the guest"
        } else if survivor === source, source.process.isRunning {
            // In doubt after GO: resumable once the dead destination's lease has expired.
            usleep(3_000_000)
            let resumed = try source.call(.PUT, "/vm/resume", "{\"force\": true}")
            #expect(resumed.status == 200, "an in-doubt source could not be resumed after its destination died: \(resumed.body)")
            outcome += ", in-doubt source resumed"
        } else {
            // No copy runs (the source handed over and exited, or the destination never got the
            // guest): the killed holder's lease is taken over and the guest runs again.
            usleep(3_000_000)
            let socket = temporaryPath("kill-again") + ".sock"
            let again = try VMMProcess(["run", counter, "--cmdline", cmdline, "--api-socket", socket] + registration + leaseTimeout,
                                       socket: socket)
            try again.waitForSocket()
            #expect(running(again), "the guest could not run again after its holder was killed: \(again.errorText)")
            _ = try? again.call(.PUT, "/vm/shutdown")
            _ = again.wait(timeout: 10)
            outcome += ", guest run again from its registration"
        }
        #expect(!(running(source) && running(destination)))
        for vmm in [source, destination] where vmm.process.isRunning {
            _ = try? vmm.call(.PUT, "/vm/shutdown")
            if vmm.wait(timeout: 5) == nil { kill(vmm.process.processIdentifier, SIGKILL); _ = vmm.wait(timeout: 5) }
        }
        return outcome
    }
}
