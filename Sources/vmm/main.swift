import ArgumentParser
import Foundation
import KVM
import Loader
import VMM

/// The `vmm` command line.
struct VMMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmm",
        abstract: "A small KVM hypervisor: boot tiny guests on /dev/kvm.",
        subcommands: [Run.self, Bench.self]
    )
}

extension BootMode: ExpressibleByArgument {}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Boot an image and run it until it exits.",
        discussion: """
        Flat binaries load at 0x10000 and need --mode real|protected|long. A file with a \
        Multiboot v1 header is booted as Multiboot without --mode. The exit status is the \
        byte the guest wrote to port 0xf4, 0 for HLT with interrupts off, 2 if the guest \
        crashed or hung, 1 for a VMM error, 128+N when stopped by signal N.
        """
    )

    @Argument(help: "The guest image (flat binary or Multiboot kernel).")
    var image: String

    @Option(help: "Guest memory size, e.g. 64M or 1G (1M to 4G).")
    var memory: String = "64M"

    @Option(help: "Boot mode: real, protected, long (flat binaries) or multiboot.")
    var mode: BootMode?

    @Option(help: "Command line for the guest (Multiboot information or parameter block).")
    var cmdline: String?

    @Option(help: "Write the guest's serial output to this file instead of stdout.")
    var serialLog: String?

    func validate() throws {
        do { _ = try MemorySize.parse(memory) } catch { throw ValidationError(error.description) }
    }

    func run() throws {
        let memorySize = try MemorySize.parse(memory)
        let exitStatus = try CommandRunner.fail {
            let bytes = try ImageFile.read(image, limit: memorySize)
            let output = try SerialOutput(path: serialLog)
            let machine = try Machine(image: bytes, configuration: MachineConfiguration(
                memorySize: memorySize, mode: mode, commandLine: cmdline), serialOutput: output.write)
            TerminationSignals.handle { signal in machine.requestStop(signal: signal) }
            machine.start()
            let exit = machine.waitForExit()
            switch exit {
            case .exitPort, .halted: break
            default: FileHandle.standardError.write(Data("vmm: \(exit)\n".utf8))
            }
            return exit.exitStatus
        }
        throw ExitCode(exitStatus)
    }
}

/// Where serial bytes go: stdout or a log file, one unbuffered write per byte.
final class SerialOutput: @unchecked Sendable {
    let fd: Int32
    init(path: String?) throws {
        if let path {
            fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else {
                throw CLIError("cannot open the serial log '\(path)': \(String(cString: strerror(errno))); check the directory exists and is writable")
            }
        } else {
            fd = STDOUT_FILENO
        }
    }
    func write(_ byte: UInt8) {
        var b = byte
        _ = Foundation.write(fd, &b, 1)
    }
}

/// Runs a command body, printing any error as one clear line and exiting 1.
enum CommandRunner {
    static func fail(_ body: () throws -> Int32) throws -> Int32 {
        do {
            return try body()
        } catch {
            FileHandle.standardError.write(Data("vmm: error: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

/// A command-line error with a message that says what to do.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

VMMCommand.main()
