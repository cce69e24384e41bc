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
    public init(_ status: HTTPResponse.Status, _ message: String) { self.status = status; self.message = message }
    public var description: String { message }
}

/// What the API acts on: the admitted guest (its machine and Billboard session) and the
/// process around it.
public protocol VMControlling: AnyObject, Sendable {
    var guest: AdmittedGuest { get }
    /// Routes beyond the basic set (migration), added by the owner of the VM.
    func extraRoutes(_ router: Router<BasicRequestContext>)
    /// Refuses a resume that could make a second running copy (a migration in doubt).
    func beforeResume(force: Bool) throws
}

extension VMControlling {
    public func extraRoutes(_ router: Router<BasicRequestContext>) {}
    public func beforeResume(force: Bool) throws {}
}

/// Turns every error into a JSON body with the right status.
struct JSONErrorMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let e as APIError {
            return JSONReply.make(e.status, ["error": e.message])
        } catch let e as HTTPError {
            let message = e.status == .notFound
                ? "no such endpoint: \(request.method) \(request.uri.path); see the README for the API"
                : (e.body ?? "\(e.status)")
            return JSONReply.make(e.status, ["error": message])
        } catch {
            return JSONReply.make(.internalServerError, ["error": "\(error)"])
        }
    }
}

/// JSON responses.
public enum JSONReply {
    public static func make(_ status: HTTPResponse.Status, _ object: Any) -> Response {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return Response(status: status, headers: [.contentType: "application/json"],
                        body: ResponseBody(byteBuffer: ByteBuffer(bytes: data + Data("\n".utf8))))
    }

    /// Parses a JSON object body; a body that is not one is a 400.
    public static func object(_ request: Request, limit: Int = 1 << 16) async throws -> [String: Any] {
        let buffer = try await request.body.collect(upTo: limit)
        let data = Data(buffer: buffer)
        if data.isEmpty { return [:] }
        guard let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw APIError(.badRequest, "the request body is not a JSON object")
        }
        return object
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

    /// Starts serving and returns once the socket listens, owner-only.
    public static func start(socketPath: String, controller: any VMControlling) throws -> ControlServer {
        if FileManager.default.fileExists(atPath: socketPath) {
            if (try? ControlClient(socketPath: socketPath).send(.GET, "/vm", timeout: .seconds(2))) != nil {
                throw APIError(.conflict, "another VMM already serves '\(socketPath)'; choose another control socket path")
            }
        }
        let router = Router()
        router.add(middleware: JSONErrorMiddleware())
        addRoutes(router, controller)
        controller.extraRoutes(router)
        var logger = Logger(label: "vmm.api")
        logger.logLevel = .critical
        let ready = DispatchSemaphore(value: 0)
        // Sockets are created owner-only: only this user may drive the VMM.
        let oldMask = umask(0o077)
        let app = Application(router: router,
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

    static func addRoutes(_ router: Router<BasicRequestContext>, _ controller: any VMControlling) {
        router.get("/vm") { _, _ in
            JSONReply.make(.ok, VMInfo.describe(controller.guest))
        }
        router.put("/vm/scan") { _, _ in
            // The active scan on demand: the same rules and actions as the periodic one.
            let guest = controller.guest
            let findings = try await offPool { guest.runScan() }
            return JSONReply.make(.ok, ["findings": findings.map {
                ["kind": $0.kind.rawValue, "pid": Int($0.pid), "guest": $0.guest ?? NSNull(), "evidence": $0.evidence,
                 "stopped": $0.mustStop] as [String: Any]
            }])
        }
        router.put("/vm/pause") { _, _ in
            let m = controller.guest
            guard m.state != .finished else { throw APIError(.conflict, "the VM has stopped; it cannot be paused") }
            let ok = try await offPool { m.pause() }
            guard ok else { throw APIError(.conflict, "the VM stopped before it could be paused") }
            return JSONReply.make(.ok, ["state": m.state.rawValue])
        }
        router.put("/vm/resume") { request, _ in
            let body = try await JSONReply.object(request)
            let m = controller.guest
            guard m.state == .paused else {
                throw APIError(.conflict, "the VM is \(m.state.rawValue), not paused; nothing to resume")
            }
            try controller.beforeResume(force: body["force"] as? Bool ?? false)
            do { try controller.guest.resume() } catch {
                throw APIError(.conflict, "this copy may not resume: \(error)")
            }
            return JSONReply.make(.ok, ["state": m.state.rawValue])
        }
        router.put("/vm/snapshot") { request, _ in
            let body = try await JSONReply.object(request)
            guard let path = body["path"] as? String, !path.isEmpty else {
                throw APIError(.badRequest, "give the snapshot file as {\"path\": \"/where/to/write\"}")
            }
            let guest = controller.guest
            guard guest.state == .paused else {
                throw APIError(.conflict, "the VM is \(guest.state.rawValue); pause it before taking a snapshot (PUT /vm/pause)")
            }
            let stats = try await offPool { try guest.snapshot(to: path) }
            return JSONReply.make(.ok, ["path": path, "bytes": stats.bytes, "pages": stats.pages,
                                        "zero_pages": stats.zeroPages, "milliseconds": stats.milliseconds])
        }
        router.get("/vm/digest") { _, _ in
            let m = controller.guest
            guard m.state == .paused else {
                throw APIError(.conflict, "the VM is \(m.state.rawValue); pause it to digest its memory consistently")
            }
            let digest = try await offPool { try m.memoryDigest() }
            return JSONReply.make(.ok, ["sha256": digest, "memory_bytes": m.memory.size])
        }
        router.put("/vm/shutdown") { _, _ in
            controller.guest.end(with: .shutdown)
            return JSONReply.make(.ok, ["state": "shutting down"])
        }
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
