import Foundation
import Testing
import TestSupport

@Suite("The vmm command line")
struct CLITests {
    @Test("--help works on every command")
    func helpEverywhere() throws {
        for args in [["--help"], ["run", "--help"], ["bench", "--help"], ["bench", "boot", "--help"]] {
            let r = try runVMM(args)
            #expect(r.status == 0, "vmm \(args.joined(separator: " ")) exited \(r.status)")
            #expect(r.stdout.contains("USAGE"), "no usage for \(args)")
        }
    }

    @Test("a missing image exits non-zero and says what to do")
    func missingImage() throws {
        let r = try runVMM(["run", "/nonexistent/image.bin", "--mode", "real"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("no such file"))
    }

    @Test("an empty image file exits non-zero")
    func emptyImage() throws {
        let path = try Fixtures.temporaryFile("empty.bin", [])
        let r = try runVMM(["run", path, "--mode", "real"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("empty"))
    }

    @Test("a directory given as image exits non-zero")
    func directoryImage() throws {
        let r = try runVMM(["run", "/tmp", "--mode", "real"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("directory"))
    }

    @Test("an unreadable image exits non-zero", .disabled(if: getuid() == 0, "root reads files regardless of mode bits"))
    func unreadableImage() throws {
        let path = try Fixtures.temporaryFile("unreadable.bin", [0x90])
        chmod(path, 0)
        let r = try runVMM(["run", path, "--mode", "real"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("permission"))
    }

    @Test("an image larger than guest memory exits non-zero naming --memory")
    func imageLargerThanMemory() throws {
        let path = try Fixtures.temporaryFile("big.bin", [UInt8](repeating: 0x90, count: (2 << 20) + 1))
        let r = try runVMM(["run", path, "--mode", "protected", "--memory", "2M"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("--memory"))
    }

    @Test("a flat image that fits the file check but not memory above 0x10000 names --memory")
    func imageLargerThanLoadArea() throws {
        let path = try Fixtures.temporaryFile("load-area.bin", [UInt8](repeating: 0x90, count: (2 << 20) - 0x10000 + 1))
        let args = try billboard().register(path, memory: "2M", mode: "protected", beacons: "none")
        let r = try runVMM(["run", path, "--mode", "protected", "--memory", "2M"] + args)
        #expect(r.status == 1)
        #expect(r.stderr.contains("more memory"))
        #expect(r.stderr.contains("--memory"))
    }

    @Test("bad memory sizes are usage errors (status 64) with the reason", arguments: ["12Q", "0", "64T", "1K"])
    func badMemoryFlag(_ size: String) throws {
        let r = try runVMM(["run", "/tmp/whatever", "--memory", size])
        #expect(r.status == 64)
        #expect(r.stderr.contains("invalid memory size"))
    }

    @Test("an unknown mode is a usage error")
    func badMode() throws {
        let r = try runVMM(["run", "/tmp/whatever", "--mode", "virtual86"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("mode"))
    }

    @Test("a flat image without --mode is refused, asking for --mode")
    func flatWithoutMode() throws {
        let path = try Fixtures.temporaryFile("flat.bin", [0xF4])
        let r = try runVMM(["run", path])
        #expect(r.status == 1)
        #expect(r.stderr.contains("--mode"))
    }

    @Test("vmm run passes the guest's exit status through", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
    func exitStatusFromCLI() throws {
        let status42 = try Fixtures.guest("status42.bin"), hello = try Fixtures.guest("hello-multiboot.elf")
        let r = try runVMM(["run", status42, "--mode", "protected"]
                           + billboard().register(status42, mode: "protected", beacons: "none"))
        #expect(r.status == 42)
        let h = try runVMM(["run", hello, "--cmdline", "from the cli"]
                           + billboard().register(hello, cmdline: "from the cli", beacons: "none"))
        #expect(h.status == 0)
        #expect(h.stdout.contains("cmdline=from the cli"))
    }

    @Test("--serial-log writes the guest's output to a file", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
    func serialLog() throws {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("serial-\(getpid()).log").path
        let image = try Fixtures.guest("hello-protected.bin")
        let r = try runVMM(["run", image, "--mode", "protected", "--serial-log", log]
                           + billboard().register(image, mode: "protected", beacons: "none"))
        #expect(r.status == 0)
        #expect(r.stdout.isEmpty)
        #expect(try String(contentsOfFile: log, encoding: .utf8) == "Hello from protected mode\n")
    }

    @Test("a hung guest exits with status 2 and a register dump", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
    func hangFromCLI() throws {
        let image = try Fixtures.guest("hang.bin")
        let r = try runVMM(["run", image, "--mode", "protected"] + billboard().register(image, mode: "protected", beacons: "none"))
        #expect(r.status == 2)
        #expect(r.stderr.contains("hung"))
        #expect(r.stderr.contains("rip="))
    }

    @Test("SIGTERM stops a running guest cleanly with status 128+15", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
    func sigtermStops() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try Fixtures.vmmBinary())
        let image = try Fixtures.guest("counter.elf")
        process.arguments = try ["run", image, "--cmdline", "count=0 ticks=100000"]
            + billboard().register(image, cmdline: "count=0 ticks=100000")
        let out = Pipe()
        process.standardOutput = out
        process.standardError = Pipe()
        try process.run()
        // Wait for the first line, so the vCPU is running.
        _ = out.fileHandleForReading.availableData
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        #expect(process.terminationStatus == 128 + SIGTERM)
    }
}

@Suite("vmm billboard on the command line")
struct BillboardCLITests {
    @Test("init, register, an admitted check, refused checks (changed memory, unknown image, non-admin signer), audit verifies")
    func registerAndCheck() throws {
        let dir = temporaryPath("billboard")
        let store = dir + "/store"
        let admin = dir + "/admin.key"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let counter = try Fixtures.guest("counter.elf")
        #expect(try runVMM(["billboard", "init", "--billboard", store, "--host", "hostA", "--admin-key", admin]).status == 0)
        let reg = try runVMM(["billboard", "register", "--billboard", store, "--signed-by", admin, "--name", "c1",
                              "--image", counter, "--memory", "64M", "--cmdline", "count=5"])
        #expect(reg.status == 0, "\(reg.stderr)")
        let ok = try runVMM(["billboard", "check", "--billboard", store, "--image", counter, "--cmdline", "count=5"])
        #expect(ok.status == 0)
        #expect(ok.stdout.contains("admitted"))
        let bigger = try runVMM(["billboard", "check", "--billboard", store, "--image", counter, "--memory", "128M", "--cmdline", "count=5"])
        #expect(bigger.status == 1)
        #expect(bigger.stderr.contains("memory 128 MiB, registered 64 MiB"))
        let other = try runVMM(["billboard", "check", "--billboard", store, "--image", try Fixtures.guest("dirtier.elf")])
        #expect(other.status == 1)
        #expect(other.stderr.contains("register it"))
        let mallory = dir + "/mallory.key"
        #expect(try runVMM(["billboard", "admin-key", "create", "--name", "mallory", "--out", mallory]).status == 0)
        let forged = try runVMM(["billboard", "register", "--billboard", store, "--signed-by", mallory, "--name", "evil",
                                 "--image", counter])
        #expect(forged.status == 1)
        #expect(forged.stderr.contains("not an administrator"))
        let audit = try runVMM(["billboard", "audit", "--verify", "--billboard", store])
        #expect(audit.status == 0)
        #expect(audit.stdout.contains("intact"))
        let missing = try runVMM(["billboard", "list", "--billboard", dir + "/nowhere"])
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("init"))
    }

    @Test("host export to stdout and a file, add by file, refused files and signers, remove, list shows removed, re-add")
    func peerHostsByFile() throws {
        let dir = temporaryPath("billboard-hosts")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let a = dir + "/a", b = dir + "/b", admin = dir + "/admin.key", adminB = dir + "/admin-b.key"
        #expect(try runVMM(["billboard", "init", "--billboard", a, "--host", "hostA", "--admin-key", admin]).status == 0)
        #expect(try runVMM(["billboard", "init", "--billboard", b, "--host", "hostB", "--admin-key", adminB]).status == 0)

        let stdout = try runVMM(["billboard", "host", "export", "--billboard", b])
        #expect(stdout.status == 0, "\(stdout.stderr)")
        #expect(stdout.stdout.contains("\"format\" : \"swift-vmm billboard host identity\""))
        #expect(stdout.stdout.contains("-----BEGIN CERTIFICATE-----"))
        let file = dir + "/b.host"
        #expect(try runVMM(["billboard", "host", "export", "--billboard", b, "--output", file]).status == 0)
        #expect(try String(contentsOfFile: file, encoding: .utf8) == stdout.stdout)
        let again = try runVMM(["billboard", "host", "export", "--billboard", b, "--output", file])
        #expect(again.status == 1, "an existing file must not be overwritten")

        let tampered = dir + "/tampered.host"
        try stdout.stdout.replacingOccurrences(of: "\"hostB\"", with: "\"hostC\"").write(toFile: tampered, atomically: true, encoding: .utf8)
        let refused = try runVMM(["billboard", "host", "add", "--billboard", a, "--signed-by", admin, tampered])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("does not name host 'hostC'"), "\(refused.stderr)")
        let mallory = try runVMM(["billboard", "host", "add", "--billboard", a, "--signed-by", adminB, file])
        #expect(mallory.status == 1)
        #expect(mallory.stderr.contains("not an administrator"), "\(mallory.stderr)")
        #expect(try runVMM(["billboard", "host", "list", "--billboard", a]).stdout.isEmpty, "a refused file added a host")

        let added = try runVMM(["billboard", "host", "add", "--billboard", a, "--signed-by", admin, file])
        #expect(added.status == 0, "\(added.stderr)")
        #expect(try runVMM(["billboard", "host", "list", "--billboard", a]).stdout.hasPrefix("hostB\tactive"))
        let twice = try runVMM(["billboard", "host", "add", "--billboard", a, "--signed-by", admin, file])
        #expect(twice.status == 1)
        #expect(twice.stderr.contains("host remove hostB"), "\(twice.stderr)")

        let removed = try runVMM(["billboard", "host", "remove", "hostB", "--billboard", a, "--signed-by", admin])
        #expect(removed.status == 0, "\(removed.stderr)")
        #expect(try runVMM(["billboard", "host", "list", "--billboard", a]).stdout.hasPrefix("hostB\tremoved by admin"))
        let unknown = try runVMM(["billboard", "host", "remove", "hostB", "--billboard", a, "--signed-by", admin])
        #expect(unknown.status == 1)
        #expect(unknown.stderr.contains("no peer host named 'hostB'"), "\(unknown.stderr)")
        #expect(try runVMM(["billboard", "host", "add", "--billboard", a, "--signed-by", admin, file]).status == 0)
        #expect(try runVMM(["billboard", "host", "list", "--billboard", a]).stdout.hasPrefix("hostB\tactive"))
        let audit = try runVMM(["billboard", "audit", "--billboard", a]).stdout
        #expect(audit.components(separatedBy: "\thost.add\t").count == 3)
        #expect(audit.contains("\thost.remove\t"))
        #expect(audit.contains("\thost.add.refused\t"))
        #expect(try runVMM(["billboard", "audit", "--verify", "--billboard", a]).status == 0)
    }
}
