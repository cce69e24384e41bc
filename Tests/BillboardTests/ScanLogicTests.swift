import Foundation
import GRDB
import SystemCalls
import Testing
@testable import Billboard

/// A live process that is not this one (a `sleep` child), for instance records of "another VMM".
final class LiveChild {
    let process = Process()
    init() throws {
        process.executableURL = URL(fileURLWithPath: "/bin/sleep")
        process.arguments = ["60"]
        try process.run()
    }
    var pid: Int32 { process.processIdentifier }
    // SIGKILL: a child inherits the test runner's signal mask, in which SIGTERM may be blocked.
    deinit { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
}

/// The state letter of /proc/PID/stat (S sleeping, T stopped, Z zombie, ...), nil if there is no such process.
func processState(_ pid: Int32) -> Character? {
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let nameEnd = stat.lastIndex(of: ")") else { return nil }
    return stat[stat.index(after: nameEnd)...].first { $0 != " " }
}

/// web1 registered, leased to this process and recorded running in it (token 1).
func web1RunningHere(_ f: Fixture) throws -> GuestRegistration {
    let r = try f.store.registry.register(web1(), signedBy: f.admin)
    try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 10)
    try f.store.instances.record(r, token: 1, state: .running)
    return r
}

/// Findings about instance records only (the /proc part of a scan also sees this test process).
func recordFindings(_ store: BillboardStore, staleAfter: TimeInterval = 60) throws -> [ScanFinding] {
    try store.scan.run(staleAfter: staleAfter).filter { ![.unmanaged, .unrecorded, .copiedStore, .foreignStore].contains($0.kind) }
}

@Suite("The active scan's judgement of instance records, beacons and leases")
struct ScanLogicTests {
    @Test("a beacon with the issued token is recorded; one with another token is kept as evidence and makes the instance a false VM")
    func falseBeaconEvidence() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try f.store.registry.register(web1(), signedBy: f.admin)
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 10)
        try f.store.instances.record(r, token: 0xABCD, state: .running)
        try f.store.instances.recordBeacon(guestID: r.id, token: 0xABCD, counter: 1, received: 2)
        var me = try #require(try f.store.instances.list().first { $0.pid == getpid() })
        #expect(me.beaconCount == 2 && me.beaconCounter == 1 && me.falseBeacon == nil)
        #expect(try recordFindings(f.store).isEmpty)

        try f.store.instances.recordBeacon(guestID: r.id, token: 0x1234, counter: 2)
        me = try #require(try f.store.instances.list().first { $0.pid == getpid() })
        #expect(me.falseBeacon?.contains("1234") == true)
        let findings = try recordFindings(f.store)
        #expect(findings.map(\.kind) == [.falseBeacon])
        #expect(findings.first?.mustStop == true && findings.first?.pid == getpid())
    }

    @Test("the same guest in a second process is a duplicate; a process whose lease was released is without lease; the holder is left alone")
    func duplicateAndNoLease() throws {
        let f = try Fixture()
        defer { f.remove() }
        let ghost = try LiveChild()
        let r = try web1RunningHere(f)
        try f.store.instances.record(r, pid: ghost.pid, token: 2, state: .running)
        let findings = try recordFindings(f.store)
        #expect(findings.count == 1)
        #expect(findings.first?.kind == .duplicate && findings.first?.pid == ghost.pid)

        try f.store.leases.release(guestID: r.id, pid: getpid())
        let after = try recordFindings(f.store)
        #expect(Set(after.map(\.kind)) == [.noLease])
        #expect(Set(after.map(\.pid)) == [getpid(), ghost.pid])
    }

    @Test("the scan only judges: a planted duplicate is found and its stop recorded, but it is never signalled")
    func scanSignalsNothing() throws {
        let f = try Fixture()
        defer { f.remove() }
        let ghost = try LiveChild()
        let r = try web1RunningHere(f)
        try f.store.instances.record(r, pid: ghost.pid, token: 2, state: .running)

        let finding = try #require(try f.store.scan.run(staleAfter: 60).first { $0.pid == ghost.pid })
        #expect(finding.kind == .duplicate && finding.mustStop)
        // Recording the stop is the Billboard's part; the signals are the VMM's (FalseVMStopper).
        try f.store.scan.recordStopped(finding, frozen: false)
        let entry = try #require(try f.store.audit.entries().last)
        #expect(entry.event == "scan.stopped" && entry.details.contains("\"pid\":\(ghost.pid)"))
        #expect(try f.store.instances.list().map(\.pid) == [getpid()])

        // A SIGSTOP or SIGKILL would show within this pause as state T or Z (a killed child stays a zombie until reaped).
        usleep(100_000)
        #expect(kill(ghost.pid, 0) == 0)
        let state = processState(ghost.pid)
        #expect(state != nil && !["T", "t", "Z", "X"].contains(state!), "the planted process is in state \(state.map(String.init) ?? "?")")
    }

    @Test("a guest in flight (incoming, migrated) or paused is neither a duplicate nor stale; a silent running one is stale")
    func inFlightPausedAndStale() throws {
        let f = try Fixture()
        defer { f.remove() }
        let destination = try LiveChild()
        let r = try web1RunningHere(f)
        try f.store.instances.record(r, pid: destination.pid, token: 1, state: .incoming)
        #expect(try recordFindings(f.store, staleAfter: 60).isEmpty)
        // The commit: lease to the destination and the source marked migrated in one transaction.
        try f.store.leases.handOver(guestID: r.id, fromPid: getpid(), toHost: "host1", toPid: destination.pid)
        #expect(try f.store.instances.list().first { $0.pid == getpid() }?.state == .migrated)
        try f.store.instances.update(guestID: r.id, pid: destination.pid, state: .running)
        #expect(try recordFindings(f.store, staleAfter: 60).isEmpty)

        // Beacons are required for web1: silent for longer than the grace period means stale.
        usleep(300_000)
        let stale = try recordFindings(f.store, staleAfter: 0.1)
        #expect(stale.map(\.kind) == [.stale] && stale.first?.pid == destination.pid && stale.first?.mustStop == false)
        #expect(try events(f.store).filter { $0 == "scan.stale" }.count == 1)
        _ = try recordFindings(f.store, staleAfter: 0.1)
        #expect(try events(f.store).filter { $0 == "scan.stale" }.count == 1, "a stale guest is audited once, not every scan")

        try f.store.instances.update(guestID: r.id, pid: destination.pid, state: .paused)
        usleep(300_000)
        #expect(try recordFindings(f.store, staleAfter: 0.1).isEmpty, "a paused guest is not stale")
    }

    @Test("a post-copy source that serves pages (page-server, awaiting recovery) holds no lease, yet is neither a ghost nor stale; the same record claiming to run is one")
    func postCopyPageServer() throws {
        let f = try Fixture()
        defer { f.remove() }
        let destination = try LiveChild()
        let r = try web1RunningHere(f)
        try f.store.instances.record(r, pid: destination.pid, token: 1, state: .incoming)
        try f.store.leases.handOver(guestID: r.id, fromPid: getpid(), toHost: "host1", toPid: destination.pid)
        try f.store.instances.update(guestID: r.id, pid: destination.pid, state: .running)
        for state in [InstanceState.pageServer, .pageServerAwaitingRecovery] {
            try f.store.instances.update(guestID: r.id, state: state)
            #expect(try f.store.instances.list().first { $0.pid == getpid() }?.state == state)
            usleep(300_000)
            let findings = try recordFindings(f.store, staleAfter: 0.1)
            #expect(!findings.contains { $0.pid == getpid() }, "\(state.rawValue): \(findings)")
        }
        // Without its post-copy state the same process, without the lease, is judged.
        try f.store.instances.update(guestID: r.id, state: .running)
        let judged = try recordFindings(f.store, staleAfter: 60)
        #expect(judged.contains { $0.pid == getpid() && $0.mustStop }, "\(judged)")
    }

    @Test("records of processes that are gone are removed; a clean exit silently, a crash with an audit entry")
    func goneProcesses() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try f.store.registry.register(web1(), signedBy: f.admin)
        try f.store.instances.record(r, pid: try deadPid(), token: 1, state: .running)
        try f.store.instances.record(r, pid: try deadPid(), token: 1, state: .ended)
        let findings = try recordFindings(f.store)
        #expect(findings.map(\.kind) == [.gone])
        #expect(try f.store.instances.list().isEmpty)
        #expect(try events(f.store).filter { $0 == "scan.gone" }.count == 1)
    }

    @Test("an instance record planted without the host key is not trusted: removed and audited")
    func forgedRecord() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try web1RunningHere(f)
        let other = try LiveChild()
        // The attacker copies our row to its own pid, MAC and all.
        try f.attacker("""
            INSERT INTO instances SELECT host, ?, guest_id, guest_name, token_mac, state, beacons_required, started_at,
                updated_at, last_beacon_at, beacon_count, beacon_counter, false_beacon, stale_since, mac
            FROM instances WHERE pid = ?
            """, [other.pid, getpid()])
        _ = try recordFindings(f.store)
        #expect(try f.store.instances.list().map(\.pid) == [getpid()])
        #expect(try events(f.store).contains("scan.forged-record"))
    }

    @Test("a store copied to another directory is refused as a copy; the original opens")
    func copiedStoreRefused() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.ensureOriginal()
        let copy = f.root + "/copy"
        try FileManager.default.copyItem(atPath: f.storeDir, toPath: copy)
        let copied = try BillboardStore(directory: copy)
        #expect(refusal { try copied.ensureOriginal() } == .copiedStore(directory: copy))
        #expect(copied.scan.judgeOtherStore(openFile(f.databasePath)).isCopy)
        #expect(f.store.scan.judgeOtherStore(openFile(copy + "/" + BillboardStore.databaseFileName)).isCopy)
        let other = try Fixture(hostName: "host2")
        defer { other.remove() }
        let judged = f.store.scan.judgeOtherStore(openFile(other.databasePath))
        #expect(!judged.isCopy && judged.evidence.contains(other.databasePath))
    }

    /// A billboard database as the scan sees it open in another process (here by its path).
    func openFile(_ path: String) -> HostProcesses.OpenFile {
        HostProcesses.OpenFile(name: path, status: try? FileStatus.of(path: path))
    }

    @Test("a rollback authorisation is signed by an administrator, bound to one snapshot digest, and used once")
    func restoreAuthorisation() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try f.store.registry.register(web1(), signedBy: f.admin)
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 10)
        try f.store.leases.release(guestID: r.id, pid: getpid())
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 10)  // epoch 2
        let digest = String(repeating: "ab", count: 32)
        #expect(refusal { try f.store.leases.checkEpoch(guestID: r.id, epoch: 1, snapshotSHA256: { digest }) }
                == .staleEpoch(guestID: r.id, epoch: 1, current: 2))

        let mallory = try AdminKey(name: "mallory")
        #expect(refusal { try f.store.leases.authorizeRestore(guestName: "web1", snapshotSHA256: digest, signedBy: mallory) } != nil)
        try f.store.leases.authorizeRestore(guestName: "web1", snapshotSHA256: digest, signedBy: f.admin)
        // Admission only looks (a restore that then fails verification must not burn it).
        try f.store.leases.checkEpoch(guestID: r.id, epoch: 1, snapshotSHA256: { digest }, consume: false)
        try f.store.leases.checkEpoch(guestID: r.id, epoch: 1, snapshotSHA256: { digest }, consume: false)
        let other = String(repeating: "cd", count: 32)
        #expect(refusal { try f.store.leases.checkEpoch(guestID: r.id, epoch: 1, snapshotSHA256: { other }) } != nil,
                "an authorisation is for one snapshot only")
        try f.store.leases.checkEpoch(guestID: r.id, epoch: 1, snapshotSHA256: { digest })
        #expect(refusal { try f.store.leases.checkEpoch(guestID: r.id, epoch: 1, snapshotSHA256: { digest }) } != nil,
                "an authorisation is good for one restore")
        #expect(try events(f.store).contains("epoch.authorized-rollback"))

        // An unused authorisation edited to point at another snapshot fails its integrity code.
        try f.store.leases.authorizeRestore(guestName: "web1", snapshotSHA256: digest, signedBy: f.admin)
        try f.attacker("UPDATE restore_authorizations SET snapshot_sha256 = ? WHERE used_at IS NULL", [other])
        #expect(refusal { try f.store.leases.checkEpoch(guestID: r.id, epoch: 1, snapshotSHA256: { other }) } == .recordTampered(what: "restore authorisation 2"))
    }

    @Test("a migration destination may take a guest whose lease the announcing source holds, not one another live process holds")
    func incomingCheck() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try f.store.registry.register(web1(), signedBy: f.admin)
        let holder = try LiveChild()
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: holder.pid, takeoverAfter: 10)
        try f.store.leases.checkAvailable(guestID: r.id, handedBy: ("host1", holder.pid), takeoverAfter: 10)
        #expect(refusal { try f.store.leases.checkAvailable(guestID: r.id, handedBy: ("host1", 1), takeoverAfter: 10) }
                == .leaseHeld(guestID: r.id, host: "host1", pid: holder.pid, epoch: 1))
        // A claim of another host gives way to that host sending the guest (any of its processes:
        // its own store decides which), and to nobody else; the lease is then taken by the same rule.
        let g = try f.store.registry.register(GuestRegistration(name: "g2", imageSHA256: imageDigest, memoryBytes: 64 << 20, vcpus: 1), signedBy: f.admin)
        try f.store.leases.acquire(guestID: g.id, host: "host1", pid: getpid(), takeoverAfter: 10)
        try f.store.leases.handOver(guestID: g.id, fromPid: getpid(), toHost: "hostA", toPid: 111)
        try f.store.leases.checkAvailable(guestID: g.id, handedBy: ("hostA", 222), takeoverAfter: 10)
        #expect(refusal { try f.store.leases.checkAvailable(guestID: g.id, handedBy: ("hostB", 111), takeoverAfter: 10) } != nil)
        #expect(try f.store.leases.acquire(guestID: g.id, host: "host1", pid: getpid(), takeoverAfter: 10,
                                         handedBy: ("hostA", 222)).pid == getpid())
    }

    @Test("a restore whose epoch fell behind between its check and its lease is refused in the lease's own transaction")
    func stateEpochInsideLease() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try f.store.registry.register(web1(), signedBy: f.admin)
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: try deadPid(), takeoverAfter: 0)   // epoch 1
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: try deadPid(), takeoverAfter: 0)   // epoch 2
        #expect(refusal { try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 0, stateEpoch: 1) }
                == .staleEpoch(guestID: r.id, epoch: 1, current: 2))
        #expect(try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 0, stateEpoch: 1,
                                         rollbackAuthorized: true).epoch == 3)
        #expect(try f.store.leases.advanceEpoch(guestID: r.id) == 4)
    }

    @Test("a state signature verifies for this host and for an added peer, and not for edited contents or an unknown host")
    func stateSignatures() throws {
        let f = try Fixture()
        defer { f.remove() }
        let peer = try Fixture(hostName: "host2")
        defer { peer.remove() }
        let stranger = try Fixture(hostName: "host3")
        defer { stranger.remove() }
        let digest = [UInt8](repeating: 7, count: 32)
        try f.store.stateSignatures.verify(try f.store.stateSignatures.sign(digest: digest), digest: digest)
        var edited = digest
        edited[0] ^= 1
        #expect(refusal { try f.store.stateSignatures.verify(try f.store.stateSignatures.sign(digest: digest), digest: edited) } != nil)
        let fromPeer = try peer.store.stateSignatures.sign(digest: digest)
        #expect(refusal { try f.store.stateSignatures.verify(fromPeer, digest: digest) } != nil)
        try f.store.peerHosts.add(name: "host2", signingKey: peer.store.hostSigningKey, agreementKey: peer.store.hostAgreementKey,
                            signedBy: f.admin)
        try f.store.stateSignatures.verify(fromPeer, digest: digest)
        #expect(refusal { try f.store.stateSignatures.verify(try stranger.store.stateSignatures.sign(digest: digest), digest: digest) } != nil)
    }

    @Test("a lease handed to another host never expires here: only that host handing the guest back, or an administrator, frees it")
    func remoteLeases() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try f.store.registry.register(web1(), signedBy: f.admin)
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 0)
        let epoch = try f.store.leases.handOver(guestID: r.id, fromPid: getpid(), toHost: "hostB", toPid: 4242)
        #expect(epoch == 2)
        usleep(50_000)
        // takeoverAfter 0: a local dead holder would be taken over at once; a remote one is not.
        #expect(refusal { try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 0) }
                == .leaseHeld(guestID: r.id, host: "hostB", pid: 4242, epoch: 2))
        // The guest migrating back from hostB's pid 4242 takes it at the next epoch.
        let back = try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 0,
                                            minimumEpoch: 3, handedBy: ("hostB", 4242))
        #expect(back.epoch == 3)
        #expect(try events(f.store).contains("lease.return"))

        try f.store.leases.handOver(guestID: r.id, fromPid: getpid(), toHost: "hostC", toPid: 7)
        let mallory = try AdminKey(name: "mallory")
        #expect(refusal { try f.store.leases.release(guestName: "web1", signedBy: mallory) } != nil)
        try f.store.leases.release(guestName: "web1", signedBy: f.admin)
        #expect(try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 0).epoch == 5)
        #expect(try events(f.store).contains("lease.admin-release"))
    }

    @Test("a lease stranded on a live process of this host that runs no VM (a rogue peer's pid 1) is released by an administrator; one whose holder runs a VM is not")
    func strandedLeaseReleasable() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try f.store.registry.register(web1(), signedBy: f.admin)
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 0)
        // A hand-over to "this host, pid 1", as a rogue destination's accept once obtained.
        try f.store.leases.handOver(guestID: r.id, fromPid: getpid(), toHost: f.store.hostName, toPid: 1)
        #expect(refusal { try f.store.leases.acquire(guestID: r.id, host: f.store.hostName, pid: getpid(), takeoverAfter: 0) } != nil)
        try f.store.leases.release(guestName: "web1", signedBy: f.admin)
        #expect(try events(f.store).contains("lease.admin-release"))
        let lease = try f.store.leases.acquire(guestID: r.id, host: f.store.hostName, pid: getpid(), takeoverAfter: 0)
        #expect(lease.pid == getpid())
    }

    @Test("a name registered again inherits its lease: the epoch does not reset and a running copy still holds it")
    func reRegistrationInheritsLease() throws {
        let f = try Fixture()
        defer { f.remove() }
        let first = try f.store.registry.register(web1(), signedBy: f.admin)
        let holder = try LiveChild()
        try f.store.leases.acquire(guestID: first.id, host: "host1", pid: holder.pid, takeoverAfter: 10)
        try f.store.registry.revoke(name: "web1", signedBy: f.admin)
        let second = try f.store.registry.register(web1(), signedBy: f.admin)
        #expect(second.id != first.id)
        #expect(try f.store.leases.epoch(guestID: second.id) == 1)
        #expect(refusal { try f.store.leases.acquire(guestID: second.id, host: "host1", pid: getpid(), takeoverAfter: 10) }
                == .leaseHeld(guestID: second.id, host: "host1", pid: holder.pid, epoch: 1))
        #expect(refusal { try f.store.leases.checkEpoch(guestID: second.id, epoch: 0) } != nil, "an older snapshot is still refused")
    }

    @Test("a lease pointed at another process by someone without the host key is detected as tampered")
    func leaseHolderTampered() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try f.store.registry.register(web1(), signedBy: f.admin)
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 10)
        try f.attacker("UPDATE leases SET pid = 1")
        #expect(refusal { try f.store.leases.renew(guestID: r.id, pid: getpid()) } == .recordTampered(what: "lease of guest \(r.id)"))
    }

    @Test("a clean end gives the lease back and marks the record ended in one step")
    func cleanEnd() throws {
        let f = try Fixture()
        defer { f.remove() }
        let r = try web1RunningHere(f)
        try f.store.instances.end(guestID: r.id, releaseLease: true)
        #expect(try f.store.leases.current(guestID: r.id)?.pid == 0)
        #expect(try f.store.instances.list().first?.state == .ended)
        #expect(try recordFindings(f.store).isEmpty)
    }
}
