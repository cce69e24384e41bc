#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import TestSupport
import MachineCore
import VMM

/// The attacker's account, who plants files where root's VMM will write.
private let nobody: uid_t = 65534

/// Under a fresh /tmp directory: `victim.conf` (root's, which nothing may change), `shared`
/// (root's, mode 1777, like /tmp) and `pub` (nobody's own, mode 1777).
private final class AttackedDirectories {
    let root: String
    var victim: String { root + "/victim.conf" }
    var shared: String { root + "/shared" }
    var pub: String { root + "/pub" }
    static let victimContents = "root's configuration\n"

    init() throws {
        var template = Array("/tmp/swift-vmm-attacked-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        root = String(cString: try #require(made))
        #expect(chmod(root, 0o755) == 0)
        try Data(Self.victimContents.utf8).write(to: URL(fileURLWithPath: victim))
        for (dir, owner) in [(shared, uid_t(0)), (pub, nobody)] {
            #expect(mkdir(dir, 0o755) == 0 && chown(dir, owner, owner) == 0 && chmod(dir, 0o1777) == 0)
        }
        for name in ["protected_symlinks", "protected_regular"] {
            let value = (try? String(contentsOfFile: "/proc/sys/fs/\(name)", encoding: .utf8)) ?? "unreadable\n"
            print("sysctl fs.\(name) = \(value)", terminator: "")
        }
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    func asNobody(_ arguments: String...) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        process.arguments = ["--reuid=\(nobody)", "--regid=\(nobody)", "--clear-groups", "--"] + arguments
        try process.run()
        process.waitUntilExit()
        try #require(process.terminationStatus == 0, "as nobody: \(arguments.joined(separator: " "))")
    }

    func contents(_ path: String) -> String? {
        FileManager.default.contents(atPath: path).map { String(decoding: $0, as: UTF8.self) }
    }

    func status(_ path: String) -> stat? {
        var info = stat()
        return lstat(path, &info) == 0 ? info : nil
    }

    func names(in dir: String) -> Set<String> { Set((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []) }

    func expectVictimUntouched() {
        #expect(contents(victim) == Self.victimContents)
        #expect(status(victim)?.st_uid == 0)
    }
}

@Suite("Snapshots and serial logs of a real guest are written without following planted files",
       .enabled(if: KVMAvailability.present && geteuid() == 0, "needs /dev/kvm, and root to plant files as nobody"))
struct FileSafetyTests {
    @Test("a booted guest's snapshot: the planted .partial symlink, target symlink and nobody's 0666 file change nothing; the snapshot is root's, 0600, and restorable")
    func snapshotAmongPlantedFiles() throws {
        let dirs = try AttackedDirectories()
        try dirs.asNobody("ln", "-s", dirs.victim, dirs.shared + "/snap.bin.partial")
        try dirs.asNobody("ln", "-s", dirs.victim, dirs.shared + "/link.snap")
        try dirs.asNobody("sh", "-c", "umask 0; printf planted > \(dirs.shared)/s2.bin")
        try dirs.asNobody("ln", "-s", dirs.victim, dirs.pub + "/snap.bin.partial")

        let guest = try bootLocal("counter.elf", MachineConfiguration(commandLine: "count=0 ticks=400000"))
        guest.startPaused()
        defer { guest.end(with: .shutdown); guest.end() }

        func refusal(_ path: String) -> String? {
            do { _ = try guest.snapshot(to: path); return nil } catch { return "\(error)" }
        }
        let symlink = try #require(refusal(dirs.shared + "/link.snap"))
        #expect(symlink.contains("the snapshot '\(dirs.shared)/link.snap' is a symlink; refusing to follow it"))
        let foreign = try #require(refusal(dirs.shared + "/s2.bin"))
        #expect(foreign.contains("belongs to uid 65534"))
        let attackersDirectory = try #require(refusal(dirs.pub + "/snap.bin"))
        #expect(attackersDirectory.contains("is owned by uid 65534"))

        let target = dirs.shared + "/snap.bin"
        let stats = try guest.snapshot(to: target)
        let written = try #require(dirs.status(target))
        #expect(written.st_mode == S_IFREG | 0o600)
        #expect(written.st_uid == 0)
        #expect(UInt64(written.st_size) == stats.bytes)
        let reopened = try SnapshotFile.Opened(path: target, unwrap: SnapshotFile.unwrapper(for: localHosts().source))
        #expect(reopened.header.identity == guest.stateHeader.identity)

        dirs.expectVictimUntouched()
        #expect(dirs.contents(dirs.shared + "/s2.bin") == "planted")
        #expect(dirs.status(dirs.shared + "/s2.bin")?.st_uid == nobody)
        #expect(dirs.names(in: dirs.shared) == ["snap.bin.partial", "link.snap", "s2.bin", "snap.bin"], "a temporary was left behind")
        #expect(dirs.names(in: dirs.pub) == ["snap.bin.partial"])
    }

    @Test("vmm run refuses a serial log that is a symlink, before any guest boots, and says what to do")
    func serialLogSymlinkRefusedByTheCLI() throws {
        let dirs = try AttackedDirectories()
        let log = dirs.shared + "/serial.log"
        try dirs.asNobody("ln", "-s", dirs.victim, log)
        let image = try Fixtures.guest("hello-protected.bin")
        let r = try runVMM(["run", image, "--mode", "protected", "--serial-log", log]
                           + billboard().register(image, mode: "protected", beacons: "none"))
        #expect(r.status == 1)
        #expect(r.stderr.contains("the serial log '\(log)' is a symlink; refusing to follow it — give a path whose last component is not a symlink"), "\(r.stderr)")
        dirs.expectVictimUntouched()
    }
}
