#if canImport(Glibc)
import Glibc
#endif
import Devices
import Foundation
import GuestMemory
import NetworkFrames
import Synchronization
import SystemCalls

/// Guest memory as the devices see it: every access range-checked by `GuestMemory`, and every
/// write logged as a VMM write (so migration sends the pages a device filled).
final class DeviceMemoryAccess: DeviceMemory {
    let memory: GuestMemory
    init(_ memory: GuestMemory) { self.memory = memory }

    func contains(_ address: UInt64, length: UInt64) -> Bool {
        (try? memory.checkRange(GuestAddress(address), length)) != nil
    }
    func read(_ address: UInt64, count: Int) -> [UInt8]? {
        try? memory.read(at: GuestAddress(address), count: count)
    }
    func write(_ bytes: [UInt8], at address: UInt64) -> Bool {
        (try? memory.write(bytes, at: GuestAddress(address))) != nil
    }
}

/// The virtio-net card on a tap: the device on the port bus (BAR0) and on PCI, and the thread
/// that takes frames from the tap to the guest. Frames the guest sends go to the tap on the
/// thread of the vCPU that notified.
///
/// Quiescing: the card is held (`VirtioNet.setHeld`, under the bus lock) whenever the machine
/// has not started, is paused by its owner, is held by the throttle, or has ended; a held card
/// drops what the tap delivers and writes nothing to guest memory. The machine holds it before
/// it parks its vCPUs, so once `pause()` returns nothing touches guest memory until `resume()`.
///
/// Thread-safety: `switches` is a mutex; the device is reached only through the bus.
public final class NetworkCard: Sendable {
    /// Where BAR0 decodes: fixed by the VMM (see `PCIConfigurationHeader`).
    public static let bar0: UInt16 = 0xC000
    /// The card's PCI slot on bus 0.
    public static let slot = 1
    /// How long the receive thread waits for a frame before it looks whether the machine ended.
    static let pollMilliseconds: Int32 = 100

    // @unchecked: the device is a class without a lock of its own; it is only touched through
    // `bus.withDevice`, which holds the bus's lock.
    private final class DeviceBox: @unchecked Sendable {
        let device: VirtioNet
        init(_ device: VirtioNet) { self.device = device }
    }

    private struct Switches {
        var started = false
        var paused = false
        var throttled = false
        var ended = false
        var threadRunning = false
        var tapWriteErrors = 0
        var held: Bool { !started || paused || throttled || ended }
    }

    public let tap: TapDevice
    public let mac: MACAddress
    private let box: DeviceBox
    private let bus: Bus
    private let switches = Mutex(Switches())
    private let stopped = NSCondition()

    /// Attaches to the tap and places the card: PCI slot `slot`, BAR0 at `bar0` on `bus`.
    init(configuration: NetworkConfiguration, memory: GuestMemory, bus: Bus, bridge: PCIHostBridge) throws {
        guard let mac = MACAddress(configuration.mac) else {
            throw MachineError.invalidConfiguration("the network card's MAC must be 6 bytes (got \(configuration.mac.count))")
        }
        guard !mac.isMulticast else {
            throw MachineError.invalidConfiguration("MAC \(mac) is a multicast address; a card needs a unicast one")
        }
        let tap = try TapDevice(name: configuration.tap)
        let errors = TapErrorCount()
        let filter = TransmitFilter()
        let device = VirtioNet(mac: mac, bar0: Self.bar0, memory: DeviceMemoryAccess(memory)) { frame in
            // The owner's egress policy decides first (the Billboard's MAC/IP filter): a frame it
            // refuses never reaches the tap.
            guard filter.admit(frame) else { errors.filtered.withLock { $0 += 1 }; return }
            do { try tap.write(frame) } catch { errors.count.withLock { $0 += 1 } }
        }
        self.tap = tap
        self.mac = mac
        self.box = DeviceBox(device)
        self.bus = bus
        self.tapErrors = errors
        self.transmitFilter = filter
        bridge.attach(device, slot: Self.slot)
        try bus.insert(device, named: "virtio-net", base: UInt64(Self.bar0), length: UInt64(VirtioNet.registerSpace))
    }

    /// Decides, on the vCPU thread that sent it, whether a frame of the guest goes out; every
    /// frame passes until an owner sets one.
    final class TransmitFilter: Sendable {
        private let decide = Mutex<(@Sendable ([UInt8]) -> Bool)?>(nil)
        func set(_ filter: @escaping @Sendable ([UInt8]) -> Bool) { decide.withLock { $0 = filter } }
        func admit(_ frame: [UInt8]) -> Bool {
            guard let filter = decide.withLock({ $0 }) else { return true }
            return filter(frame)
        }
    }
    private let transmitFilter: TransmitFilter

    /// Sets what decides whether a frame the guest sends reaches the tap (false: dropped).
    func setTransmitFilter(_ filter: @escaping @Sendable ([UInt8]) -> Bool) { transmitFilter.set(filter) }

    /// Writes a frame of the host's own (an announcement after a migration) to the tap, as if
    /// the card had sent it; it does not pass the guest's transmit filter, and nothing of the
    /// guest is touched. A frame the tap refuses is counted with the card's tap write errors,
    /// and thrown to the caller (the announcer reports it).
    public func writeHostFrame(_ frame: [UInt8]) throws(TapError) {
        do { try tap.write(frame) } catch {
            tapErrors.count.withLock { $0 += 1 }
            throw error
        }
    }

    private final class TapErrorCount: Sendable { let count = Mutex(0); let filtered = Mutex(0) }
    private let tapErrors: TapErrorCount

    /// What the card did so far, how many frames the tap refused, and how many the transmit
    /// filter dropped.
    public var statistics: (device: VirtioNetStatistics, tapWriteErrors: Int, filtered: Int) {
        (bus.withDevice(box.device) { $0.statistics }, tapErrors.count.withLock { $0 }, tapErrors.filtered.withLock { $0 })
    }

    func saveState() -> VirtioNetState { bus.withDevice(box.device) { $0.saveState() } }

    func restoreState(_ state: VirtioNetState) throws {
        try bus.withDevice(box.device) { device throws in try device.restoreState(state) }
    }

    /// Applies a change to the switches and holds or releases the device accordingly.
    private func update(_ change: (inout Switches) -> Void) {
        switches.withLock { s in
            change(&s)
            let held = s.held
            bus.withDevice(box.device) { $0.setHeld(held) }
        }
    }

    func setPaused(_ paused: Bool) { update { $0.paused = paused } }
    func setThrottled(_ throttled: Bool) { update { $0.throttled = throttled } }

    /// The machine starts: frames may flow (unless paused), and the receive thread starts.
    func start() {
        var startThread = false
        update { s in
            s.started = true
            if !s.threadRunning && !s.ended { s.threadRunning = true; startThread = true }
        }
        guard startThread else { return }
        startOSThread(name: "net-rx-\(tap.name)") { [self] in receiveLoop() }
    }

    /// The machine ended: no frame reaches the guest again, the thread stops and the tap is
    /// let go (so another VMM, or a restored copy, can attach to it).
    func end() {
        var closeNow = false
        update { s in
            s.ended = true
            closeNow = !s.threadRunning
        }
        if closeNow { tap.close() }
    }

    /// Waits until the receive thread has stopped and the tap is closed (after `end()`).
    func waitUntilStopped() {
        stopped.lock(); defer { stopped.unlock() }
        while switches.withLock({ $0.threadRunning }) { stopped.wait() }
    }

    private var ended: Bool { switches.withLock { $0.ended } }

    private func receiveLoop() {
        defer {
            tap.close()
            stopped.lock()
            switches.withLock { $0.threadRunning = false }
            stopped.broadcast()
            stopped.unlock()
        }
        while !ended {
            do {
                guard let frame = try tap.read(timeoutMilliseconds: Self.pollMilliseconds) else { continue }
                bus.withDevice(box.device) { _ = $0.receive(frame) }
            } catch {
                FileHandle.standardError.write(Data("vmm: the network card stops receiving: \(error)\n".utf8))
                return
            }
        }
    }
}
