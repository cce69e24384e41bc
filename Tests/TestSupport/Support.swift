import Foundation
import KVM
import Testing

// What every test target that boots guests needs: whether KVM is here, where the built guests
// and the `vmm` binary are, and a thread-safe serial capture.

/// Whether this machine can run guests; tests that need KVM are skipped otherwise.
public enum KVMAvailability {
    public static let present: Bool = {
        let fd = open(KVMSystem.defaultPath, O_RDWR)
        if fd >= 0 { close(fd); return true }
        return false
    }()
    /// Whether /dev/kvm is the PVM flavour (kvm_pvm), whose dirty ring misbehaves.
    public static let isPVM: Bool = FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm")
    public static let skipMessage: Comment = "/dev/kvm is missing or not accessible: KVM tests are skipped"
}

/// Paths of the repository, the built guests and the built `vmm` binary.
public enum Fixtures {
    public static let root: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// A guest image built by `make guests`. A missing image is a test failure that says how to build it.
    public static func guest(_ name: String) throws -> String {
        let path = root.appendingPathComponent("GuestImages/build/\(name)").path
        try #require(FileManager.default.fileExists(atPath: path),
                     "guest image \(name) is missing: run `make guests` (make test does it)")
        return path
    }

    public static func guestBytes(_ name: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: try guest(name))))
    }

    /// The `vmm` executable of this build.
    public static func vmmBinary() throws -> String {
        if let env = ProcessInfo.processInfo.environment["VMM_BINARY"] { return env }
        let path = root.appendingPathComponent(".build/debug/vmm").path
        try #require(FileManager.default.isExecutableFile(atPath: path),
                     "the vmm binary is missing at \(path): run `swift build` (make test does it)")
        return path
    }

    public static func temporaryFile(_ name: String, _ bytes: [UInt8]) throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vmm-tests-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let url = dir.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url.path
    }
}

/// Collects a guest's serial output, thread-safely.
// @unchecked: `bytes` is read and written only under `lock`.
public final class SerialCapture: @unchecked Sendable {
    private let lock = NSLock()
    private var bytes: [UInt8] = []
    public init() {}
    public func append(_ b: UInt8) { lock.lock(); bytes.append(b); lock.unlock() }
    public var text: String { lock.lock(); defer { lock.unlock() }; return String(decoding: bytes, as: UTF8.self) }
    public var count: Int { lock.lock(); defer { lock.unlock() }; return bytes.count }
}

