import Foundation
import Testing
import KVM
import Loader
import MachineCore

/// Whether this machine can run guests; tests that need KVM are skipped otherwise.
enum KVMAvailability {
    static let present: Bool = {
        let fd = open(KVMSystem.defaultPath, O_RDWR)
        if fd >= 0 { close(fd); return true }
        return false
    }()
    /// Whether /dev/kvm is the PVM flavour (kvm_pvm), whose dirty ring misbehaves.
    static let isPVM: Bool = FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm")
    static let skipMessage: Comment = "/dev/kvm is missing or not accessible: KVM tests are skipped"
}

/// Paths of the repository and the built guests.
enum Fixtures {
    static let root: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// A guest image built by `make guests`. A missing image is a test failure that says how to build it.
    static func guest(_ name: String) throws -> String {
        let path = root.appendingPathComponent("GuestImages/build/\(name)").path
        try #require(FileManager.default.fileExists(atPath: path),
                     "guest image \(name) is missing: run `make guests` (make test does it)")
        return path
    }

    static func guestBytes(_ name: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: try guest(name))))
    }
}

/// Collects a guest's serial output, thread-safely.
// @unchecked: `bytes` is read and written only under `lock`.
final class SerialCapture: @unchecked Sendable {
    private let lock = NSLock()
    private var bytes: [UInt8] = []
    func append(_ b: UInt8) { lock.lock(); bytes.append(b); lock.unlock() }
    var text: String { lock.lock(); defer { lock.unlock() }; return String(decoding: bytes, as: UTF8.self) }
    var count: Int { lock.lock(); defer { lock.unlock() }; return bytes.count }
}

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
