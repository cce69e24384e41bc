#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import SystemCalls
import Testing
import TestSupport

/// A network namespace of one test (`ip netns add`), removed by `close()` with every interface
/// in it: the taps these tests make never appear in the host's own namespace. Names are unique
/// in the process (`vtd<pid><n>`), because the kernel's record of which tap a descriptor is
/// attached to (`/proc/self/fdinfo`) gives the name, not the namespace, and other suites of this
/// process attach taps of their own (tap0, ...) in theirs.
private final class ThrowawayNamespace {
    /// Why these tests cannot run here, or nil.
    static let unavailable: String? = {
        guard geteuid() == 0 else { return "tap tests need root (CAP_NET_ADMIN)" }
        guard FileManager.default.fileExists(atPath: "/dev/net/tun") else { return "/dev/net/tun is missing" }
        guard let r = try? run(["ip", "netns", "list"]), r.status == 0 else { return "network namespaces (`ip netns`) are not available" }
        return nil
    }()
    static var isAvailable: Bool { unavailable == nil }
    static var skipMessage: Comment { "tap tests are skipped: \(unavailable ?? "")" }

    private static let serial = Mutex(0)
    let name: String
    private let id: String

    init() throws {
        let n = Self.serial.withLock { $0 += 1; return $0 }
        id = "\(getpid() % 100_000)\(n)"
        name = "vmmst-\(getpid())-\(n)"
        try Self.ip(["netns", "add", name])
    }

    deinit { close() }

    func close() { _ = try? Self.run(["ip", "netns", "delete", name]) }

    /// An interface name no other tap of this process has (at most 15 bytes).
    func uniqueName(_ suffix: String) -> String { "vtd\(id)\(suffix)" }

    /// `ip -n NAMESPACE ARGS`, failing with its stderr.
    func ip(_ arguments: [String]) throws { try Self.ip(["-n", name] + arguments) }

    /// A persistent tap (or, with `mode: "tun"`, a tun) made as an administrator would, and up.
    func makeTap(_ tap: String, mode: String = "tap") throws {
        try ip(["tuntap", "add", "dev", tap, "mode", mode])
        try ip(["link", "set", "dev", tap, "up"])
    }

    /// `ip link show` of `interface` in this namespace; nil when there is none.
    func link(_ interface: String) throws -> String? {
        let r = try Self.run(["ip", "-n", name, "link", "show", "dev", interface])
        return r.status == 0 ? r.stdout : nil
    }

    /// Runs `body` on a thread that entered this namespace first, so what it opens belongs here.
    func inside<T>(_ body: @escaping () throws -> T) throws -> T {
        let path = "/run/netns/\(name)"
        nonisolated(unsafe) let body = body
        nonisolated(unsafe) var outcome: Result<T, any Error>?
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            outcome = Result { try NetworkNamespace.enter(path: path); return try body() }
            done.signal()
        }
        thread.start()
        done.wait()
        return try outcome!.get()
    }

    static func ip(_ arguments: [String]) throws {
        let r = try run(["ip"] + arguments)
        guard r.status == 0 else { throw TestFailure("ip \(arguments.joined(separator: " ")): \(r.stderr)") }
    }

    static func run(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        try NetworkLab.run(arguments)
    }
}

private struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The descriptors of this process attached to tap `name`: open on /dev/net/tun, and attached
/// to that interface by the kernel's own record (`iff:` in /proc/self/fdinfo). Every open of
/// /dev/net/tun is the same inode, so the attachment is what tells one tap's descriptor from
/// another's; descriptor numbers say nothing (other tests open and close them in parallel).
private func descriptorsAttached(to name: String) -> [Int32] {
    guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") else { return [] }
    return entries.compactMap(Int32.init).filter { fd in
        guard (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) == "/dev/net/tun",
              let info = try? String(contentsOfFile: "/proc/self/fdinfo/\(fd)", encoding: .utf8) else { return false }
        return info.split(separator: "\n").contains { $0 == "iff:\t\(name)" }
    }
}

/// Polls `condition` until it holds or `seconds` pass.
private func eventually(_ seconds: Double = 10, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    repeat {
        if try condition() { return true }
        usleep(20_000)
    } while Date() < deadline
    return try condition()
}

/// A broadcast frame of a local experimental EtherType (0x88b5) carrying `marker`, so that
/// what the kernel itself sends on a fresh interface (IPv6 router solicitations, MLD) is
/// never mistaken for it.
private func testFrame(_ marker: [UInt8]) -> [UInt8] {
    [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x88, 0xb5] + marker
}

@Suite("Tap devices", .serialized)
struct TapDeviceTests {
    @Test("a tap name no interface can have is refused before anything is opened, saying what a name may be")
    func invalidName() {
        for bad in ["", "a/b", "has space", "sixteen-bytes-xx", "..", "eth0:1"] {
            let error = #expect(throws: TapError.self, "\(bad)") { _ = try TapDevice(name: bad) }
            #expect(error?.reason == .invalidName)
            #expect(error?.description.contains("'\(bad)' is not a tap interface name") == true, "\(error?.description ?? "")")
        }
    }

    @Test("attaching a tap that does not exist is refused, naming the tap and how to create it, and nothing is created",
          .enabled(if: ThrowawayNamespace.isAvailable, ThrowawayNamespace.skipMessage))
    func missingTap() throws {
        let ns = try ThrowawayNamespace()
        defer { ns.close() }
        let name = ns.uniqueName("m")
        let error = #expect(throws: TapError.self) { _ = try ns.inside { try TapDevice(name: name) } }
        #expect(error?.reason == .missing)
        #expect(error?.description.contains("there is no tap '\(name)'") == true, "\(error?.description ?? "")")
        #expect(error?.description.contains("ip tuntap add dev \(name) mode tap") == true, "\(error?.description ?? "")")
        // TUNSETIFF alone would have made it: the check came first.
        #expect(try ns.link(name) == nil)
    }

    @Test("an interface that is not such a tap (loopback, a tun) is refused as not a tap; a tap another descriptor holds is refused as busy",
          .enabled(if: ThrowawayNamespace.isAvailable, ThrowawayNamespace.skipMessage))
    func wrongKindOrBusy() throws {
        let ns = try ThrowawayNamespace()
        defer { ns.close() }
        let tun = ns.uniqueName("u"), tap = ns.uniqueName("b")
        try ns.makeTap(tun, mode: "tun")
        try ns.makeTap(tap)
        for name in ["lo", tun] {
            let error = #expect(throws: TapError.self, "\(name)") { _ = try ns.inside { try TapDevice(name: name) } }
            #expect(error?.reason == .notATap, "\(name): \(error?.description ?? "")")
            #expect(error?.description.contains("'\(name)' is not a tap this VMM can use") == true)
        }
        let first = try ns.inside { try TapDevice(name: tap) }
        defer { first.close() }
        let busy = #expect(throws: TapError.self) { _ = try ns.inside { try TapDevice(name: tap) } }
        #expect(busy?.reason == .busy, "\(busy?.description ?? "")")
        #expect(busy?.description.contains("tap '\(tap)' is already attached by another process") == true)
    }

    @Test("a tap made by the administrator opens with IFF_TAP|IFF_NO_PI; a frame written to it is seen on the host side, and one the host sends out of it is read from it",
          .enabled(if: ThrowawayNamespace.isAvailable, ThrowawayNamespace.skipMessage))
    func framesBothWays() throws {
        let ns = try ThrowawayNamespace()
        defer { ns.close() }
        let name = ns.uniqueName("f")
        try ns.makeTap(name)
        let tap = try ns.inside { try TapDevice(name: name) }
        defer { tap.close() }
        #expect(tap.name == name)
        let flags = try tap.interfaceFlags()
        #expect(flags & TapDevice.tapFlags == TapDevice.tapFlags, "flags 0x\(String(flags, radix: 16))")
        let host = try ns.inside { try PacketSocket(interface: name) }
        defer { host.close() }

        // Guest to host: what the card writes enters the host's network on the tap.
        let outbound = testFrame((0..<46).map { _ in UInt8.random(in: 0...255) })
        try tap.write(outbound)
        var seenOnHost = false
        let hostDeadline = Date().addingTimeInterval(10)
        while !seenOnHost, Date() < hostDeadline, let frame = try host.receive(timeoutMilliseconds: 500) {
            seenOnHost = frame == outbound
        }
        #expect(seenOnHost, "the frame written to the tap never reached the host side")

        // Host to guest: a frame the host sends out of the tap is what the card reads next.
        let inbound = testFrame((0..<46).map { _ in UInt8.random(in: 0...255) })
        try host.send(inbound)
        var readFromTap = false
        let tapDeadline = Date().addingTimeInterval(10)
        while !readFromTap, Date() < tapDeadline {
            guard let frame = try tap.read(timeoutMilliseconds: 500) else { continue }
            readFromTap = frame == inbound
        }
        #expect(readFromTap, "the frame the host sent out of the tap was never read from it")
    }

    @Test("a frame shorter than an Ethernet header or longer than 1522 bytes is refused before the write, naming the tap and the length; the limits themselves pass",
          .enabled(if: ThrowawayNamespace.isAvailable, ThrowawayNamespace.skipMessage))
    func frameLengths() throws {
        let ns = try ThrowawayNamespace()
        defer { ns.close() }
        let name = ns.uniqueName("l")
        try ns.makeTap(name)
        let tap = try ns.inside { try TapDevice(name: name) }
        defer { tap.close() }
        for length in [0, 1, TapDevice.minimumFrameLength - 1] {
            let error = #expect(throws: TapError.self) { try tap.write(testFrame([]).prefix(length).map { $0 }) }
            #expect(error?.reason == .frameTooShort(length: length))
            #expect(error?.description.contains("a frame of \(length) bytes cannot go to tap '\(name)'") == true, "\(error?.description ?? "")")
        }
        for length in [TapDevice.maximumFrameLength + 1, 9000, 65_536] {
            let error = #expect(throws: TapError.self) { try tap.write(testFrame([UInt8](repeating: 0, count: length - 14))) }
            #expect(error?.reason == .frameTooLong(length: length))
            #expect(error?.description.contains("at most \(TapDevice.maximumFrameLength) bytes") == true)
        }
        try tap.write(testFrame([]))
        try tap.write(testFrame([UInt8](repeating: 0x5a, count: TapDevice.maximumFrameLength - 14)))
    }

    @Test("the descriptor is closed when the device goes: none of this process stays attached to the tap, and the kernel sees it without carrier",
          .enabled(if: ThrowawayNamespace.isAvailable, ThrowawayNamespace.skipMessage))
    func closedOnDeinit() throws {
        let ns = try ThrowawayNamespace()
        defer { ns.close() }
        let name = ns.uniqueName("d")
        try ns.makeTap(name)
        var tap: TapDevice? = try ns.inside { try TapDevice(name: name) }
        let raw = try #require(tap?.descriptor.raw)
        #expect(descriptorsAttached(to: name) == [raw])
        #expect(try ns.link(name)?.contains("LOWER_UP") == true, "attached and up, the tap has carrier")
        tap = nil
        #expect(eventually { descriptorsAttached(to: name).isEmpty }, "a descriptor of this process is still attached to \(name)")
        let noCarrier = try eventually { try ns.link(name)?.contains("NO-CARRIER") == true }
        #expect(noCarrier, "\((try? ns.link(name)) ?? "no such link")")
    }
}
