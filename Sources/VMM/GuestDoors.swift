import Billboard
import Devices
import Foundation
import KVM
import MachineCore
import Migration
import NetworkFrames
import PageFaults
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
    ///
    /// `tap`: the host tap interface of a network card (`vmm run --net tap=NAME`); the card's MAC
    /// is the registration's, and a guest registered without one is refused a card.
    public static func boot(image: [UInt8], name: String?, configuration: MachineConfiguration, tap: String? = nil,
                            store: BillboardStore, settings: BillboardSettings, kvm: KVMSystem? = nil,
                            log: @escaping @Sendable (String) -> Void,
                            serialOutput: @escaping (UInt8) -> Void) throws -> AdmittedGuest {
        let session = try GuestSession.admitBoot(store: store, name: name, image: image, configuration: configuration,
                                                 settings: settings, log: log)
        var configuration = configuration
        do {
            if let tap { configuration.network = try session.networkConfiguration(tap: tap) }
            guard networkMatches(configuration.network, session.registration) else {
                throw NetworkRefusal(description: "guest '\(session.registration.name)' may have a network card only with its registered MAC (\(session.registration.mac ?? "none registered"))")
            }
        } catch {
            session.end()
            throw error
        }
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
            let machine = try Machine(image: image, configuration: configuration, kvm: kvm, serialOutput: serialOutput)
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
            let machine = try Machine(configuration: configuration, kvm: kvm, serialOutput: serialOutput)
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
    ///
    /// `lazy` (sealed files only): the same checks of the header, the index, the vcpu and devices
    /// blocks and the signature happen before anything runs, but memory is not read: it is
    /// registered with a userfaultfd and each chunk is read, checked and decrypted on its first
    /// fault, while a filler brings in the rest (see docs/lazy-restore.md). A chunk that fails its
    /// check is never installed: the machine ends with a fatal exit naming it.
    ///
    /// `tap`: this host's tap for the guest's network card (`vmm restore --net tap=NAME`),
    /// needed exactly when the saved guest had a card; its MAC is the one the file carries,
    /// which must be the registration's.
    public static func restore(path: String, requestedMemory: UInt64?, tap: String? = nil, store: BillboardStore, settings: BillboardSettings,
                               lazy: Bool = false, kvm: KVMSystem? = nil, log: @escaping @Sendable (String) -> Void,
                               serialOutput: @escaping (UInt8) -> Void) throws -> (AdmittedGuest, SnapshotStats) {
        try restore(path: path, requestedMemory: requestedMemory, tap: tap, store: store, settings: settings, lazy: lazy, fillLazily: true,
                    kvm: kvm, log: log, serialOutput: serialOutput)
    }

    /// `fillLazily: false` (tests): no background filler, so pages arrive only on fault and the
    /// guest, not the filler, is the first to meet an edited chunk.
    static func restore(path: String, requestedMemory: UInt64?, tap: String? = nil, store: BillboardStore, settings: BillboardSettings,
                        lazy: Bool, fillLazily: Bool, kvm: KVMSystem? = nil, log: @escaping @Sendable (String) -> Void,
                        serialOutput: @escaping (UInt8) -> Void) throws -> (AdmittedGuest, SnapshotStats) {
        let file: SnapshotFile.Opened
        do {
            file = try SnapshotFile.Opened(path: path, unwrap: SnapshotFile.unwrapper(for: store))
        } catch let error as SealedFileError {
            store.stateSignatures.auditRefused(guest: nil, reason: "\(path): \(error)")
            throw error
        }
        let description = file.header.description
        if lazy && !file.isSealed {
            throw MachineError.io("--lazy needs a sealed snapshot; '\(path)' is unsealed (version 1), which has no index to find a page by: restore it without --lazy")
        }
        if let requestedMemory, requestedMemory != description.memorySize {
            throw SnapshotError.memoryMismatch(snapshot: description.memorySize, requested: requestedMemory)
        }
        // Admission: before any memory is reserved.
        let session = try GuestSession.admitRestore(store: store, header: file.header, snapshotSHA256: file.sha256,
                                                    settings: settings, log: log)
        do {
            guard session.claimMachine() else { throw oneMachineOnly(session) }
            var configuration = description.configuration
            configuration.network = try arrivingNetwork(description, tap: tap, session: session)
            let machine = try Machine(configuration: configuration, kvm: kvm, serialOutput: serialOutput)
            func verifySignature(_ body: StateBody) throws {
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
            }
            if lazy {
                let (body, source) = try file.lazyBody(memorySize: description.memorySize)
                try verifySignature(body)
                let state = try MachineStateCodec.decode(body, description: description)
                // Registered before anything touches the memory; the server keeps the file open.
                let server = try FaultServer(memory: machine.memory, source: source) { [weak machine] failure in
                    store.stateSignatures.auditRefused(guest: session.registration.name, reason: "\(path): \(failure)")
                    machine?.end(with: .fatal(reason: "lazy restore of '\(path)' stopped: \(failure)", details: ""))
                }
                let guest = AdmittedGuest(machine: machine, session: session, carriedDescription: description, lazyMemory: server)
                try machine.restoreState(state)
                server.start(fill: fillLazily)
                return (guest, file.lazyStats())
            }
            let guest = AdmittedGuest(machine: machine, session: session, carriedDescription: description)
            let body = try file.readBody(into: machine.memory)
            try verifySignature(body)
            try machine.restoreState(try MachineStateCodec.decode(body, description: description))
            return (guest, file.stats(body))
        } catch {
            session.end()
            throw error
        }
    }

    /// The network card of a guest restored or arriving here: the MAC its description carries,
    /// which must be its registration's, on this host's `tap`. A guest that had a card needs a
    /// tap here; one that had none cannot be given one.
    static func arrivingNetwork(_ description: MachineDescription, tap: String?, session: GuestSession) throws -> NetworkConfiguration? {
        let name = session.registration.name
        switch (description.networkMAC, tap) {
        case (nil, nil):
            return nil
        case (nil, _?):
            throw NetworkRefusal(description: "guest '\(name)' had no network card; --net cannot give it one here")
        case (_?, nil):
            throw NetworkRefusal(description: "guest '\(name)' has a network card; name this host's tap for it with --net tap=NAME")
        case let (carried?, tap?):
            let network = try session.networkConfiguration(tap: tap)
            guard network.mac == carried else {
                throw NetworkRefusal(description: "guest '\(name)' carries the MAC \(carried.map { String(format: "%02x", $0) }.joined(separator: ":")), not its registered \(session.registration.mac ?? "none")")
            }
            return network
        }
    }

    static func matches(_ c: MachineConfiguration, _ r: GuestRegistration) -> Bool {
        c.memorySize == r.memoryBytes && c.vcpuCount == r.vcpus && sameBytes(c.mode?.rawValue, r.mode)
            && sameBytes(c.commandLine.flatMap { $0.isEmpty ? nil : $0 }, r.commandLine)
            && networkMatches(c.network, r)
    }

    /// A network card only for a guest registered with a MAC, and only with that MAC.
    static func networkMatches(_ network: NetworkConfiguration?, _ r: GuestRegistration) -> Bool {
        guard let network else { return true }
        return r.network?.mac.bytes == network.mac
    }

    /// Waits for one incoming migration, connection after connection, until one completes or
    /// `deadline` (monotonic ms) passes: a failed, refused or hostile connection is logged and
    /// the next one awaited, one reservation at a time. On each, the challenge goes out first,
    /// the manifest must answer it and name this host (and, on TLS, come from the host the
    /// channel authenticated); the guest's identity is admitted before memory is reserved; the
    /// state is verified (by the channel, or by the source host's signature in plaintext) before
    /// READY; the lease is taken on GO before the guest runs. Returns the running guest; after a
    /// post-copy switch that is at once, while its missing pages go on arriving
    /// (`AdmittedGuest.incomingPostCopy`), and paused while the link is down until
    /// recovered or given up (`postcopyRecoverTimeout`: seconds before it gives up by itself).
    public static func receive(listener: any MigrationListener, deadline: Double?, store: BillboardStore, settings: BillboardSettings,
                               dirtyTracker: DirtyTrackerKind, tap: String? = nil, kvm: KVMSystem? = nil,
                               manifestTimeoutSeconds: Double = 10, announce: AnnounceSchedule = .qemuDefault,
                               postcopyRecoverTimeout: Double? = nil, postcopyLiveness: PostCopyLiveness = .standard,
                               wrapTransport: @escaping (any MigrationTransport) -> any MigrationTransport = { $0 },
                               log: @escaping @Sendable (String) -> Void,
                               serialOutput: @escaping @Sendable (UInt8) -> Void) throws -> AdmittedGuest {
        let receiver = MigrationReceiver<AdmittedGuest>(hostName: store.hostName) { manifest, authenticated in
            let header = try StateHeader.decode(Array(manifest.machine), what: "machine description in the manifest")
            // On TLS the channel named the source; in plaintext its claim stands until the
            // stream's signature (checked before READY) proves it.
            let source = (host: authenticated ?? manifest.sourceHost, pid: manifest.sourcePid)
            // The Billboard's admission runs here, before any memory is reserved.
            let session = try GuestSession.admitIncoming(store: store, header: header, source: source, challenge: manifest.challenge,
                                                         settings: settings, log: log)
            var configuration = header.description.configuration
            configuration.dirtyTracker = dirtyTracker
            do { configuration.network = try arrivingNetwork(header.description, tap: tap, session: session) } catch {
                session.end()
                throw error
            }
            let guest = try reserveIncoming(session: session, configuration: configuration, description: header.description,
                                            kvm: kvm, serialOutput: serialOutput)
            guest.setAnnounceSchedule(announce)
            return guest
        }
        let postcopyOptions = PostCopyIncoming.Options(liveness: postcopyLiveness, recoverTimeoutSeconds: postcopyRecoverTimeout, log: log)
        while true {
            let transport = wrapTransport(try listener.nextConnection(deadline: deadline, onRefused: { log("refused a connection: \($0)") }))
            // Post-copy keeps the connection for the pages still to come.
            var handedOn = false
            defer { if !handedOn { transport.close() } }
            // A peer that does not send its manifest in time loses the connection; the
            // receiver goes back to listening.
            let watchdog = ManifestWatchdog(transport: transport, seconds: manifestTimeoutSeconds)
            do {
                // A post-copy page channel is the next connection bound to this migration.
                let acceptPageChannel = {
                    try listener.nextConnection(deadline: monotonicMilliseconds() + manifestTimeoutSeconds * 1000,
                                                onRefused: { log("refused a connection: \($0)") })
                }
                let (guest, result) = try receiver.run(transport: transport, onManifest: watchdog.disarm,
                                                       acceptPageChannel: acceptPageChannel, postcopyOptions: postcopyOptions)
                watchdog.disarm()
                handedOn = result.incoming != nil
                // Post-copy goes on: `arrivalReport` reads its state from the guest's migration.
                guest.recordArrival(ArrivalReport(source: result.sourceHost, outcome: .running,
                                                  resumedAtMs: result.resumedAt, pagesReceived: result.pages,
                                                  zeroPages: result.zeroPages, bytesReceived: result.bytes))
                if let p = result.phases {
                    log(String(format: "migration: arrived; state applied and READY sent in %.2f ms, lease taken %.2f ms after GO, vCPUs running %.2f ms after", p.apply, p.lease, p.start))
                }
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
