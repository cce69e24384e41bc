#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Devices
import GuestMemory
import KVM
import DirtyTrackers
import Loader

/// Which dirty tracker a machine uses; fixed when the VM is created, because
/// KVM needs the dirty ring enabled before any vCPU exists.
public enum DirtyTrackerKind: String, Sendable, Equatable, Codable, CaseIterable {
    case bitmap, ring
}

/// What a machine is built from.
public struct MachineConfiguration: Sendable, Equatable {
    public var memorySize: UInt64
    public var vcpuCount: Int
    public var mode: BootMode?
    public var commandLine: String?
    public var dirtyTracker: DirtyTrackerKind
    /// Size of each KVM memory slot (guest RAM is split into slots of this size).
    public var slotSize: UInt64

    public init(memorySize: UInt64 = 64 << 20, vcpuCount: Int = 1, mode: BootMode? = nil, commandLine: String? = nil,
                dirtyTracker: DirtyTrackerKind = .bitmap, slotSize: UInt64 = GuestMemory.maxRegionSize) {
        self.slotSize = slotSize
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.mode = mode
        self.commandLine = commandLine
        self.dirtyTracker = dirtyTracker
    }
}

/// How a run ended.
public enum MachineExit: Sendable, Equatable, CustomStringConvertible {
    /// The guest wrote `status` to the exit port.
    case exitPort(status: UInt8)
    /// `HLT` with interrupts disabled: a clean stop.
    case halted
    /// `HLT` with interrupts enabled: with no interrupt source, the guest would wait forever.
    case hang(details: String)
    /// Triple fault, failed entry, internal error or an unexpected exit.
    case fatal(reason: String, details: String)
    /// Stopped from outside (a signal or `requestStop`).
    case stopped(signal: Int32)
    /// Shut down through the control API.
    case shutdown
    /// Handed over to a migration destination; this copy must never run again.
    case migrated
    /// Stopped by the Billboard: this copy lost its lease or was found to be a false VM.
    case evicted(reason: String)

    /// The process exit status for `vmm run`.
    public var exitStatus: Int32 {
        switch self {
        case let .exitPort(s): Int32(s)
        case .halted: 0
        case .hang, .fatal: 2
        case let .stopped(sig): 128 + sig
        case .shutdown, .migrated: 0
        case .evicted: 3
        }
    }

    public var description: String {
        switch self {
        case let .exitPort(s): "guest exited with status \(s) through port 0xf4"
        case .halted: "guest halted with interrupts disabled"
        case let .hang(d): "guest hung: HLT with interrupts enabled, but this VM has no interrupt source\n\(d)"
        case let .fatal(r, d): "guest stopped: \(r)\n\(d)"
        case let .stopped(sig): "stopped by signal \(sig)"
        case .shutdown: "shut down through the control API"
        case .migrated: "migrated to another VMM"
        case let .evicted(r): "stopped by the billboard: \(r)"
        }
    }
}

/// Run state of a machine.
public enum RunState: String, Sendable, Codable {
    case created, running, paused, finished
}

/// A virtual machine with its memory, devices and vCPU threads.
///
/// Each vCPU runs on its own OS thread. `pause()` sets a flag and
/// `immediate_exit`, signals each vCPU thread, and waits until every vCPU has
/// acknowledged; because pausing happens only after `KVM_RUN` returns EINTR,
/// any I/O in flight has been completed by KVM first.
///
/// Thread-safety: the mutable run state lives behind `control` (an NSCondition).
public final class Machine: @unchecked Sendable {
    public let configuration: MachineConfiguration
    public let kvm: KVMSystem
    public let vm: VirtualMachine
    public let memory: GuestMemory
    public let vcpus: [VCPU]
    public let serial: Serial16550

    private let deviceLock = NSLock()
    let control = NSCondition()
    // Guarded by `control`:
    private var threads: [pthread_t?]
    private var alive: [Bool]
    private var pauseRequested = false
    private var stopRequested = false
    private var pausedCount = 0
    private var started = false
    private var result: MachineExit?
    private var runningThreads = 0

    /// The Billboard session that admitted this guest and holds its lease (nil for a machine
    /// built directly by library code, which no `vmm` command does).
    public internal(set) var session: GuestSession? {
        get { deviceLock.lock(); defer { deviceLock.unlock() }; return attachedSession }
        set { deviceLock.lock(); attachedSession = newValue; deviceLock.unlock() }
    }
    /// Whether the last `pauseForMigration` paused a running guest (only then may a failed
    /// migration resume it).
    var pausedByMigration = false  // guarded by control
    private var attachedSession: GuestSession?  // guarded by deviceLock
    private var beaconHandler: (@Sendable (BeaconMessage) -> Void)?  // guarded by deviceLock

    /// Called (on the vCPU thread) for every beacon the guest sends through `BeaconBlock.port`.
    public func onBeacon(_ handler: @escaping @Sendable (BeaconMessage) -> Void) {
        deviceLock.lock(); beaconHandler = handler; deviceLock.unlock()
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
    let throttle = Throttle()
    /// Tells which pages changed, for live migration.
    public let dirtyTracker: any DirtyTracker
    /// The MSRs saved with each vCPU: KVM's saveable list, less those this host cannot
    /// save and restore. Probed on first use (a snapshot or migration), not at boot.
    public func savedMSRIndices() throws -> [UInt32] {
        try MSRProbe.saveable(kvm: kvm, vcpu: vcpus[0])
    }
    /// Guest TSC frequency in kHz.
    public let tscKHz: UInt32
    /// When `start()` ran (monotonic milliseconds), for uptime.
    public private(set) var startedAt: Double?
    /// Information about the image this machine booted (nil when restored).
    public private(set) var image: LoadedImage?

    /// Creates the VM with zeroed memory and vCPUs that have `cpuid` (default: all
    /// that KVM supports), but no boot state yet: callers load an image or restore.
    /// Internal: outside this module a machine is made only through `GuestDoors`, after the
    /// Billboard admitted its guest.
    init(configuration: MachineConfiguration, cpuid: [CPUIDEntry]? = nil, kvm: KVMSystem? = nil,
                serialOutput: @escaping (UInt8) -> Void) throws {
        guard configuration.vcpuCount >= 1, configuration.vcpuCount <= 64 else {
            throw MachineError.invalidConfiguration("vCPU count \(configuration.vcpuCount) must be 1 to 64")
        }
        guard configuration.memorySize >= BootLayout.minMemory, configuration.memorySize <= BootLayout.maxMemory else {
            throw LoaderError.memorySize(configuration.memorySize)
        }
        self.configuration = configuration
        self.kvm = try kvm ?? KVMSystem()
        self.memory = try GuestMemory(size: configuration.memorySize, regionSize: configuration.slotSize)
        self.vm = try self.kvm.createVM()
        try vm.register(memory)
        let cpuid = try cpuid ?? self.kvm.supportedCPUID()
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
        self.serial = Serial16550(output: serialOutput)
        self.threads = Array(repeating: nil, count: vcpus.count)
        self.alive = Array(repeating: false, count: vcpus.count)
    }

    /// Builds the VM and boots `image` (KVM_CREATE_VM, guest memory, the image,
    /// vCPUs with CPUID and the initial registers). Throws `KVMError`,
    /// `GuestMemoryError` or `LoaderError`.
    convenience init(image bytes: [UInt8], configuration: MachineConfiguration, kvm: KVMSystem? = nil,
                     serialOutput: @escaping (UInt8) -> Void) throws {
        try self.init(configuration: configuration, kvm: kvm, serialOutput: serialOutput)
        let loaded = try ImageLoader.load(image: bytes, mode: configuration.mode,
                                          commandLine: configuration.commandLine, into: memory)
        for vcpu in vcpus { try CPUSetup.apply(loaded.cpu, to: vcpu) }
        self.image = loaded
    }

    /// Current run state.
    public var state: RunState {
        control.lock(); defer { control.unlock() }
        if result != nil && runningThreads == 0 { return .finished }
        if !started { return .created }
        return pausedCount == runningThreads && pauseRequested ? .paused : .running
    }

    /// Starts one OS thread per vCPU and returns once all of them run. A guest whose session does
    /// not hold its Billboard lease never runs: the machine ends at once, "evicted".
    public func start() {
        guard session?.holdsLease == true else {
            end(with: .evicted(reason: "this guest does not hold its billboard lease, so it may not run here"))
            return
        }
        KickSignal.install()
        control.lock()
        precondition(!started, "a machine starts once")
        started = true
        startedAt = monotonicMilliseconds()
        runningThreads = vcpus.count
        control.unlock()
        for (index, vcpu) in vcpus.enumerated() {
            startOSThread(name: "vcpu\(index)") { [self] in vcpuLoop(index: index, vcpu: vcpu) }
        }
        control.lock()
        while threads.contains(where: { $0 == nil }) && result == nil { control.wait() }
        control.unlock()
    }

    /// Starts the vCPU threads already paused (a restored guest waiting for resume).
    public func startPaused() {
        control.lock()
        pauseRequested = true
        // The first KVM_RUN of each vCPU returns at once, before any guest instruction.
        for vcpu in vcpus { vcpu.immediateExit = true }
        control.unlock()
        start()
        control.lock()
        while pausedCount < runningThreads && result == nil { control.wait() }
        control.unlock()
    }

    /// Pauses every vCPU and returns once all have acknowledged. Returns false if
    /// the machine has already finished.
    @discardableResult
    public func pause() -> Bool {
        control.lock(); defer { control.unlock() }
        guard started, result == nil else { return false }
        pauseRequested = true
        kickAllLocked()
        while pausedCount < runningThreads && result == nil { control.wait() }
        return result == nil
    }

    /// Resumes a paused machine.
    public func resume() {
        // A guest that runs on after a snapshot leaves that snapshot behind: its epoch moves on.
        session?.resuming()
        control.lock(); defer { control.unlock() }
        pauseRequested = false
        control.broadcast()
    }

    /// Stops all vCPUs; the run ends with `.stopped(signal:)` unless it already ended.
    public func requestStop(signal: Int32 = 0) {
        end(with: .stopped(signal: signal))
    }

    /// Ends the run with `exit` (unless it already ended) and stops every vCPU,
    /// paused or running; works before `start()` too.
    public func end(with exit: MachineExit) {
        control.lock(); defer { control.unlock() }
        if result == nil { result = exit }
        stopRequested = true
        kickAllLocked()
        control.broadcast()
    }

    /// How the run ended, once it has.
    public var exitResult: MachineExit? {
        control.lock(); defer { control.unlock() }
        return runningThreads == 0 ? result : nil
    }

    /// Blocks until every vCPU thread has stopped; returns how the run ended.
    public func waitForExit() -> MachineExit {
        control.lock(); defer { control.unlock() }
        while result == nil || runningThreads > 0 { control.wait() }
        return result!
    }

    /// Waits up to `timeout` seconds; nil if the machine is still running.
    public func waitForExit(timeout: Double) -> MachineExit? {
        let deadline = Date(timeIntervalSinceNow: timeout)
        control.lock(); defer { control.unlock() }
        while result == nil || runningThreads > 0 {
            if !control.wait(until: deadline) { return nil }
        }
        return result
    }

    private func kickAllLocked() {
        for (i, vcpu) in vcpus.enumerated() where alive[i] {
            vcpu.immediateExit = true
            if let t = threads[i] { pthread_kill(t, KickSignal.number) }
        }
    }

    private func finish(_ exit: MachineExit) {
        control.lock(); defer { control.unlock() }
        if result == nil { result = exit }
        stopRequested = true
        kickAllLocked()
        control.broadcast()
    }

    private func vcpuLoop(index: Int, vcpu: VCPU) {
        KickSignal.unblockInThisThread()
        control.lock()
        threads[index] = pthread_self()
        alive[index] = true
        control.broadcast()
        control.unlock()
        defer {
            control.lock()
            alive[index] = false
            runningThreads -= 1
            control.broadcast()
            control.unlock()
        }
        while true {
            let exit: VCPUExit
            do {
                exit = try vcpu.run()
            } catch {
                finish(.fatal(reason: "\(error)", details: dumpRegisters(vcpu)))
                return
            }
            if case .interrupted = exit {
                control.lock()
                if stopRequested { control.unlock(); return }
                if pauseRequested {
                    vcpu.immediateExit = false
                    pausedCount += 1
                    control.broadcast()
                    while pauseRequested && !stopRequested { control.wait() }
                    pausedCount -= 1
                    let stop = stopRequested
                    control.unlock()
                    if stop { return }
                    continue
                }
                // A stale kick from an earlier pause: clear it and go on.
                vcpu.immediateExit = false
                control.unlock()
                continue
            }
            if let ending = handle(exit, vcpu: vcpu) {
                finish(ending)
                return
            }
        }
    }

    /// One `switch` on the exit reason: what each exit means for this machine.
    private func handle(_ exit: VCPUExit, vcpu: VCPU) -> MachineExit? {
        switch exit {
        case let .io(port, isWrite, size, count, data):
            if port == DebugExitPort.port && isWrite {
                return .exitPort(status: data.first ?? 0)
            }
            if port == BeaconBlock.port && isWrite {
                let slot = GuestAddress(BootLayout.beaconBlock + BeaconBlock.messageOffset)
                if let bytes = try? memory.read(at: slot, count: BeaconBlock.messageSize), let message = BeaconMessage(bytes) {
                    deviceLock.lock(); let handler = beaconHandler; deviceLock.unlock()
                    handler?(message)
                }
                return nil
            }
            let com1 = Serial16550.com1Base
            if port >= com1 && port < com1 + 8 {
                deviceLock.lock(); defer { deviceLock.unlock() }
                if isWrite {
                    // `rep outsb` delivers several items; a wider access writes its low byte.
                    for item in 0..<count { serial.write(offset: port - com1, value: data[item * size]) }
                } else {
                    var bytes: [UInt8] = []
                    for _ in 0..<count {
                        bytes.append(serial.read(offset: port - com1))
                        bytes.append(contentsOf: repeatElement(0, count: size - 1))
                    }
                    vcpu.completeInput(bytes)
                }
                return nil
            }
            // No device here: writes are dropped and reads float high, as on a PC bus.
            if !isWrite { vcpu.completeInput([UInt8](repeating: 0xFF, count: size * count)) }
            return nil
        case let .mmio(_, isWrite, data):
            // No MMIO devices: writes are dropped, reads return all ones.
            if !isWrite { vcpu.completeMMIORead([UInt8](repeating: 0xFF, count: data.count)) }
            return nil
        case let .hlt(interruptsEnabled):
            return interruptsEnabled ? .hang(details: dumpRegisters(vcpu)) : .halted
        case .shutdown:
            return .fatal(reason: "triple fault on vCPU \(vcpu.id) (KVM_EXIT_SHUTDOWN)", details: dumpRegisters(vcpu))
        case let .failEntry(reason, cpu):
            return .fatal(reason: "KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware reason 0x\(String(reason, radix: 16)), cpu \(cpu))",
                          details: dumpRegisters(vcpu))
        case let .internalError(sub):
            return .fatal(reason: "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror \(sub)): an instruction KVM cannot emulate",
                          details: dumpRegisters(vcpu))
        case let .systemEvent(type):
            return .fatal(reason: "system event \(type) (KVM_EXIT_SYSTEM_EVENT)", details: dumpRegisters(vcpu))
        case .dirtyRingFull:
            // The vCPU harvests every ring itself, then goes on.
            guard let ring = dirtyTracker as? DirtyRingTracker else {
                return .fatal(reason: "dirty ring full, but no dirty ring is enabled", details: dumpRegisters(vcpu))
            }
            do { try ring.harvestFull() } catch {
                return .fatal(reason: "harvesting the dirty ring failed: \(error)", details: dumpRegisters(vcpu))
            }
            return nil
        case let .unknown(reason):
            return .fatal(reason: "unexpected exit reason \(reason)", details: dumpRegisters(vcpu))
        case .interrupted:
            return nil
        }
    }

    /// The UART's state, read under the device lock.
    public var serialState: Serial16550State {
        deviceLock.lock(); defer { deviceLock.unlock() }
        return serial.state
    }

    func restoreSerial(_ state: Serial16550State) {
        deviceLock.lock(); defer { deviceLock.unlock() }
        serial.restore(state)
    }

    /// A register dump for fatal exits.
    public func dumpRegisters(_ vcpu: VCPU) -> String {
        guard let r = try? vcpu.registers(), let s = try? vcpu.specialRegisters() else {
            return "(registers unavailable)"
        }
        func h(_ v: UInt64) -> String {
            let s = String(v, radix: 16)
            return "0x" + String(repeating: "0", count: max(0, 16 - s.count)) + s
        }
        return """
        vCPU \(vcpu.id) registers:
          rip=\(h(r.rip)) rflags=\(h(r.rflags)) rsp=\(h(r.rsp)) rbp=\(h(r.rbp))
          rax=\(h(r.rax)) rbx=\(h(r.rbx)) rcx=\(h(r.rcx)) rdx=\(h(r.rdx))
          rsi=\(h(r.rsi)) rdi=\(h(r.rdi)) r8=\(h(r.r8)) r9=\(h(r.r9))
          cs=\(String(s.cs.selector, radix: 16)) base=\(h(s.cs.base)) ss=\(String(s.ss.selector, radix: 16)) ds=\(String(s.ds.selector, radix: 16))
          cr0=\(h(s.cr0)) cr2=\(h(s.cr2)) cr3=\(h(s.cr3)) cr4=\(h(s.cr4)) efer=\(h(s.efer))
          gdt=\(h(s.gdt.base))/\(s.gdt.limit) idt=\(h(s.idt.base))/\(s.idt.limit)
        """
    }
}

/// Errors of the machine itself (not KVM, memory or loader).
public enum MachineError: Error, CustomStringConvertible {
    case invalidConfiguration(String)
    case io(String)
    public var description: String {
        switch self {
        case let .invalidConfiguration(s): "invalid machine configuration: \(s)"
        case let .io(s): s
        }
    }
}
