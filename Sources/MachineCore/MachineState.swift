import Foundation
import Devices
import GuestMemory
import KVM
import Loader

/// Saving and restoring a part of the machine as a plain value (rust-vmm's `Persist`):
/// `saveState()` only while the part is quiet (the machine paused), `restoreState(_:)` only
/// before it runs.
public protocol Persist {
    associatedtype State: Sendable & Codable
    func saveState() throws -> State
    func restoreState(_ state: State) throws
}

/// What to build before any state can be applied: the machine section of a snapshot, the
/// machine in a migration hello.
public struct MachineDescription: Sendable, Equatable, Codable {
    public var memorySize: UInt64
    public var vcpuCount: Int
    public var mode: String?
    public var commandLine: String?
    public var tscKHz: UInt32
    /// Whether the VM had KVM's in-kernel interrupt controller (never, for now).
    public var inKernelIRQChip: Bool
    /// The network card's MAC (6 bytes), if the machine has a card; absent in older files (no
    /// card). The tap is not carried: it is this host's, named where the guest lands.
    public var networkMAC: [UInt8]?

    public init(memorySize: UInt64, vcpuCount: Int, mode: String?, commandLine: String?, tscKHz: UInt32, inKernelIRQChip: Bool = false,
                networkMAC: [UInt8]? = nil) {
        self.networkMAC = networkMAC
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.mode = mode
        self.commandLine = commandLine
        self.tscKHz = tscKHz
        self.inKernelIRQChip = inKernelIRQChip
    }

    /// What to build, less the network card: its tap is the host's to name
    /// (`NetworkConfiguration(mac: networkMAC, tap: ...)`).
    public var configuration: MachineConfiguration {
        MachineConfiguration(memorySize: memorySize, vcpuCount: vcpuCount,
                             mode: mode.flatMap(BootMode.init(rawValue:)), commandLine: commandLine)
    }
}

/// Device state section.
public struct DeviceState: Sendable, Equatable, Codable {
    public var serial: Serial16550State
    /// The PCI address latch (absent in files from before PCI: an idle latch).
    public var pci: PCIHostBridgeState?
    /// The virtio-net card, if the machine has one.
    public var network: VirtioNetState?
}

/// Everything of a paused machine but its memory (which travels page by page in memory
/// sections): what a snapshot file and a migration stream carry besides pages.
public struct MachineState: Sendable, Equatable, Codable {
    public var description: MachineDescription
    public var vcpus: [VCPUState]
    public var devices: DeviceState

    public init(description: MachineDescription, vcpus: [VCPUState], devices: DeviceState) {
        self.description = description
        self.vcpus = vcpus
        self.devices = devices
    }
}

extension Serial16550: Persist {}

/// Why a snapshot cannot be taken or applied.
public enum SnapshotError: Error, CustomStringConvertible, Equatable {
    case notPaused
    case finished
    case inKernelIRQChip
    case memoryMismatch(snapshot: UInt64, requested: UInt64)
    case vcpuMismatch(snapshot: Int, found: Int)
    case missingCPUFeatures([String])
    case tscFrequency(snapshot: UInt32, host: UInt32, reason: String)
    case sectionOrder(String)
    case malformed(String)

    public var description: String {
        switch self {
        case .notPaused: "the VM is running; pause it first"
        case .finished: "the VM has already stopped; there is nothing to snapshot"
        case .inKernelIRQChip: "this VM uses KVM's in-kernel interrupt controller, whose state is not saved yet; snapshots are refused"
        case let .memoryMismatch(s, r): "the snapshot's guest has \(s >> 20) MiB of memory but \(r >> 20) MiB were asked for; ask for the same size or none"
        case let .vcpuMismatch(s, f): "the snapshot names \(s) vCPUs but holds state for \(f)"
        case let .missingCPUFeatures(f): "this host's CPU lacks features the guest was using: \(f.joined(separator: ", ")); restore on a compatible host"
        case let .tscFrequency(s, h, r): "the guest's TSC ran at \(s) kHz, this host's at \(h) kHz, and it cannot be scaled (\(r))"
        case let .sectionOrder(w): "the snapshot's sections are out of order: \(w)"
        case let .malformed(w): "the snapshot is malformed: \(w)"
        }
    }
}

/// Compares a saved CPUID with what this host's KVM supports.
public enum CPUCompatibility {
    /// Feature leaves whose set bits the guest may rely on. (function, index, registers to compare)
    enum Register: String, Sendable { case eax, ebx, ecx, edx }
    static let featureLeaves: [(UInt32, UInt32, [Register])] = [
        (0x1, 0, [.ecx, .edx]),
        (0x7, 0, [.ebx, .ecx, .edx]),
        (0x8000_0001, 0, [.ecx, .edx]),
        (0xD, 1, [.eax]),
    ]

    static func value(_ e: CPUIDEntry?, _ r: Register) -> UInt32 {
        guard let e else { return 0 }
        switch r { case .eax: return e.eax; case .ebx: return e.ebx; case .ecx: return e.ecx; case .edx: return e.edx }
    }

    /// Names of feature bits set in `saved` but missing from `host`; empty when compatible.
    public static func missingFeatures(saved: [CPUIDEntry], host: [CPUIDEntry]) -> [String] {
        var missing: [String] = []
        for (function, index, registers) in featureLeaves {
            guard let s = saved.first(where: { $0.function == function && $0.index == index }) else { continue }
            let h = host.first(where: { $0.function == function && $0.index == index })
            for register in registers {
                let name = register.rawValue
                var lacking = value(s, register) & ~value(h, register)
                // Leaf 1 ECX bit 27 (OSXSAVE) mirrors CR4 and is not a host feature.
                if function == 1 && name == "ecx" { lacking &= ~(1 << 27) }
                var bit: UInt32 = 0
                while lacking != 0 {
                    if lacking & 1 != 0 {
                        missing.append("CPUID 0x\(String(function, radix: 16)).\(index) \(name) bit \(bit)")
                    }
                    lacking >>= 1
                    bit += 1
                }
            }
        }
        return missing
    }
}

extension Machine {
    /// The machine section for this VM.
    public var machineDescription: MachineDescription {
        MachineDescription(memorySize: configuration.memorySize, vcpuCount: vcpus.count,
                           mode: configuration.mode?.rawValue, commandLine: configuration.commandLine,
                           tscKHz: tscKHz, inKernelIRQChip: false, networkMAC: configuration.network?.mac)
    }

    /// The MSRs saved with each vCPU: KVM's saveable list, less those this host cannot
    /// save and restore. Probed when the process's first machine is made (`Machine.init`).
    public func savedMSRIndices() throws -> [UInt32] {
        try MSRProbe.saveable(kvm: kvm, vcpu: vcpus[0])
    }

    /// The UART's and the other devices' state, read under the bus lock.
    public var deviceState: DeviceState {
        DeviceState(serial: portBus.withDevice(devices.serial) { $0.saveState() },
                    pci: portBus.withDevice(devices.pci) { $0.saveState() },
                    network: network?.saveState())
    }
}

extension Machine: Persist {
    public typealias State = MachineState

    /// Saves every vCPU and device. The machine must be paused, so that no vCPU is
    /// inside `KVM_RUN` and KVM has completed any I/O in flight.
    public func saveState() throws -> MachineState {
        switch state {
        case .paused: break
        case .finished: throw SnapshotError.finished
        default: throw SnapshotError.notPaused
        }
        let indices = try savedMSRIndices()
        let states = try vcpus.map { try $0.saveState(msrIndices: indices) }
        return MachineState(description: machineDescription, vcpus: states, devices: deviceState)
    }

    /// Applies saved vCPU and device state to a machine that has not started yet.
    /// Refuses CPU features this host lacks and a TSC frequency it cannot match.
    public func restoreState(_ saved: MachineState) throws {
        let description = saved.description
        guard !description.inKernelIRQChip else { throw SnapshotError.inKernelIRQChip }
        guard saved.vcpus.count == vcpus.count, description.vcpuCount == vcpus.count else { throw SnapshotError.vcpuMismatch(snapshot: description.vcpuCount, found: saved.vcpus.count) }
        // The network card is a host resource named again here: it must be there exactly when
        // the saved guest had one.
        switch (saved.devices.network, network) {
        case (nil, nil): break
        case (let state?, let card?): try card.restoreState(state)
        case (_?, nil): throw MachineError.invalidConfiguration("the saved guest has a network card; name the tap it gets here (--net tap=NAME)")
        case (nil, _?): throw MachineError.invalidConfiguration("the saved guest has no network card, but this machine was given one (--net)")
        }
        // What this host gives a new vCPU (KVM may add bits to what it reports as supported).
        let host = try vcpus[0].cpuid()
        for s in saved.vcpus {
            let missing = CPUCompatibility.missingFeatures(saved: s.cpuid, host: host)
            guard missing.isEmpty else { throw SnapshotError.missingCPUFeatures(missing) }
        }
        if description.tscKHz != tscKHz {
            for v in vcpus {
                do { try v.setTscKHz(description.tscKHz) } catch {
                    throw SnapshotError.tscFrequency(snapshot: description.tscKHz, host: tscKHz, reason: "\(error)")
                }
            }
        }
        for (index, (vcpu, s)) in zip(vcpus, saved.vcpus.sorted { $0.id < $1.id }).enumerated() {
            try vcpu.restoreState(s, currentCPUID: index == 0 ? host : try vcpu.cpuid())
        }
        portBus.withDevice(devices.serial) { $0.restoreState(saved.devices.serial) }
        portBus.withDevice(devices.pci) { $0.restoreState(saved.devices.pci ?? PCIHostBridgeState()) }
    }
}
