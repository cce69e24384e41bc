import Foundation
import Testing
import TestSupport
@testable import MachineCore

@Suite("vCPU runners: start, pause, hold and end as a state machine", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct RunnerTests {
    @Test("a machine ended before it starts is finished, never runs, and cannot be paused")
    func endedBeforeStart() throws {
        let capture = SerialCapture()
        let machine = try bootMachine("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=20000"), serialOutput: capture.append)
        #expect(machine.state == .created)
        #expect(machine.pause() == false)
        machine.end(with: .stoppedByOwner(reason: "refused"))
        #expect(machine.state == .finished)
        machine.start()
        #expect(machine.waitForExit(timeout: 10) == .stoppedByOwner(reason: "refused"))
        #expect(capture.text.isEmpty)
    }

    @Test("startPaused runs no guest instruction until resume")
    func startPausedWaitsForResume() throws {
        let capture = SerialCapture()
        let machine = try bootMachine("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=20000"), serialOutput: capture.append)
        machine.startPaused()
        #expect(machine.state == .paused)
        usleep(200_000)
        #expect(capture.count == 0, "the guest ran while started paused")
        machine.resume()
        #expect(machine.state == .running)
        let ran = (0..<100).contains { _ in usleep(20_000); return capture.count > 0 }
        #expect(ran, "the guest did not run after resume")
        machine.requestStop()
        #expect(machine.waitForExit() == .stopped(signal: 0))
    }

    @Test("a throttle hold parks the guest but the machine reads running; releasing it never undoes the owner's pause")
    func holdIsNotAPause() throws {
        let capture = SerialCapture()
        let machine = try bootMachine("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=20000"), serialOutput: capture.append)
        machine.start()
        usleep(50_000)
        #expect(machine.hold())
        #expect(machine.state == .running)
        let held = capture.count
        usleep(100_000)
        #expect(capture.count == held, "output grew while held")
        // The owner pauses while the throttle holds; the throttle lets go; the guest stays paused.
        #expect(machine.pause())
        machine.releaseHold()
        #expect(machine.state == .paused)
        let paused = capture.count
        usleep(100_000)
        #expect(capture.count == paused, "releasing the hold resumed an owner's pause")
        machine.resume()
        let ran = (0..<100).contains { _ in usleep(20_000); return capture.count > paused }
        #expect(ran)
        machine.requestStop()
        _ = machine.waitForExit()
    }
}
