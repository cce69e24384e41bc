import Foundation
import GRDB
import SystemCalls
import Testing
@testable import Billboard

/// The hand-over intents: synced before a migration's pause so that the commit inside it need
/// not be, and resolved after a crash as the commit would have gone. An OS crash is stood for by
/// the boot id: an intent written under another boot id than the resolver's is one whose
/// unsynced commit may have been lost (the store then holds the intent and the lease as it was
/// before the commit, which is what these tests leave behind).
@Suite("Hand-over intents: a crash at any point leaves exactly one side that may run the guest")
struct HandoverIntentTests {
    let previousBoot = "00000000-0000-0000-0000-000000000000"
    var thisBoot: String { kernelBootID ?? "this-boot" }

    @Test("source: an intent left by an OS crash before its commit was synced is resolved at the next scan as the commit: the lease is the destination's at epoch + 1, and this host cannot take it back")
    func sourceCrashRollsForward() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        let holder = try deadPid()
        #expect(try f.store.leases.acquire(guestID: guest, host: "host1", pid: holder, takeoverAfter: 0).epoch == 1)
        try f.store.handoverIntents.prepareOutgoing(guestID: guest, toHost: "host2", toPid: 4242, challenge: "c1", pid: holder,
                                                    bootID: previousBoot)
        // The periodic scan (any VMM's, or `vmm billboard scan`) settles it.
        _ = try f.store.scan.run(staleAfter: 60)
        let lease = try #require(try f.store.leases.current(guestID: guest))
        #expect(lease.host == "host2" && lease.pid == 4242 && lease.epoch == 2)
        #expect(try f.store.handoverIntents.list().isEmpty)
        #expect(try events(f.store).contains("lease.handover-recovered"))
        // The source's host never takes back by time a lease another host holds.
        #expect(refusal { try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 0) }
                == .leaseHeld(guestID: guest, host: "host2", pid: 4242, epoch: 2))
    }

    @Test("source: before any scan, the lease decision itself settles a crash's intent first (no takeover of a lease that may have moved)")
    func leaseDecisionResolvesFirst() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        let holder = try deadPid()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: holder, takeoverAfter: 0)
        try f.store.handoverIntents.prepareOutgoing(guestID: guest, toHost: "host2", toPid: 4242, challenge: "c1", pid: holder,
                                                    bootID: previousBoot)
        #expect(refusal { try f.store.leases.checkAvailable(guestID: guest, handedBy: nil, takeoverAfter: 0) }
                == .leaseHeld(guestID: guest, host: "host2", pid: 4242, epoch: 2))
        #expect(refusal { try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 0) }
                == .leaseHeld(guestID: guest, host: "host2", pid: 4242, epoch: 2))
    }

    @Test("source: a process killed after its intent, in this boot, handed nothing over (its commit would be in the store): the intent is void and the dead holder's lease is taken over as before")
    func sourceKilledSameBootIsVoid() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        let holder = try deadPid()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: holder, takeoverAfter: 0)
        try f.store.handoverIntents.prepareOutgoing(guestID: guest, toHost: "host2", toPid: 4242, challenge: "c1", pid: holder,
                                                    bootID: thisBoot)
        let resolved = try f.store.handoverIntents.resolve(bootID: thisBoot)
        #expect(resolved.map(\.outcome) == [.void])
        let lease = try #require(try f.store.leases.current(guestID: guest))
        #expect(lease.host == "host1" && lease.pid == holder && lease.epoch == 1)
        #expect(try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 0).epoch == 2)
    }

    @Test("an intent of a live process in this boot is a migration in flight: left alone")
    func liveIntentLeftAlone() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 30)
        try f.store.handoverIntents.prepareOutgoing(guestID: guest, toHost: "host2", toPid: 4242, challenge: "c1")
        #expect(try f.store.handoverIntents.resolve(bootID: kernelBootID).isEmpty)
        #expect(try f.store.handoverIntents.list().count == 1)
        #expect(try f.store.leases.current(guestID: guest)?.pid == getpid())
    }

    @Test("only the lease's holder may write an outgoing intent")
    func intentNeedsTheLease() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 30)
        #expect(refusal { try f.store.handoverIntents.prepareOutgoing(guestID: guest, toHost: "host2", toPid: 1, challenge: "c", pid: 4242) }
                == .leaseNotHeld(guestID: guest, pid: 4242))
        #expect(try f.store.handoverIntents.list().isEmpty)
    }

    @Test("the commit consumes its intent (nothing is left to resolve after a crash); a commit the intent does not describe is refused, and made the synced way instead")
    func commitConsumesIntent() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 30)
        let intent = try f.store.handoverIntents.prepareOutgoing(guestID: guest, toHost: "host2", toPid: 4242, challenge: "c1")
        // Another destination than intended: the intent covers nothing.
        #expect(refusal { try f.store.leases.handOver(guestID: guest, fromPid: getpid(), toHost: "host3", toPid: 4242, intent: intent) }
                == .handoverIntentMissing(guestID: guest))
        #expect(try f.store.leases.current(guestID: guest)?.pid == getpid())
        #expect(try f.store.leases.handOver(guestID: guest, fromPid: getpid(), toHost: "host2", toPid: 4242, intent: intent) == 2)
        #expect(try f.store.handoverIntents.list().isEmpty)
        #expect(try f.store.handoverIntents.resolve(bootID: previousBoot).isEmpty)
        let lease = try #require(try f.store.leases.current(guestID: guest))
        #expect(lease.host == "host2" && lease.pid == 4242 && lease.epoch == 2)
        // The same intent cannot be used twice.
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 30, handedBy: ("host2", 4242))
        #expect(refusal { try f.store.leases.handOver(guestID: guest, fromPid: getpid(), toHost: "host2", toPid: 4242, intent: intent) }
                == .handoverIntentMissing(guestID: guest))
    }

    @Test("a withdrawn intent (the migration failed before GO) is never acted on, even after a crash")
    func withdrawnIntent() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 30)
        let intent = try f.store.handoverIntents.prepareOutgoing(guestID: guest, toHost: "host2", toPid: 4242, challenge: "c1")
        try f.store.handoverIntents.withdraw(intent)
        #expect(try f.store.handoverIntents.resolve(bootID: previousBoot).isEmpty)
        #expect(try f.store.leases.current(guestID: guest)?.pid == getpid())
    }

    @Test("one host (a shared store): the source's intent from before an OS crash gives the lease to no one of that boot: released at epoch + 1")
    func sameHostRollForwardReleases() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        let source = try deadPid()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: source, takeoverAfter: 0)
        try f.store.handoverIntents.prepareOutgoing(guestID: guest, toHost: "host1", toPid: 4242, challenge: "c1", pid: source,
                                                    bootID: previousBoot)
        try f.store.handoverIntents.recordIncoming(guestID: guest, fromHost: "host1", fromPid: source, epoch: 1, challenge: "c1",
                                                   pid: 4242, bootID: previousBoot)
        let outcomes = try f.store.handoverIntents.resolve(bootID: thisBoot).map(\.outcome)
        #expect(outcomes.count == 2 && outcomes.contains(.rolledForward))
        let lease = try #require(try f.store.leases.current(guestID: guest))
        #expect(lease.pid == 0 && lease.epoch == 2)
        #expect(try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 30).epoch == 3)
    }

    @Test("destination: an intent from before an OS crash releases the dead receiver's claim and moves the epoch past the state's; a lease someone else holds is left to them")
    func destinationCrash() throws {
        let f = try Fixture(hostName: "host2")
        defer { f.remove() }
        // The take was lost: no lease row here at all. Released at the state's epoch + 1, so the
        // state that ran (or an older snapshot) is not new any more.
        let fresh = UUID()
        try f.store.handoverIntents.recordIncoming(guestID: fresh, fromHost: "host1", fromPid: 77, epoch: 5, challenge: "c",
                                                   pid: 4242, bootID: previousBoot)
        // The take survived: the lease names the receiver, which died with the OS.
        let taken = UUID()
        try f.store.leases.acquire(guestID: taken, host: "host2", pid: 4242, takeoverAfter: 30, minimumEpoch: 6, handedBy: ("host1", 77))
        try f.store.handoverIntents.recordIncoming(guestID: taken, fromHost: "host1", fromPid: 77, epoch: 5, challenge: "c",
                                                   pid: 4242, bootID: previousBoot)
        // The lease is held by another host (the guest's earlier hand-over): untouched.
        let elsewhere = UUID()
        try f.store.leases.acquire(guestID: elsewhere, host: "host2", pid: getpid(), takeoverAfter: 30)
        try f.store.leases.handOver(guestID: elsewhere, fromPid: getpid(), toHost: "host1", toPid: 77)
        try f.store.handoverIntents.recordIncoming(guestID: elsewhere, fromHost: "host1", fromPid: 78, epoch: 2, challenge: "c",
                                                   pid: 4243, bootID: previousBoot)
        _ = try f.store.handoverIntents.resolve(bootID: thisBoot)
        let a = try #require(try f.store.leases.current(guestID: fresh))
        #expect(a.pid == 0 && a.epoch == 6)
        let b = try #require(try f.store.leases.current(guestID: taken))
        #expect(b.pid == 0 && b.epoch == 6)
        let c = try #require(try f.store.leases.current(guestID: elsewhere))
        #expect(c.host == "host1" && c.pid == 77 && c.epoch == 2)
        #expect(try f.store.handoverIntents.list().isEmpty)
        // A snapshot of the state that arrived is history now.
        #expect(refusal { try f.store.leases.checkEpoch(guestID: fresh, epoch: 5) } == .staleEpoch(guestID: fresh, epoch: 5, current: 6))
    }

    @Test("destination: a receiver killed in this boot before its take leaves a void intent; the lease is as it was")
    func destinationKilledSameBoot() throws {
        let f = try Fixture(hostName: "host2")
        defer { f.remove() }
        let guest = UUID()
        try f.store.handoverIntents.recordIncoming(guestID: guest, fromHost: "host1", fromPid: 77, epoch: 5, challenge: "c",
                                                   pid: try deadPid(), bootID: thisBoot)
        #expect(try f.store.handoverIntents.resolve(bootID: thisBoot).map(\.outcome) == [.void])
        #expect(try f.store.leases.current(guestID: guest) == nil)
    }

    @Test("the take on GO consumes the receiver's intent; without it the take is made the synced way")
    func takeConsumesIntent() throws {
        let f = try Fixture(hostName: "host2")
        defer { f.remove() }
        let guest = UUID()
        let intent = try f.store.handoverIntents.recordIncoming(guestID: guest, fromHost: "host1", fromPid: 77, epoch: 5, challenge: "c")
        let lease = try f.store.leases.acquire(guestID: guest, host: "host2", pid: getpid(), takeoverAfter: 30, minimumEpoch: 6,
                                               handedBy: ("host1", 77), intent: intent)
        #expect(lease.epoch == 6)
        #expect(try f.store.handoverIntents.list().isEmpty)
        #expect(refusal { try f.store.leases.acquire(guestID: UUID(), host: "host2", pid: getpid(), takeoverAfter: 30, intent: intent) }
                == .handoverIntentMissing(guestID: guest))
    }

    @Test("a forged intent (written without host.key) or an edited one is never acted on: audited, dropped, the lease untouched; a commit relying on an edited one is refused")
    func forgedOrEditedRefused() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        let holder = try deadPid()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: holder, takeoverAfter: 0)
        // Planted: an intent that would give the lease to a rogue host after a "crash".
        try f.attacker("""
            INSERT INTO handover_intents(guest_id, role, host, pid, peer_host, peer_pid, epoch, challenge_sha256, boot_id, created_at, mac)
            VALUES (?, 'outgoing', 'host1', ?, 'rogue', 666, 1, 'x', ?, 0, x'00')
            """, [guestIDText(guest), holder, previousBoot])
        let planted = try f.store.handoverIntents.resolve(bootID: thisBoot)
        #expect(planted.map(\.outcome) == [.refused])
        var lease = try #require(try f.store.leases.current(guestID: guest))
        #expect(lease.host == "host1" && lease.pid == holder && lease.epoch == 1)
        #expect(try events(f.store).contains("handover.intent-refused"))

        // A real intent, its destination edited afterwards.
        let live = UUID()
        try f.store.leases.acquire(guestID: live, host: "host1", pid: getpid(), takeoverAfter: 30)
        let intent = try f.store.handoverIntents.prepareOutgoing(guestID: live, toHost: "host2", toPid: 4242, challenge: "c1")
        try f.attacker("UPDATE handover_intents SET peer_host = 'rogue' WHERE guest_id = ?", [guestIDText(live)])
        #expect(refusal { try f.store.leases.handOver(guestID: live, fromPid: getpid(), toHost: "host2", toPid: 4242, intent: intent) }
                == .recordTampered(what: "hand-over intent of guest \(live)"))
        lease = try #require(try f.store.leases.current(guestID: live))
        #expect(lease.pid == getpid())
        // The commit made the synced way, without the intent, is not affected by it.
        #expect(try f.store.leases.handOver(guestID: live, fromPid: getpid(), toHost: "host2", toPid: 4242) == 2)
        // And after a "crash" the edited row is refused, never rolled forward to 'rogue'.
        try f.attacker("UPDATE handover_intents SET boot_id = ?", [previousBoot])
        #expect(try f.store.handoverIntents.resolve(bootID: thisBoot).map(\.outcome) == [.refused])
        #expect(try f.store.leases.current(guestID: live)?.host == "host2")
    }

    @Test("an intent is synced at its commit (synchronous=FULL); the commit inside the pause is not, and runs no checkpoint; the store's setting is put back after each")
    func durabilityOfEachWrite() throws {
        let f = try Fixture()
        defer { f.remove() }
        let db = f.store.database
        let normal = try db.read { try Int.fetchOne($0, sql: "PRAGMA synchronous") }
        let autocheckpoint = try db.read { try Int.fetchOne($0, sql: "PRAGMA wal_autocheckpoint") }
        #expect(normal == 1, "the store is expected to run WAL with synchronous=NORMAL")
        #expect(try db.write(.system) { try Int.fetchOne($0, sql: "PRAGMA synchronous") } == 2)
        #expect(try db.write(.pause) { try Int.fetchOne($0, sql: "PRAGMA wal_autocheckpoint") } == 0)
        #expect(try db.write(.pause) { try Int.fetchOne($0, sql: "PRAGMA synchronous") } == normal)
        #expect(try db.read { try Int.fetchOne($0, sql: "PRAGMA synchronous") } == normal)
        #expect(try db.read { try Int.fetchOne($0, sql: "PRAGMA wal_autocheckpoint") } == autocheckpoint)
        // Also after a refusal inside the transaction.
        _ = try? db.write(.system) { _ -> Int in throw BillboardRefusal.bootstrapNotAllowed }
        #expect(try db.read { try Int.fetchOne($0, sql: "PRAGMA synchronous") } == normal)
    }
}
