#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import GRDB
import SystemCalls

/// Something the active scan found.
public struct ScanFinding: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable, Codable {
        /// The guest must beacon, runs, and has been silent for longer than the grace period.
        case stale
        /// A beacon carried a token this VMM did not issue: the guest inside is not who it claims.
        case falseBeacon = "false-beacon"
        /// The same guest runs in another process that holds its lease: this one is the ghost.
        case duplicate
        /// The process runs the guest without holding its lease (taken over, handed over, released).
        case noLease = "no-lease"
        /// A process has a KVM VM and this store open, but no instance record: it skipped admission.
        case unrecorded
        /// A process runs a VM against a copy of this host's store (same host key, other directory).
        case copiedStore = "copied-store"
        /// The process of an instance record is gone; the record was removed.
        case gone
        /// A process with a KVM VM that has no billboard open (QEMU, another VMM): reported only.
        case unmanaged
        /// A process with a KVM VM and some other host's billboard open (another store on this
        /// machine, e.g. a test's): reported only; that store's own scan judges it.
        case foreignStore = "foreign-store"
    }
    public let kind: Kind
    public let pid: Int32
    public let guest: String?
    public let evidence: String

    /// Whether the process is a false or duplicate VM that must be stopped.
    public var mustStop: Bool { [.falseBeacon, .duplicate, .noLease, .unrecorded, .copiedStore].contains(kind) }

    public var description: String { "\(kind.rawValue): pid \(pid)\(guest.map { " guest '\($0)'" } ?? ""): \(evidence)" }
}

/// Processes on this host that hold a KVM VM, with the billboard databases they have open.
public enum HostProcesses {
    public struct VMProcess: Sendable, Equatable {
        public let pid: Int32
        public let billboardFiles: [String]
    }

    /// Reads /proc/PID/fd of every process: a VM shows as `anon_inode:kvm-vm`.
    public static func withVMs() -> [VMProcess] {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
        var found: [VMProcess] = []
        for entry in entries {
            guard let pid = Int32(entry) else { continue }
            let fdDir = "/proc/\(pid)/fd"
            guard let fds = try? FileManager.default.contentsOfDirectory(atPath: fdDir) else { continue }
            var hasVM = false
            var stores: [String] = []
            for fd in fds {
                guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: fdDir + "/" + fd) else { continue }
                if target == "anon_inode:kvm-vm" { hasVM = true }
                let path = target.hasSuffix(" (deleted)") ? String(target.dropLast(10)) : target
                if path.hasSuffix("/" + BillboardStore.databaseFileName), !stores.contains(path) { stores.append(path) }
            }
            if hasVM { found.append(VMProcess(pid: pid, billboardFiles: stores)) }
        }
        return found
    }

    static func alive(_ pid: Int32) -> Bool { pid > 0 && (kill(pid, 0) == 0 || errno == EPERM) }

    /// Whether process `pid` holds a KVM VM: only such a process can be running a guest.
    static func holdsVM(_ pid: Int32) -> Bool {
        guard pid > 0, let fds = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd") else { return false }
        return fds.contains { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")) == "anon_inode:kvm-vm" }
    }

    static func sameFile(_ a: String, _ b: String) -> Bool {
        var sa = stat(), sb = stat()
        guard stat(a, &sa) == 0, stat(b, &sb) == 0 else { return false }
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
    }
}

/// The active scan's judgement: compares the instance records and leases with the processes that
/// hold a KVM VM on this host, records the evidence, and says which processes must be stopped.
public struct Scan: Sendable {
    let database: BillboardDatabase
    let instances: Instances
    let leaseRecords: LeaseRecords

    /// Looks at every guest this host runs and every process with a KVM VM, and returns what is
    /// wrong. Records the evidence of each new finding in the audit log; removes records of dead
    /// processes. It signals no process: the VMM stops what `mustStop` (another process through
    /// `recordStopped`, between its SIGSTOP and SIGKILL; itself after `recordSelfEviction`).
    ///
    /// `staleAfter`: seconds without a beacon (since the last beacon, start, resume or token
    /// change) after which a running guest that must beacon is stale.
    public func run(staleAfter: TimeInterval, actor: String? = nil) throws -> [ScanFinding] {
        let actor = actor ?? database.processActor
        let now = Date().milliseconds
        var findings: [ScanFinding] = []
        // /proc and other stores' key files are read before the transaction: nobody waits on them.
        let processes = HostProcesses.withVMs().map { p in
            (p, p.billboardFiles.map { file -> (String, Bool, Bool) in
                let ours = HostProcesses.sameFile(file, database.path)
                return (file, ours, !ours && isCopyOfThisStore(databaseFile: file))
            })
        }
        try database.write { db in
            let rows = try Row.fetchAll(db, sql: "SELECT * FROM instances WHERE host = ?", arguments: [database.hostName])
            var recordedPids = Set<Int32>()
            for row in rows {
                let pid: Int32 = row["pid"]
                let guestID: String = row["guest_id"]
                let name: String = row["guest_name"]
                let state = InstanceState(rawValue: row["state"]) ?? .running
                guard HostProcesses.alive(pid) else {
                    try db.execute(sql: "DELETE FROM instances WHERE host = ? AND pid = ? AND guest_id = ?",
                                   arguments: [database.hostName, pid, guestID])
                    if state == .ended { continue }  // a clean exit
                    findings.append(ScanFinding(kind: .gone, pid: pid, guest: name, evidence: "process \(pid) no longer exists"))
                    try database.appendAudit(db, actor: actor, event: "scan.gone", guest: name, details: [
                        "pid": .int(Int64(pid)), "guestID": .string(guestID)])
                    continue
                }
                guard instances.isAuthentic(db, row) else {
                    // Planted without host.key: not a record at all. The process check below judges the process.
                    try db.execute(sql: "DELETE FROM instances WHERE host = ? AND pid = ? AND guest_id = ?",
                                   arguments: [database.hostName, pid, guestID])
                    try database.appendAudit(db, actor: actor, event: "scan.forged-record", guest: name, details: [
                        "pid": .int(Int64(pid)), "guestID": .string(guestID)])
                    continue
                }
                recordedPids.insert(pid)
                // In flight: a destination before GO owns nothing yet; a source after GO is ending.
                // An ended guest's process is only tearing its VM down.
                if state == .incoming || state == .migrated || state == .ended { continue }
                if let evidence: String = row["false_beacon"] {
                    findings.append(ScanFinding(kind: .falseBeacon, pid: pid, guest: name, evidence: evidence))
                }
                // The lease as its integrity code vouches for it: a tampered row is evidence, never a reason to stop anyone.
                let lease: LeaseRow?
                do { lease = try UUID(uuidString: guestID).flatMap { try leaseRecords.row(db, $0) } } catch {
                    try database.appendAudit(db, actor: actor, event: "scan.tampered-lease", guest: name,
                                             details: ["guestID": .string(guestID)])
                    continue
                }
                let holderHost: String? = lease?.host
                let holderPid: Int32? = lease?.pid
                if !sameBytes(holderHost, database.hostName) || holderPid != pid {
                    let holder = holderPid.map { "pid \($0) on \(holderHost ?? "?")" } ?? "nobody"
                    let holderRunsIt = rows.contains { ($0["pid"] as Int32) == holderPid && sameBytes($0["guest_id"] as String, guestID) }
                    findings.append(ScanFinding(kind: holderRunsIt ? .duplicate : .noLease, pid: pid, guest: name,
                                                evidence: "runs guest \(guestID) (state \(state.rawValue)) but its lease is held by \(holder)"))
                }
                let required: Bool = row["beacons_required"]
                if required && state == .running {
                    let since = max((row["last_beacon_at"] as Int64?) ?? 0, row["updated_at"] as Int64)
                    let silentMs = now - since
                    if Double(silentMs) > staleAfter * 1000 {
                        let last = (row["last_beacon_at"] as Int64?).map { "last beacon \(now - $0) ms ago" } ?? "no beacon since it started"
                        findings.append(ScanFinding(kind: .stale, pid: pid, guest: name,
                                                    evidence: "\(last); beacons are required (grace \(Int(staleAfter * 1000)) ms)"))
                        if (row["stale_since"] as Int64?) == nil {
                            try db.execute(sql: "UPDATE instances SET stale_since = ? WHERE host = ? AND pid = ? AND guest_id = ?",
                                           arguments: [now, database.hostName, pid, guestID])
                            try database.appendAudit(db, actor: actor, event: "scan.stale", guest: name, details: [
                                "pid": .int(Int64(pid)), "guestID": .string(guestID), "evidence": .string(findings.last!.evidence)])
                        }
                    }
                }
            }
            for (process, files) in processes {
                if files.isEmpty {
                    findings.append(ScanFinding(kind: .unmanaged, pid: process.pid, guest: nil,
                                                evidence: "holds a KVM VM without any billboard open (another VMM, or a test)"))
                    continue
                }
                for (file, ours, copy) in files {
                    if ours {
                        // Re-checked inside the transaction: a VMM records itself before it creates its VM.
                        let recorded = try Bool.fetchOne(db, sql: "SELECT EXISTS(SELECT 1 FROM instances WHERE host = ? AND pid = ?)",
                                                         arguments: [database.hostName, process.pid]) ?? false
                        if !recordedPids.contains(process.pid) && !recorded {
                            findings.append(ScanFinding(kind: .unrecorded, pid: process.pid, guest: nil,
                                                        evidence: "holds a KVM VM and this billboard open, but was never admitted (no instance record)"))
                        }
                    } else if copy {
                        findings.append(ScanFinding(kind: .copiedStore, pid: process.pid, guest: nil,
                                                    evidence: "runs a VM against \(file), a copy of this host's billboard (same host key)"))
                    } else {
                        findings.append(ScanFinding(kind: .foreignStore, pid: process.pid, guest: nil,
                                                    evidence: "runs a VM with another billboard open (\(file))"))
                    }
                }
            }
        }
        return findings
    }

    /// Whether `databaseFile`'s directory holds this host's key: a copy of this store.
    func isCopyOfThisStore(databaseFile: String) -> Bool {
        let keyFile = (databaseFile as NSString).deletingLastPathComponent + "/" + BillboardStore.keyFileName
        guard let other = try? HostKeys.load(path: keyFile) else { return false }
        return other.signing.publicKey.rawRepresentation == database.keys.signing.publicKey.rawRepresentation
    }

    /// Records that this VMM found its own guest false or without a lease and is ending it.
    public func recordSelfEviction(_ finding: ScanFinding) throws {
        try database.write { db in
            try database.appendAudit(db, actor: database.processActor, event: "scan.stopped", guest: finding.guest, details: [
                "pid": .int(Int64(finding.pid)), "kind": .string(finding.kind.rawValue),
                "evidence": .string(finding.evidence), "self": .bool(true),
            ])
        }
    }

    /// Records that `finding`'s process was frozen (`frozen`: whether its SIGSTOP was delivered)
    /// and is being killed, and removes its instance record. The VMM calls this between the two
    /// signals, so the evidence is in the audit log before the process is gone.
    public func recordStopped(_ finding: ScanFinding, frozen: Bool, actor: String? = nil) throws {
        let actor = actor ?? database.processActor
        try database.write { db in
            try database.appendAudit(db, actor: actor, event: "scan.stopped", guest: finding.guest, details: [
                "pid": .int(Int64(finding.pid)), "kind": .string(finding.kind.rawValue),
                "evidence": .string(finding.evidence), "frozen": .bool(frozen),
            ])
            try db.execute(sql: "DELETE FROM instances WHERE host = ? AND pid = ?",
                           arguments: [database.hostName, finding.pid])
        }
    }
}
