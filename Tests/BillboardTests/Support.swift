#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import GRDB
import Testing
@testable import Billboard

/// A fresh store in its own temporary directory, with one bootstrap administrator ("alice").
struct Fixture {
    let root: String
    let storeDir: String
    let admin: AdminKey
    let store: BillboardStore

    init(hostName: String = "host1") throws {
        var template = Array("/tmp/billboard-test-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        try #require(made != nil)
        root = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        storeDir = root + "/billboard"
        admin = try BillboardStore.createAdminKey(name: "alice", path: root + "/alice.key")
        store = try BillboardStore.initialize(directory: storeDir, hostName: hostName, firstAdmin: admin)
    }

    func remove() { try? FileManager.default.removeItem(atPath: root) }

    var databasePath: String { storeDir + "/" + BillboardStore.databaseFileName }
    var keyPath: String { storeDir + "/" + BillboardStore.keyFileName }

    /// What an attacker with write access to billboard.sqlite (but not host.key) can do:
    /// open it directly with its own connection, drop the append-only triggers, and write.
    func attacker(_ sql: String, _ arguments: StatementArguments = []) throws {
        var config = Configuration()
        config.busyMode = .timeout(5)
        let queue = try DatabaseQueue(path: databasePath, configuration: config)
        try queue.write { db in
            try db.execute(sql: "DROP TRIGGER IF EXISTS audit_no_update; DROP TRIGGER IF EXISTS audit_no_delete")
            try db.execute(sql: sql, arguments: arguments)
        }
        try queue.close()
    }

    func attackerRead<T: DatabaseValueConvertible>(_ sql: String, _ arguments: StatementArguments = []) throws -> T? {
        let queue = try DatabaseQueue(path: databasePath)
        defer { try? queue.close() }
        return try queue.read { db in try T.fetchOne(db, sql: sql, arguments: arguments) }
    }
}

/// A small fake image and its digest.
let imageBytes = Data((0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) })
let imageDigest = ImageDigest.sha256(imageBytes)

func web1(allowedHosts: [String] = []) -> GuestRegistration {
    GuestRegistration(name: "web1", imageSHA256: imageDigest, memoryBytes: 64 << 20, vcpus: 2,
                      mode: "protected", commandLine: "console=ttyS0", mac: "52:54:00:12:34:56",
                      ip: "10.0.0.5", os: "tinyos", allowedHosts: allowedHosts, beacons: .required)
}

/// Admits web1 exactly as registered, unless a test overrides one input.
@discardableResult
func admitWeb1(_ store: BillboardStore, name: String? = "web1", image: String = imageDigest,
               memory: UInt64 = 64 << 20, vcpus: Int = 2, mode: String? = "protected",
               commandLine: String? = "console=ttyS0", host: String = "host1") throws -> GuestRegistration {
    try store.registry.admit(name: name, imageSHA256: image, memoryBytes: memory, vcpus: vcpus, mode: mode,
                    commandLine: commandLine, host: host)
}

/// Runs `body` and returns the refusal it throws (failing the test if it throws nothing or something else).
func refusal(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> BillboardRefusal? {
    do {
        try body()
        Issue.record("expected a refusal, but it was accepted", sourceLocation: sourceLocation)
    } catch let r as BillboardRefusal {
        return r
    } catch {
        Issue.record("expected a BillboardRefusal, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

func storeError(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> BillboardError? {
    do {
        try body()
        Issue.record("expected a BillboardError, but it succeeded", sourceLocation: sourceLocation)
    } catch let e as BillboardError {
        return e
    } catch {
        Issue.record("expected a BillboardError, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

/// A pid that certainly has no process: a child that has exited and been reaped.
func deadPid() throws -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/true")
    try p.run()
    p.waitUntilExit()
    let pid = p.processIdentifier
    #expect(kill(pid, 0) != 0)
    return pid
}

func events(_ store: BillboardStore) throws -> [String] { try store.audit.entries().map(\.event) }

func flipByte(_ data: Data, at index: Int) -> Data {
    var d = data
    d[d.startIndex + index] ^= 0x01
    return d
}
