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
        /// The guest's network card sent frames that claim another MAC or IP than its
        /// registration's, past the threshold: the guest is not who it claims.
        case spoofedTraffic = "spoofed-traffic"
    }
    public let kind: Kind
    public let pid: Int32
    public let guest: String?
    public let evidence: String

    public init(kind: Kind, pid: Int32, guest: String?, evidence: String) {
        self.kind = kind
        self.pid = pid
        self.guest = guest
        self.evidence = evidence
    }

    /// Whether the process is a false or duplicate VM that must be stopped.
    public var mustStop: Bool { [.falseBeacon, .duplicate, .noLease, .unrecorded, .copiedStore, .spoofedTraffic].contains(kind) }

    public var description: String { "\(kind.rawValue): pid \(pid)\(guest.map { " guest '\($0)'" } ?? ""): \(evidence)" }
}

/// Processes on this host that hold a KVM VM, with the files they have open.
public enum HostProcesses {
    /// A file a VM process has open, as the kernel sees it: its name (from the `/proc/PID/fd/N`
    /// link, which the process chose) and its identity (stat through that link, which is the
    /// open file itself, whatever its name says).
    public struct OpenFile: Sendable, Equatable {
        /// The name the kernel reports, " (deleted)" removed.
        public let name: String
        /// nil when the link could not be followed (the process closed it or exited meanwhile).
        public let status: FileStatus?
    }

    public struct VMProcess: Sendable, Equatable {
        public let pid: Int32
        /// Its open files that have a name (not sockets, pipes or anonymous inodes).
        public let files: [OpenFile]

        /// The files named like a billboard database (`.../billboard.sqlite`).
        public var billboardFiles: [OpenFile] { files.filter { $0.name.hasSuffix("/" + BillboardStore.databaseFileName) } }
    }

    /// Reads /proc/PID/fd of every process: a VM shows as `anon_inode:kvm-vm`. Only names and
    /// `stat` of the links: nothing a process has open is opened or read here.
    public static func withVMs() -> [VMProcess] {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
        var found: [VMProcess] = []
        for entry in entries {
            guard let pid = Int32(entry) else { continue }
            let fdDir = "/proc/\(pid)/fd"
            guard let fds = try? FileManager.default.contentsOfDirectory(atPath: fdDir) else { continue }
            var hasVM = false
            var files: [OpenFile] = []
            for fd in fds {
                let link = fdDir + "/" + fd
                guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: link) else { continue }
                if target == "anon_inode:kvm-vm" { hasVM = true }
                guard target.hasPrefix("/") else { continue }
                let name = target.hasSuffix(" (deleted)") ? String(target.dropLast(10)) : target
                files.append(OpenFile(name: name, status: try? FileStatus.of(path: link)))
            }
            if hasVM { found.append(VMProcess(pid: pid, files: files)) }
        }
        return found
    }

    static func alive(_ pid: Int32) -> Bool { pid > 0 && (kill(pid, 0) == 0 || errno == EPERM) }

    /// Whether process `pid` holds a KVM VM: only such a process can be running a guest.
    static func holdsVM(_ pid: Int32) -> Bool {
        guard pid > 0, let fds = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd") else { return false }
        return fds.contains { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")) == "anon_inode:kvm-vm" }
    }
}

/// The active scan's judgement: compares the instance records and leases with the processes that
/// hold a KVM VM on this host, records the evidence, and says which processes must be stopped.
public struct Scan: Sendable {
    let database: BillboardDatabase
    let instances: Instances
    let leaseRecords: LeaseRecords
    let intents: HandoverIntents

    /// Looks at every guest this host runs and every process with a KVM VM, and returns what is
    /// wrong. Records the evidence of each new finding in the audit log; removes records of dead
    /// processes. It signals no process: the VMM stops what `mustStop` (another process through
    /// `recordStopped`, between its SIGSTOP and SIGKILL; itself after `recordSelfEviction`).
    ///
    /// `staleAfter`: seconds without a beacon (since the last beacon, start, resume or token
    /// change) after which a running guest that must beacon is stale.
    public func run(staleAfter: TimeInterval, actor: String? = nil) throws -> [ScanFinding] {
        let actor = actor ?? database.processActor
        // Hand-overs a crash may have cut short are settled first, so leases read as they stand.
        try intents.resolve(actor: actor)
        let now = Date().milliseconds
        var findings: [ScanFinding] = []
        // /proc, and the key files beside other stores, are read before the transaction: nobody waits on them.
        let processes = HostProcesses.withVMs().map { p in
            // Ours by device and inode, under any name (a hard link too): never by the name the process chose.
            (p, holdsThisStore: p.files.contains { $0.status?.isSameFile(as: database.fileStatus) == true },
             otherStores: p.billboardFiles.filter { $0.status?.isSameFile(as: database.fileStatus) != true }.map(judgeOtherStore))
        }
        try database.write { db in
            let rows = try Row.fetchAll(db, sql: "SELECT * FROM instances WHERE host = ?", arguments: [database.hostName])
            var recordedPids = Set<Int32>()
            // Processes found gone just now: one that held a VM when /proc was read has exited
            // since (a migration source ending), and is not a VM without a record.
            var gonePids = Set<Int32>()
            for row in rows {
                let pid: Int32 = row["pid"]
                let guestID: String = row["guest_id"]
                let name: String = row["guest_name"]
                let state = InstanceState(rawValue: row["state"]) ?? .running
                guard HostProcesses.alive(pid) else {
                    gonePids.insert(pid)
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
                // In flight: a destination before GO owns nothing yet; a source after GO is ending,
                // or (post-copy) serves the pages its destination lacks and never runs the guest.
                // An ended guest's process is only tearing its VM down.
                if [.incoming, .migrated, .pageServer, .pageServerAwaitingRecovery, .ended].contains(state) { continue }
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
            for (process, holdsThisStore, otherStores) in processes {
                if !holdsThisStore && otherStores.isEmpty {
                    findings.append(ScanFinding(kind: .unmanaged, pid: process.pid, guest: nil,
                                                evidence: "holds a KVM VM without any billboard open (another VMM, or a test)"))
                    continue
                }
                if holdsThisStore && !gonePids.contains(process.pid) && HostProcesses.alive(process.pid) {
                    // Re-checked inside the transaction: a VMM records itself before it creates its VM.
                    let recorded = try Bool.fetchOne(db, sql: "SELECT EXISTS(SELECT 1 FROM instances WHERE host = ? AND pid = ?)",
                                                     arguments: [database.hostName, process.pid]) ?? false
                    if !recordedPids.contains(process.pid) && !recorded {
                        findings.append(ScanFinding(kind: .unrecorded, pid: process.pid, guest: nil,
                                                    evidence: "holds a KVM VM and this billboard open, but was never admitted (no instance record)"))
                    }
                }
                for other in otherStores {
                    findings.append(ScanFinding(kind: other.isCopy ? .copiedStore : .foreignStore, pid: process.pid, guest: nil,
                                                evidence: other.evidence))
                }
            }
        }
        return findings
    }

    /// A real `host.key` is about 300 bytes; the scan reads no more than this of one it did not make.
    static let keyFileReadLimit = 4096

    /// Whether a billboard database another VM process has open is a copy of this store: its
    /// directory (by the name the kernel reports) holds this host's signing key. The key file is
    /// read as something an attacker planted: at most `keyFileReadLimit` bytes, a regular file
    /// only, its last component not a symbolic link. Anything else makes the store foreign,
    /// with the reason as evidence; the database itself is never opened or read.
    func judgeOtherStore(_ file: HostProcesses.OpenFile) -> (isCopy: Bool, evidence: String) {
        guard let status = file.status else {
            return (false, "runs a VM with another billboard open (\(file.name)), which could not be examined")
        }
        guard status.isRegularFile else {
            return (false, "runs a VM with \(file.name) open, which is \(status.kindDescription), not a billboard")
        }
        let keyFile = (file.name as NSString).deletingLastPathComponent + "/" + BillboardStore.keyFileName
        let bytes: [UInt8]
        do { bytes = try readSmallRegularFile(keyFile, limit: Self.keyFileReadLimit) } catch {
            return (false, "runs a VM with another billboard open (\(file.name)); its key file was not read: \(error)")
        }
        guard let other = try? HostKeys.decode(Data(bytes), path: keyFile) else {
            return (false, "runs a VM with another billboard open (\(file.name)); its key file is not a host key")
        }
        guard other.signing.publicKey.rawRepresentation == database.keys.signing.publicKey.rawRepresentation else {
            return (false, "runs a VM with another billboard open (\(file.name))")
        }
        return (true, "runs a VM against \(file.name), a copy of this host's billboard (same host key)")
    }

    /// Records a frame the guest's network card sent and the VMM dropped because it claimed
    /// another MAC or IP than the registration's (`evidence`: what it claimed and its first
    /// bytes), with how many were dropped so far out of the `threshold` that makes it false.
    public func recordSpoofedFrame(guest: String, evidence: String, dropped: Int, threshold: Int) throws {
        try database.write { db in
            try database.appendAudit(db, actor: database.processActor, event: "network.spoof", guest: guest, details: [
                "pid": .int(Int64(getpid())), "evidence": .string(evidence),
                "dropped": .int(Int64(dropped)), "threshold": .int(Int64(threshold)),
            ])
        }
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
