import Foundation
import Hummingbird
import Migration
import VMM

/// The handlers of `PUT /vm/migrate` and `GET /vm/migration`.
enum MigrationRoutes {
    /// Limits that keep every later conversion of the settings (to milliseconds, to integers) in range.
    static let maximumTimeoutSeconds = 86_400.0
    static let maximumDowntimeMs = 3_600_000.0

    static func migrate(_ fields: RequestFields, service: MigrationService) async throws -> Response {
        guard fields.object["destination"] != nil else {
            throw APIError(.badRequest, "give the destination as {\"destination\": \"HOST:PORT\"}")
        }
        if let conflict = MigrationSettings.convergenceConflict(convergence: fields.object["convergence"] as? String,
                                                                 autoConverge: fields.object["auto_converge"] as? Bool) {
            throw APIError(.badRequest, conflict)
        }
        if let mode = fields.object["convergence"], (mode as? String).flatMap(ConvergenceMode.init(rawValue:)) == nil {
            throw APIError(.badRequest, "\"convergence\" takes off, throttle or adaptive (the default), not \(mode)")
        }
        let settings = try fields.decode(MigrationSettings.self)
        struct Wait: Decodable { var wait: Bool? }
        let wait = try fields.decode(Wait.self).wait ?? false
        if settings.transport == .tls && settings.peer == nil {
            throw APIError(.badRequest, "name the enrolled host expected at the destination as \"peer\", or choose \"transport\": \"plaintext\"")
        }
        do { _ = try parseHostPort(settings.destination) } catch { throw APIError(.badRequest, "\(error)") }
        guard settings.maxDowntimeMs > 0, settings.maxDowntimeMs <= maximumDowntimeMs,
              settings.timeoutSeconds > 0, settings.timeoutSeconds <= maximumTimeoutSeconds else {
            throw APIError(.badRequest, "max_downtime_ms must be above 0 and at most \(Int(maximumDowntimeMs)), timeout_s above 0 and at most \(Int(maximumTimeoutSeconds))")
        }
        if let rounds = settings.postcopyAfterRounds, rounds < 0 || rounds > 1000 {
            throw APIError(.badRequest, "postcopy_after_rounds must be between 0 and 1000, or \"never\" (switch only on request or on stall)")
        }
        if settings.postcopyOnStall && !settings.postcopy {
            throw APIError(.badRequest, "postcopy_on_stall switches to post-copy, which the migration must allow: add \"postcopy\": true")
        }
        let done = AsyncReport()
        do {
            try service.start(settings, completion: { report in done.set(report) })
        } catch {
            throw APIError(.conflict, "\(error)")
        }
        if wait {
            let report = await done.value()
            var object = try reportObject(report)
            if settings.postcopy { object["warning"] = postcopyWarning }
            return JSONReply.make(report.outcome == .completed ? .ok : .conflict, object)
        }
        var object: [String: Any] = ["state": "migrating", "destination": settings.destination]
        if settings.postcopy { object["warning"] = postcopyWarning }
        return JSONReply.make(.accepted, object)
    }

    /// Said whenever post-copy is asked for (QEMU warns the same way).
    static let postcopyWarning = "post-copy: once the guest switches to the destination, neither side has all of it until the last page has moved; if the link fails then, the guest is lost (recovery is not implemented)"

    /// `PUT /vm/migration/postcopy`: the running post-copy migration switches as soon as it can.
    static func switchToPostCopy(_ service: MigrationService) throws -> Response {
        let progress: MigrationProgress
        do { progress = try service.requestPostCopySwitch() } catch let refusal as PostCopySwitchRefusal {
            throw APIError(.conflict, refusal.description)
        }
        var object = try jsonObject(progress)
        object["warning"] = postcopyWarning
        return JSONReply.make(.accepted, object)
    }

    static func status(_ service: MigrationService) throws -> Response {
        JSONReply.make(.ok, try statusObject(service))
    }

    /// The body of `GET /vm/migration`.
    static func statusObject(_ service: MigrationService) throws -> [String: Any] {
        let (progress, report) = service.status
        var object = try jsonObject(progress)
        if let report { object["last_report"] = try reportObject(report) }
        // On a destination: the migration that brought the guest here, and its announcement.
        if let incoming = service.incoming { object["incoming"] = try jsonObject(incoming) }
        return object
    }

    static func jsonObject<T: Encodable>(_ value: T) throws -> [String: Any] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return (try JSONSerialization.jsonObject(with: e.encode(value)) as? [String: Any]) ?? [:]
    }

    static func reportObject(_ report: MigrationReport) throws -> [String: Any] { try jsonObject(report) }
}

/// A report delivered from the migration thread to an async waiter.
// @unchecked: `report` and `waiter` are read and written only under `lock`.
final class AsyncReport: @unchecked Sendable {
    private let lock = NSLock()
    private var report: MigrationReport?
    private var waiter: CheckedContinuation<MigrationReport, Never>?

    func set(_ r: MigrationReport) {
        lock.lock()
        if let w = waiter { waiter = nil; lock.unlock(); w.resume(returning: r); return }
        report = r
        lock.unlock()
    }

    func value() async -> MigrationReport {
        await withCheckedContinuation { c in
            lock.lock()
            if let r = report { lock.unlock(); c.resume(returning: r); return }
            waiter = c
            lock.unlock()
        }
    }
}
