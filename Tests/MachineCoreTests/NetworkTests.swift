import Devices
import Foundation
import GuestMemory
import MachineCore
import NetworkFrames
import TestSupport
import Testing

@Suite("netecho on a virtio-net card over a tap", .serialized,
       .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage),
       .enabled(if: TapInNamespace.available, TapInNamespace.skipMessage))
struct NetworkTests {
    static let mac = MACAddress(parsing: "02:00:5e:10:00:01")!
    static let port = 7007
    static let commandLine = "ip=\(TapInNamespace.guestAddress)/\(TapInNamespace.prefix) port=\(port)"

    func configuration(_ net: TapInNamespace) -> MachineConfiguration {
        MachineConfiguration(commandLine: Self.commandLine, network: NetworkConfiguration(mac: Self.mac.bytes, tap: net.tap))
    }

    /// Waits (without a time limit that decides anything: the guest is slow under nested KVM)
    /// until `text` appears in the serial output, or 120 s pass.
    func waitFor(_ text: String, in capture: SerialCapture) -> Bool {
        let deadline = Date().addingTimeInterval(120)
        while Date() < deadline {
            if capture.text.contains(text) { return true }
            usleep(20_000)
        }
        return false
    }

    func stop(_ machine: Machine) {
        machine.requestStop()
        _ = machine.waitForExit()
    }

    @Test("netecho finds the card, prints the VMM's MAC, and answers ping and UDP echo from the host side of the tap")
    func pingAndEcho() throws {
        let net = try TapInNamespace()
        defer { net.remove() }
        let capture = SerialCapture()
        let image = try Fixtures.guestBytes("netecho.elf")
        let machine = try net.attach { try Machine(image: image, configuration: configuration(net), serialOutput: capture.append) }
        machine.start()
        defer { stop(machine) }
        #expect(waitFor("netecho mac=\(Self.mac) ip=\(TapInNamespace.guestAddress)/24 port=\(Self.port)", in: capture), "\(capture.text)")
        let probe = try net.probe(port: Self.port)
        #expect(probe.ok, "\(probe.output)")
        let stats = try #require(machine.network?.statistics)
        #expect(stats.device.framesReceived >= 6 && stats.device.framesTransmitted >= 6)
        #expect(stats.tapWriteErrors == 0)
    }

    @Test("while the machine is paused, frames from the tap are dropped and guest memory does not change; after resume it answers again")
    func pausedWritesNothing() throws {
        let net = try TapInNamespace()
        defer { net.remove() }
        let capture = SerialCapture()
        let image = try Fixtures.guestBytes("netecho.elf")
        let machine = try net.attach { try Machine(image: image, configuration: configuration(net), serialOutput: capture.append) }
        machine.start()
        defer { stop(machine) }
        #expect(waitFor("netecho mac=", in: capture), "\(capture.text)")
        #expect(try net.probe(port: Self.port, count: 1).ok)  // the host side learns the guest's MAC
        #expect(machine.pause())
        let before = try MemoryDigest.sha256(machine.memory)
        let drops = try #require(machine.network?.statistics.device.receiveDrops)
        try net.fire(port: Self.port, count: 5)
        // Every datagram reaches the card (and is dropped) whatever the speed; wait until it has.
        let deadline = Date().addingTimeInterval(60)
        while try #require(machine.network?.statistics.device.receiveDrops) < drops + 5 && Date() < deadline { usleep(20_000) }
        #expect(try #require(machine.network?.statistics.device.receiveDrops) >= drops + 5)
        #expect(try MemoryDigest.sha256(machine.memory) == before, "guest memory changed while paused")
        machine.resume()
        let probe = try net.probe(port: Self.port)
        #expect(probe.ok, "\(probe.output)")
    }

    @Test("a snapshot of netecho (state through JSON, memory copied) restored into a new machine on the same tap keeps answering")
    func snapshotRestoreKeepsAnswering() throws {
        let net = try TapInNamespace()
        defer { net.remove() }
        let capture = SerialCapture()
        let image = try Fixtures.guestBytes("netecho.elf")
        let first = try net.attach { try Machine(image: image, configuration: configuration(net), serialOutput: capture.append) }
        first.start()
        #expect(waitFor("netecho mac=", in: capture), "\(capture.text)")
        #expect(try net.probe(port: Self.port).ok)
        #expect(first.pause())
        let state = try first.saveState()
        let saved = try JSONEncoder().encode(state)
        let pages = first.memory.possiblyNonZeroPages()?.pageFrames ?? Array(0..<first.memory.pageCount)
        var contents: [(UInt64, [UInt8])] = []
        for page in pages {
            let address = GuestAddress(page * GuestMemory.pageSize)
            contents.append((address.raw, try first.memory.read(at: address, count: Int(GuestMemory.pageSize))))
        }
        // The first copy ends and lets the tap go before the second attaches.
        first.end(with: .stopped(signal: 0))
        _ = first.waitForExit()

        let decoded = try JSONDecoder().decode(MachineState.self, from: saved)
        let network = try #require(decoded.devices.network)
        #expect(network.mac == Self.mac && network.status & VirtioNet.Status.driverOK != 0)
        #expect(network.queues[0].pfn != 0 && network.queues[0].usedIndex > 0, "the receive queue's progress is saved")
        var restoredConfiguration = decoded.description.configuration
        restoredConfiguration.network = NetworkConfiguration(mac: Self.mac.bytes, tap: net.tap)
        let second = try net.attach { try Machine(configuration: restoredConfiguration, serialOutput: capture.append) }
        for (address, bytes) in contents { try second.memory.write(bytes, at: GuestAddress(address)) }
        try second.restoreState(decoded)
        second.start()
        defer { stop(second) }
        let probe = try net.probe(port: Self.port)
        #expect(probe.ok, "\(probe.output)")
        #expect(capture.text.components(separatedBy: "netecho mac=").count == 2, "the restored guest did not boot again")
    }

    @Test("a restore is refused when the saved guest had a card and this machine has none, or the MAC differs")
    func restoreNeedsTheSameCard() throws {
        let net = try TapInNamespace()
        defer { net.remove() }
        let capture = SerialCapture()
        let image = try Fixtures.guestBytes("netecho.elf")
        let first = try net.attach { try Machine(image: image, configuration: configuration(net), serialOutput: capture.append) }
        first.startPaused()
        let state = try first.saveState()
        first.end(with: .stopped(signal: 0))
        _ = first.waitForExit()
        let bare = try Machine(configuration: state.description.configuration, serialOutput: { _ in })
        #expect(throws: MachineError.self) { try bare.restoreState(state) }
        var other = state.description.configuration
        other.network = NetworkConfiguration(mac: MACAddress(parsing: "02:00:00:00:00:99")!.bytes, tap: net.tap)
        let foreign = try net.attach { try Machine(configuration: other, serialOutput: { _ in }) }
        #expect(throws: (any Error).self) { try foreign.restoreState(state) }
    }

    static let qemu = "/usr/bin/qemu-system-x86_64"

    @Test("netecho answers ping and UDP echo under QEMU's virtio-net-pci,disable-modern=on on a tap",
          .enabled(if: FileManager.default.isExecutableFile(atPath: qemu), "qemu-system-x86_64 is not installed"))
    func underQEMU() throws {
        let net = try TapInNamespace()
        defer { net.remove() }
        let process = net.process(Self.qemu, [
            "-enable-kvm", "-m", "64", "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", try Fixtures.guest("netecho.elf"), "-append", Self.commandLine,
            "-netdev", "tap,id=n0,ifname=\(net.tap),script=no,downscript=no",
            "-device", "virtio-net-pci,disable-modern=on,netdev=n0,mac=\(Self.mac)",
        ])
        let out = Pipe()
        process.standardOutput = out
        process.standardError = Pipe()
        let capture = SerialCapture()
        out.fileHandleForReading.readabilityHandler = { h in for b in h.availableData { capture.append(b) } }
        try process.run()
        defer {
            // SIGKILL: QEMU inherits the test process's blocked SIGTERM and would never see it.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            out.fileHandleForReading.readabilityHandler = nil
        }
        #expect(waitFor("netecho mac=\(Self.mac)", in: capture), "\(capture.text)")
        let probe = try net.probe(port: Self.port)
        #expect(probe.ok, "\(probe.output)")
    }
}
