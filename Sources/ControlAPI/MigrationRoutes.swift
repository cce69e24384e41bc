import Foundation
import Hummingbird
import Migration
import VMM

/// `PUT /vm/migrate` and `GET /vm/migration`.
public enum MigrationRoutes {
    public static func add(_ router: Router<BasicRequestContext>, service: MigrationService) {
        router.put("/vm/migrate") { request, _ in
            let body = try await JSONReply.object(request)
            guard body["destination"] is String else {
                throw APIError(.badRequest, "give the destination as {\"destination\": \"HOST:PORT\"}")
            }
            let settings: MigrationSettings
            do {
                settings = try JSONDecoder().decode(MigrationSettings.self, from: JSONSerialization.data(withJSONObject: body))
            } catch {
                throw APIError(.badRequest, "bad migration settings: \(error); fields are destination, peer, transport (tls or plaintext), max_downtime_ms, max_bandwidth, auto_converge, timeout_s")
            }
            if settings.transport == .tls && settings.peer == nil {
                throw APIError(.badRequest, "name the enrolled host expected at the destination as \"peer\", or choose \"transport\": \"plaintext\"")
            }
            do { _ = try parseHostPort(settings.destination) } catch { throw APIError(.badRequest, "\(error)") }
            guard settings.maxDowntimeMs > 0, settings.timeoutSeconds > 0 else {
                throw APIError(.badRequest, "max_downtime_ms and timeout_s must be positive")
            }
            let wait = body["wait"] as? Bool ?? false
            let done = AsyncReport()
            do {
                try service.start(settings, completion: { report in done.set(report) })
            } catch {
                throw APIError(.conflict, "\(error)")
            }
            if wait {
                let report = await done.value()
                return JSONReply.make(report.outcome == .completed ? .ok : .conflict, try reportObject(report))
            }
            return JSONReply.make(.accepted, ["state": "migrating", "destination": settings.destination])
        }
        router.get("/vm/migration") { _, _ in
            let (progress, report) = service.status
            var object = try jsonObject(progress)
            if let report { object["last_report"] = try reportObject(report) }
            return JSONReply.make(.ok, object)
        }
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
