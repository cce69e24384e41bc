import Billboard
import Foundation
import KVM
import Migration

/// The three ways a guest comes to run in a VMM process (boot, restore, incoming migration),
/// each admitted by the Billboard before `KVM_CREATE_VM`. The `vmm` commands and the
/// benchmarks use these and nothing else to get a machine.
public enum GuestDoors {
    /// Admits `image` with `configuration`, then creates and loads the machine, with its beacon
    /// block written and its session attached. The lease is held from admission on.
    public static func boot(image: [UInt8], name: String?, configuration: MachineConfiguration, store: BillboardStore,
                            settings: BillboardSettings, kvm: KVMSystem? = nil, log: @escaping @Sendable (String) -> Void,
                            serialOutput: @escaping (UInt8) -> Void) throws -> Machine {
        let session = try GuestSession.admitBoot(store: store, name: name, image: image, configuration: configuration,
                                                 settings: settings, log: log)
        // Admitted just now for these very bytes: no need to check them again.
        return try make(session: session, image: image, configuration: configuration, kvm: kvm, serialOutput: serialOutput)
    }

    /// Creates and loads the machine of a guest `session` admitted (`GuestSession.admitBoot`);
    /// for callers that time admission apart. Ends the session if the machine cannot be made.
    public static func boot(session: GuestSession, image: [UInt8], configuration: MachineConfiguration, kvm: KVMSystem? = nil,
                            serialOutput: @escaping (UInt8) -> Void) throws -> Machine {
        // One admission, one machine: exactly the image and configuration that were admitted.
        let r = session.registration
        guard session.isFresh, session.holdsLease, ImageDigest.sha256(Data(image)) == r.imageSHA256,
              matches(configuration, r) else {
            throw SessionError.mismatch("this session admitted '\(r.name)' once, with its registered image and configuration; a machine must be exactly that, and only one")
        }
        return try make(session: session, image: image, configuration: configuration, kvm: kvm, serialOutput: serialOutput)
    }

    private static func make(session: GuestSession, image: [UInt8], configuration: MachineConfiguration, kvm: KVMSystem?,
                             serialOutput: @escaping (UInt8) -> Void) throws -> Machine {
        do {
            let machine = try Machine(image: image, configuration: configuration, kvm: kvm, serialOutput: serialOutput)
            try session.attachBooted(machine)
            return machine
        } catch {
            session.end()
            throw error
        }
    }

    /// Reserves the machine (memory, vCPUs, no state) of a guest arriving by migration, which
    /// `session` admitted (`GuestSession.admitIncoming`). Ends the session if it cannot be made.
    public static func reserveIncoming(session: GuestSession, configuration: MachineConfiguration, kvm: KVMSystem? = nil,
                                       serialOutput: @escaping (UInt8) -> Void) throws -> Machine {
        let r = session.registration
        guard session.isFresh, session.carried != nil, matches(configuration, r) else {
            throw SessionError.mismatch("this session admitted an incoming '\(r.name)' once, with its registered configuration; a machine must be exactly that, and only one")
        }
        do {
            let machine = try Machine(configuration: configuration, kvm: kvm, serialOutput: serialOutput)
            session.attachPending(machine)
            return machine
        } catch {
            session.end()
            throw error
        }
    }

    /// Reads a snapshot file: the identity it carries is admitted before memory is reserved, and
    /// the host signature is checked (a missing or foreign one is refused and audited). The
    /// returned session has not taken the lease yet: call `attachRestored` just before the guest
    /// runs, so that nothing that can still fail consumes an epoch or an authorisation.
    public static func restore(path: String, requestedMemory: UInt64?, store: BillboardStore, settings: BillboardSettings,
                               kvm: KVMSystem? = nil, log: @escaping @Sendable (String) -> Void,
                               serialOutput: @escaping (UInt8) -> Void) throws -> (Machine, GuestSession, SnapshotStats) {
        var session: GuestSession?
        do {
            let (machine, _, stats) = try SnapshotFile.read(path, kvm: kvm, requestedMemory: requestedMemory, admit: { description, fileSHA256 in
                let admitted = try GuestSession.admitRestore(store: store, description: description, snapshotSHA256: fileSHA256,
                                                             settings: settings, log: log)
                session = admitted
                return admitted
            }, verifySignature: { signature, digest in
                do {
                    guard let signature else {
                        throw BillboardRefusal.badSnapshotSignature(reason: "the snapshot carries no signature")
                    }
                    try store.stateSignatures.verify(signature, digest: digest)
                } catch {
                    store.stateSignatures.auditRefused(guest: session?.registration.name, reason: "\(path): \(error)")
                    throw error
                }
            }, serialOutput: serialOutput)
            guard let session else { throw SessionError.noIdentity("snapshot") }
            // Connected now, so that any failure before the lease ends the session with the machine.
            session.attachPending(machine)
            return (machine, session, stats)
        } catch {
            session?.end()
            throw error
        }
    }

    static func matches(_ c: MachineConfiguration, _ r: GuestRegistration) -> Bool {
        c.memorySize == r.memoryBytes && c.vcpuCount == r.vcpus && c.mode?.rawValue == r.mode
            && (c.commandLine.flatMap { $0.isEmpty ? nil : $0 }) == r.commandLine
    }

    /// Waits for one incoming migration: the hello's identity is admitted before memory is
    /// reserved, the stream's signature checked before READY, the lease taken on GO before the
    /// guest runs. Returns the running machine.
    public static func receive(listener: TCPListener, store: BillboardStore, settings: BillboardSettings,
                               dirtyTracker: DirtyTrackerKind, fault: InjectedFault? = nil, kvm: KVMSystem? = nil,
                               log: @escaping @Sendable (String) -> Void,
                               serialOutput: @escaping @Sendable (UInt8) -> Void) throws -> Machine {
        let (machine, _) = try IncomingMigration.receive(listener: listener, kvm: kvm, dirtyTracker: dirtyTracker, fault: fault,
            admit: { description in
                try GuestSession.admitIncoming(store: store, description: description, settings: settings, log: log)
            }, serialOutput: serialOutput)
        return machine
    }
}
