#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Hummingbird
import Logging
import NIOCore
import MachineCore
import VMM
import SystemCalls

/// An error answered as JSON `{"error": message}` with an HTTP status.
public struct APIError: Error, CustomStringConvertible {
    public var status: HTTPResponse.Status
    public var message: String
    /// Extra response headers (`Allow` on a 405).
    public var headers: HTTPFields
    public init(_ status: HTTPResponse.Status, _ message: String, headers: HTTPFields = [:]) {
        self.status = status; self.message = message; self.headers = headers
    }
    public var description: String { message }
}

/// What the API acts on: the admitted guest (its machine and Billboard session) and the
/// process around it.
public protocol VMControlling: AnyObject, Sendable {
    var guest: AdmittedGuest { get }
    /// Behind `PUT /vm/migrate` and `GET /vm/migration`.
    var migrations: MigrationService { get }
    /// The only directory `PUT /vm/snapshot` may write to; nil refuses API snapshots.
    var snapshotDirectory: SnapshotDirectory? { get }
    /// Refuses a resume that could make a second running copy (a migration in doubt).
    func beforeResume(force: Bool) throws
}

/// Every route the control API serves. The router is built from this table, requests for other
/// paths and methods are refused from it, and a test holds docs/api.yaml to it.
public enum ControlRoute: CaseIterable, Sendable {
    case info, scan, pause, resume, snapshot, digest, shutdown, migrate, migration, postcopySwitch, migrationRecover, migrationCancel

    public var method: HTTPRequest.Method {
        switch self {
        case .info, .digest, .migration: .get
        case .scan, .pause, .resume, .snapshot, .shutdown, .migrate, .postcopySwitch, .migrationRecover, .migrationCancel: .put
        }
    }

    public var path: String {
        switch self {
        case .info: "/vm"
        case .scan: "/vm/scan"
        case .pause: "/vm/pause"
        case .resume: "/vm/resume"
        case .snapshot: "/vm/snapshot"
        case .digest: "/vm/digest"
        case .shutdown: "/vm/shutdown"
        case .migrate: "/vm/migrate"
        case .migration: "/vm/migration"
        case .postcopySwitch: "/vm/migration/postcopy"
        case .migrationRecover: "/vm/migration/recover"
        case .migrationCancel: "/vm/migration/cancel"
        }
    }

    /// The fields its JSON body may have; a body with any other field is refused, so that a
    /// misspelt option is not silently ignored.
    public var bodyFields: Set<String> {
        switch self {
        case .resume: ["force"]
        case .snapshot: ["path", "unsealed"]
        case .migrate: ["destination", "peer", "transport", "max_downtime_ms", "max_bandwidth", "auto_converge", "convergence", "timeout_s", "postcopy", "postcopy_after_rounds", "postcopy_on_stall", "resume", "channels", "wait"]
        case .migrationRecover: ["listen", "timeout_s"]
        case .info, .scan, .pause, .digest, .shutdown, .migration, .postcopySwitch, .migrationCancel: []
        }
    }

    /// Largest request body accepted, on any route: a snapshot path is at most PATH_MAX (4 KiB).
    public static let maximumBodyBytes = 64 << 10
}

/// The basic request context plus the connection, so that a request refused for its size can
/// end the connection instead of leaving the server to drain a body nobody wants.
public struct ControlRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: any Channel
    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// Refuses, before any handler runs or any body is buffered beyond the limit, what no route
/// takes: unknown paths (404), methods a path does not serve (405), bodies over the limit (413).
struct RouteGate: RouterMiddleware {
    func handle(_ request: Request, context: ControlRequestContext, next: (Request, ControlRequestContext) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        let methods = ControlRoute.allCases.filter { $0.path == path }.map(\.method)
        guard !methods.isEmpty else {
            throw APIError(.notFound, "no such endpoint: \(request.method) \(path); docs/api.yaml lists the API")
        }
        guard methods.contains(request.method) else {
            let allowed = methods.map(\.rawValue).joined(separator: ", ")
            throw APIError(.methodNotAllowed, "\(path) does not take \(request.method); use \(allowed)",
                           headers: [.allow: allowed])
        }
        let limit = ControlRoute.maximumBodyBytes
        if let length = request.headers[.contentLength].flatMap({ Int($0) }), length > limit {
            return Self.tooLarge(limit, closing: context.channel)
        }
        // Bodies without a length (chunked) are buffered only up to the limit.
        var request = request
        do { _ = try await request.collectBody(upTo: limit) } catch is NIOTooManyBytesError {
            return Self.tooLarge(limit, closing: context.channel)
        }
        return try await next(request, context)
    }

    /// A 413 that ends the connection once written: otherwise the server would go on reading (and
    /// dropping) whatever the client sends, however much that is.
    static func tooLarge(_ limit: Int, closing channel: any Channel) -> Response {
        let body = ByteBuffer(bytes: ((try? JSONSerialization.data(withJSONObject: [
            "error": "the request body is larger than \(limit) bytes; no request needs that much"])) ?? Data()) + Data("\n".utf8))
        return Response(status: .contentTooLarge, headers: [.contentType: "application/json", .connection: "close"],
                        body: ResponseBody(contentLength: body.readableBytes) { writer in
                            try await writer.write(body)
                            try await writer.finish(nil)
                            // Queued on the event loop after the write it follows.
                            channel.eventLoop.execute { channel.close(promise: nil) }
                        })
    }
}

/// Turns every error into a JSON body with the right status.
struct JSONErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let e as APIError {
            return JSONReply.make(e.status, ["error": e.message], headers: e.headers)
        } catch let e as HTTPError {
            return JSONReply.make(e.status, ["error": e.body ?? "\(e.status)"])
        } catch {
            return JSONReply.make(.internalServerError, ["error": "\(error)"])
        }
    }
}

/// JSON responses.
public enum JSONReply {
    public static func make(_ status: HTTPResponse.Status, _ object: Any, headers: HTTPFields = [:]) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        var fields = headers
        fields[.contentType] = "application/json"
        return Response(status: status, headers: fields,
                        body: ResponseBody(byteBuffer: ByteBuffer(bytes: data + Data("\n".utf8))))
    }
}

/// A request's JSON body: empty, or an object with only its route's fields and no nulls.
struct RequestFields {
    let data: Data
    let object: [String: Any]

    init(_ request: Request, route: ControlRoute) async throws {
        // RouteGate has already buffered the body within the limit.
        let buffer = try await request.body.collect(upTo: ControlRoute.maximumBodyBytes)
        data = Data(buffer: buffer)
        if data.allSatisfy({ [0x20, 0x09, 0x0a, 0x0d].contains($0) }) { object = [:]; return }
        guard let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw APIError(.badRequest, "the request body is not a JSON object\(Self.expected(route))")
        }
        if let unknown = object.keys.sorted().first(where: { !route.bodyFields.contains($0) }) {
            throw APIError(.badRequest, "unknown field '\(unknown)'\(Self.expected(route))")
        }
        if let null = object.keys.sorted().first(where: { object[$0] is NSNull }) {
            throw APIError(.badRequest, "the field '\(null)' is null; leave it out to use its default")
        }
        self.object = object
    }

    static func expected(_ route: ControlRoute) -> String {
        route.bodyFields.isEmpty ? "; \(route.method) \(route.path) takes no fields"
            : "; \(route.method) \(route.path) takes \(route.bodyFields.sorted().joined(separator: ", "))"
    }

    /// Decodes the body as `T`, typed strictly (`1` is not `true`); an empty body as `{}`.
    func decode<T: Decodable>(_ type: T.Type) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: object.isEmpty ? Data("{}".utf8) : data)
        } catch let error as DecodingError {
            if case let .dataCorrupted(context) = error, context.codingPath.isEmpty, let field = culprit(T.self) {
                // Foundation names no field for a number out of range (-1 or 1.5 for an unsigned integer).
                throw APIError(.badRequest, "the field '\(field)' has a value out of range for it (a whole number where one is needed, within the documented bounds)")
            }
            throw APIError(.badRequest, Self.describe(error))
        }
    }

    /// The field without which decoding `T` no longer fails as corrupt data.
    private func culprit<T: Decodable>(_ type: T.Type) -> String? {
        object.keys.sorted().first { key in
            guard let data = try? JSONSerialization.data(withJSONObject: object.filter { $0.key != key }) else { return false }
            do { _ = try JSONDecoder().decode(T.self, from: data); return true } catch DecodingError.dataCorrupted {
                return false
            } catch let DecodingError.keyNotFound(missing, _) {
                return missing.stringValue != key  // only missing because it was taken out: no verdict
            } catch { return true }
        }
    }

    static func describe(_ error: DecodingError) -> String {
        func field(_ path: [any CodingKey]) -> String { path.map(\.stringValue).joined(separator: ".") }
        switch error {
        case let .keyNotFound(key, context):
            return "the field '\(field(context.codingPath + [key]))' is missing"
        case let .typeMismatch(type, context), let .valueNotFound(type, context):
            let kind = type == Bool.self ? "true or false" : type == String.self ? "a string" : "a number"
            return "the field '\(field(context.codingPath))' must be \(kind)"
        case let .dataCorrupted(context):
            return "the field '\(field(context.codingPath))' has a value it cannot take: \(context.debugDescription)"
        @unknown default:
            return "the request body does not fit: \(error)"
        }
    }
}

/// Runs blocking work (pausing vCPUs, writing gigabytes) off the cooperative pool.
public func offPool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        DispatchQueue.global().async { continuation.resume(with: Result { try body() }) }
    }
}

/// The HTTP/JSON control API on a Unix socket (Hummingbird).
public final class ControlServer: Sendable {
    public let socketPath: String
    private let task: Task<Void, any Error>

    private init(socketPath: String, task: Task<Void, any Error>) {
        self.socketPath = socketPath
        self.task = task
    }

    /// Seconds a connection may send nothing while a request is incomplete, or between requests.
    public static let idleTimeoutSeconds = 10

    /// Starts serving and returns once the socket listens, owner-only.
    public static func start(socketPath: String, controller: any VMControlling) throws -> ControlServer {
        if FileManager.default.fileExists(atPath: socketPath) {
            if (try? ControlClient(socketPath: socketPath).send(.GET, "/vm", timeout: .seconds(2))) != nil {
                throw APIError(.conflict, "another VMM already serves '\(socketPath)'; choose another control socket path")
            }
        }
        let router = Router(context: ControlRequestContext.self)
        router.add(middleware: JSONErrorMiddleware())
        router.add(middleware: RouteGate())
        addRoutes(router, controller)
        var logger = Logger(label: "vmm.api")
        logger.logLevel = .critical
        let ready = DispatchSemaphore(value: 0)
        // Sockets are created owner-only: only this user may drive the VMM.
        let oldMask = umask(0o077)
        // A client that stalls mid-request (a body announced but not sent) is cut off, not waited for.
        let app = Application(router: router, server: .http1(configuration: .init(idleTimeout: .seconds(Int64(idleTimeoutSeconds)))),
                              configuration: .init(address: .unixDomainSocket(path: socketPath), serverName: "swift-vmm"),
                              onServerRunning: { _ in ready.signal() }, logger: logger)
        let task = Task.detached { try await app.run() }
        let started = ready.wait(timeout: .now() + 10) == .success
        umask(oldMask)
        guard started else {
            task.cancel()
            throw APIError(.internalServerError, "the control socket '\(socketPath)' did not start listening; check the directory exists and is writable")
        }
        chmod(socketPath, 0o600)
        return ControlServer(socketPath: socketPath, task: task)
    }

    /// Stops serving and removes the socket file.
    public func stop() {
        task.cancel()
        unlink(socketPath)
    }

    /// Builds the router from `ControlRoute`: every route gets its handler from `respond`.
    static func addRoutes(_ router: Router<ControlRequestContext>, _ controller: any VMControlling) {
        for route in ControlRoute.allCases {
            router.on(RouterPath(route.path), method: route.method) { request, _ in
                try await respond(route, fields: try await RequestFields(request, route: route), controller)
            }
        }
    }

    static func respond(_ route: ControlRoute, fields: RequestFields, _ controller: any VMControlling) async throws -> Response {
        let guest = controller.guest
        switch route {
        case .info:
            return JSONReply.make(.ok, VMInfo.describe(guest))
        case .scan:
            // The active scan on demand: the same rules and actions as the periodic one.
            let findings = try await offPool { guest.runScan() }
            return JSONReply.make(.ok, ["findings": findings.map {
                ["kind": $0.kind.rawValue, "pid": Int($0.pid), "guest": $0.guest ?? NSNull(), "evidence": $0.evidence,
                 "stopped": $0.mustStop] as [String: Any]
            }])
        case .pause:
            guard guest.state != .finished else { throw APIError(.conflict, "the VM has stopped; it cannot be paused") }
            if guest.incomingPostCopy?.status.phase == .postcopyPaused {
                // Its vCPUs park at their next exit; one asleep on a missing page must not be kicked.
                throw APIError(.conflict, "the guest is already paused: the link of its post-copy migration failed, and it waits for the migration to be recovered")
            }
            let ok = try await offPool { guest.pause() }
            guard ok else { throw APIError(.conflict, "the VM stopped before it could be paused") }
            return JSONReply.make(.ok, ["state": guest.state.rawValue])
        case .resume:
            struct Body: Decodable { var force: Bool? }
            let force = try fields.decode(Body.self).force ?? false
            if guest.incomingPostCopy?.status.phase == .postcopyPaused {
                throw APIError(.conflict, "the guest is paused because the link of its post-copy migration failed; it resumes by itself once the migration is recovered (PUT /vm/migration/recover here, then a migrate with resume at the source)")
            }
            if controller.migrations.servesPostCopyPages {
                throw APIError(.conflict, "this copy went to its destination by post-copy and only serves the pages the destination lacks; it never resumes (the destination runs the guest)")
            }
            guard guest.state == .paused else {
                throw APIError(.conflict, "the VM is \(guest.state.rawValue), not paused; nothing to resume")
            }
            try controller.beforeResume(force: force)
            do { try guest.resume() } catch {
                throw APIError(.conflict, "this copy may not resume: \(error)")
            }
            return JSONReply.make(.ok, ["state": guest.state.rawValue])
        case .snapshot:
            return try await snapshot(fields, controller)
        case .digest:
            try refuseWhilePagesArrive(guest, "digested")
            guard guest.state == .paused else {
                throw APIError(.conflict, "the VM is \(guest.state.rawValue); pause it to digest its memory consistently")
            }
            let digest = try await offPool { try guest.memoryDigest() }
            return JSONReply.make(.ok, ["sha256": digest, "memory_bytes": guest.memory.size])
        case .shutdown:
            guest.end(with: .shutdown)
            return JSONReply.make(.ok, ["state": "shutting down"])
        case .migrate:
            return try await MigrationRoutes.migrate(fields, service: controller.migrations)
        case .migration:
            return try MigrationRoutes.status(controller.migrations)
        case .postcopySwitch:
            return try MigrationRoutes.switchToPostCopy(controller.migrations)
        case .migrationRecover:
            return try await MigrationRoutes.recover(fields, guest: guest)
        case .migrationCancel:
            return try await MigrationRoutes.cancel(controller.migrations, guest: guest)
        }
    }

    /// A guest whose pages still arrive by post-copy cannot be read whole: a digest or snapshot
    /// would wait for pages that may not come while the link is down.
    static func refuseWhilePagesArrive(_ guest: AdmittedGuest, _ what: String) throws {
        guard guest.awaitsPostCopyPages else { return }
        let missing = guest.incomingPostCopy?.status.pagesMissing ?? 0
        throw APIError(.conflict, "pages of this guest are still arriving by post-copy (\(missing) missing); it can be \(what) once GET /vm/migration shows the incoming migration completed")
    }

    /// `PUT /vm/snapshot`: only into the configured snapshot directory, only while paused.
    static func snapshot(_ fields: RequestFields, _ controller: any VMControlling) async throws -> Response {
        struct Body: Decodable { var path: String; var unsealed: Bool? }
        guard fields.object["path"] != nil else {
            throw APIError(.badRequest, "give the snapshot file as {\"path\": \"NAME\"}; it is written inside the VMM's --snapshot-dir")
        }
        let body = try fields.decode(Body.self)
        let requested = body.path
        guard let directory = controller.snapshotDirectory else {
            throw APIError(.forbidden, "API snapshots are off in this VMM: start it with --snapshot-dir DIR to allow snapshots into DIR")
        }
        let path: String
        do { path = try directory.resolve(requested) } catch let refusal as SnapshotDirectory.Refusal {
            switch refusal.kind {
            case .malformed: throw APIError(.badRequest, refusal.description)
            case .forbidden: throw APIError(.forbidden, refusal.description)
            case .occupied: throw APIError(.conflict, refusal.description)
            }
        }
        let guest = controller.guest
        try refuseWhilePagesArrive(guest, "snapshotted")
        guard guest.state == .paused else {
            throw APIError(.conflict, "the VM is \(guest.state.rawValue); pause it before taking a snapshot (PUT /vm/pause)")
        }
        let sealed = !(body.unsealed ?? false)
        let stats = try await offPool { try guest.snapshot(to: path, sealed: sealed) }
        var reply: [String: Any] = ["path": path, "bytes": stats.bytes, "pages": stats.pages, "zero_pages": stats.zeroPages,
                                    "milliseconds": stats.milliseconds, "sealed": sealed]
        if let hosts = stats.sealedFor { reply["sealed_for"] = hosts }
        if let warnings = stats.warnings { reply["warnings"] = warnings }
        return JSONReply.make(.ok, reply)
    }
}

/// The `GET /vm` document.
public enum VMInfo {
    public static func describe(_ guest: AdmittedGuest) -> [String: Any] {
        let m = guest
        var info: [String: Any] = [
            "state": m.state.rawValue,
            "config": [
                "memory_bytes": m.configuration.memorySize,
                "vcpus": m.configuration.vcpuCount,
                "mode": m.configuration.mode?.rawValue ?? NSNull(),
                "cmdline": m.configuration.commandLine ?? NSNull(),
            ] as [String: Any],
            "tsc_khz": m.tscKHz,
        ]
        if let started = m.startedAt { info["uptime_s"] = (monotonicMilliseconds() - started) / 1000 }
        if let exit = m.exitResult {
            info["exit"] = ["status": exit.exitStatus, "reason": exit.description]
        }
        do {
            let session = guest.session
            info["billboard"] = [
                "guest": session.registration.name,
                "id": session.registration.id.uuidString.lowercased(),
                "host": session.store.hostName,
                "epoch": session.epoch,
                "beacons": session.registration.beacons.rawValue,
            ] as [String: Any]
        }
        return info
    }
}
