#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Loader

/// Which dirty tracker a machine uses; fixed when the VM is created, because
/// KVM needs the dirty ring enabled before any vCPU exists.
public enum DirtyTrackerKind: String, Sendable, Equatable, Codable, CaseIterable {
    case bitmap, ring
}

/// The machine's network card: its MAC (from the guest's registration, never chosen on the
/// command line) and the host tap interface it is attached to.
public struct NetworkConfiguration: Sendable, Equatable {
    /// Six bytes.
    public var mac: [UInt8]
    public var tap: String

    public init(mac: [UInt8], tap: String) {
        self.mac = mac
        self.tap = tap
    }
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
    /// The network card and the tap it is attached to on this host, or none. The tap is a host
    /// resource (a restored or migrated guest names its tap again where it lands); the MAC
    /// travels in the machine description (`MachineDescription.networkMAC`).
    public var network: NetworkConfiguration?

    public init(memorySize: UInt64 = 64 << 20, vcpuCount: Int = 1, mode: BootMode? = nil, commandLine: String? = nil,
                dirtyTracker: DirtyTrackerKind = .bitmap, slotSize: UInt64 = GuestMemory.maxRegionSize,
                network: NetworkConfiguration? = nil) {
        self.network = network
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
    /// Stopped by a signal (SIGINT, SIGTERM) through `requestStop`.
    case stopped(signal: Int32)
    /// Shut down through the control API.
    case shutdown
    /// Handed over to a migration destination; this copy must never run again.
    case migrated
    /// Stopped by whoever owns the machine, for the reason given (the owner knows what it means).
    case stoppedByOwner(reason: String)

    public var description: String {
        switch self {
        case let .exitPort(s): "guest exited with status \(s) through port 0xf4"
        case .halted: "guest halted with interrupts disabled"
        case let .hang(d): "guest hung: HLT with interrupts enabled, but this VM has no interrupt source\n\(d)"
        case let .fatal(r, d): "guest stopped: \(r)\n\(d)"
        case let .stopped(sig): "stopped by signal \(sig)"
        case .shutdown: "shut down through the control API"
        case .migrated: "migrated to another VMM"
        case let .stoppedByOwner(r): r
        }
    }
}

/// Run state of a machine.
public enum RunState: String, Sendable, Codable {
    case created, running, paused, finished
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


extension MachineExit {
    /// The process exit status for `vmm run` (README: "The command line").
    public var exitStatus: Int32 {
        switch self {
        case let .exitPort(s): Int32(s)
        case .halted: 0
        case .hang, .fatal: 2
        case let .stopped(sig): 128 + sig
        case .shutdown, .migrated: 0
        case .stoppedByOwner: 3
        }
    }
}
