import Foundation
import Synchronization
import SystemCalls
import Testing

/// Throwaway networks for tests, built with iproute2 inside network namespaces only: nothing
/// is added to the host's own namespace. Every namespace is named `vmmt-PID-SERIAL-ROLE` and
/// removed by `close()` (and `deinit`), which takes its interfaces with it; namespaces left by
/// a test process that died are removed by the next lab. Addresses are 10.200.x.y, inside
/// the namespaces only. Bridges have STP off, so their ports forward at once.
// @unchecked: `namespaces` is read and written only under `lock`.
public final class NetworkLab: @unchecked Sendable {
    /// Why these tests cannot run here, or nil.
    public static let unavailable: String? = {
        guard geteuid() == 0 else { return "network namespace tests need root" }
        guard FileManager.default.fileExists(atPath: "/dev/net/tun") else { return "/dev/net/tun is missing" }
        guard let r = try? run(["ip", "netns", "list"]), r.status == 0 else { return "`ip netns` is not available" }
        return nil
    }()
    public static var isAvailable: Bool { unavailable == nil }
    public static var skipMessage: Comment { "network namespace tests are skipped: \(unavailable ?? "")" }

    private static let serial = Mutex(0)
    private let lock = NSLock()
    private var namespaces: [String] = []
    private let stem: String

    public init() throws {
        if let unavailable = Self.unavailable { throw LabError("\(unavailable)") }
        stem = "vmmt-\(getpid())-\(Self.serial.withLock { $0 += 1; return $0 })"
        Self.removeLeftovers()
    }

    deinit { close() }

    /// Removes every namespace this lab made (their interfaces go with them). Idempotent.
    public func close() {
        let names = lock.withLock { defer { namespaces = [] }; return namespaces }
        for name in names.reversed() { _ = try? Self.run(["ip", "netns", "delete", name]) }
    }

    /// Namespaces of test processes that no longer exist.
    static func removeLeftovers() {
        guard let list = try? run(["ip", "netns", "list"]) else { return }
        for line in list.stdout.split(separator: "\n") {
            let name = String(line.split(separator: " ").first ?? "")
            let parts = name.split(separator: "-")
            guard parts.count >= 4, parts[0] == "vmmt", let pid = Int32(parts[1]), pid != getpid(),
                  kill(pid, 0) != 0 && errno == ESRCH else { continue }
            _ = try? run(["ip", "netns", "delete", name])
        }
    }

    // MARK: - Building

    /// A new namespace (loopback up); returns its name.
    public func namespace(_ role: String) throws -> String {
        let name = "\(stem)-\(role)"
        try ip(["netns", "add", name])
        lock.withLock { namespaces.append(name) }
        try ip(["-n", name, "link", "set", "lo", "up"])
        return name
    }

    /// A bridge with STP off, up.
    public func bridge(_ name: String, in namespace: String) throws {
        try ip(["-n", namespace, "link", "add", name, "type", "bridge", "stp_state", "0"])
        try ip(["-n", namespace, "link", "set", "dev", name, "up"])
    }

    /// A veth pair, `a` in `namespaceA` and `b` in `namespaceB`, both up; each end is made a
    /// port of the bridge given for it.
    public func veth(_ a: String, in namespaceA: String, bridge bridgeA: String? = nil,
                     peer b: String, peerIn namespaceB: String, peerBridge bridgeB: String? = nil) throws {
        try ip(["-n", namespaceA, "link", "add", a, "type", "veth", "peer", "name", b, "netns", namespaceB])
        for (name, ns, bridge) in [(a, namespaceA, bridgeA), (b, namespaceB, bridgeB)] {
            if let bridge { try ip(["-n", ns, "link", "set", "dev", name, "master", bridge]) }
            try ip(["-n", ns, "link", "set", "dev", name, "up"])
        }
    }

    /// Gives `interface` the address `cidr` (e.g. 10.200.0.1/24).
    public func address(_ cidr: String, on interface: String, in namespace: String) throws {
        try ip(["-n", namespace, "addr", "add", cidr, "dev", interface])
    }

    /// Makes a persistent tap `name` inside `namespace` (it lives until the namespace goes), a
    /// port of `bridge` there when one is given, and up: what an administrator does before a
    /// VMM may attach to it.
    public func persistentTap(_ name: String, in namespace: String, bridge: String? = nil) throws {
        try ip(["-n", namespace, "tuntap", "add", "dev", name, "mode", "tap"])
        if let bridge { try ip(["-n", namespace, "link", "set", "dev", name, "master", bridge]) }
        try ip(["-n", namespace, "link", "set", "dev", name, "up"])
    }

    /// Makes tap `name` inside `namespace` (`persistentTap`) and opens it.
    public func tap(_ name: String, in namespace: String, bridge: String?) throws -> TapDevice {
        try persistentTap(name, in: namespace, bridge: bridge)
        return try inside(namespace) { try TapDevice(name: name) }
    }

    /// A capture of every frame `interface` of `namespace` sends or receives.
    public func capture(_ interface: String, in namespace: String) throws -> PacketSocket {
        try inside(namespace) { try PacketSocket(interface: interface) }
    }

    /// The bridge's forwarding database, `bridge fdb show` lines, e.g.
    /// "52:54:00:12:34:56 dev up-a master br-lan".
    public func forwardingDatabase(_ bridge: String, in namespace: String) throws -> [String] {
        let r = try Self.run(["bridge", "-n", namespace, "fdb", "show", "br", bridge])
        guard r.status == 0 else { throw LabError("bridge fdb show br \(bridge) in \(namespace): \(r.stderr)") }
        return r.stdout.split(separator: "\n").map(String.init)
    }

    /// The port of `bridge` on which it learned `mac` (a dynamic entry), or nil.
    public func port(of mac: String, on bridge: String, in namespace: String) throws -> String? {
        for line in try forwardingDatabase(bridge, in: namespace) {
            let words = line.split(separator: " ").map(String.init)
            guard words.first?.lowercased() == mac.lowercased(), !words.contains("permanent"),
                  let dev = words.firstIndex(of: "dev"), dev + 1 < words.count else { continue }
            return words[dev + 1]
        }
        return nil
    }

    /// Runs `body` on a thread of its own that entered `namespace` first: what it opens
    /// (taps, sockets) belongs to that namespace. The thread ends afterwards; this one never moves.
    public func inside<T>(_ namespace: String, _ body: @escaping () throws -> T) throws -> T {
        let done = DispatchSemaphore(value: 0)
        let box = OutcomeBox<T>()
        nonisolated(unsafe) let body = body
        let thread = Thread {
            box.outcome = Result { () throws -> T in
                try NetworkNamespace.enter(path: "/run/netns/\(namespace)")
                return try body()
            }
            done.signal()
        }
        thread.start()
        done.wait()
        return try box.outcome!.get()
    }

    /// `ip ARGS`, failing with its stderr.
    public func ip(_ arguments: [String]) throws {
        let r = try Self.run(["ip"] + arguments)
        guard r.status == 0 else { throw LabError("ip \(arguments.joined(separator: " ")): \(r.stderr)") }
    }

    /// Runs `arguments` through /usr/bin/env and waits: its status, stdout and stderr.
    public static func run(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
    }
}

/// Carries one thread's result to the thread that waits for it (the semaphore orders the two).
// @unchecked: written once before the signal, read after the wait.
final class OutcomeBox<T>: @unchecked Sendable {
    var outcome: Result<T, any Error>?
}

public struct LabError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The layout of the migration tests: a LAN namespace with bridge `brLAN` and the client
/// (`client`, 10.200.0.1/24, a port of `brLAN` through `clientPort`); each host a namespace with
/// its own bridge `brHOST` holding its tap, uplinked by veth (`uplink` in the host, `to-hostX` in the LAN,
/// a port of `brLAN`); and a separate link for migrations between the hosts (`mig` ends,
/// 10.200.255.1/30 and 10.200.255.2/30), not bridged to the LAN.
public struct MigrationNetwork {
    public struct Host {
        public let namespace: String
        public let bridge: String
        /// The tap's name (opened by `openTap`).
        public let tap: String
        /// The uplink's end in the LAN namespace: the LAN bridge's port toward this host.
        public let lanPort: String
        /// This host's address on the migration link.
        public let migrationAddress: String
    }

    public let lab: NetworkLab
    public let lan: String
    public let lanBridge = "brLAN"
    public let client = "client"
    public let clientAddress = "10.200.0.1"
    public let hosts: [Host]

    public init(lab: NetworkLab, hosts count: Int = 2) throws {
        precondition((1...2).contains(count))
        self.lab = lab
        lan = try lab.namespace("lan")
        try lab.bridge(lanBridge, in: lan)
        try lab.veth(client, in: lan, peer: "clientPort", peerIn: lan, peerBridge: lanBridge)
        try lab.address("\(clientAddress)/24", on: client, in: lan)
        var hosts: [Host] = []
        for (i, letter) in ["a", "b"].prefix(count).enumerated() {
            let ns = try lab.namespace("host\(letter)")
            let host = Host(namespace: ns, bridge: "brHOST", tap: "tap0", lanPort: "to-host\(letter)",
                            migrationAddress: "10.200.255.\(i + 1)")
            try lab.bridge(host.bridge, in: ns)
            try lab.veth("uplink", in: ns, bridge: host.bridge, peer: host.lanPort, peerIn: lan, peerBridge: lanBridge)
            hosts.append(host)
        }
        if hosts.count == 2 {
            try lab.veth("mig", in: hosts[0].namespace, peer: "mig", peerIn: hosts[1].namespace)
            for host in hosts { try lab.address("\(host.migrationAddress)/30", on: "mig", in: host.namespace) }
        }
        self.hosts = hosts
    }

    /// Opens `host`'s tap as a port of its bridge.
    public func openTap(_ host: Host) throws -> TapDevice {
        try lab.tap(host.tap, in: host.namespace, bridge: host.bridge)
    }
}
