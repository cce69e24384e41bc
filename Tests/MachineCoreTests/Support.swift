import Foundation
import Testing
import KVM
import Loader
import MachineCore
import TestSupport

/// Builds a machine for a guest image from GuestImages/build, not started: no store, no
/// admission, just the machine.
func bootMachine(_ name: String, _ c: MachineConfiguration, serialOutput: @escaping (UInt8) -> Void = { _ in }) throws -> Machine {
    try Machine(image: try Fixtures.guestBytes(name), configuration: c, serialOutput: serialOutput)
}

/// Boots `image` in-process and runs it to its end (or `timeout`).
func runGuest(_ name: String, mode: BootMode? = nil, commandLine: String? = nil,
              memory: UInt64 = 64 << 20, timeout: Double = 60) throws -> (exit: MachineExit, output: String) {
    let capture = SerialCapture()
    let machine = try bootMachine(name, MachineConfiguration(memorySize: memory, mode: mode, commandLine: commandLine),
                                  serialOutput: capture.append)
    machine.start()
    guard let exit = machine.waitForExit(timeout: timeout) else {
        machine.requestStop()
        _ = machine.waitForExit()
        Issue.record("guest \(name) did not finish within \(timeout) s; output: \(capture.text)")
        return (.stopped(signal: 0), capture.text)
    }
    return (exit, capture.text)
}
