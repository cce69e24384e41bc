import Billboard
import Devices
import Foundation
import KVM
import MachineCore
import Migration
import Snapshot
import Synchronization
import SystemCalls

/// The three ways a guest comes to run in a VMM process (boot, restore, incoming migration),
/// each admitted by the Billboard before `KVM_CREATE_VM`. The `vmm` commands and the
/// benchmarks use these and nothing else to get a machine: each door returns an
/// `AdmittedGuest`, which owns the machine.
public enum GuestDoors {
    /// Admits `image` with `configuration`, then creates and loads the machine, with its beacon
    /// block written. The lease is held from admission on.
    public static func boot(image: [UInt8], name: String?, configuration: MachineConfiguration, store: BillboardStore,
                            settings: BillboardSettings, kvm: KVMSystem? = nil, log: @escaping @Sendable (String) -> Void,
                            serialOutput: @escaping (UInt8) -> Void) throws -> AdmittedGuest {
        let session = try GuestSession.admitBoot(store: store, name: name, image: image, configuration: configuration,
                                                 settings: settings, log: log)
        // Admitted just now for these very bytes: no need to check them again.
        return try make(session: session, image: image, configuration: configuration, kvm: kvm, serialOutput: serialOutput)
    }

    /// Creates and loads the machine of a guest `session` admitted (`GuestSession.admitBoot`);
    /// for callers that time admission apart. Ends the session if the machine cannot be made.
    public static func boot(session: GuestSession, image: [UInt8], configuration: MachineConfiguration, kvm: KVMSystem? = nil,
                            serialOutput: @escaping (UInt8) -> Void) throws -> AdmittedGuest {
        // One admission, one machine: exactly the image and configuration that were admitted.
        let r = session.registration
        guard session.isFresh, session.holdsLease, sameBytes(ImageDigest.sha256(Data(image)), r.imageSHA256),
              matches(configuration, r) else {
            throw SessionError.mismatch("this session admitted '\(r.name)' once, with its registered image and configuration; a machine must be exactly that, and only one")
        }
        return try make(session: session, image: image, configuration: configuration, kvm: kvm, serialOutput: serialOutput)
    }

    private static func make(session: GuestSession, image: [UInt8], configuration: MachineConfiguration, kvm: KVMSystem?,
                             serialOutput: @escaping (UInt8) -> Void) throws -> AdmittedGuest {
        do {
            guard session.claimMachine() else { throw oneMachineOnly(session) }
            let machine = try Machine(image: image, configuration: withMAC(configuration, session), kvm: kvm, serialOutput: serialOutput)
            try machine.writeBeaconBlock(BeaconBlock(token: session.token, intervalMs: session.beaconInterval, tscKHz: machine.tscKHz))
            return AdmittedGuest(machine: machine, session: session)
        } catch {
            session.end()
            throw error
        }
    }

    private static func oneMachineOnly(_ session: GuestSession) -> SessionError {
        .mismatch("this session admitted '\(session.registration.name)' once; it gives one machine only")
    }

    /// Reserves the machine (memory, vCPUs, no state) of a guest arriving by migration, which
    /// `session` admitted (`GuestSession.admitIncoming`). Ends the session if it cannot be made.
    public static func reserveIncoming(session: GuestSession, configuration: MachineConfiguration,
                                       description: MachineDescription? = nil, kvm: KVMSystem? = nil,
                                       serialOutput: @escaping (UInt8) -> Void) throws -> AdmittedGuest {
        let r = session.registration
        do {
            guard session.isFresh, session.carried != nil, matches(configuration, r) else {
                throw SessionError.mismatch("this session admitted an incoming '\(r.name)' once, with its registered configuration; a machine must be exactly that, and only one")
            }
            guard session.claimMachine() else { throw oneMachineOnly(session) }
            let machine = try Machine(configuration: withMAC(configuration, session), kvm: kvm, serialOutput: serialOutput)
            return AdmittedGuest(machine: machine, session: session, carriedDescription: description)
        } catch {
            session.end()
            throw error
        }
    }

    /// Restores a snapshot file in steps: the header is read and the identity it carries
    /// admitted before memory is reserved; the body is read into the reserved machine; the host
    /// signature is checked (a missing or foreign one is refused and audited) before any state
    /// is applied. The guest has not taken its lease yet: call `takeRestoredLease` just before
    /// it runs, so that nothing that can still fail consumes an epoch or an authorisation.
    public static func restore(path: String, requestedMemory: UInt64?, network: NetworkConfiguration? = nil,
                               store: BillboardStore, settings: BillboardSettings,
                               kvm: KVMSystem? = nil, log: @escaping @Sendable (String) -> Void,
                               serialOutput: @escaping (UInt8) -> Void) throws -> (AdmittedGuest, SnapshotStats) {
        let file: SnapshotFile.Opened
        do {
            file = try SnapshotFile.Opened(path: path, unwrap: SnapshotFile.unwrapper(for: store))
        } catch let error as SealedFileError {
            store.stateSignatures.auditRefused(guest: nil, reason: "\(path): \(error)")
            throw error
        }
        let description = file.header.description
        if let requestedMemory, requestedMemory != description.memorySize {
            throw SnapshotError.memoryMismatch(snapshot: description.memorySize, requested: requestedMemory)
        }
        // Admission: before any memory is reserved.
        let session = try GuestSession.admitRestore(store: store, header: file.header, snapshotSHA256: file.sha256,
                                                    settings: settings, log: log)
        do {
            guard session.claimMachine() else { throw oneMachineOnly(session) }
            var configuration = description.configuration
            configuration.network = network
            let machine = try Machine(configuration: withMAC(configuration, session), kvm: kvm, serialOutput: serialOutput)
            let guest = AdmittedGuest(machine: machine, session: session, carriedDescription: description)
            let body = try file.readBody(into: machine.memory)
            do {
                guard let signature = body.signature else {
                    throw BillboardRefusal.badSnapshotSignature(reason: "the snapshot carries no signature")
                }
                try store.stateSignatures.verify(try StateJSON.decode(StateSignature.self, from: signature, what: "signature section"),
                                      digest: body.signedDigest)
            } catch {
                store.stateSignatures.auditRefused(guest: session.registration.name, reason: "\(path): \(error)")
                throw error
            }
            try machine.restoreState(try MachineStateCodec.decode(body, description: description))
            return (guest, file.stats(body))
        } catch {
            session.end()
            throw error
        }
    }

    /// `configuration` with its network card's MAC filled in where none was given: derived from
    /// the admitted guest's name, so every door and every host gives a guest the same MAC.
    static func withMAC(_ configuration: MachineConfiguration, _ session: GuestSession) -> MachineConfiguration {
        var c = configuration
        if var network = c.network, network.mac == nil {
            network.mac = NetworkConfiguration.derivedMAC(guestName: session.registration.name)
            c.network = network
        }
        return c
    }

    static func matches(_ c: MachineConfiguration, _ r: GuestRegistration) -> Bool {
        c.memorySize == r.memoryBytes && c.vcpuCount == r.vcpus && sameBytes(c.mode?.rawValue, r.mode)
            && sameBytes(c.commandLine.flatMap { $0.isEmpty ? nil : $0 }, r.commandLine)
    }

    /// Waits for one incoming migration, connection after connection, until one completes or
    /// `deadline` (monotonic ms) passes: a failed, refused or hostile connection is logged and
    /// the next one awaited, one reservation at a time. On each, the challenge goes out first,
    /// the manifest must answer it and name this host (and, on TLS, come from the host the
    /// channel authenticated); the guest's identity is admitted before memory is reserved; the
    /// state is verified (by the channel, or by the source host's signature in plaintext) before
    /// READY; the lease is taken on GO before the guest runs. Returns the running guest.
    public static func receive(listener: any MigrationListener, deadline: Double?, store: BillboardStore, settings: BillboardSettings,
                               dirtyTracker: DirtyTrackerKind, network: NetworkConfiguration? = nil, kvm: KVMSystem? = nil,
                               manifestTimeoutSeconds: Double = 10,
                               wrapTransport: @escaping (any MigrationTransport) -> any MigrationTransport = { $0 },
                               log: @escaping @Sendable (String) -> Void,
                               serialOutput: @escaping @Sendable (UInt8) -> Void) throws -> AdmittedGuest {
        let receiver = MigrationReceiver<AdmittedGuest>(hostName: store.hostName) { manifest, authenticated in
            let header = try StateHeader.decode(Array(manifest.machine), what: "machine description in the manifest")
            // On TLS the channel named the source; in plaintext its claim stands until the
            // stream's signature (checked before READY) proves it.
            let source = (host: authenticated ?? manifest.sourceHost, pid: manifest.sourcePid)
            // The Billboard's admission runs here, before any memory is reserved.
            let session = try GuestSession.admitIncoming(store: store, header: header, source: source, settings: settings, log: log)
            var configuration = header.description.configuration
            configuration.dirtyTracker = dirtyTracker
            configuration.network = network
            return try reserveIncoming(session: session, configuration: configuration, description: header.description,
                                       kvm: kvm, serialOutput: serialOutput)
        }
        while true {
            let transport = wrapTransport(try listener.nextConnection(deadline: deadline, onRefused: { log("refused a connection: \($0)") }))
            defer { transport.close() }
            // A peer that does not send its manifest in time loses the connection; the
            // receiver goes back to listening.
            let watchdog = ManifestWatchdog(transport: transport, seconds: manifestTimeoutSeconds)
            do {
                let (guest, _) = try receiver.run(transport: transport, onManifest: watchdog.disarm)
                watchdog.disarm()
                return guest
            } catch {
                watchdog.disarm()
                log("an incoming migration from \(transport.authenticatedPeer ?? transport.peer) failed: \(error); still listening")
            }
        }
    }
}

/// Closes a connection whose manifest has not arrived within its time.
final class ManifestWatchdog: Sendable {
    private let armed = Mutex(true)

    init(transport: any MigrationTransport, seconds: Double) {
        startOSThread(name: "manifest-watchdog") { [self] in
            let deadline = monotonicMilliseconds() + seconds * 1000
            while monotonicMilliseconds() < deadline {
                usleep(50_000)
                if !isArmed { return }
            }
            if isArmed { transport.close() }
        }
    }

    private var isArmed: Bool { armed.withLock { $0 } }

    /// The manifest arrived (or the connection ended): never close.
    @Sendable func disarm() { armed.withLock { $0 = false } }
}
