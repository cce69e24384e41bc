import Foundation
import Testing
import TestSupport
import ControlAPI
import SystemCalls
import VMM

/// A loopback TCP proxy for every connection a migration opens through it (the main connection
/// first, then the page channel, right after the accept). Once the page channel is open it lets
/// the source's side of the main connection through at a crawl (the state, GO, then the push), so
/// that the guest, started on GO,
/// asks for a missing page long before the push could bring it. When the first page-sized reply comes
/// back from the source on the page channel, it runs `onFirstPage` and drops that reply; with
/// `cut`, it also shuts every connection down, as a link that failed.
// @unchecked: `connections`, `fired` and `pageChannelBytes` are read and written only under `lock`.
final class LinkProxy: @unchecked Sendable {
    private let listening: OwnedFileDescriptor
    let port: UInt16
    private let lock = NSLock()
    private var connections: [Int32] = []
    private var fired = false
    private var pageChannelBytes = 0
    private var pageChannelOpen = false
    private let cut: Bool
    private let onFirstPage: @Sendable () -> Void

    init(targetPort: UInt16, cut: Bool, onFirstPage: @escaping @Sendable () -> Void = {}) throws {
        (listening, port) = try TCPProxy.listen()
        self.cut = cut
        self.onFirstPage = onFirstPage
        Thread.detachNewThread { [self] in acceptLoop(targetPort) }
    }

    deinit { shutDownAll() }

    var hasFired: Bool { lock.withLock { fired } }

    private func acceptLoop(_ targetPort: UInt16) {
        var index = 0
        while true {
            let client = accept(listening.raw, nil, nil)
            guard client >= 0 else { return }
            let server = TCPProxy.connect(targetPort)
            guard server >= 0 else { close(client); continue }
            let isPageChannel = index == 1, isMain = index == 0
            index += 1
            lock.withLock { connections += [client, server]; if isPageChannel { pageChannelOpen = true } }
            Thread.detachNewThread { [self] in pump(from: client, to: server, watch: isPageChannel, crawl: isMain) }
            Thread.detachNewThread { [self] in pump(from: server, to: client, watch: false, crawl: false) }
        }
    }

    private func pump(from: Int32, to: Int32, watch: Bool, crawl: Bool) {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(from, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            if watch {
                // The handshake, the page channel's opening and heartbeats stay well below a page.
                let fire = lock.withLock { () -> Bool in
                    pageChannelBytes += n
                    guard !fired, pageChannelBytes >= 4096 else { return false }
                    fired = true
                    return true
                }
                if fire {
                    onFirstPage()
                    if cut { shutDownAll() }
                }
            }
            if lock.withLock({ fired }) && (cut || watch) { continue }
            var sent = 0
            while sent < n {
                // About 5 KB/s: shaping the traffic, not timing anything.
                let slow = crawl && lock.withLock { pageChannelOpen }
                let piece = slow ? min(512, n - sent) : n - sent
                let w = buffer.withUnsafeBytes { write(to, $0.baseAddress! + sent, piece) }
                if w <= 0 { break }
                sent += w
                if slow { usleep(100_000) }
            }
        }
        shutdown(to, Int32(SHUT_RDWR))
        shutdown(from, Int32(SHUT_RDWR))
    }

    /// Shuts every connection down (both directions) and stops accepting.
    func shutDownAll() {
        shutdown(listening.raw, Int32(SHUT_RDWR))
        for fd in lock.withLock({ connections }) { shutdown(fd, Int32(SHUT_RDWR)) }
    }
}

/// Post-copy recovery between two `vmm` processes, driven through `vmm ctl` as an operator would.
@Suite("Post-copy recovery through the CLI", .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage), .serialized)
struct PostCopyRecoveryCLITests {
    struct Pair {
        let store: TestBillboard
        let source: VMMProcess
        let destination: VMMProcess
        let sourceSocket: String
        let destinationSocket: String
        let port: UInt16
        let reports: String

        /// The source's migration reports, for failure messages.
        var reportText: String {
            let files = (try? FileManager.default.contentsOfDirectory(atPath: reports)) ?? []
            return files.sorted().compactMap { try? String(contentsOfFile: reports + "/" + $0, encoding: .utf8) }.joined(separator: "\n")
        }
    }

    /// A counter run by `vmm run`, and `vmm receive` waiting for it, on one fresh billboard.
    func pair(receiveOptions: [String] = []) throws -> Pair {
        let store = try TestBillboard(host: "pcr\(UInt16.random(in: 0...UInt16.max))")
        let counter = try Fixtures.guest("counter.elf")
        let cmdline = "ticks=400000"
        let registration = try store.register(counter, cmdline: cmdline)
        let quick = ["--scan-interval", "1", "--lease-timeout", "3"]
        let sourceSocket = temporaryPath("pcr-src") + ".sock"
        let reports = temporaryPath("pcr-reports")
        let source = try VMMProcess(["run", counter, "--cmdline", cmdline, "--api-socket", sourceSocket, "--report-dir", reports]
                                    + registration + quick, socket: sourceSocket)
        try source.waitForSocket()
        let port = try freePort()
        let destinationSocket = temporaryPath("pcr-dst") + ".sock"
        let destination = try VMMProcess(["receive", "--listen", "127.0.0.1:\(port)", "--api-socket", destinationSocket,
                                          "--listen-timeout", "120"] + receiveOptions + store.storeArguments + quick,
                                         socket: destinationSocket)
        #expect(waitUntil(30) { destination.errorText.contains("listening on") }, "\(destination.errorText)")
        return Pair(store: store, source: source, destination: destination, sourceSocket: sourceSocket,
                    destinationSocket: destinationSocket, port: port, reports: reports)
    }

    func json(_ vmm: VMMProcess, _ path: String) -> [String: Any]? { try? vmm.call(.GET, path).json }
    func phase(_ vmm: VMMProcess) -> String? { json(vmm, "/vm/migration")?["phase"] as? String }
    /// The destination's post-copy phase, from its arrival report.
    func incomingPhase(_ vmm: VMMProcess) -> String? {
        let incoming = json(vmm, "/vm/migration")?["incoming"] as? [String: Any]
        return (incoming?["postcopy_state"] as? [String: Any])?["phase"] as? String
    }

    /// Post-copy before any round: every page is missing at the switch, so the guest asks for its
    /// code (the pages it wrote last here, its stack and counter, go with the state and would not
    /// be asked for).
    func startPostCopy(_ p: Pair, through proxy: LinkProxy) throws {
        let start = try p.source.call(.PUT, "/vm/migrate",
                                      "{\"destination\": \"127.0.0.1:\(proxy.port)\", \"peer\": \"\(p.store.host)\", \"postcopy\": true, \"postcopy_after_rounds\": 0}")
        #expect(start.status == 202, "\(start.body)")
        let warning = start.json?["warning"] as? String ?? ""
        #expect(warning.contains("both sides pause") && warning.contains("the guest is lost"), "\(warning)")
    }

    @Test("vmm receive serves its API during post-copy; a cut link pauses both VMMs (no scan stops either), and vmm ctl migrate-recover with migrate --resume finish the migration, the counter going on with no gap")
    func recoverThroughCLI() throws {
        let p = try pair()
        let proxy = try LinkProxy(targetPort: p.port, cut: true)
        try startPostCopy(p, through: proxy)
        #expect(waitUntil(60) { phase(p.source) == "postcopy-paused" },
                "source: \(String(describing: json(p.source, "/vm/migration"))) \(p.reportText) \(p.source.errorText) destination: \(p.destination.errorText)")
        // The destination's API is up although pages are still missing.
        #expect(waitUntil(60) { incomingPhase(p.destination) == "postcopy-paused" },
                "destination: \(String(describing: json(p.destination, "/vm/migration"))) \(p.destination.errorText)")
        #expect(proxy.hasFired)

        // Neither copy may run: the paused destination until recovered, the source never.
        #expect(try p.destination.call(.PUT, "/vm/resume").status == 409)
        #expect(try p.source.call(.PUT, "/vm/resume", "{\"force\": true}").status == 409)
        #expect(try p.destination.call(.GET, "/vm/digest").status == 409)
        #expect(try p.source.call(.PUT, "/vm/migration/cancel").status == 409)
        // The scans see a page server and a paused guest: nothing to stop.
        for vmm in [p.source, p.destination] {
            let findings = try vmm.call(.PUT, "/vm/scan").json?["findings"] as? [[String: Any]] ?? []
            #expect(!findings.contains { $0["stopped"] as? Bool == true }, "\(findings)")
        }
        let instances = try p.store.cli(["instances"]).stdout
        #expect(instances.contains("pid \(p.source.process.processIdentifier)\tpage-server-awaiting-recovery"), "\(instances)")
        #expect(p.source.process.isRunning && p.destination.process.isRunning)
        let before = counterNumbers(String(decoding: p.source.output + p.destination.output, as: UTF8.self)).count

        let recover = try runVMM(["ctl", "migrate-recover", "--api-socket", p.destinationSocket, "--listen", "127.0.0.1:0"])
        #expect(recover.status == 0, "\(recover.stderr)")
        let address = try #require(
            (try? JSONSerialization.jsonObject(with: Data(recover.stdout.utf8)) as? [String: Any])?["listen"] as? String,
            "\(recover.stdout)")
        let resume = try runVMM(["ctl", "migrate", address, "--resume", "--peer", p.store.host, "--api-socket", p.sourceSocket, "--quiet"],
                                timeout: 180)
        #expect(resume.status == 0, "\(resume.stdout) \(resume.stderr)")
        #expect(resume.stdout.contains("\"outcome\":\"completed\""), "\(resume.stdout)")
        #expect(p.source.wait(timeout: 30) == 0, "the source did not exit after the migration: \(p.source.errorText)")
        #expect(waitUntil(60) { incomingPhase(p.destination) == "completed" })
        #expect(waitUntil(60) {
            counterNumbers(String(decoding: p.source.output + p.destination.output, as: UTF8.self)).count >= before + 5
        }, "the counter did not go on at the destination")
        _ = try? p.destination.call(.PUT, "/vm/shutdown")
        #expect(p.destination.wait(timeout: 30) == 0, "\(p.destination.errorText)")
        let numbers = counterNumbers(String(decoding: p.source.output + p.destination.output, as: UTF8.self))
        #expect(isSequence(numbers), "gap or repeat: \(numbers.suffix(20))")
    }

    @Test("the source killed during post-copy: vmm receive pauses, never runs the guest with missing pages, and once given up with vmm ctl migrate-cancel reports it lost (exit status 2)")
    func sourceKilled() throws {
        let p = try pair()
        let sourcePid = p.source.process.processIdentifier
        // kill -9 as the source is about to answer its first page request.
        let proxy = try LinkProxy(targetPort: p.port, cut: false) { kill(sourcePid, SIGKILL) }
        try startPostCopy(p, through: proxy)
        #expect(p.source.wait(timeout: 60) != nil)
        #expect(proxy.hasFired, "\(p.reportText) \(p.destination.errorText)")
        #expect(waitUntil(60) { incomingPhase(p.destination) == "postcopy-paused" },
                "destination: \(String(describing: json(p.destination, "/vm/migration"))) \(p.destination.errorText)")
        #expect(p.destination.process.isRunning)
        let cancel = try runVMM(["ctl", "migrate-cancel", "--api-socket", p.destinationSocket])
        #expect(cancel.status == 0, "\(cancel.stderr)")
        #expect(cancel.stdout.contains("\"state\":\"lost\""), "\(cancel.stdout)")
        #expect(p.destination.wait(timeout: 60) == 2, "\(p.destination.errorText)")
        #expect(p.destination.errorText.contains("the guest is lost"), "\(p.destination.errorText)")
        // What the destination printed continues the source's count: it never ran on zero pages.
        let numbers = counterNumbers(String(decoding: p.source.output + p.destination.output, as: UTF8.self))
        #expect(isSequence(numbers), "gap or repeat: \(numbers.suffix(20))")
    }
}
