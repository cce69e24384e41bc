import ArgumentParser
import ControlAPI
import Foundation
import NIOHTTP1
import Synchronization

struct Ctl: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Control a running VMM through its API socket.",
        subcommands: [Info.self, Pause.self, Resume.self, SnapshotCmd.self, Digest.self, Shutdown.self, Migrate.self, MigrationStatus.self,
                      MigratePostcopy.self, MigrateRecover.self, MigrateCancel.self, Scan.self])

    struct Socket: ParsableArguments {
        @Option(help: "The VMM's control socket (vmm run --api-socket PATH).")
        var apiSocket: String
    }

    /// Sends a request, prints the JSON reply; a non-2xx reply prints the error and exits 1.
    static func call(_ socket: Socket, _ method: HTTPMethod, _ path: String, body: [String: Any]? = nil) throws {
        let text = try body.map { String(decoding: try JSONSerialization.data(withJSONObject: $0), as: UTF8.self) }
        let reply: ControlClient.Reply
        do {
            reply = try ControlClient(socketPath: socket.apiSocket).send(method, path, body: text)
        } catch {
            FileHandle.standardError.write(Data("vmm: error: \(describeWithFlagHint(error))\n".utf8))
            throw ExitCode(1)
        }
        guard (200..<300).contains(reply.status) else {
            let message = reply.json?["error"] as? String ?? reply.body
            FileHandle.standardError.write(Data("vmm: error (HTTP \(reply.status)): \(message)\n".utf8))
            throw ExitCode(1)
        }
        print(reply.body, terminator: reply.body.hasSuffix("\n") ? "" : "\n")
    }

    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show the VM's state, configuration and uptime (GET /vm).")
        @OptionGroup var socket: Socket
        func run() throws { try Ctl.call(socket, .GET, "/vm") }
    }
    struct Pause: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Pause every vCPU (PUT /vm/pause).")
        @OptionGroup var socket: Socket
        func run() throws { try Ctl.call(socket, .PUT, "/vm/pause") }
    }
    struct Resume: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Resume a paused VM (PUT /vm/resume).")
        @OptionGroup var socket: Socket
        @Flag(help: "Resume even though the last migration is in doubt (only if the destination does not run the guest).")
        var force = false
        func run() throws { try Ctl.call(socket, .PUT, "/vm/resume", body: force ? ["force": true] : nil) }
    }
    struct SnapshotCmd: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "snapshot", abstract: "Write a paused VM to a file (PUT /vm/snapshot).")
        @OptionGroup var socket: Socket
        @Argument(help: "A file name, written inside the VMM's --snapshot-dir, or an absolute path directly in that directory.")
        var path: String
        // Sent as given: the VMM, not this process's working directory, decides where a name lands.
        @Flag(help: "Write the guest in clear, for debugging: anyone who can read the file reads the guest's memory. By default snapshots are sealed for this host and the guest's allowed peer hosts.")
        var unsealed = false
        func run() throws {
            var body: [String: Any] = ["path": path]
            if unsealed { body["unsealed"] = true }
            try Ctl.call(socket, .PUT, "/vm/snapshot", body: body)
        }
    }
    struct Digest: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "SHA-256 of all guest RAM of a paused VM (GET /vm/digest).")
        @OptionGroup var socket: Socket
        func run() throws { try Ctl.call(socket, .GET, "/vm/digest") }
    }
    struct Scan: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run the VMM's active billboard scan now (PUT /vm/scan); false and duplicate VMs are stopped.")
        @OptionGroup var socket: Socket
        func run() throws { try Ctl.call(socket, .PUT, "/vm/scan") }
    }
    struct Shutdown: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop the VM and end its VMM (PUT /vm/shutdown).")
        @OptionGroup var socket: Socket
        func run() throws { try Ctl.call(socket, .PUT, "/vm/shutdown") }
    }
}

extension Ctl {
    struct Migrate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Live-migrate the VM to `vmm receive` at HOST:PORT (PUT /vm/migrate), showing progress.",
            discussion: "Exits 0 when the guest runs on the destination; 1 if the migration failed (the guest keeps running here), is in doubt, or (post-copy) paused because its link failed. A paused post-copy migration is resumed with --resume, to where the destination listens after `vmm ctl migrate-recover`.")
        @OptionGroup var socket: Socket
        @Argument(help: "The destination, HOST:PORT.") var destination: String
        @Option(help: "The enrolled host expected at the destination (vmm billboard host add); its TLS certificate must be that host's.") var peer: String?
        @Flag(help: "Send over plain TCP instead of mutually authenticated TLS (for benchmarks; the destination must consent too). Anyone on the path can read the guest.") var insecurePlaintext = false
        @Option(help: "Largest acceptable pause of the guest, in milliseconds.") var maxDowntimeMs: Double = 300
        @Option(help: "Bandwidth cap in bytes per second; 0 = unlimited.") var maxBandwidth: UInt64 = 0
        @Option(help: ArgumentHelp("What pre-copy does when its rounds stop shrinking: off (iterate until the final round fits or the timeout), throttle (slow the guest, sized from its dirty rate), adaptive (hot pages last, then throttle; the default).", valueName: "off|throttle|adaptive"))
        var convergence: String?
        @Flag(help: "The old spelling of --convergence throttle.") var autoConverge = false
        @Option(help: "Give up (guest keeps running here) after this many seconds.") var timeout: Double = 60
        @Flag(help: "Allow post-copy: the guest moves to the destination before all its pages did and the rest follow, after --postcopy-after-rounds rounds, on `vmm ctl migrate-postcopy`, or with --postcopy-on-stall. If the link fails after the switch, both sides pause and keep what they have until recovered (migrate-recover there, --resume here); if either VMM dies before the last page moved, the guest is lost.") var postcopy = false
        @Option(help: ArgumentHelp("Pre-copy rounds before the post-copy switch (0 to 1000), or `never`: only on request or on stall, and a pre-copy that converges first finishes as usual. Default 1, or never with --postcopy-on-stall.", valueName: "N|never"))
        var postcopyAfterRounds: String?
        @Flag(help: "With --postcopy: switch as soon as pre-copy is seen not to converge within --max-downtime-ms, instead of failing at the timeout.") var postcopyOnStall = false
        @Flag(help: "Resume this guest's post-copy migration, paused after its link failed, at HOST:PORT (where `vmm ctl migrate-recover` made the destination listen); the same --peer as before.") var resume = false
        @Option(help: ArgumentHelp("Connections that carry the pages (1 to 8): with 1 they go on the main connection; with N, on N more connections, each with its own thread (zero pages, encryption), each page always on the same one.", valueName: "N"))
        var channels: Int = 1
        @Flag(help: "No progress line.") var quiet = false

        func validate() throws {
            if peer == nil && !insecurePlaintext {
                throw ValidationError("name the destination host with --peer NAME (an enrolled peer), or migrate in plaintext with --insecure-plaintext")
            }
            if resume && (insecurePlaintext || postcopy || postcopyOnStall || postcopyAfterRounds != nil) {
                throw ValidationError("--resume resumes a paused post-copy migration over TLS: give it the destination, --peer and optionally --max-bandwidth, not --insecure-plaintext or the --postcopy options")
            }
            if let convergence, !["off", "throttle", "adaptive"].contains(convergence) {
                throw ValidationError("--convergence takes off, throttle or adaptive (the default), not '\(convergence)'")
            }
            if autoConverge, let convergence, convergence != "throttle" {
                throw ValidationError("--auto-converge is the old spelling of --convergence throttle and contradicts --convergence \(convergence): give only --convergence")
            }
            guard (1...8).contains(channels) else {
                throw ValidationError("--channels takes 1 to 8 connections for the pages (1: the main connection), not \(channels)")
            }
            if channels > 1 && (postcopy || resume) {
                throw ValidationError("--channels above 1 does not combine with --postcopy or --resume yet: leave it at 1")
            }
            if postcopyOnStall && !postcopy {
                throw ValidationError("--postcopy-on-stall switches to post-copy, which the migration must allow: add --postcopy")
            }
            if let rounds = postcopyAfterRounds {
                guard postcopy else { throw ValidationError("--postcopy-after-rounds applies to post-copy: add --postcopy") }
                guard rounds == "never" || Int(rounds).map({ (0...1000).contains($0) }) == true else {
                    throw ValidationError("--postcopy-after-rounds takes a number of rounds from 0 to 1000, or never")
                }
            }
        }

        func run() throws {
            let client = ControlClient(socketPath: socket.apiSocket)
            var body: [String: Any] = ["destination": destination, "max_downtime_ms": maxDowntimeMs,
                                       "max_bandwidth": maxBandwidth, "auto_converge": autoConverge,
                                       "timeout_s": timeout, "wait": true,
                                       "postcopy": postcopy, "postcopy_on_stall": postcopyOnStall,
                                       "transport": insecurePlaintext ? "plaintext" : "tls"]
            if resume { body["resume"] = true }
            if channels != 1 { body["channels"] = channels }
            if let peer { body["peer"] = peer }
            if let convergence { body["convergence"] = convergence }
            // Left out, the VMM's default applies (1, or never with a switch on stall).
            if let rounds = postcopyAfterRounds { body["postcopy_after_rounds"] = Int(rounds).map { $0 as Any } ?? rounds }
            let text = String(decoding: try JSONSerialization.data(withJSONObject: body), as: UTF8.self)
            // The request waits for the end; a second connection polls progress meanwhile.
            let finished = Finished()
            if !quiet {
                Thread.detachNewThread {
                    var lastLine = ""
                    while !finished.value {
                        if let r = try? client.send(.GET, "/vm/migration", timeout: .seconds(2)), let j = r.json {
                            let phase = j["phase"] as? String ?? "?"
                            let line = String(format: "\r%@ round %d  sent %d pages  dirty %d  %.1f MB/s  expected downtime %.1f ms  throttle %d%%   ",
                                              phase, j["round"] as? Int ?? 0, j["pages_sent"] as? Int ?? 0,
                                              j["dirty_pages_left"] as? Int ?? 0, (j["rate_bytes_per_s"] as? Double ?? 0) / 1e6,
                                              j["expected_downtime_ms"] as? Double ?? 0, j["throttle_percent"] as? Int ?? 0)
                            if !finished.value && line != lastLine { FileHandle.standardError.write(Data(line.utf8)) }
                            lastLine = line
                        }
                        usleep(200_000)
                    }
                }
            }
            let reply: ControlClient.Reply
            do {
                reply = try client.send(.PUT, "/vm/migrate", body: text, timeout: .seconds(Int64(timeout) + 120))
            } catch {
                finished.value = true
                FileHandle.standardError.write(Data("\nvmm: error: \(error)\n".utf8))
                throw ExitCode(1)
            }
            finished.value = true
            if !quiet { FileHandle.standardError.write(Data("\n".utf8)) }
            print(reply.body, terminator: reply.body.hasSuffix("\n") ? "" : "\n")
            guard reply.status == 200 else {
                let message = reply.json?["error"] as? String ?? "HTTP \(reply.status)"
                FileHandle.standardError.write(Data("vmm: migration did not complete: \(message)\n".utf8))
                throw ExitCode(1)
            }
        }
    }

    struct MigratePostcopy: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "migrate-postcopy",
            abstract: "Switch the running post-copy migration to post-copy now (PUT /vm/migration/postcopy).",
            discussion: "The migration must have been started with --postcopy; it switches at once, even in the middle of a round. From then on, if the link fails, both sides pause until recovered (migrate-recover at the destination, migrate --resume here); if either VMM dies before the last page moved, the guest is lost.")
        @OptionGroup var socket: Socket
        func run() throws { try Ctl.call(socket, .PUT, "/vm/migration/postcopy") }
    }

    struct MigrationStatus: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "migration", abstract: "Show migration progress (GET /vm/migration).")
        @OptionGroup var socket: Socket
        func run() throws { try Ctl.call(socket, .GET, "/vm/migration") }
    }

    struct MigrateRecover: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "migrate-recover",
            abstract: "At the destination of a post-copy migration paused after its link failed: listen for the source's resume (PUT /vm/migration/recover).",
            discussion: "Only the migration's own source host gets in (mutually authenticated TLS), answering a fresh challenge with the migration's identity; then run `vmm ctl migrate HOST:PORT --resume --peer THIS-HOST` at the source. Prints the address it listens on.")
        @OptionGroup var socket: Socket
        @Option(help: "Address to listen on, HOST:PORT (port 0 picks one).") var listen: String
        @Option(help: "Seconds to listen; the migration stays paused if no resume came.") var timeout: Double = 600
        func run() throws { try Ctl.call(socket, .PUT, "/vm/migration/recover", body: ["listen": listen, "timeout_s": timeout]) }
    }

    struct MigrateCancel: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "migrate-cancel",
            abstract: "Cancel a migration (PUT /vm/migration/cancel).",
            discussion: "At a source before the commit: the migration stops and the guest keeps running here. At the destination of a paused post-copy migration whose source is gone: gives it up, and the guest is lost (it never runs with missing pages; the VMM ends with status 2).")
        @OptionGroup var socket: Socket
        func run() throws { try Ctl.call(socket, .PUT, "/vm/migration/cancel") }
    }
}

/// A flag shared between the request and the progress thread.
final class Finished: Sendable {
    private let flag = Mutex(false)
    var value: Bool {
        get { flag.withLock { $0 } }
        set { flag.withLock { $0 = newValue } }
    }
}
