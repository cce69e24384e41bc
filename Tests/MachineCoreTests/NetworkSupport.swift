import Foundation
import Testing
import SystemCalls

/// A network namespace of its own with a tap in it, for one test: the host side of the tap has
/// 10.77.0.1/24 inside the namespace and nothing changes outside it. The machine attaches to
/// the tap from a thread that entered the namespace (`attach`); probes run inside it with
/// `ip netns exec`. Deleting the namespace (`remove`, always) deletes the tap with it.
final class TapInNamespace {
    static let hostAddress = "10.77.0.1"
    static let guestAddress = "10.77.0.2"
    static let prefix = 24
    nonisolated(unsafe) private static var counter = 0
    private static let counterLock = NSLock()

    /// Whether taps and namespaces can be made here (root, /dev/net/tun, iproute2, python3).
    static let available: Bool = geteuid() == 0 && FileManager.default.fileExists(atPath: "/dev/net/tun")
        && FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")
        && (FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") || FileManager.default.isExecutableFile(atPath: "/sbin/ip"))
    static let skipMessage: Comment = "needs root, /dev/net/tun, iproute2 (ip netns) and python3: network tests are skipped"

    let namespace: String
    let tap: String

    init() throws {
        let n = Self.counterLock.withLock { Self.counter += 1; return Self.counter }
        let id = "\(getpid() % 100_000)x\(n)"
        namespace = "vmmnet\(id)"
        tap = "vt\(id)"
        try Self.ip(["netns", "add", namespace])
        do {
            try Self.ip(["-n", namespace, "link", "set", "lo", "up"])
            try Self.ip(["-n", namespace, "tuntap", "add", "dev", tap, "mode", "tap"])
            try Self.ip(["-n", namespace, "addr", "add", "\(Self.hostAddress)/\(Self.prefix)", "dev", tap])
            try Self.ip(["-n", namespace, "link", "set", tap, "up"])
        } catch {
            remove()
            throw error
        }
    }

    /// Deletes the namespace and the tap in it.
    func remove() {
        _ = try? Self.run("/usr/bin/env", ["ip", "netns", "del", namespace])
    }

    /// Runs `body` on a thread inside the namespace (so a tap it opens is this one) and
    /// returns what it returned.
    func attach<T>(_ body: @escaping () throws -> T) throws -> T {
        nonisolated(unsafe) let body = body
        nonisolated(unsafe) var result: Result<T, any Error>?
        let done = DispatchSemaphore(value: 0)
        let path = "/run/netns/\(namespace)"
        let thread = Thread {
            result = Result { try NetworkNamespace.enter(path: path); return try body() }
            done.signal()
        }
        thread.start()
        done.wait()
        return try result!.get()
    }

    /// Pings the guest `count` times and sends it `count` UDP datagrams on `port`, from inside
    /// the namespace; true if every echo came back intact. `output` says how many did.
    func probe(port: Int, count: Int = 3) throws -> (ok: Bool, output: String) {
        let (status, output) = try Self.run("/usr/bin/env", ["ip", "netns", "exec", namespace, "/usr/bin/python3", "-c", Self.probeScript,
                                                            Self.guestAddress, String(port), String(count)])
        return (status == 0, output)
    }

    /// Sends `count` UDP datagrams to the guest without waiting for anything.
    func fire(port: Int, count: Int) throws {
        let script = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(int(sys.argv[3])): s.sendto(b'x'*64,(sys.argv[1],int(sys.argv[2])))"
        _ = try Self.run("/usr/bin/env", ["ip", "netns", "exec", namespace, "/usr/bin/python3", "-c", script,
                                         Self.guestAddress, String(port), String(count)])
    }

    /// A process in the namespace (QEMU), stopped and reaped by the caller.
    func process(_ executable: String, _ arguments: [String]) -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["ip", "netns", "exec", namespace, executable] + arguments
        return p
    }

    static func ip(_ arguments: [String]) throws {
        let (status, output) = try run("/usr/bin/env", ["ip"] + arguments)
        guard status == 0 else { throw NetworkSetupError(description: "ip \(arguments.joined(separator: " ")) failed (\(status)): \(output)") }
    }

    struct NetworkSetupError: Error, CustomStringConvertible { let description: String }

    @discardableResult
    static func run(_ executable: String, _ arguments: [String]) throws -> (Int32, String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = arguments
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// ICMP echo with a raw socket (no ping binary needed), then UDP echo; each reply must carry
    /// the request's identifier, sequence and payload. Waits up to 5 s per reply.
    static let probeScript = """
    import os, socket, struct, sys, time
    def csum(b):
        if len(b) % 2: b += b'\\0'
        s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
        while s >> 16: s = (s & 0xffff) + (s >> 16)
        return ~s & 0xffff
    ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(5)
    pings = 0
    for seq in range(n):
        payload = os.urandom(32)
        h = struct.pack('!BBHHH', 8, 0, 0, 0x4e45, seq)
        s.sendto(struct.pack('!BBHHH', 8, 0, csum(h + payload), 0x4e45, seq) + payload, (ip, 0))
        end = time.time() + 5
        while time.time() < end:
            try: d, a = s.recvfrom(4096)
            except socket.timeout: break
            icmp = d[(d[0] & 15) * 4:]
            if a[0] == ip and icmp[0] == 0 and struct.unpack('!HH', icmp[4:8]) == (0x4e45, seq) and icmp[8:] == payload:
                pings += 1
                break
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(5)
    echoes = 0
    for i in range(n):
        m = b'netecho %d ' % i + os.urandom(8).hex().encode()
        u.sendto(m, (ip, port))
        try:
            d, a = u.recvfrom(4096)
            if d == m and a == (ip, port): echoes += 1
        except socket.timeout: pass
    print('ping %d/%d udp %d/%d' % (pings, n, echoes, n))
    sys.exit(0 if pings == n and echoes == n else 1)
    """
}
