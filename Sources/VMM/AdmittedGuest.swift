#if canImport(Glibc)
import Glibc
#endif
import Billboard
import Devices
import Foundation
import GuestMemory
import MachineCore
import Migration
import NetworkFrames
import PageFaults
import Snapshot
import Synchronization
import SystemCalls

/// A guest the Billboard admitted, with the one machine it runs in. It owns both, in one
/// direction: the machine never learns of the session. It reacts to the machine's events
/// (beacons, run state) and does what the Billboard asks of a running guest: renew the lease,
/// record beacons, scan for false VMs, move the epoch past a snapshot when the guest resumes,
/// and stop the machine from outside when this copy may no longer run (eviction).
///
/// Only `GuestDoors` makes one, so every `vmm` command's machine has been admitted.
public final class AdmittedGuest: Sendable {
    /// Internal: outside this module the machine is reached only through the guest, so nothing
    /// can start or resume it around the lease.
    let machine: Machine
    public let session: GuestSession
    /// The description the state came with (restore, migration): the machine the saved vCPUs
    /// ran on (its TSC rate, above all), which may differ from this host's defaults.
    let carriedDescription: MachineDescription?
    /// The egress filter of the guest's network card, from its registration; nil for a guest
    /// registered without a MAC (which may have no card).
    public let egressPolicy: EgressPolicy?
    /// A lazy restore's fault server, which fills the machine's memory while the guest runs.
    let lazyMemory: FaultServer?

    private struct Shared {
        /// Wakes housekeeping early: a beacon with a foreign token is evidence to record at once.
        var urgent = false
        /// Whether the last `pauseForMigration` paused a running guest (only then may a failed
        /// migration resume it).
        var pausedByMigration = false
        /// Runs at the start of every periodic scan; tests make a scan slow with it, to show
        /// that lease renewal and beacons do not wait for the scan.
        var beforePeriodicScan: (@Sendable () -> Void)?
        /// Where frames for the host's network go (the tap's writer, throwing when the tap
        /// refuses one), once the card's backend is up.
        var hostFrameSink: (@Sendable ([UInt8]) throws -> Void)?
        /// How a guest arriving by migration announces itself once it runs here.
        var announceSchedule = AnnounceSchedule.qemuDefault
        /// The last announcement started (after an arrival, or by an owner).
        var announcer: Announcer?
        /// The announcement of the arrival by migration: one that was started, or the report of
        /// one that sent nothing (off, or no host side).
        var arrivalAnnouncer: Announcer?
        var unsentAnnounce: AnnounceReport?
        /// When the machine was started after an incoming migration (monotonic ms).
        var arrivedAt: Double?
        /// What the incoming migration brought (its `announce` is filled in when read).
        var arrival: ArrivalReport?
        /// A post-copy migration that fills the memory of a guest that arrived before all its
        /// pages did.
        var postCopyIncoming: PostCopyIncoming?
        /// Its link failed: the guest is paused for it (housekeeping reports it paused, even
        /// while a vCPU still sleeps on a missing page).
        var postCopyPaused = false
        /// Whether that pause paused a running guest (only then does a recovery resume it).
        var pausedByPostCopy = false
    }
    private let shared = Mutex(Shared())
    private let wakeup = NSCondition()

    /// Connects `session` to its freshly made `machine` and starts housekeeping. From here on
    /// whatever fails ends the session with the machine.
    init(machine: Machine, session: GuestSession, carriedDescription: MachineDescription? = nil, lazyMemory: FaultServer? = nil) {
        self.machine = machine
        self.session = session
        self.carriedDescription = carriedDescription
        let registration = session.registration
        egressPolicy = registration.network.map { network in
            EgressPolicy(guest: registration.name, mac: network.mac, ip: network.ip, threshold: session.settings.spoofThreshold,
                         scan: session.store.scan, log: session.log) { [weak machine] finding in
                guard let machine else { return }
                // Off the vCPU thread that sent the frame (a pause waits for every vCPU to park).
                // As the false-VM stopper: frozen first, the evidence recorded, then ended.
                startOSThread(name: "spoof-stop") {
                    machine.pause()
                    session.log("billboard: \(finding)")
                    do { try session.store.scan.recordSelfEviction(finding) } catch {
                        session.log("billboard: could not record the stop of '\(registration.name)': \(error)")
                    }
                    machine.end(with: .stoppedByOwner(reason: AdmittedGuest.evictionText(finding.description)))
                }
            }
        }
        self.lazyMemory = lazyMemory
        // Every frame the guest sends passes the Billboard's egress policy (its registered MAC
        // and IP) before it reaches the tap; a refused frame is dropped and counted as evidence.
        machine.onTransmit { [weak self] frame in self?.admitEgress(frame) ?? false }
        machine.onBeacon { [weak self] message in
            guard let self, session.noteBeacon(message) else { return }
            wakeup.lock(); shared.withLock { $0.urgent = true }; wakeup.signal(); wakeup.unlock()
        }
        // A weak reference taken again each round: a guest dropped without `end()` stops
        // renewing its lease (and `deinit` gives the lease back).
        startOSThread(name: "billboard") { [weak self] in
            while let guest = self, guest.housekeepingRound() {}
        }
        // The scan on a thread of its own: it reads /proc and files other processes chose, and
        // however long that takes, the lease is renewed and beacons recorded on time.
        let settings = session.settings
        startOSThread(name: "billboard-scan") { [weak self] in
            var nextScan = Date().addingTimeInterval(settings.scanInterval)
            while let guest = self, guest.scanRound(nextScan: &nextScan) {}
        }
        // The host's own frames (the announcement after a migration) go out through the card's tap.
        if let card = machine.network {
            connectHostNetwork { frame in try card.writeHostFrame(frame) }
        }
    }

    /// Tests only: runs `body` at the start of every periodic scan (see `Shared.beforePeriodicScan`).
    func beforePeriodicScan(_ body: @escaping @Sendable () -> Void) {
        shared.withLock { $0.beforePeriodicScan = body }
    }

    deinit {
        lazyMemory?.stop()
        session.end()
    }

    /// The guest's registered name.
    public var name: String { session.registration.name }

    // MARK: - Running

    /// Starts the guest, if it holds its lease; a guest without its lease never runs: the
    /// machine ends at once, stopped by the Billboard.
    public func start() {
        guard session.holdsLease else { return refuseToRun() }
        machine.start()
    }

    /// Starts the guest's vCPUs parked (a restored guest waiting for resume), if it holds its lease.
    public func startPaused() {
        guard session.holdsLease else { return refuseToRun() }
        machine.startPaused()
    }

    private func refuseToRun() {
        machine.end(with: .stoppedByOwner(reason: Self.evictionText("this guest does not hold its billboard lease, so it may not run here")))
    }

    /// Resumes a paused guest, if it holds its lease (after a hand-over it must `reclaim()`
    /// first). A guest that runs on after a snapshot leaves that snapshot behind: its epoch
    /// moves on first.
    public func resume() throws {
        guard session.holdsLease else {
            throw GuestRefusal(guest: name, refusal: .leaseNotHeld(guestID: session.registration.id, pid: getpid()))
        }
        session.resuming()
        machine.resume()
    }

    // The machine, as the owner's callers (the API, the CLI, tests) may see and stop it.
    public var state: RunState { machine.state }
    public var configuration: MachineConfiguration { machine.configuration }
    public var tscKHz: UInt32 { machine.tscKHz }
    public var startedAt: Double? { machine.startedAt }
    public var exitResult: MachineExit? { machine.exitResult }
    @discardableResult public func pause() -> Bool { machine.pause() }
    public func requestStop(signal: Int32 = 0) { machine.requestStop(signal: signal) }
    public func end(with exit: MachineExit) { machine.end(with: exit) }
    public func waitForExit() -> MachineExit { machine.waitForExit() }
    public func waitForExit(timeout: Double) -> MachineExit? { machine.waitForExit(timeout: timeout) }
    public func memoryDigest() throws -> String { try machine.memoryDigest() }

    /// Stops this copy from outside: it lost its lease or was found false.
    public func evict(reason: String) {
        machine.pause()
        machine.end(with: .stoppedByOwner(reason: Self.evictionText(reason)))
    }

    static func evictionText(_ reason: String) -> String { "stopped by the billboard: \(reason)" }

    /// The guest is gone from this process: the lease goes back (unless handed over) and the
    /// record says so. Idempotent.
    public func end() {
        shared.withLock { $0.announcer }?.cancel()
        // The machine has ended (or was told to): a vCPU still asleep on a missing page wakes and leaves.
        lazyMemory?.stop()
        shared.withLock { $0.postCopyIncoming }?.guestEnded()
        session.end()
    }

    // MARK: - Network

    /// Whether a frame the guest's network card sent may leave for the host's network: only
    /// frames from its registered MAC and IP (`EgressPolicy.admit`). A guest registered without
    /// a MAC sends nothing. The device calls this for every transmitted frame.
    public func admitEgress(_ frame: [UInt8]) -> Bool {
        egressPolicy?.admit(frame) ?? false
    }

    /// Connects the host side of the guest's network card: `sink` writes one frame to the
    /// host's network (the tap), and throws if it is refused. The announcement after a
    /// migration goes through it.
    public func connectHostNetwork(_ sink: @escaping @Sendable ([UInt8]) throws -> Void) {
        shared.withLock { $0.hostFrameSink = sink }
    }

    /// How this guest announces itself after it arrives by migration (`vmm receive --announce-*`).
    func setAnnounceSchedule(_ schedule: AnnounceSchedule) {
        shared.withLock { $0.announceSchedule = schedule }
    }

    /// Starts announcing the guest's MAC (RARP) and registered IP (gratuitous ARP) on
    /// `schedule` through `sink`, times counted from `resumedAt` (monotonic ms); nil when the
    /// guest has no network card, no registered MAC, or the schedule has no rounds.
    @discardableResult
    public func startAnnouncing(_ schedule: AnnounceSchedule, resumedAt: Double = monotonicMilliseconds(),
                                sink: @escaping @Sendable ([UInt8]) throws -> Void) -> Announcer? {
        guard machine.configuration.network != nil, let policy = egressPolicy, schedule.rounds > 0 else { return nil }
        let announcer = Announcer(schedule: schedule, mac: policy.mac, ip: policy.ip, sink: sink)
        let previous = shared.withLock { s in defer { s.announcer = announcer }; return s.announcer }
        previous?.cancel()
        announcer.start(resumedAt: resumedAt)
        return announcer
    }

    /// The last announcement started here (after an arrival, or by `startAnnouncing`), if any.
    public var announcer: Announcer? { shared.withLock { $0.announcer } }

    /// The announcement that followed this guest's arrival by migration, if one was started.
    public var arrivalAnnouncer: Announcer? { shared.withLock { $0.arrivalAnnouncer } }

    /// The destination resumed the guest at `resumedAt`: announce it, if it has a network card
    /// (the first round before this returns). An announcement that sends nothing (off, or no
    /// host side) is recorded as such for the reports.
    func announceArrival(resumedAt: Double) {
        guard machine.configuration.network != nil, let policy = egressPolicy else { return }
        let (schedule, sink) = shared.withLock { ($0.announceSchedule, $0.hostFrameSink) }
        let framesPerRound = Announcement.round(mac: policy.mac, ip: policy.ip).count
        guard schedule.rounds > 0 else {
            shared.withLock { $0.unsentAnnounce = AnnounceReport(unsent: .off, schedule: schedule, framesPerRound: framesPerRound) }
            return session.log("network: '\(name)' was not announced (the announcement is off): switches learn its new port only when it sends")
        }
        guard let sink else {
            shared.withLock { $0.unsentAnnounce = AnnounceReport(unsent: .notConnected, schedule: schedule, framesPerRound: framesPerRound) }
            return session.log("network: '\(name)' has a network card but no host network is connected; it was not announced")
        }
        let announcer = startAnnouncing(schedule, resumedAt: resumedAt, sink: sink)
        shared.withLock { $0.arrivalAnnouncer = announcer }
    }

    /// The announcement after this guest's arrival by migration, as it stands: nil when it
    /// has no network card or did not arrive by migration.
    public var arrivalAnnounce: AnnounceReport? {
        let (announcer, unsent) = shared.withLock { ($0.arrivalAnnouncer, $0.unsentAnnounce) }
        return announcer?.report ?? unsent
    }

    /// The destination's report of the incoming migration that brought this guest, with its
    /// announcement as it stands now; nil for a guest that did not arrive by migration.
    public var arrivalReport: ArrivalReport? {
        guard var report = shared.withLock({ $0.arrival }) else { return nil }
        report.announce = arrivalAnnounce
        if let incoming = incomingPostCopy {
            // Post-copy goes on after the guest arrived: where it stands now.
            let status = incoming.status
            report.postcopyState = status
            report.postcopy = incoming.figures
            if status.phase == .lost {
                report.outcome = .lost
                report.error = status.error
            }
        }
        return report
    }

    /// Keeps what the incoming migration brought, for `arrivalReport`.
    func recordArrival(_ report: ArrivalReport) {
        shared.withLock { $0.arrival = report }
    }

    /// When the machine was started after an incoming migration.
    var arrivedAt: Double? { shared.withLock { $0.arrivedAt } }

    func noteArrival(at resumedAt: Double) { shared.withLock { $0.arrivedAt = resumedAt } }

    // MARK: - Lazy restore

    /// A lazy restore's figures (faults, latency, time to the last page); nil for an eager one.
    public var lazyRestoreStats: FaultStats? { lazyMemory?.stats }

    /// A post-copy arrival's figures (faults, latency, time to the last page); nil otherwise.
    public var postCopyStats: FaultStats? { shared.withLock { $0.postCopyIncoming }?.server.stats }

    /// The post-copy migration that brought this guest here, while it goes on and after.
    public var incomingPostCopy: PostCopyIncoming? { shared.withLock { $0.postCopyIncoming } }

    /// Whether pages of this guest are still to arrive by post-copy (its memory cannot be read
    /// whole yet: a snapshot, a digest or an onward migration would wait for them).
    public var awaitsPostCopyPages: Bool {
        guard let incoming = incomingPostCopy else { return false }
        return !incoming.server.isFinished
    }

    /// Post-copy: the migration filling this guest's memory (it ends when the guest ends).
    func attachPostCopyIncoming(_ incoming: PostCopyIncoming) { shared.withLock { $0.postCopyIncoming = incoming } }

    /// Post-copy, the link failed: asks the vCPUs to park at their next exit, without kicking or
    /// waiting for one asleep on a missing page (`Machine.requestPause`).
    func pauseForPostCopy() {
        let running = machine.state != .paused
        shared.withLock { $0.postCopyPaused = true; $0.pausedByPostCopy = running }
        machine.requestPause()
    }

    /// Post-copy, recovered: resumes the guest if the failure paused it.
    func resumeAfterPostCopy() {
        let mine = shared.withLock { s in defer { s.postCopyPaused = false; s.pausedByPostCopy = false }; return s.pausedByPostCopy }
        if mine { machine.resume() }
    }

    /// Listens at `listen` (mutually authenticated TLS with this host's identity) for the source's
    /// resume of this guest's paused post-copy migration; returns the address it listens on.
    public func recoverIncomingMigration(listen: String, timeoutSeconds: Double) throws -> String {
        guard let incoming = incomingPostCopy else {
            throw PostCopyIncoming.Refusal(description: "this guest did not arrive by post-copy; there is no migration to recover")
        }
        let store = session.store
        return try incoming.recover(timeoutSeconds: timeoutSeconds) {
            try GuestDoors.listen(listen, store: store, plaintext: false)
        }
    }

    /// Gives up this guest's paused post-copy migration: the guest is lost (its source is gone),
    /// unless every page had arrived before the link failed (then it completes). Returns which.
    @discardableResult
    public func giveUpIncomingMigration(reason: String) throws -> IncomingPostCopyStatus.Phase {
        guard let incoming = incomingPostCopy else {
            throw PostCopyIncoming.Refusal(description: "this guest did not arrive by post-copy; there is no incoming migration to give up")
        }
        return try incoming.giveUp(reason: reason)
    }

    /// Waits until a lazy restore has brought in every page (snapshots and migration read memory
    /// by what is resident, so a page still missing would read as absent); throws if it failed.
    public func awaitCompleteMemory() throws {
        if let postCopy = shared.withLock({ $0.postCopyIncoming })?.server {
            _ = postCopy.waitUntilFinished(timeout: 365 * 86_400)
            if let failure = postCopy.failure { throw MachineError.io("post-copy migration failed: \(failure)") }
        }
        guard let lazyMemory else { return }
        _ = lazyMemory.waitUntilFinished(timeout: 365 * 86_400)
        if let failure = lazyMemory.failure { throw MachineError.io("lazy restore failed: \(failure)") }
    }

    // MARK: - Snapshots and restore

    /// The header (machine section, migration hello) for this guest's state.
    public var stateHeader: StateHeader {
        StateHeader(description: machine.machineDescription, identity: session.identity)
    }

    /// Writes the paused guest to `path`, signed by this host's key: an edited snapshot, even
    /// with recomputed checksums, is refused. Sealed (the default), the file is encrypted for
    /// this host and the guest's allowed hosts that are enrolled peers; `sealed: false` writes
    /// the guest in clear, for debugging.
    public func snapshot(to path: String, sealed: Bool = true) throws -> SnapshotStats {
        let store = session.store
        var sealing = SnapshotSealing.unsealed
        var warnings: [String] = []
        if sealed {
            let recipients = try store.stateSealing.recipients(for: session.registration)
            warnings = recipients.warnings
            for warning in warnings { session.log("snapshot: \(warning)") }
            sealing = .sealed(writer: store.hostName, hosts: recipients.hosts)
        } else {
            warnings = ["the snapshot is unsealed: anyone who can read '\(path)' can read the guest's memory"]
        }
        try awaitCompleteMemory()
        session.noteSnapshot()
        var stats = try SnapshotFile.write(machine, header: stateHeader, to: path, sealing: sealing) { digest in
            try StateJSON.encode(try store.stateSignatures.sign(digest: digest))
        }
        stats.warnings = warnings.isEmpty ? nil : warnings
        return stats
    }

    /// A restored guest, fully verified: takes the lease (the epoch moves past the snapshot's,
    /// an authorised rollback is used) just before it runs, so that nothing that can still fail
    /// consumes either.
    public func takeRestoredLease() throws {
        // Lazily restored, reading the beacon block may fault in its chunk: one that fails its
        // check stops the guest here, before the lease is taken and before it ever runs.
        let token = try machine.beaconToken()
        if let failure = lazyMemory?.failure { throw MachineError.io("lazy restore refused before the guest ran: \(failure)") }
        try session.takeRestoredLease(beaconToken: token)
    }

    /// Source, resuming after an in-doubt migration: only if the lease can be taken back.
    public func reclaim() throws { try session.reclaim() }

    // MARK: - Housekeeping

    /// One round of housekeeping (at most a second, less when a beacon is urgent); false when
    /// the guest has ended and housekeeping stops.
    private func housekeepingRound() -> Bool {
        let settings = session.settings
        let tick = min(1.0, settings.leaseTimeout / 3)
        wakeup.lock()
        if !shared.withLock({ $0.urgent }) { _ = wakeup.wait(until: Date().addingTimeInterval(tick)) }
        shared.withLock { $0.urgent = false }
        wakeup.unlock()
        if session.hasEnded || machine.state == .finished { return false }
        // Paused for a failed post-copy link, the guest counts as paused (not silent) even while
        // a vCPU still sleeps on a missing page.
        let state = shared.withLock { $0.postCopyPaused } ? .paused : machine.state
        if let refusal = session.housekeepingRound(machineState: state) {
            evict(reason: "\(refusal)")
            return false
        }
        return true
    }

    /// Waits at most a second (so a dropped guest is let go soon), and scans when `nextScan`
    /// has come; false when the guest has ended.
    private func scanRound(nextScan: inout Date) -> Bool {
        let wait = min(1.0, nextScan.timeIntervalSinceNow)
        if wait > 0 { usleep(useconds_t(wait * 1_000_000)) }
        if session.hasEnded || machine.state == .finished { return false }
        if Date() >= nextScan {
            shared.withLock { $0.beforePeriodicScan }?()
            runScan()
            // From the scan's end: a scan slower than the interval is not run back to back.
            nextScan = Date().addingTimeInterval(session.settings.scanInterval)
        }
        return true
    }

    /// One active scan: stops false and duplicate VMs (this one too, if it is the false one).
    @discardableResult
    public func runScan() -> [ScanFinding] {
        let (findings, evictSelf) = session.scan()
        if let evictSelf { evict(reason: evictSelf.description) }
        return findings
    }

    // MARK: - Migration (source)

    /// Pauses for the stop-and-copy phase; false if the guest has already stopped.
    public func pauseForMigration() -> Bool {
        let wasRunning = machine.state == .running
        let paused = machine.pause()
        shared.withLock { $0.pausedByMigration = paused && wasRunning }
        return paused
    }

    /// Resumes only a guest the migration paused (a guest the user had paused stays paused).
    public func resumeAfterMigration() {
        let mine = shared.withLock { s in defer { s.pausedByMigration = false }; return s.pausedByMigration }
        // As any resume: the epoch moves past a snapshot taken meanwhile.
        if mine { try? resume() }
    }
}
