import Foundation
import Testing
import TestSupport
import KVM
import Loader
import MachineCore

@Suite("Pausing vCPUs from another thread", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct PauseTests {
    /// The counter's numbers after its "counter start" line.
    /// A stopped guest may leave a partial last line, which is dropped.
    func sequence(_ output: String) -> [Int] {
        var lines = output.split(separator: "\n", omittingEmptySubsequences: false)
        lines.removeLast()
        return lines.dropFirst().compactMap { Int($0) }
    }

    /// Whether `numbers` is exactly 1, 2, 3, ... with no gap and no repeat.
    func isContiguous(_ numbers: [Int]) -> Bool {
        numbers.enumerated().allSatisfy { $0.offset + 1 == $0.element }
    }

    @Test("a paused guest makes no progress, and resumes without losing or repeating a step")
    func pauseAndResume() throws {
        let capture = SerialCapture()
        let machine = try bootMachine("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=20000"),
                                    serialOutput: capture.append)
        machine.start()
        for _ in 0..<20 {
            usleep(20_000)
            #expect(machine.pause())
            #expect(machine.state == .paused)
            let frozen = capture.count
            usleep(20_000)
            #expect(capture.count == frozen, "output grew while paused")
            machine.resume()
        }
        usleep(50_000)
        machine.requestStop()
        #expect(machine.waitForExit() == .stopped(signal: 0))
        let numbers = sequence(capture.text)
        #expect(numbers.count > 10)
        #expect(isContiguous(numbers), "the sequence has a gap or a repeat: \(numbers.suffix(20))")
    }

    @Test("pause waits for every vCPU of a two-vCPU machine to acknowledge")
    func pauseTwoVCPUs() throws {
        // Both vCPUs start at the same entry; a guest that only spins (`jmp $`) touches
        // no memory, so two copies of it cannot corrupt each other as two counters would.
        let spin: [UInt8] = [0xEB, 0xFE]
        let machine = try Machine(image: spin, configuration: MachineConfiguration(vcpuCount: 2, mode: .protected), serialOutput: { _ in })
        machine.start()
        usleep(20_000)
        for _ in 0..<10 {
            #expect(machine.pause())
            #expect(machine.state == .paused)
            machine.resume()
            #expect(machine.state == .running)
        }
        machine.requestStop(signal: 15)
        #expect(machine.waitForExit() == .stopped(signal: 15))
    }

    @Test("pause on a finished machine reports false instead of waiting forever")
    func pauseAfterExit() throws {
        let machine = try bootMachine("status42.bin", MachineConfiguration(mode: .protected))
        machine.start()
        #expect(machine.waitForExit() == .exitPort(status: 42))
        #expect(machine.pause() == false)
        #expect(machine.state == .finished)
    }
}
