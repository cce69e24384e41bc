#if canImport(Glibc)
import Glibc
#endif
import Devices
import Foundation
import GuestMemory
import DirtyTrackers
import KVM
import Loader
import SystemCalls

/// A virtual machine: its memory, its vCPU runners, and its devices on two buses.
///
/// The machine knows how to run and stop a guest, and nothing of who may run it: whoever owns
/// it (an admitted guest, a benchmark, a test) decides when to start, pause, resume and end it.
///
/// Thread-safety: the run state (`started`, `result`, and each runner's state and target) is
/// guarded by `control`; devices are reached only through their bus, which serialises calls.
public final class Machine: Sendable {
    public let configuration: MachineConfiguration
    public let kvm: KVMSystem
    public let vm: VirtualMachine
    public let memory: GuestMemory
    public let vcpus: [VCPU]
    /// Port I/O (`in`/`out`) and MMIO address spaces; a device added here needs no change to
    /// the run loop.
    public let portBus = Bus(name: "port I/O")
    public let mmioBus = Bus(name: "MMIO")
    /// Tells which pages changed, for live migration.
    public let dirtyTracker: any DirtyTracker
    /// Guest TSC frequency in kHz.
    public let tscKHz: UInt32
    /// Information about the image this machine booted (nil when restored or received).
    public let image: LoadedImage?

    let devices: PCDevices
    private let runners: [VCPURunner]
    let throttle = Throttle()

    /// The devices the machine keeps a handle on (to save, restore and listen to them).
    // @unchecked: the devices are classes without locks; they are only touched through
    // `Bus.withDevice` or a bus access, which hold the bus's lock.
    final class PCDevices: @unchecked Sendable {
        let serial: Serial16550
        let beaconPort: BeaconPort
        let pci: PCIHostBridge
        init(serial: Serial16550, beaconPort: BeaconPort, pci: PCIHostBridge) {
            self.serial = serial; self.beaconPort = beaconPort; self.pci = pci
        }
    }

    /// The virtio-net card on a tap, when the configuration asks for one.
    public let network: NetworkCard?

    /// Sets what decides, for each frame the guest transmits, whether it reaches the tap (on
    /// the vCPU thread that sent it; false drops it). The owner sets it before the machine
    /// runs; until then every frame passes. No effect on a machine without a network card.
    public func onTransmit(_ decide: @escaping @Sendable ([UInt8]) -> Bool) {
        network?.setTransmitFilter(decide)
    }

    // `control` guards the run record and every runner's `state`, `target` and `thread`.
    private let control: NSCondition
    private let run = RunRecord()

    /// The mutable run record.
    // @unchecked: every field is read and written only with `Machine.control` held.
    private final class RunRecord: @unchecked Sendable {
        var started = false
        var result: MachineExit?
        var startedAt: Double?
    }

    /// Creates the VM with zeroed memory and vCPUs that have `cpuid` (default: all that KVM
    /// supports), but no boot state yet: load an image (`init(image:...)`) or restore state.
    public convenience init(configuration: MachineConfiguration, cpuid: [CPUIDEntry]? = nil, kvm: KVMSystem? = nil,
                            serialOutput: @escaping (UInt8) -> Void) throws {
        try self.init(configuration: configuration, cpuid: cpuid, kvm: kvm, image: nil, serialOutput: serialOutput)
    }

    /// Builds the VM and boots `image` (KVM_CREATE_VM, guest memory, the image,
    /// vCPUs with CPUID and the initial registers). Throws `KVMError`,
    /// `GuestMemoryError` or `LoaderError`.
    public convenience init(image bytes: [UInt8], configuration: MachineConfiguration, kvm: KVMSystem? = nil,
                            serialOutput: @escaping (UInt8) -> Void) throws {
        try self.init(configuration: configuration, cpuid: nil, kvm: kvm, image: bytes, serialOutput: serialOutput)
    }

    private init(configuration: MachineConfiguration, cpuid: [CPUIDEntry]?, kvm: KVMSystem?, image: [UInt8]?,
                 serialOutput: @escaping (UInt8) -> Void) throws {
        guard configuration.vcpuCount >= 1, configuration.vcpuCount <= 64 else {
            throw MachineError.invalidConfiguration("vCPU count \(configuration.vcpuCount) must be 1 to 64")
        }
        guard configuration.memorySize >= BootLayout.minMemory, configuration.memorySize <= BootLayout.maxMemory else {
            throw LoaderError.memorySize(configuration.memorySize)
        }
        self.configuration = configuration
        let kvm = try kvm ?? KVMSystem()
        self.kvm = kvm
        let memory = try GuestMemory(size: configuration.memorySize, regionSize: configuration.slotSize)
        self.memory = memory
        self.vm = try kvm.createVM()
        try vm.register(memory)
        let cpuid = try cpuid ?? kvm.supportedCPUID()
        if configuration.dirtyTracker == .ring { try DirtyRingTracker.prepare(vm: vm) }
        var vcpus: [VCPU] = []
        for id in 0..<configuration.vcpuCount {
            let vcpu = try vm.createVCPU(id: UInt32(id))
            try vcpu.setCPUID(cpuid)
            vcpus.append(vcpu)
        }
        self.vcpus = vcpus
        switch configuration.dirtyTracker {
        case .bitmap: self.dirtyTracker = DirtyBitmapTracker(vm: vm, memory: memory)
        case .ring: self.dirtyTracker = try DirtyRingTracker(vm: vm, vcpus: vcpus, memory: memory)
        }
        self.tscKHz = try vcpus[0].tscKHz()
        // Which MSRs can be saved is probed here, once per process, while no vCPU runs (the
        // probe writes back what it read): the first snapshot or migration would otherwise pay
        // for it inside its pause. A failure leaves it to the first save, which reports it.
        _ = try? MSRProbe.saveable(kvm: kvm, vcpu: vcpus[0])
        let control = NSCondition()
        self.control = control
        self.runners = vcpus.enumerated().map { VCPURunner(vcpu: $1, index: $0, control: control) }

        // The PC's devices: COM1, the exit port, the beacon port.
        let serial = Serial16550(output: serialOutput)
        let slot = GuestAddress(BootLayout.beaconBlock + BeaconBlock.messageOffset)
        let beaconPort = BeaconPort(readSlot: { try? memory.read(at: slot, count: BeaconBlock.messageSize) })
        let pci = PCIHostBridge()
        devices = PCDevices(serial: serial, beaconPort: beaconPort, pci: pci)
        try portBus.insert(serial, named: "COM1", base: UInt64(Serial16550.com1Base), length: Serial16550.registerCount)
        try portBus.insert(DebugExitPort(), named: "exit port", base: UInt64(DebugExitPort.port), length: 1)
        try portBus.insert(beaconPort, named: "beacon port", base: UInt64(BeaconBlock.port), length: 1)
        // PCI (configuration mechanism #1) and, if asked for, the network card in slot 1.
        try portBus.insert(pci, named: "PCI host bridge", base: UInt64(PCIHostBridge.base), length: PCIHostBridge.length)
        let ports = portBus
        network = try configuration.network.map { try NetworkCard(configuration: $0, memory: memory, bus: ports, bridge: pci) }

        if let image {
            let loaded = try ImageLoader.load(image: image, mode: configuration.mode,
                                              commandLine: configuration.commandLine, into: memory)
            for vcpu in vcpus { try CPUSetup.apply(loaded.cpu, to: vcpu) }
            self.image = loaded
        } else {
            self.image = nil
        }
    }

    // MARK: - Run control

    /// Current run state.
    public var state: RunState {
        control.lock(); defer { control.unlock() }
        // Ended, and no thread runs (a machine ended before it started is finished too).
        if run.result != nil && runners.allSatisfy({ $0.state == .finished || $0.state == .created }) { return .finished }
        if !run.started { return .created }
        let live = runners.filter { $0.state != .finished }
        // Paused while every live vCPU is parked and asked to stay so (a resume counts at once).
        if !live.isEmpty && live.allSatisfy({ $0.state == .paused && $0.target == .paused }) { return .paused }
        return .running
    }

    /// When `start()` ran (monotonic milliseconds), for uptime.
    public var startedAt: Double? {
        control.lock(); defer { control.unlock() }
        return run.startedAt
    }

    /// Creates the vCPU threads now, waiting, so that `start()` later only wakes them (a
    /// migration destination does this while the pages arrive: the threads' creation is then
    /// not in the guest's downtime). The machine stays `created`: state may still be restored.
    /// Nothing runs until `start()`; `end(with:)` lets them finish. At most once; no effect
    /// once the machine started or ended.
    public func prestartVCPUThreads() {
        KickSignal.install()
        control.lock(); defer { control.unlock() }
        guard !run.started, run.result == nil else { return }
        for runner in runners {
            runner.prestartLocked(dispatch: { [self] exit, vcpu in dispatch(exit, vcpu: vcpu) },
                                  end: { [self] exit in end(with: exit) })
        }
    }

    /// Starts one OS thread per vCPU (or wakes those `prestartVCPUThreads` made) and returns
    /// once all of them run.
    public func start() {
        network?.start()
        KickSignal.install()
        control.lock()
        precondition(!run.started, "a machine starts once")
        run.started = true
        run.startedAt = monotonicMilliseconds()
        for runner in runners where runner.prestarted { runner.launchLocked() }
        control.broadcast()
        control.unlock()
        for runner in runners where !runner.prestarted {
            runner.start(dispatch: { [self] exit, vcpu in dispatch(exit, vcpu: vcpu) },
                         end: { [self] exit in end(with: exit) })
        }
        control.lock()
        while runners.contains(where: { $0.state == .created }) && run.result == nil { control.wait() }
        control.unlock()
    }

    /// Starts the vCPU threads parked (a restored guest waiting for resume): no guest
    /// instruction runs until `resume()`.
    public func startPaused() {
        network?.setPaused(true)
        control.lock()
        for runner in runners { runner.sendLocked(.pause) }
        control.unlock()
        start()
        control.lock()
        while runners.contains(where: { $0.state != .paused && $0.state != .finished }) && run.result == nil { control.wait() }
        control.unlock()
    }

    /// Pauses every vCPU and returns once all have acknowledged. Returns false if
    /// the machine has already finished.
    @discardableResult
    public func pause() -> Bool {
        // The card first: once the vCPUs are parked, nothing writes guest memory.
        network?.setPaused(true)
        control.lock(); defer { control.unlock() }
        guard run.started, run.result == nil else { return false }
        for runner in runners { runner.sendLocked(.pause) }
        while runners.contains(where: { $0.state != .paused && $0.state != .finished }) && run.result == nil { control.wait() }
        return run.result == nil
    }

    /// Asks every vCPU to park at its next exit from the guest, and returns at once: no vCPU is
    /// kicked. For a post-copy migration whose link failed: a vCPU asleep in the kernel on a
    /// guest page that is not there yet must stay asleep, undisturbed, until that page is
    /// installed (on some KVMs, kvm_pvm here among them, a signal makes such a vCPU retry its
    /// fault in a busy loop instead of leaving `KVM_RUN`). The others park when they next exit
    /// (port I/O, `HLT`, ...); one that never exits runs on on the pages it has until it needs
    /// one that is missing. `state` reads paused once all have parked.
    public func requestPause() {
        network?.setPaused(true)
        control.lock(); defer { control.unlock() }
        guard run.started, run.result == nil else { return }
        for runner in runners { runner.sendLocked(.parkAtNextExit) }
    }

    /// Resumes a paused machine.
    public func resume() {
        network?.setPaused(false)
        control.lock(); defer { control.unlock() }
        for runner in runners { runner.sendLocked(.resume) }
        control.broadcast()
    }

    /// Parks every vCPU for the throttle and returns once all have; false if the machine has
    /// finished. Unlike `pause()`, the machine still reads as running, and `releaseHold()`
    /// leaves an owner's pause in place.
    func hold() -> Bool {
        network?.setThrottled(true)
        control.lock(); defer { control.unlock() }
        guard run.started, run.result == nil else { return false }
        for runner in runners { runner.sendLocked(.hold) }
        while runners.contains(where: { $0.state != .paused && $0.state != .finished }) && run.result == nil { control.wait() }
        return run.result == nil
    }

    /// Ends the throttle's hold.
    func releaseHold() {
        network?.setThrottled(false)
        control.lock(); defer { control.unlock() }
        for runner in runners { runner.sendLocked(.release) }
        control.broadcast()
    }

    /// Stops all vCPUs; the run ends with `.stopped(signal:)` unless it already ended.
    public func requestStop(signal: Int32 = 0) {
        end(with: .stopped(signal: signal))
    }

    /// Ends the run with `exit` (unless it already ended) and stops every vCPU,
    /// paused or running; works before `start()` too.
    public func end(with exit: MachineExit) {
        network?.end()
        control.lock(); defer { control.unlock() }
        if run.result == nil { run.result = exit }
        for runner in runners { runner.sendLocked(.finish) }
        control.broadcast()
    }

    /// How the run ended, once it has.
    public var exitResult: MachineExit? {
        control.lock(); defer { control.unlock() }
        return runners.allSatisfy { $0.state == .finished || $0.state == .created } ? run.result : nil
    }

    /// Blocks until every vCPU thread has stopped; returns how the run ended.
    public func waitForExit() -> MachineExit {
        control.lock()
        while run.result == nil || runners.contains(where: { $0.state != .finished && $0.state != .created }) { control.wait() }
        let result = run.result!
        control.unlock()
        // The tap is let go too, so whoever waited can attach another machine to it.
        network?.waitUntilStopped()
        return result
    }

    /// Waits up to `timeout` seconds; nil if the machine is still running.
    public func waitForExit(timeout: Double) -> MachineExit? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        control.lock()
        while run.result == nil || runners.contains(where: { $0.state != .finished && $0.state != .created }) {
            if !control.wait(until: deadline) { control.unlock(); return nil }
        }
        let result = run.result
        control.unlock()
        network?.waitUntilStopped()
        return result
    }

    // MARK: - Exits

    /// The whole run loop's decision, one `switch` on the exit reason (kicked-out runs never
    /// get here: the runner handles EINTR itself).
    private func dispatch(_ exit: VCPUExit, vcpu: VCPU) -> MachineExit? {
        switch exit {
        case let .io(port, isWrite, size, count, data):
            // `rep ins/outs` moves `count` items of `size` bytes through the same port.
            if isWrite {
                for item in 0..<count {
                    let bytes = Array(data[item * size ..< min((item + 1) * size, data.count)])
                    if case let .exitRequested(status) = portBus.write(UInt64(port), data: bytes) {
                        return .exitPort(status: status)
                    }
                }
            } else {
                var bytes: [UInt8] = []
                for _ in 0..<count { bytes += portBus.read(UInt64(port), width: size) }
                vcpu.completeInput(bytes)
            }
            return nil
        case let .mmio(address, isWrite, data):
            if isWrite {
                if case let .exitRequested(status) = mmioBus.write(address, data: data) { return .exitPort(status: status) }
            } else {
                vcpu.completeMMIORead(mmioBus.read(address, width: data.count))
            }
            return nil
        case let .hlt(interruptsEnabled):
            return interruptsEnabled ? .hang(details: vcpu.registerDump()) : .halted
        case .shutdown:
            return .fatal(reason: "triple fault on vCPU \(vcpu.id) (KVM_EXIT_SHUTDOWN)", details: vcpu.registerDump())
        case let .failEntry(reason, cpu):
            return .fatal(reason: "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason 0x\(String(reason, radix: 16)), cpu \(cpu))",
                          details: vcpu.registerDump())
        case let .internalError(sub):
            return .fatal(reason: "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror \(sub)): an instruction KVM cannot emulate",
                          details: vcpu.registerDump())
        case let .systemEvent(type):
            return .fatal(reason: "system event \(type) (KVM_EXIT_SYSTEM_EVENT)", details: vcpu.registerDump())
        case .dirtyRingFull:
            // The vCPU harvests every ring itself, then goes on.
            guard let ring = dirtyTracker as? DirtyRingTracker else {
                return .fatal(reason: "dirty ring full, but no dirty ring is enabled", details: vcpu.registerDump())
            }
            do { try ring.harvestFull() } catch {
                return .fatal(reason: "harvesting the dirty ring failed: \(error)", details: vcpu.registerDump())
            }
            return nil
        case let .unknown(reason):
            return .fatal(reason: "unexpected exit reason \(reason)", details: vcpu.registerDump())
        case .interrupted:
            return nil
        }
    }

    // MARK: - The beacon device

    /// Called (on the vCPU thread) for every beacon the guest sends through `BeaconBlock.port`.
    public func onBeacon(_ handler: @escaping @Sendable (BeaconMessage) -> Void) {
        portBus.withDevice(devices.beaconPort) { $0.onBeacon(handler) }
    }

    /// Writes the beacon block the guest reads its token, period and TSC rate from.
    public func writeBeaconBlock(_ block: BeaconBlock) throws {
        try memory.write(block.bytes, at: GuestAddress(BootLayout.beaconBlock))
    }

    /// The token in the guest's beacon block, if its memory holds one (a restored or migrated
    /// guest keeps the token of its boot: restoring or moving it is not a new boot).
    public func beaconToken() throws -> UInt64? {
        let header = try memory.read(at: GuestAddress(BootLayout.beaconBlock), count: 8)
        guard BeaconBlock.isBlock(header) else { return nil }
        return try memory.readInteger(UInt64.self, at: GuestAddress(BootLayout.beaconBlock + BeaconBlock.tokenOffset))
    }

    /// Holds the vCPUs paused for `percent` of every 20 ms (auto-converge); 0 turns it off.
    public func setThrottle(percent: Int) {
        throttle.set(percent: percent, machine: self)
    }
}
