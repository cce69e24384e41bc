import Foundation
import Hummingbird
import Migration
import VMM

/// The handlers of `PUT /vm/migrate`, `GET /vm/migration`, `PUT /vm/migration/recover` and
/// `PUT /vm/migration/cancel`.
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
        if settings.resume && settings.transport != .tls {
            throw APIError(.badRequest, "a post-copy migration resumes over mutually authenticated TLS only: name the destination host as \"peer\"")
        }
        guard settings.maxDowntimeMs > 0, settings.maxDowntimeMs <= maximumDowntimeMs,
              settings.timeoutSeconds > 0, settings.timeoutSeconds <= maximumTimeoutSeconds else {
            throw APIError(.badRequest, "max_downtime_ms must be above 0 and at most \(Int(maximumDowntimeMs)), timeout_s above 0 and at most \(Int(maximumTimeoutSeconds))")
        }
        if let rounds = settings.postcopyAfterRounds, rounds < 0 || rounds > 1000 {
            throw APIError(.badRequest, "postcopy_after_rounds must be between 0 and 1000, or \"never\" (switch only on request or on stall)")
        }
        if !(1...maxMigrationChannels).contains(settings.channels) {
            throw APIError(.badRequest, "channels must be 1 to \(maxMigrationChannels) (connections that carry the pages; 1: on the main connection), not \(settings.channels)")
        }
        if settings.channels > 1 && (settings.postcopy || settings.resume) {
            throw APIError(.badRequest, "channels above 1 do not combine with postcopy or resume yet: give \"channels\": 1")
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
        var object: [String: Any] = ["state": settings.resume ? "resuming" : "migrating", "destination": settings.destination]
        if settings.postcopy { object["warning"] = postcopyWarning }
        return JSONReply.make(.accepted, object)
    }

    /// Said whenever post-copy is asked for (QEMU warns the same way).
    static let postcopyWarning = "post-copy: once the guest switches to the destination, neither side has all of it until the last page has moved. If the link fails then, both sides pause and keep what they have; recover with migrate-recover at the destination and migrate --resume here. If either VMM dies or is stopped before the last page moved (this one above all: it holds pages the destination lacks), the guest is lost"

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

    /// `PUT /vm/migration/recover`: the destination of a paused post-copy migration listens for
    /// its source's resume.
    static func recover(_ fields: RequestFields, guest: AdmittedGuest) async throws -> Response {
        struct Body: Decodable {
            var listen: String
            var timeoutSeconds: Double?
            enum CodingKeys: String, CodingKey { case listen; case timeoutSeconds = "timeout_s" }
        }
        guard fields.object["listen"] != nil else {
            throw APIError(.badRequest, "give the address to listen on for the source's resume as {\"listen\": \"HOST:PORT\"} (port 0 picks one)")
        }
        let body = try fields.decode(Body.self)
        do { _ = try parseHostPort(body.listen, allowAnyPort: true) } catch { throw APIError(.badRequest, "\(error)") }
        let timeout = body.timeoutSeconds ?? 600
        guard timeout > 0, timeout <= maximumTimeoutSeconds else {
            throw APIError(.badRequest, "timeout_s must be above 0 and at most \(Int(maximumTimeoutSeconds))")
        }
        let address: String
        do { address = try await offPool { try guest.recoverIncomingMigration(listen: body.listen, timeoutSeconds: timeout) } } catch {
            throw APIError(.conflict, "\(error)")
        }
        return JSONReply.make(.accepted, ["state": "listening", "listen": address])
    }

    /// `PUT /vm/migration/cancel`: aborts an outgoing migration that has not committed, or gives
    /// up a paused incoming post-copy migration (its guest is then lost).
    static func cancel(_ service: MigrationService, guest: AdmittedGuest) async throws -> Response {
        if let incoming = guest.incomingPostCopy, incoming.status.phase == .postcopyPaused {
            let phase: IncomingPostCopyStatus.Phase
            do {
                phase = try await offPool { try guest.giveUpIncomingMigration(reason: "given up by the operator (PUT /vm/migration/cancel)") }
            } catch {
                throw APIError(.conflict, "\(error)")
            }
            return JSONReply.make(.ok, ["state": phase.rawValue])
        }
        if service.cancel(reason: "cancelled through the API (PUT /vm/migration/cancel)") {
            return JSONReply.make(.ok, ["state": "cancelling"])
        }
        if service.servesPostCopyPages {
            throw APIError(.conflict, "the destination runs this guest with pages only this copy has; cancelling here would lose it. If the link failed, recover it; if the destination is gone the guest is lost anyway: stop this VMM (PUT /vm/shutdown)")
        }
        if let incoming = guest.incomingPostCopy, incoming.status.phase == .postcopy {
            throw APIError(.conflict, "the incoming post-copy migration is bringing this guest's last pages; only a paused one (its link failed) can be given up")
        }
        throw APIError(.conflict, "no migration to cancel: an outgoing one can be cancelled before it commits, an incoming post-copy one once it is paused")
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
