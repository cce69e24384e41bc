import Foundation
import GuestMemory
import Testing
import TestSupport
import KVM
import Loader
import MachineCore

@Suite("Booting guests on /dev/kvm", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct BootTests {
    @Test("hello boots in real mode and ends by HLT with interrupts off (status 0)")
    func helloReal() throws {
        let (exit, output) = try runGuest("hello-real.bin", mode: .real)
        #expect(output.contains("Hello from real mode"))
        #expect(exit == .halted)
        #expect(exit.exitStatus == 0)
    }

    @Test("hello boots in protected mode and ends through port 0xf4 with status 0")
    func helloProtected() throws {
        let (exit, output) = try runGuest("hello-protected.bin", mode: .protected)
        #expect(output == "Hello from protected mode\n")
        #expect(exit == .exitPort(status: 0))
    }

    @Test("hello boots in long mode and reads the parameter block: command line and memory size")
    func helloLong() throws {
        let (exit, output) = try runGuest("hello-long.bin", mode: .long, commandLine: "alpha beta=2", memory: 96 << 20)
        #expect(output.contains("Hello from long mode\n"))
        #expect(output.contains("cmdline: alpha beta=2\n"))
        #expect(output.contains("memory: 96 MiB\n"))
        #expect(exit == .exitPort(status: 0))
    }

    @Test("long mode identity-maps all of a 4 GiB guest (the last 2 MiB page included)")
    func longModeLargeMemory() throws {
        let (exit, output) = try runGuest("hello-long.bin", mode: .long, memory: 4 << 30)
        #expect(output.contains("memory: 4096 MiB"))
        #expect(exit == .exitPort(status: 0))
    }

    @Test("a guest's byte on port 0xf4 becomes the exit status")
    func exitStatusThroughPort() throws {
        let (exit, output) = try runGuest("status42.bin", mode: .protected)
        #expect(output.isEmpty)
        #expect(exit == .exitPort(status: 42))
        #expect(exit.exitStatus == 42)
    }

    @Test("HLT with interrupts enabled is reported as a hang, not a success")
    func hangIsReported() throws {
        let (exit, output) = try runGuest("hang.bin", mode: .protected)
        #expect(output == "hang\n")
        guard case let .hang(details) = exit else { Issue.record("expected a hang, got \(exit)"); return }
        #expect(details.contains("rflags="))
        #expect(exit.exitStatus != 0)
    }

    @Test("a triple fault is a fatal exit with the registers, and a non-zero status")
    func tripleFaultIsFatal() throws {
        let (exit, _) = try runGuest("triplefault.bin", mode: .protected)
        guard case let .fatal(reason, details) = exit else { Issue.record("expected a fatal exit, got \(exit)"); return }
        // Nested KVM may report the unrecoverable fault as an emulation failure instead of SHUTDOWN.
        #expect(reason.contains("KVM_EXIT_SHUTDOWN") || reason.contains("KVM_EXIT_INTERNAL_ERROR"))
        #expect(details.contains("rip="))
        #expect(exit.exitStatus == 2)
    }

    @Test("a Multiboot kernel sees the magic, mem_lower/mem_upper, the memory map and its command line")
    func multibootInformation() throws {
        let (exit, output) = try runGuest("hello-multiboot.elf", commandLine: "console=ttyS0 answer=42", memory: 128 << 20)
        #expect(output.contains("Hello from multiboot\n"))
        #expect(!output.contains("bad magic"))
        #expect(output.contains("mem_lower=640 mem_upper=\((128 << 10) - 1024)\n"))
        #expect(output.contains("cmdline=console=ttyS0 answer=42\n"))
        #expect(output.contains("mmap 0x100000 0x7f00000 1\n"))
        #expect(exit == .exitPort(status: 0))
    }

    @Test("without --cmdline the Multiboot information carries no command line")
    func multibootWithoutCommandLine() throws {
        let (exit, output) = try runGuest("hello-multiboot.elf")
        #expect(!output.contains("cmdline="))
        #expect(exit == .exitPort(status: 0))
    }

    @Test("the counter guest prints its sequence and ends after count steps")
    func counterCounts() throws {
        let (exit, output) = try runGuest("counter.elf", commandLine: "count=20 ticks=10000")
        let numbers = output.split(separator: "\n").dropFirst().compactMap { Int($0) }
        #expect(numbers == Array(1...20))
        #expect(exit == .exitPort(status: 0))
    }

    @Test("the dirtier guest writes its working set for the given passes and exits 0")
    func dirtierRuns() throws {
        let (exit, output) = try runGuest("dirtier.elf", commandLine: "pages=512 passes=4 mark_us=0", memory: 64 << 20)
        #expect(output.contains("dirtier pages=512"))
        #expect(output.contains("dirtier done passes=4"))
        #expect(exit == .exitPort(status: 0))
    }

    /// Boots the dirtier for `passes` and returns its output and the working set's pages.
    private func dirtierPages(_ commandLine: String, pages: Int) throws -> (exit: MachineExit?, output: String, pages: [[UInt8]]) {
        let capture = SerialCapture()
        let machine = try bootMachine("dirtier.elf", MachineConfiguration(memorySize: 64 << 20, commandLine: commandLine),
                                      serialOutput: capture.append)
        machine.start()
        let exit = machine.waitForExit(timeout: 300)
        if exit == nil { machine.requestStop(); _ = machine.waitForExit() }
        let set = try (0..<pages).map { try machine.memory.read(at: GuestAddress(0x400000 + UInt64($0) * 4096), count: 4096) }
        return (exit, capture.text, set)
    }

    @Test("fill=random leaves every page of the set incompressible and unlike the others")
    func dirtierRandomFill() throws {
        let run = try dirtierPages("pages=32 passes=2 mark_us=0 fill=random touch=4", pages: 32)
        #expect(run.exit == .exitPort(status: 0), "output: \(run.output)")
        #expect(run.output.contains("fill=random touch=4"))
        #expect(run.output.contains("dirtier filled 32 pages"))
        for page in run.pages {
            // 4096 random bytes take nearly every value; a page of words or text takes few.
            #expect(Set(page).count > 200)
        }
        #expect(Set(run.pages).count == 32)
    }

    @Test("fill=text leaves text in every page of the set, each unlike the others")
    func dirtierTextFill() throws {
        let run = try dirtierPages("pages=32 passes=2 mark_us=0 fill=text touch=4", pages: 32)
        #expect(run.exit == .exitPort(status: 0), "output: \(run.output)")
        let text = Set(Array("abcdefghijklmnopqrstuvwxyz \n".utf8))
        for page in run.pages {
            #expect(page.allSatisfy(text.contains))
            #expect(page.filter { $0 == UInt8(ascii: " ") }.count > 200)
        }
        #expect(Set(run.pages).count == 32)
    }

    @Test("store=byte sweeps one byte per page, the pass number, and nothing else")
    func dirtierByteSweep() throws {
        let run = try dirtierPages("pages=16 passes=3 mark_us=0 store=byte", pages: 16)
        #expect(run.exit == .exitPort(status: 0), "output: \(run.output)")
        #expect(run.output.contains("store=byte"))
        for page in run.pages {
            #expect(page[0] == 3)
            #expect(page.dropFirst().allSatisfy { $0 == 0 })
        }
    }

    @Test("report_ms prints the write rate when paced too")
    func dirtierReportsWhenPaced() throws {
        // Pacing and reports both count TSC ticks at the tsc_khz given, so 100 writes at 400/s
        // span 250 ms of that clock, five 50 ms report periods, however fast the host is. A stall
        // (the vCPU descheduled) folds periods into one report, so only one is required.
        let run = try dirtierPages("pages=4 passes=25 rate=400 tsc_khz=1000000 mark_us=0 report_ms=50", pages: 4)
        #expect(run.exit == .exitPort(status: 0), "output: \(run.output)")
        let rates = run.output.split(separator: "\n").filter { $0.hasPrefix("rate=") }.compactMap { Int($0.dropFirst(5)) }
        #expect(!rates.isEmpty, "output: \(run.output)")
        #expect(rates.allSatisfy { $0 > 0 })
    }

    @Test("the dirtier refuses store=byte with a fill, and report_ms without tsc_khz, with status 2")
    func dirtierRefusesBadModes() throws {
        let byteFill = try runGuest("dirtier.elf", commandLine: "pages=4 passes=1 mark_us=0 store=byte fill=text")
        #expect(byteFill.output.contains("store=byte writes one byte and needs fill=zero"))
        #expect(byteFill.exit == .exitPort(status: 2))
        let noClock = try runGuest("dirtier.elf", commandLine: "pages=4 passes=1 mark_us=0 report_ms=100")
        #expect(noClock.output.contains("tsc_khz= is required"))
        #expect(noClock.exit == .exitPort(status: 2))
        let badFill = try runGuest("dirtier.elf", commandLine: "pages=4 passes=1 mark_us=0 fill=zip")
        #expect(badFill.output.contains("bad value fill=zip"))
        #expect(badFill.exit == .exitPort(status: 2))
    }

    @Test("the dirtier refuses a working set larger than its memory with status 2")
    func dirtierRefusesOversizedSet() throws {
        let (exit, output) = try runGuest("dirtier.elf", commandLine: "pages=100000 passes=1 mark_us=0", memory: 16 << 20)
        #expect(output.contains("does not fit"))
        #expect(exit == .exitPort(status: 2))
    }
}

@Suite("A Multiboot kernel nobody here wrote", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct ForeignKernelTests {
    @Test("Intel's tboot (Debian's package) boots, prints through COM1 and halts")
    func tbootBoots() throws {
        let path = Fixtures.root.appendingPathComponent("GuestImages/build/third-party/tboot.elf").path
        try #require(FileManager.default.fileExists(atPath: path),
                     "tboot is missing: run `bash scripts/fetch-tboot.sh` (make test does it)")
        let capture = SerialCapture()
        let machine = try Machine(image: [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))),
                                  configuration: MachineConfiguration(memorySize: 128 << 20, commandLine: "logging=serial"),
                                  serialOutput: capture.append)
        machine.start()
        let exit = machine.waitForExit(timeout: 120)
        #expect(exit == .halted)
        #expect(capture.text.contains("TBOOT: command line: logging=serial"))
        #expect(capture.text.contains("shutdown_system() called"))
    }
}

@Suite("The benchmark guest under QEMU", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct QEMUCompatibilityTests {
    static let qemu = "/usr/bin/qemu-system-x86_64"

    @Test("dirtier.elf boots unchanged under qemu-system-x86_64 -enable-kvm -kernel and ends through port 0xf4",
          .enabled(if: FileManager.default.isExecutableFile(atPath: qemu), "qemu-system-x86_64 is not installed (make test installs it)"))
    func dirtierUnderQEMU() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Self.qemu)
        process.arguments = ["-enable-kvm", "-m", "64", "-nodefaults", "-display", "none", "-no-reboot",
                             "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
                             "-kernel", try Fixtures.guest("dirtier.elf"), "-append", "pages=128 passes=2 mark_us=0"]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = Pipe()
        try process.run()
        let watchdog = DispatchWorkItem { process.terminate() }
        DispatchQueue.global().asyncAfter(deadline: .now() + 120, execute: watchdog)
        let data = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        watchdog.cancel()
        let text = String(decoding: data, as: UTF8.self)
        #expect(text.contains("dirtier pages=128"))
        #expect(text.contains("dirtier done passes=2"))
        // isa-debug-exit: QEMU exits with (status << 1) | 1.
        #expect(process.terminationStatus == 1)
    }
}
