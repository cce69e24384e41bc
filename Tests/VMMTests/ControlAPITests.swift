#if canImport(Glibc)
import Glibc
#endif
import ControlAPI
import Foundation
import Testing
import TestSupport

/// The keys of a YAML document in block style, each with the raw text after its colon: enough
/// to read docs/api.yaml's paths, methods and schema references without a YAML library.
/// List items and block scalars (and everything nested in them) are skipped.
struct YAMLKeys {
    /// Every key's path from the root, with its raw value ("" for a key that opens a block).
    private(set) var values: [[String]: String] = [:]

    init(_ text: String) {
        var open: [(indent: Int, path: [String])] = []
        var skipDeeperThan: Int?
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            let indent = line.prefix { $0 == " " }.count
            let content = line.dropFirst(indent)
            if content.isEmpty || content.hasPrefix("#") { continue }
            if let limit = skipDeeperThan {
                if indent > limit { continue }
                skipDeeperThan = nil
            }
            if content.hasPrefix("-") { skipDeeperThan = indent; continue }
            guard let colon = content.firstIndex(of: ":") else { continue }
            let key = content[..<colon].trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "\"'"))
            let value = content[content.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            while let last = open.last, last.indent >= indent { open.removeLast() }
            let path = (open.last?.path ?? []) + [key]
            values[path] = value
            open.append((indent, path))
            if ["|", ">", "|-", ">-"].contains(value) { skipDeeperThan = indent }
        }
    }

    func children(of path: [String]) -> [String] {
        values.keys.filter { $0.count == path.count + 1 && Array($0.prefix(path.count)) == path }.map { $0.last! }.sorted()
    }

    func value(_ path: [String]) -> String? { values[path] }
}

@Suite("docs/api.yaml describes exactly the routes the server serves")
struct APISpecTests {
    static let methods: Set<String> = ["get", "put", "post", "delete", "patch", "head", "options", "trace"]

    func spec() throws -> YAMLKeys {
        YAMLKeys(try String(contentsOf: Fixtures.root.appendingPathComponent("docs/api.yaml"), encoding: .utf8))
    }

    @Test("every route and method in docs/api.yaml is served, and every served one is in docs/api.yaml")
    func sameRoutes() throws {
        let spec = try spec()
        #expect(spec.value(["openapi"])?.hasPrefix("3.") == true)
        var documented: Set<String> = []
        for path in spec.children(of: ["paths"]) {
            for method in spec.children(of: ["paths", path]) where Self.methods.contains(method) {
                documented.insert("\(method.uppercased()) \(path)")
            }
        }
        let served = Set(ControlRoute.allCases.map { "\($0.method.rawValue) \($0.path)" })
        #expect(!served.isEmpty)
        #expect(documented.subtracting(served).isEmpty, "documented but not served: \(documented.subtracting(served).sorted())")
        #expect(served.subtracting(documented).isEmpty, "served but not documented: \(served.subtracting(documented).sorted())")
    }

    @Test("each route's request body in docs/api.yaml has exactly the fields the server accepts")
    func sameBodyFields() throws {
        let spec = try spec()
        for route in ControlRoute.allCases {
            let operation = ["paths", route.path, route.method.rawValue.lowercased()]
            let schemaLine = spec.value(operation + ["requestBody", "content", "application/json", "schema"])
            guard let schemaLine else {
                #expect(route.bodyFields.isEmpty, "\(route.path) takes \(route.bodyFields.sorted()) but docs/api.yaml gives it no request body")
                continue
            }
            let name = try #require(schemaLine.split(separator: "/").last.map { $0.trimmingCharacters(in: CharacterSet(charactersIn: "\"'} ")) },
                                    "\(route.path): no schema reference in '\(schemaLine)'")
            let schema = ["components", "schemas", name]
            #expect(spec.value(schema + ["additionalProperties"]) == "false", "\(name) must refuse other fields, as the server does")
            #expect(Set(spec.children(of: schema + ["properties"])) == route.bodyFields, "\(name) in docs/api.yaml vs \(route.path)")
        }
    }
}

@Suite("Snapshot paths are accepted only directly inside the snapshot directory")
struct SnapshotDirectoryTests {
    /// A fresh snapshot directory, its canonical path, and a directory outside it.
    func makeDirectory() throws -> (SnapshotDirectory, String, String) {
        let root = temporaryPath("snapdir")
        try FileManager.default.createDirectory(atPath: root + "/snaps", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: root + "/elsewhere", withIntermediateDirectories: true)
        let directory = try SnapshotDirectory(root + "/snaps")
        return (directory, directory.canonical, root + "/elsewhere")
    }

    func kind(_ directory: SnapshotDirectory, _ path: String) -> SnapshotDirectory.Refusal.Kind? {
        do { _ = try directory.resolve(path); return nil } catch let r as SnapshotDirectory.Refusal { return r.kind } catch { return nil }
    }

    @Test("a plain name and an absolute path in the directory land in it; an existing regular file may be replaced")
    func accepted() throws {
        let (directory, dir, _) = try makeDirectory()
        #expect(try directory.resolve("a.snap") == dir + "/a.snap")
        #expect(try directory.resolve(dir + "/b.snap") == dir + "/b.snap")
        #expect(try directory.resolve(dir + "//c.snap") == dir + "/c.snap")
        FileManager.default.createFile(atPath: dir + "/old.snap", contents: Data([1]))
        #expect(try directory.resolve("old.snap") == dir + "/old.snap")
    }

    @Test("refused: .., other directories, subdirectories, symlinked components, directories, links, NUL, control characters, long names")
    func refused() throws {
        let (directory, dir, elsewhere) = try makeDirectory()
        try FileManager.default.createDirectory(atPath: dir + "/sub", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: dir + "/link", withDestinationPath: elsewhere + "/target")
        try FileManager.default.createSymbolicLink(atPath: elsewhere + "/to-snaps", withDestinationPath: dir)
        mkfifo(dir + "/fifo", 0o600)
        let cases: [(String, SnapshotDirectory.Refusal.Kind)] = [
            ("", .malformed), ("a\u{0}b", .malformed), ("a\nb", .malformed), (String(repeating: "x", count: 201), .malformed),
            (dir + "/", .malformed), ("/", .malformed),
            ("..", .forbidden), (".", .forbidden), ("../x.snap", .forbidden), ("sub/x.snap", .forbidden),
            (dir + "/../snaps/x.snap", .forbidden), (dir + "/./x.snap", .forbidden), (dir + "/sub/x.snap", .forbidden),
            (elsewhere + "/x.snap", .forbidden), ("/tmp/x.snap", .forbidden), (elsewhere + "/to-snaps/x.snap", .forbidden),
            ("sub", .occupied), (dir + "/sub", .occupied), ("link", .occupied), ("fifo", .occupied),
        ]
        for (path, expected) in cases {
            #expect(kind(directory, path) == expected, "\(path.debugDescription)")
        }
        #expect(!FileManager.default.fileExists(atPath: elsewhere + "/target"))
    }

    @Test("the directory as configured through a symlink is accepted; a directory swapped for a symlink after start is refused")
    func configuredThroughLinkAndSwapped() throws {
        let root = temporaryPath("snapdir-link")
        try FileManager.default.createDirectory(atPath: root + "/real", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: root + "/other", withIntermediateDirectories: true)
        try FileManager.default.createSymbolicLink(atPath: root + "/configured", withDestinationPath: root + "/real")
        let directory = try SnapshotDirectory(root + "/configured")
        #expect(try directory.resolve(root + "/configured/x.snap") == directory.canonical + "/x.snap")
        try FileManager.default.removeItem(atPath: root + "/configured")
        try FileManager.default.createSymbolicLink(atPath: root + "/configured", withDestinationPath: root + "/other")
        #expect(kind(directory, "x.snap") == .forbidden)
    }

    @Test("a missing directory or a file is refused at start, saying what to do")
    func badDirectory() throws {
        #expect(throws: SnapshotDirectory.Refusal.self) { try SnapshotDirectory(temporaryPath("missing")) }
        let file = temporaryPath("file")
        FileManager.default.createFile(atPath: file, contents: Data())
        let error = #expect(throws: SnapshotDirectory.Refusal.self) { try SnapshotDirectory(file) }
        #expect(error?.description.contains("not a directory") == true)
    }
}

/// Sends `bytes` as they are over a Unix socket and returns everything the server answers until it
/// closes or `timeout` passes: for requests `ControlClient` will not send (chunked, lying lengths).
func rawExchange(_ socketPath: String, _ bytes: [UInt8], timeout: Double = 10) throws -> String {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    try #require(fd >= 0)
    defer { close(fd) }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (i, b) in socketPath.utf8.prefix(raw.count - 1).enumerated() { raw[i] = b }
    }
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    try #require(connected == 0, "cannot connect to \(socketPath)")
    var tv = timeval(tv_sec: Int(timeout), tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var offset = 0
    while offset < bytes.count {
        // The server may answer and close before it has read everything: that is the point.
        let n = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if n <= 0 { break }
        offset += n
    }
    var answer: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = recv(fd, &buffer, buffer.count, 0)
        if n <= 0 { break }
        answer += buffer[0..<n]
    }
    return String(decoding: answer, as: UTF8.self)
}

@Suite("The control API refuses bad requests with 4xx and a JSON error, and the guest survives them",
       .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct ControlAPIHardeningTests {
    func counter(_ extra: [String]) throws -> VMMProcess {
        let socket = temporaryPath("api") + ".sock"
        let counter = try Fixtures.guest("counter.elf")
        let vmm = try VMMProcess(["run", counter, "--cmdline", "count=0 ticks=5000000", "--api-socket", socket] + extra
                                 + billboard().register(counter, cmdline: "count=0 ticks=5000000"), socket: socket)
        try vmm.waitForSocket()
        return vmm
    }

    func error(_ reply: ControlClient.Reply) -> String { reply.json?["error"] as? String ?? "(no JSON error: \(reply.body))" }

    @Test("unknown routes 404, other methods 405 with Allow, bad JSON, mistyped, unknown and null fields 400, huge bodies 413")
    func badRequests() throws {
        let vmm = try counter([])
        let unknown = try vmm.call(.GET, "/vm/nonsense")
        #expect(unknown.status == 404)
        #expect(error(unknown).contains("no such endpoint"))
        #expect(try vmm.call(.GET, "/").status == 404)
        #expect(try vmm.call(.GET, "/vm/").status == 404)

        let wrongMethod = try vmm.call(.PUT, "/vm")
        #expect(wrongMethod.status == 405)
        #expect(error(wrongMethod).contains("use GET"))
        let post = try rawExchange(vmm.socket, Array("POST /vm/pause HTTP/1.1\r\nHost: l\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".utf8))
        #expect(post.hasPrefix("HTTP/1.1 405"), "\(post)")
        #expect(post.lowercased().contains("allow: put"), "\(post)")

        for (path, body, says) in [("/vm/resume", "{not json", "not a JSON object"), ("/vm/resume", "[]", "not a JSON object"),
                                   ("/vm/resume", "{\"force\": 1}", "true or false"), ("/vm/resume", "{\"force\": null}", "null"),
                                   ("/vm/resume", "{\"froce\": true}", "unknown field 'froce'"), ("/vm/pause", "{\"x\": 1}", "takes no fields"),
                                   ("/vm/snapshot", "{\"path\": 5}", "must be a string"), ("/vm/snapshot", "{}", "give the snapshot file"),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"peer\": \"p\", \"max_bandwidth\": -1}", "max_bandwidth"),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"carrier-pigeon\"}", "transport"),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"plaintext\", \"timeout_s\": 1e300}", "timeout_s"),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"plaintext\", \"postcopy\": true, \"postcopy_after_rounds\": \"soon\"}", "postcopy_after_rounds"),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"plaintext\", \"postcopy\": true, \"postcopy_after_rounds\": 1001}", "or \"never\""),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"plaintext\", \"postcopy_on_stall\": true}", "add \"postcopy\": true"),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"plaintext\", \"auto_converge\": true, \"convergence\": \"off\"}", "give only \"convergence\""),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"plaintext\", \"convergence\": \"fast\"}", "off, throttle or adaptive"),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"plaintext\", \"channels\": 0}", "channels must be 1 to 8"),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"plaintext\", \"channels\": 9}", "channels must be 1 to 8"),
                                   ("/vm/migrate", "{\"destination\": \"127.0.0.1:1\", \"transport\": \"plaintext\", \"channels\": 2, \"postcopy\": true}", "do not combine with postcopy"),
                                   ("/vm/resume", String(repeating: "[", count: 60_000), "not a JSON object")] {
            let reply = try vmm.call(.PUT, path, body)
            #expect(reply.status == 400, "\(path) \(body.prefix(80)): \(reply.status) \(reply.body)")
            #expect(error(reply).contains(says), "\(path) \(body.prefix(80)): \(error(reply))")
        }

        let huge = try vmm.call(.PUT, "/vm/resume", "{\"force\": \"" + String(repeating: "x", count: 1 << 20) + "\"}")
        #expect(huge.status == 413)
        #expect(error(huge).contains("larger than"))
        // A length announced but never sent is refused from the header, and the connection ends at
        // once rather than when the idle timeout passes.
        let sent = Date()
        let announced = try rawExchange(vmm.socket, Array("PUT /vm/resume HTTP/1.1\r\nHost: l\r\nContent-Length: 1000000000\r\n\r\n{".utf8),
                                        timeout: 30)
        #expect(announced.hasPrefix("HTTP/1.1 413"), "\(announced)")
        #expect(announced.hasSuffix("no request needs that much\"}\n"), "one answer, with its JSON error, and nothing after it: \(announced)")
        #expect(Date().timeIntervalSince(sent) < Double(ControlServer.idleTimeoutSeconds) / 2, "the refused connection was kept open")
        // A chunked body has no length to check: it is cut off at the limit.
        var chunked = Array("PUT /vm/resume HTTP/1.1\r\nHost: l\r\nTransfer-Encoding: chunked\r\n\r\n".utf8)
        for _ in 0..<64 { chunked += Array("4000\r\n".utf8) + [UInt8](repeating: 0x20, count: 0x4000) + Array("\r\n".utf8) }
        let cut = try rawExchange(vmm.socket, chunked + Array("0\r\n\r\n".utf8))
        #expect(cut.hasPrefix("HTTP/1.1 413"), "\(cut.prefix(200))")

        let info = try vmm.call(.GET, "/vm")
        #expect(info.status == 200)
        #expect(info.json?["state"] as? String == "running", "the guest did not survive: \(info.body)")
        let before = vmm.output.count
        #expect(waitUntil(5) { vmm.output.count > before }, "the guest stopped counting")
        #expect(try vmm.call(.PUT, "/vm/shutdown").status == 200)
        #expect(vmm.wait() == 0)
    }

    @Test("a request that stalls (its announced body never comes) is cut off after the idle timeout, and the guest runs on")
    func stalledRequest() throws {
        let vmm = try counter([])
        let start = Date()
        let answer = try rawExchange(vmm.socket, Array("PUT /vm/resume HTTP/1.1\r\nHost: l\r\nContent-Length: 100\r\n\r\n{".utf8),
                                     timeout: Double(ControlServer.idleTimeoutSeconds) * 3)
        let waited = Date().timeIntervalSince(start)
        #expect(answer.isEmpty, "\(answer)")
        #expect(waited < Double(ControlServer.idleTimeoutSeconds) * 2, "the connection was held \(waited) s")
        #expect(try vmm.call(.GET, "/vm").json?["state"] as? String == "running")
        #expect(try vmm.call(.PUT, "/vm/shutdown").status == 200)
        #expect(vmm.wait() == 0)
    }

    @Test("without --snapshot-dir API snapshots are refused with 403, naming the flag")
    func noSnapshotDirectory() throws {
        let vmm = try counter([])
        #expect(try vmm.call(.PUT, "/vm/pause").status == 200)
        let reply = try vmm.call(.PUT, "/vm/snapshot", "{\"path\": \"\(temporaryPath("x.snap"))\"}")
        #expect(reply.status == 403)
        #expect(error(reply).contains("--snapshot-dir"))
        let ctl = try runVMM(["ctl", "snapshot", "x.snap", "--api-socket", vmm.socket])
        #expect(ctl.status == 1)
        #expect(ctl.stderr.contains("HTTP 403") && ctl.stderr.contains("--snapshot-dir"), "\(ctl.stderr)")
        #expect(try vmm.call(.PUT, "/vm/shutdown").status == 200)
        #expect(vmm.wait() == 0)
    }

    @Test("snapshot paths: a name and a path in the directory are written there; elsewhere, .., links, directories and unwritable files are refused and nothing is written")
    func snapshotPaths() throws {
        let root = temporaryPath("snapshot-paths")
        let dir = root + "/snaps", elsewhere = root + "/elsewhere"
        for d in [dir, elsewhere, dir + "/sub"] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        try FileManager.default.createSymbolicLink(atPath: dir + "/link", withDestinationPath: elsewhere + "/via-link.snap")
        try FileManager.default.createSymbolicLink(atPath: elsewhere + "/snaps-link", withDestinationPath: dir)
        let vmm = try counter(["--snapshot-dir", dir])
        #expect(try vmm.call(.PUT, "/vm/pause").status == 200)

        let named = try vmm.call(.PUT, "/vm/snapshot", "{\"path\": \"named.snap\"}")
        #expect(named.status == 200, "\(named.body)")
        #expect(named.json?["path"] as? String == dir + "/named.snap")
        #expect(try vmm.call(.PUT, "/vm/snapshot", "{\"path\": \"\(dir)/absolute.snap\"}").status == 200)
        let ctl = try runVMM(["ctl", "snapshot", "by-ctl.snap", "--api-socket", vmm.socket])
        #expect(ctl.status == 0, "\(ctl.stderr)")
        for name in ["named.snap", "absolute.snap", "by-ctl.snap"] {
            #expect(FileManager.default.fileExists(atPath: dir + "/" + name), "\(name) was not written into the directory")
        }

        let refusals: [(String, Int, String)] = [
            (elsewhere + "/x.snap", 403, "outside the snapshot directory"), ("../elsewhere/x.snap", 403, ".."),
            (dir + "/../elsewhere/x.snap", 403, ".."), (elsewhere + "/snaps-link/x.snap", 403, "outside the snapshot directory"),
            ("sub", 409, "is a directory"), (dir + "/sub", 409, "is a directory"), ("link", 409, "symbolic link"),
            (dir + "/", 400, "directory"), ("", 400, "empty"), ("a\\u0000b", 400, "NUL"),
        ]
        for (path, status, says) in refusals {
            let reply = try vmm.call(.PUT, "/vm/snapshot", "{\"path\": \"\(path)\"}")
            #expect(reply.status == status, "\(path): \(reply.status) \(reply.body)")
            #expect(error(reply).contains(says), "\(path): \(error(reply))")
        }

        // Unwritable even for root: an immutable file in the directory, then the directory itself.
        FileManager.default.createFile(atPath: dir + "/frozen.snap", contents: Data([1]))
        let locked = getuid() == 0 ? try runTool("/usr/bin/chattr", ["+i", dir + "/frozen.snap"]) : chmod(dir + "/frozen.snap", 0o400)
        try #require(locked == 0, "cannot make a file unwritable here (chattr +i needs ext4 or xfs)")
        defer { if getuid() == 0 { _ = try? runTool("/usr/bin/chattr", ["-i", dir + "/frozen.snap"]) } }
        let frozen = try vmm.call(.PUT, "/vm/snapshot", "{\"path\": \"frozen.snap\"}")
        #expect(frozen.status == 403, "\(frozen.body)")
        #expect(error(frozen).contains("cannot be replaced"))
        let lockedDir = getuid() == 0 ? try runTool("/usr/bin/chattr", ["+i", dir]) : chmod(dir, 0o500)
        try #require(lockedDir == 0)
        defer { if getuid() == 0 { _ = try? runTool("/usr/bin/chattr", ["-i", dir]) } else { chmod(dir, 0o700) } }
        let unwritable = try vmm.call(.PUT, "/vm/snapshot", "{\"path\": \"new.snap\"}")
        #expect(unwritable.status == 403, "\(unwritable.body)")
        #expect(error(unwritable).contains("not writable"))

        let written = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        #expect(written == ["absolute.snap", "by-ctl.snap", "frozen.snap", "link", "named.snap", "sub"])
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/sub").isEmpty)
        #expect(try FileManager.default.contentsOfDirectory(atPath: elsewhere) == ["snaps-link"])

        #expect(try vmm.call(.PUT, "/vm/resume").status == 200)
        #expect(try vmm.call(.GET, "/vm").json?["state"] as? String == "running")
        #expect(try vmm.call(.PUT, "/vm/shutdown").status == 200)
        #expect(vmm.wait() == 0)
    }

    @Test("--snapshot-dir must exist and needs --api-socket")
    func snapshotDirFlag() throws {
        let counter = try Fixtures.guest("counter.elf")
        let reg = try billboard().register(counter, cmdline: "count=1 ticks=1000")
        let missing = try runVMM(["run", counter, "--cmdline", "count=1 ticks=1000", "--api-socket", temporaryPath("api") + ".sock",
                                  "--snapshot-dir", temporaryPath("missing")] + reg)
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("create it first"), "\(missing.stderr)")
        let noSocket = try runVMM(["run", counter, "--cmdline", "count=1 ticks=1000", "--snapshot-dir", snapshotDirectory] + reg)
        #expect(noSocket.status == 64)
        #expect(noSocket.stderr.contains("needs --api-socket"), "\(noSocket.stderr)")
    }
}

/// Runs a tool and returns its exit status.
func runTool(_ path: String, _ arguments: [String]) throws -> Int32 {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    process.standardError = FileHandle.nullDevice
    try process.run()
    process.waitUntilExit()
    return process.terminationStatus
}
