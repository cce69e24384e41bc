import Foundation
import KVM
import MachineCore
import Migration
import Snapshot
import Synchronization
import SystemCalls

/// Runs at most one outgoing migration of a guest at a time, in the background,
/// and remembers the last outcome for the API.
public final class MigrationService: Sendable {
    public let guest: AdmittedGuest
    /// Where each migration's JSON report goes (nil: not written).
    public let reportDirectory: String?
    private struct Shared {
        var sender: PreCopySender?
        var lastReport: MigrationReport?
        var lastProgress = MigrationProgress()
        /// A resume of a paused post-copy migration is under way.
        var resuming = false
    }
    private let shared = Mutex<Shared>(Shared())

    public init(guest: AdmittedGuest, reportDirectory: String?) {
        self.guest = guest
        self.reportDirectory = reportDirectory
    }

    public enum StartError: Error, CustomStringConvertible {
        case busy, notRunning(String), inDoubt, servingPages, nothingToResume(String), pagesArriving
        public var description: String {
            switch self {
            case .busy: "a migration is already in progress"
            case .servingPages: "this guest went to its destination by post-copy and this copy only serves its pages (paused for good); resume that migration with \"resume\": true if its link failed"
            case let .nothingToResume(phase): "there is no paused post-copy migration to resume (the last migration is \(phase))"
            case .pagesArriving: "pages of this guest are still arriving by post-copy; it can migrate on once they are all in"
            case .inDoubt: "the last migration is in doubt (the destination may run this guest): resolve it first, by resuming here with force only if the destination does not run it"
            case let .notRunning(s): "the VM is \(s); only a running or paused VM can migrate"
            }
        }
    }

    /// Starts migrating; returns at once. On success the machine ends with `.migrated`.
    /// Starts migrating over the transport the settings name (TLS to the named enrolled peer,
    /// or plain TCP); returns at once. On success the machine ends with `.migrated`.
    public func start(_ settings: MigrationSettings, completion: @escaping @Sendable (MigrationReport) -> Void = { _ in }) throws {
        let guest = self.guest
        try start(settings, connect: { try guest.connect(settings) }, completion: completion)
    }

    public func start(_ settings: MigrationSettings, connect: @escaping @Sendable () throws -> any MigrationTransport,
                      completion: @escaping @Sendable (MigrationReport) -> Void = { _ in }) throws {
        if settings.resume { return try resume(settings, connect: connect, completion: completion) }
        let state = guest.state
        guard state == .running || state == .paused else { throw StartError.notRunning(state.rawValue) }
        guard !inDoubt else { throw StartError.inDoubt }
        guard !guest.awaitsPostCopyPages else { throw StartError.pagesArriving }
        let sender = PreCopySender(vm: guest, settings: settings)
        try shared.withLock { s in
            if let current = s.sender, [.postcopy, .postcopyPaused].contains(current.progress.phase) { throw StartError.servingPages }
            if let current = s.sender, ![.completed, .failed, .inDoubt].contains(current.progress.phase) { throw StartError.busy }
            s.sender = sender
        }
        startOSThread(name: "migration") { [self] in
            // A lazily restored guest's missing pages would read as absent (not resident): all in first.
            try? guest.awaitCompleteMemory()
            let report = sender.run(connect: connect)
            shared.withLock { $0.lastReport = report; $0.lastProgress = sender.progress }
            writeReport(report)
            completion(report)
            if report.outcome == .completed { guest.end(with: .migrated) }
        }
    }

    /// Resumes the paused post-copy migration over the connection `connect` opens (to where its
    /// destination listens after `migration/recover`); returns at once.
    private func resume(_ settings: MigrationSettings, connect: @escaping @Sendable () throws -> any MigrationTransport,
                        completion: @escaping @Sendable (MigrationReport) -> Void) throws {
        let sender = try shared.withLock { s -> PreCopySender in
            guard let current = s.sender, current.progress.phase == .postcopyPaused else {
                throw StartError.nothingToResume((s.sender?.progress ?? s.lastProgress).phase.rawValue)
            }
            guard !s.resuming else { throw StartError.busy }
            s.resuming = true
            return current
        }
        let guest = self.guest
        startOSThread(name: "migration-resume") { [self] in
            let report = sender.resumePostCopy(settings: settings, connect: connect)
            shared.withLock { $0.lastReport = report; $0.lastProgress = sender.progress; $0.resuming = false }
            writeReport(report)
            completion(report)
            if report.outcome == .completed { guest.end(with: .migrated) }
        }
    }

    /// Asks the running post-copy migration to switch now (`PUT /vm/migration/postcopy`); returns
    /// its progress once the request is recorded. Throws `PostCopySwitchRefusal`.
    public func requestPostCopySwitch() throws -> MigrationProgress {
        guard let sender = shared.withLock({ $0.sender }),
              ![.completed, .failed, .inDoubt].contains(sender.progress.phase) else {
            throw PostCopySwitchRefusal.noMigration
        }
        try sender.requestPostCopySwitch()
        return sender.progress
    }

    /// Aborts a migration that has not sent GO (signals, shutdown); false if there is none.
    @discardableResult
    public func cancel(reason: String) -> Bool {
        guard let sender = shared.withLock({ $0.sender }),
              [.none, .setup, .precopy, .stopAndCopy, .handover].contains(sender.progress.phase) else { return false }
        return sender.cancel(reason: reason)
    }

    /// Whether this copy, after a post-copy switch, only serves the guest's pages to its destination.
    public var servesPostCopyPages: Bool { [.postcopy, .postcopyPaused].contains(status.progress.phase) }

    /// Current progress, or the last migration's final state.
    public var status: (progress: MigrationProgress, report: MigrationReport?) {
        shared.withLock { s in (s.sender?.progress ?? s.lastProgress, s.lastReport) }
    }

    /// Whether the last migration ended after GO without confirmation.
    public var inDoubt: Bool { status.progress.phase == .inDoubt }

    private func writeReport(_ report: MigrationReport) {
        guard let dir = reportDirectory else { return }
        _ = Self.writeReport(report, named: "migration", in: dir)
    }

    /// The destination's report of the incoming migration that brought this guest, with its
    /// announcement as it stands (nil: the guest did not arrive by migration).
    public var incoming: ArrivalReport? { guest.arrivalReport }

    /// The destination's side, once `guest` arrived by migration: on a thread of its own, waits
    /// until the announcement has finished (its last round is 800 ms after the resume with
    /// QEMU's schedule; the control API shows it meanwhile), logs when the rounds went out, then
    /// writes the arrival report as `DIR/incoming-<ms since 1970>.json` and logs where.
    /// `completion` gets the path (nil: not written, or no arrival).
    public static func reportArrival(of guest: AdmittedGuest, in dir: String, log: @escaping @Sendable (String) -> Void,
                                     completion: @escaping @Sendable (String?) -> Void = { _ in }) {
        startOSThread(name: "arrival-report") {
            if let announcer = guest.arrivalAnnouncer {
                _ = announcer.waitUntilFinished(timeout: 600)
                let a = announcer.report
                log("network: announced '\(guest.name)' at \(a.sentMs.map { String(Int($0)) }.joined(separator: ", ")) ms after it resumed"
                    + " (\(a.framesSent) frames\(a.errors > 0 ? ", \(a.errors) refused by the tap: \(a.lastError ?? "")" : ""))")
            }
            guard let report = guest.arrivalReport else { return completion(nil) }
            let path = writeReport(report, named: "incoming", in: dir)
            log(path.map { "migration: arrival report written to \($0)" } ?? "migration: warning: the arrival report could not be written to \(dir)")
            completion(path)
        }
    }

    /// Writes `report` as `DIR/NAME-<ms since 1970>.json` (pretty, sorted keys), replacing by
    /// rename; the path, or nil when it could not be written. Best effort: a report that cannot
    /// be written does not fail the migration.
    @discardableResult
    public static func writeReport(_ report: some Encodable, named name: String, in dir: String) -> String? {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        guard let data = try? e.encode(report) else { return nil }
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let path = dir + "/\(name)-\(Int(Date().timeIntervalSince1970 * 1000)).json"
        do { try AtomicFileWriter.write([UInt8](data), to: path, what: "migration report") } catch { return nil }
        return path
    }
}
