#if canImport(Glibc)
import Glibc
#endif
import Billboard
import Devices
import Foundation
import MachineCore
import Synchronization
import SystemCalls

/// Timing of the Billboard inside a VMM.
public struct BillboardSettings: Sendable, Equatable {
    /// Seconds between active scans.
    public var scanInterval: Double = 5
    /// Milliseconds between a guest's beacons (written into the beacon block).
    public var beaconIntervalMs: UInt32 = 1000
    /// Seconds after its last renewal before a dead holder's lease may be taken over.
    public var leaseTimeout: Double = 10
    /// Seconds without a beacon before a running guest that must beacon is stale.
    public var staleAfter: Double { max(3 * Double(beaconIntervalMs) / 1000, 2 * scanInterval) }
    /// Frames with another MAC or IP than registered that a guest's network card may send
    /// (each dropped and audited) before the guest is found false and stopped.
    public var spoofThreshold: Int = 8

    public init(scanInterval: Double = 5, beaconIntervalMs: UInt32 = 1000, leaseTimeout: Double = 10, spoofThreshold: Int = 8) {
        self.spoofThreshold = spoofThreshold
        self.scanInterval = scanInterval
        self.beaconIntervalMs = beaconIntervalMs
        self.leaseTimeout = leaseTimeout
    }
}

/// The Billboard's side of one admitted guest: its registration, its lease, its beacon token, its
/// instance record. It never sees the machine: `AdmittedGuest` owns both and tells the session
/// what happens (a beacon, the run state, a snapshot, a resume).
///
/// Every `vmm` command that creates a VM makes one of these first (`admitBoot`, `admitRestore`,
/// `admitIncoming`); the VM is created only after admission succeeded.
// @unchecked: the mutable fields live in `shared` (a Mutex); the store calls that must not
// interleave are serialised by `storeLock`.
public final class GuestSession: @unchecked Sendable {
    public let store: BillboardStore
    public let registration: GuestRegistration
    public let settings: BillboardSettings
    let log: @Sendable (String) -> Void

    private struct Shared {
        var epoch: Int64 = 0
        var token: UInt64 = 0
        var holdsLease = false
        var ended = false
        var latestBeacon: (BeaconMessage, Date)?
        var beaconsSinceFlush = 0
        var attached = false
        /// A running record that could not be written on GO; housekeeping retries it first.
        var pendingToken: UInt64?
        var snapshotSinceEpoch = false
        var reportedState: InstanceState?
        /// Post-copy: the guest runs before its beacon token could be read (its beacon block may
        /// be among the pages still to come); its beacons are not recorded until it is.
        var tokenUnknown = false
        /// The synced record of the hand-over about to happen (source: before the pause;
        /// destination: at admission), which lets its commit skip the sync.
        var handoverIntent: HandoverIntent?
    }
    private let shared = Mutex(Shared())
    /// The identity the state carried at admission (restore, incoming); nil for a boot.
    let carried: GuestIdentity?
    /// Incoming: the host (authenticated by the channel, or proven by the stream's signature)
    /// and process the guest comes from, the only holder whose lease may pass to this one.
    let source: (host: String, pid: Int32)?
    var carriedEpoch: Int64 { carried?.epoch ?? 0 }
    /// Serialises this session's store writes (housekeeping, hand-over, end), so that a periodic
    /// renewal or state update never interleaves with a hand-over or the end.
    private let storeLock = NSLock()
    /// The snapshot's SHA-256, for a restore whose rollback an administrator authorised.
    private let snapshotSHA256: (() throws -> String)?

    private init(store: BillboardStore, registration: GuestRegistration, settings: BillboardSettings,
                 carried: GuestIdentity?, source: (host: String, pid: Int32)? = nil, snapshotSHA256: (() throws -> String)? = nil,
                 log: @escaping @Sendable (String) -> Void) {
        self.store = store
        self.registration = registration
        self.settings = settings
        self.carried = carried
        self.source = source
        self.snapshotSHA256 = snapshotSHA256
        self.log = log
    }

    static func newToken() -> UInt64 {
        var token: UInt64 = 0
        while token == 0 { token = UInt64.random(in: .min ... .max) }
        return token
    }

    // MARK: - The three doors

    /// `vmm run`: admits the image and configuration, takes the lease and records this process,
    /// all before `KVM_CREATE_VM`.
    public static func admitBoot(store: BillboardStore, name: String?, image: [UInt8], configuration: MachineConfiguration,
                                 settings: BillboardSettings, log: @escaping @Sendable (String) -> Void) throws -> GuestSession {
        try store.ensureOriginal()
        let registration = try store.registry.admit(name: name, imageSHA256: ImageDigest.sha256(Data(image)),
                                           memoryBytes: configuration.memorySize, vcpus: configuration.vcpuCount,
                                           mode: configuration.mode?.rawValue, commandLine: configuration.commandLine,
                                           host: store.hostName)
        let session = GuestSession(store: store, registration: registration, settings: settings, carried: nil, log: log)
        try naming(registration) { try session.takeLease(minimumEpoch: 0) }
        do { try session.record(state: .running) } catch {
            try? store.leases.release(guestID: registration.id, pid: getpid())
            throw error
        }
        return session
    }

    /// `vmm restore`: admits the identity the snapshot carries (registration, image, configuration,
    /// epoch) before any memory is reserved. The lease is taken by `commit` once the whole file verified.
    public static func admitRestore(store: BillboardStore, header: StateHeader,
                                    snapshotSHA256: @escaping () throws -> String,
                                    settings: BillboardSettings, log: @escaping @Sendable (String) -> Void) throws -> GuestSession {
        try store.ensureOriginal()
        guard let identity = header.identity else { throw SessionError.noIdentity("snapshot") }
        let registration = try admitIdentity(store: store, identity: identity, description: header.description)
        // Hashed at most once, while the file being restored is open (admission), and reused when
        // the authorisation is used: the same bytes that are restored.
        let snapshotSHA256 = DigestOnce(snapshotSHA256).value
        // A running copy first (the plainer refusal when both apply), then the epoch.
        try naming(registration) {
            try store.leases.checkAvailable(guestID: registration.id, handedBy: nil, takeoverAfter: settings.leaseTimeout)
        }
        // An authorisation for a rollback is only looked at here; it is used once the file verified.
        try naming(registration) {
            try store.leases.checkEpoch(guestID: registration.id, epoch: identity.epoch, snapshotSHA256: snapshotSHA256, consume: false)
        }
        let session = GuestSession(store: store, registration: registration, settings: settings, carried: identity,
                                   snapshotSHA256: snapshotSHA256, log: log)
        // Recorded before the VM exists (as not yet owning it), so no scan mistakes this process for a ghost.
        try session.record(state: .incoming)
        return session
    }

    /// A migration destination: admits the identity in the hello before memory is reserved; the
    /// guest in flight may still hold its lease at the source. Takes the lease on GO (`commitIncoming`).
    ///
    /// The intent to take the lease from that source (for the connection of `challenge`) is
    /// synced here, outside the downtime, so that the take on GO need not be.
    public static func admitIncoming(store: BillboardStore, header: StateHeader, source: (host: String, pid: Int32),
                                     challenge: String = "", settings: BillboardSettings,
                                     log: @escaping @Sendable (String) -> Void) throws -> GuestSession {
        try store.ensureOriginal()
        guard let identity = header.identity else { throw SessionError.noIdentity("migration manifest") }
        guard sameBytes(identity.host, source.host) else {
            throw SessionError.mismatch("the guest's state says it was held by host '\(identity.host)' but it comes from '\(source.host)'")
        }
        let registration = try admitIdentity(store: store, identity: identity, description: header.description)
        try naming(registration) {
            try store.leases.checkEpoch(guestID: registration.id, epoch: identity.epoch)
            try store.leases.checkAvailable(guestID: registration.id, handedBy: source,
                                          takeoverAfter: settings.leaseTimeout)
        }
        let session = GuestSession(store: store, registration: registration, settings: settings, carried: identity,
                                   source: source, log: log)
        try session.record(state: .incoming)
        do {
            let intent = try store.handoverIntents.recordIncoming(guestID: registration.id, fromHost: source.host, fromPid: source.pid,
                                                                  epoch: identity.epoch, challenge: challenge)
            session.shared.withLock { $0.handoverIntent = intent }
        } catch {
            session.end()
            throw error
        }
        return session
    }

    static func admitIdentity(store: BillboardStore, identity: GuestIdentity, description: MachineDescription) throws -> GuestRegistration {
        try store.registry.admit(name: identity.name, imageSHA256: identity.imageSHA256, memoryBytes: description.memorySize,
                        vcpus: description.vcpuCount, mode: description.mode, commandLine: description.commandLine,
                        host: store.hostName)
    }

    // MARK: - Lease and record

    private func takeLease(minimumEpoch: Int64, handedBy: (host: String, pid: Int32)? = nil,
                           stateEpoch: Int64? = nil, rollbackAuthorized: Bool = false, intent: HandoverIntent? = nil) throws {
        let lease = try store.leases.acquire(guestID: registration.id, host: store.hostName, pid: getpid(),
                                           takeoverAfter: settings.leaseTimeout, minimumEpoch: minimumEpoch, handedBy: handedBy,
                                           stateEpoch: stateEpoch, rollbackAuthorized: rollbackAuthorized, intent: intent)
        shared.withLock { $0.epoch = lease.epoch; $0.holdsLease = true }
    }

    /// Runs `commit` with the session's hand-over intent, and once more without it (the synced
    /// way) if the store no longer has it as written: a missing intent costs a sync, nothing else.
    private func withIntent<T>(_ usable: (HandoverIntent) -> Bool, _ commit: (HandoverIntent?) throws -> T) throws -> T {
        let intent = shared.withLock { $0.handoverIntent.flatMap { usable($0) ? $0 : nil } }
        guard let intent else { return try commit(nil) }
        let result: T
        do { result = try commit(intent) } catch let refusal as BillboardRefusal {
            switch refusal {
            case .handoverIntentMissing, .recordTampered:
                log("billboard: the hand-over intent of '\(registration.name)' is not in the store as written (\(refusal)); committing the synced way")
                result = try commit(nil)
            default:
                // Not committed: the intent stays, for `abandonHandover` (or the end) to withdraw.
                throw refusal
            }
        }
        shared.withLock { $0.handoverIntent = nil }
        return result
    }

    private func record(state: InstanceState, token: UInt64 = newToken()) throws {
        shared.withLock { $0.token = token; $0.reportedState = state }
        try store.instances.record(registration, token: token, state: state)
    }

    /// The identity to put in a snapshot or a migration hello.
    public var identity: GuestIdentity {
        GuestIdentity(name: registration.name, id: registration.id.uuidString.lowercased(), imageSHA256: registration.imageSHA256,
                      epoch: shared.withLock { $0.epoch }, host: store.hostName, pid: getpid())
    }

    public var epoch: Int64 { shared.withLock { $0.epoch } }
    public var token: UInt64 { shared.withLock { $0.token } }
    /// Whether this process holds the guest's lease (only then may the guest run here).
    public var holdsLease: Bool { shared.withLock { $0.holdsLease } }

    /// Whether this session may still give a machine (admitted, not yet attached, not ended).
    var isFresh: Bool { shared.withLock { !$0.attached && !$0.ended } }

    /// Takes the session's one machine: true the first time, false once attached or ended.
    func claimMachine() -> Bool {
        shared.withLock { s in
            guard !s.attached && !s.ended else { return false }
            s.attached = true
            return true
        }
    }

    /// A snapshot of the guest was written at the current epoch.
    func noteSnapshot() { shared.withLock { $0.snapshotSinceEpoch = true } }

    /// The guest resumes: if a snapshot was taken since the epoch last moved, the running guest
    /// now leaves it behind, so the epoch moves on (restoring that snapshot later is a rollback).
    func resuming() {
        guard shared.withLock({ $0.snapshotSinceEpoch && $0.holdsLease }) else { return }
        storeLock.withLock {
            do {
                let epoch = try store.leases.advanceEpoch(guestID: registration.id)
                shared.withLock { $0.epoch = epoch; $0.snapshotSinceEpoch = false }
            } catch {
                log("billboard: could not move the epoch of '\(registration.name)' past its snapshot: \(error)")
            }
        }
    }

    // MARK: - The guest's life

    /// The beacon period written into a booted guest's beacon block.
    var beaconInterval: UInt32 { settings.beaconIntervalMs }

    /// A restored machine (fully verified): takes the lease (the epoch moves past the snapshot's)
    /// and records the boot token the guest's memory holds (`beaconToken`), which its beacons
    /// must carry.
    func takeRestoredLease(beaconToken: UInt64?) throws {
        try storeLock.withLock {
            try naming(registration) {
                let authorized = try store.leases.checkEpoch(guestID: registration.id, epoch: carriedEpoch,
                                                      snapshotSHA256: snapshotSHA256, consume: true)
                // The epoch is checked again inside the lease's own transaction (two restores racing).
                try takeLease(minimumEpoch: carriedEpoch + 1, stateEpoch: carriedEpoch, rollbackAuthorized: authorized)
            }
        }
        let token = beaconToken ?? Self.newToken()
        shared.withLock { $0.token = token; $0.reportedState = .paused }
        try store.instances.update(guestID: registration.id, state: .paused, token: token)
    }

    /// A beacon from the guest; true if it carries a token that is not this boot's (evidence a
    /// housekeeping round should record at once).
    func noteBeacon(_ message: BeaconMessage) -> Bool {
        shared.withLock { s in
            s.latestBeacon = (message, Date())
            s.beaconsSinceFlush += 1
            return !s.tokenUnknown && message.token != s.token
        }
    }

    // MARK: - Migration

    /// Destination, on GO: this process becomes the owner (next epoch); the guest's beacons
    /// must carry the boot token its memory holds.
    ///
    /// Only the lease is on the downtime path: `start` runs the guest as soon as it is held, and
    /// the record is updated after. The store lock is held across all three, so housekeeping
    /// cannot record a beacon against the record's old token in between.
    /// Returns when the lease was taken (CLOCK_MONOTONIC ms). The take consumes the intent
    /// synced at admission and is not synced itself (docs/migration.md, crash safety).
    @discardableResult
    ///
    /// `tokenLater` (post-copy): the guest's beacon token is learnt once its memory can be read
    /// (`learnBeaconToken`): reading the beacon block may wait for a page that is still to come,
    /// and neither the guest's start nor a recovery of its migration may wait for that. Until
    /// then no beacon is recorded, so none is judged false.
    func commitIncoming(beaconToken: UInt64?, tokenLater: Bool = false, start: () -> Void) throws -> Double {
        try storeLock.withLock {
            try naming(registration) {
                try withIntent({ $0.role == .incoming }) { intent in
                    try takeLease(minimumEpoch: carriedEpoch + 1, handedBy: source, intent: intent)
                }
            }
            let leaseTaken = monotonicMilliseconds()
            let token = beaconToken ?? Self.newToken()
            shared.withLock { $0.token = token; $0.reportedState = .running; $0.tokenUnknown = tokenLater }
            start()
            do { try store.instances.update(guestID: registration.id, state: .running, token: token) } catch {
                // The guest runs here now, whatever happens; housekeeping writes the record later.
                shared.withLock { $0.pendingToken = token }
                log("billboard: could not record '\(registration.name)' as running here yet: \(error)")
            }
            return leaseTaken
        }
    }

    /// The token the arrived guest's memory holds (nil: it has no beacon block); from now on its
    /// beacons must carry it.
    func learnBeaconToken(_ beaconToken: UInt64?) {
        let token = beaconToken ?? Self.newToken()
        storeLock.withLock {
            let state = shared.withLock { s -> InstanceState? in
                guard !s.ended, s.tokenUnknown else { return nil }
                s.token = token
                s.tokenUnknown = false
                return s.reportedState ?? .running
            }
            guard let state else { return }
            do { try store.instances.update(guestID: registration.id, state: state, token: token) } catch {
                shared.withLock { $0.pendingToken = token }
                log("billboard: could not record the beacon token of '\(registration.name)' yet: \(error)")
            }
        }
    }

    /// Destination: the state stream must be signed by the host the hello named as its source
    /// (this host, or a peer an administrator added).
    func verifyIncomingSignature(_ signature: StateSignature?, digest: [UInt8]) throws {
        do {
            guard let signature else { throw BillboardRefusal.badSnapshotSignature(reason: "the migration stream carries no signature") }
            let signer = try store.stateSignatures.verify(signature, digest: digest)
            guard let claimed = source?.host, sameBytes(signer, claimed) else {
                throw BillboardRefusal.badSnapshotSignature(reason: "the stream is signed by host '\(signer)' but claims to come from '\(source?.host ?? "?")'")
            }
        } catch {
            store.stateSignatures.auditRefused(guest: registration.name, reason: "incoming migration: \(error)")
            throw error
        }
    }

    /// Source, just before the pause: syncs the intent to hand the lease to `host`/`pid` (for the
    /// connection of `challenge`), so that `handOver` inside the pause need not wait for the disk.
    public func prepareHandover(toHost host: String, toPid pid: Int32, challenge: String) throws {
        try storeLock.withLock {
            let intent = try store.handoverIntents.prepareOutgoing(guestID: registration.id, toHost: host, toPid: pid, challenge: challenge)
            shared.withLock { $0.handoverIntent = intent }
        }
    }

    /// Source, the migration failed before GO: the prepared hand-over will not happen (the
    /// intent is withdrawn, synced).
    public func abandonHandover() {
        storeLock.withLock {
            guard let intent = shared.withLock({ s in defer { s.handoverIntent = nil }; return s.handoverIntent }) else { return }
            do { try store.handoverIntents.withdraw(intent) } catch {
                log("billboard: could not withdraw the hand-over intent of '\(registration.name)': \(error) (the next scan drops it)")
            }
        }
    }

    /// Source, just before GO: moves the lease to the destination in one transaction (not
    /// synced when the intent prepared before the pause covers it). If this throws, GO is not
    /// sent and the guest resumes here.
    public func handOver(toHost host: String, toPid pid: Int32) throws {
        let epoch = try storeLock.withLock {
            let epoch = try withIntent({ $0.role == .outgoing && sameBytes($0.peerHost, host) && $0.peerPid == pid }) { intent in
                try store.leases.handOver(guestID: registration.id, fromPid: getpid(), toHost: host, toPid: pid, intent: intent)
            }
            shared.withLock { $0.holdsLease = false; $0.reportedState = .migrated }
            return epoch
        }
        log("billboard: lease of '\(registration.name)' handed to pid \(pid) on \(host) at epoch \(epoch)")
    }

    /// Source, post-copy, after GO: this process now only serves the guest's pages to its
    /// destination (`awaitingRecovery` while the link is down). Recorded so that a scan neither
    /// takes it for a ghost nor expects it to run.
    func notePageServer(awaitingRecovery: Bool) {
        let state: InstanceState = awaitingRecovery ? .pageServerAwaitingRecovery : .pageServer
        storeLock.withLock {
            guard !shared.withLock({ $0.ended || $0.holdsLease }) else { return }
            shared.withLock { $0.reportedState = state }
            do { try store.instances.update(guestID: registration.id, state: state) } catch {
                log("billboard: could not record '\(registration.name)' as \(state.rawValue): \(error)")
            }
        }
    }

    /// Source, resuming after an in-doubt migration: only if the lease can be taken back (the
    /// destination is gone, or its claim expired). Audited as a takeover.
    public func reclaim() throws {
        try storeLock.withLock {
            try naming(registration) { try takeLease(minimumEpoch: 0) }
            try store.instances.update(guestID: registration.id, state: .running)
            shared.withLock { $0.reportedState = .running }
        }
    }

    // MARK: - Housekeeping

    /// One round of housekeeping, given the machine's run state: retries a pending record,
    /// records the latest beacon, renews the lease and reports running/paused. Returns the
    /// refusal when the lease is no longer ours (this copy must stop), nil otherwise.
    func housekeepingRound(machineState: RunState) -> BillboardRefusal? {
        // Under the store lock, a hand-over or the end cannot happen between reading the
        // flags and acting on them.
        storeLock.lock(); defer { storeLock.unlock() }
        if shared.withLock({ $0.ended }) { return nil }
        let (holds, beacon, received) = shared.withLock { s -> (Bool, (BeaconMessage, Date)?, Int) in
            let b = s.latestBeacon, n = s.beaconsSinceFlush
            s.latestBeacon = nil
            s.beaconsSinceFlush = 0
            return (s.holdsLease, b, n)
        }
        if let pending = shared.withLock({ $0.pendingToken }),
           (try? store.instances.update(guestID: registration.id, state: .running, token: pending)) != nil {
            shared.withLock { $0.pendingToken = nil }
        }
        if let (message, time) = beacon, shared.withLock({ $0.pendingToken == nil && !$0.tokenUnknown }) {
            do { try store.instances.recordBeacon(guestID: registration.id, token: message.token, counter: message.counter, received: received, at: time) } catch {
                log("billboard: cannot record a beacon: \(error)")
            }
        }
        if holds {
            do { try store.leases.renew(guestID: registration.id, pid: getpid()) } catch let refusal as BillboardRefusal {
                // Someone else owns the guest now: this copy must not run on.
                log("billboard: the lease of '\(registration.name)' is no longer ours (\(refusal)); stopping this copy")
                shared.withLock { $0.holdsLease = false }
                return refusal
            } catch {
                log("billboard: cannot renew the lease: \(error)")
            }
        }
        // Running or paused only: an incoming guest has no say yet, a handed-over one none any more.
        let state: InstanceState = machineState == .paused ? .paused : .running
        let changed = shared.withLock { s -> Bool in
            let noSay: [InstanceState?] = [.incoming, .migrated, .pageServer, .pageServerAwaitingRecovery]
            guard !noSay.contains(s.reportedState), s.reportedState != state else { return false }
            s.reportedState = state
            return true
        }
        if changed { try? store.instances.update(guestID: registration.id, state: state) }
        return nil
    }

    /// Whether the session has ended (housekeeping stops).
    var hasEnded: Bool { shared.withLock { $0.ended } }

    /// One active scan: the Billboard's judgement. Findings about other processes that must stop
    /// are acted on here; a finding about this very guest is returned as `evictSelf`, for the
    /// owner of the machine to act on.
    func scan() -> (findings: [ScanFinding], evictSelf: ScanFinding?) {
        let findings: [ScanFinding]
        do { findings = try store.scan.run(staleAfter: settings.staleAfter) } catch {
            log("billboard: scan failed: \(error)")
            return ([], nil)
        }
        for finding in findings where ![.unmanaged, .gone, .foreignStore].contains(finding.kind) {
            log("billboard: scan: \(finding)")
        }
        var evictSelf: ScanFinding?
        for finding in findings where finding.mustStop {
            if finding.pid == getpid() {
                // This process: only a finding about this session's own guest ends it (a library
                // process may hold several guests, each with its own session).
                guard finding.guest == nil || finding.guest == registration.name else { continue }
                try? store.scan.recordSelfEviction(finding)
                evictSelf = finding
            } else {
                do {
                    try FalseVMStopper(scan: store.scan).stop(finding)
                    log("billboard: stopped pid \(finding.pid) (\(finding.kind.rawValue))")
                } catch { log("billboard: cannot stop pid \(finding.pid): \(error)") }
            }
        }
        return (findings, evictSelf)
    }

    /// The guest is gone from this process: give the lease back (unless it was handed over or
    /// taken) and remove the record. Idempotent.
    public func end() {
        storeLock.lock(); defer { storeLock.unlock() }
        let (first, holds) = shared.withLock { s -> (Bool, Bool) in
            defer { s.ended = true; s.holdsLease = false }
            return (!s.ended, s.holdsLease)
        }
        guard first else { return }
        // One transaction: lease back and record "ended" (kept until the process is gone, since
        // its VM exists until then; the next scan removes it).
        // An incoming guest that never started gives back a lease the source handed to this
        // process before a GO that never came, so the guest is not stranded on a process that
        // runs nothing (the store releases it only if it is held in this process's name).
        do { try store.instances.end(guestID: registration.id, releaseLease: holds || source != nil) } catch {
            log("billboard: could not record the end of '\(registration.name)': \(error)")
        }
    }
}

/// Computes a digest once and remembers it (or its error).
// @unchecked: `result` is read and written only under `lock`.
final class DigestOnce: @unchecked Sendable {
    private let lock = NSLock()
    private var result: Result<String, any Error>?
    private let compute: () throws -> String
    init(_ compute: @escaping () throws -> String) { self.compute = compute }
    var value: () throws -> String {
        { [self] in
            try lock.withLock {
                if result == nil { result = Result { try compute() } }
                return try result!.get()
            }
        }
    }
}

/// A lease or epoch refusal with the guest's registered name in front (the store speaks of ids).
public struct GuestRefusal: Error, CustomStringConvertible {
    public let guest: String
    public let refusal: BillboardRefusal
    public var description: String { "'\(guest)': \(refusal)" }
}

/// Runs `body`, naming the guest in any refusal it throws.
func naming<T>(_ registration: GuestRegistration, _ body: () throws -> T) throws -> T {
    do { return try body() } catch let refusal as BillboardRefusal {
        throw GuestRefusal(guest: registration.name, refusal: refusal)
    }
}

/// Why a session cannot be made.
public enum SessionError: Error, CustomStringConvertible {
    case noIdentity(String)
    case mismatch(String)
    public var description: String {
        switch self {
        case let .noIdentity(what):
            "the \(what) carries no guest identity, so the Billboard cannot admit it; it was made by a VMM without a billboard. Boot the guest with `vmm run` on a registered image instead"
        case let .mismatch(what): what
        }
    }
}
