import Foundation
import Testing
@testable import Billboard

@Suite("Leases allow one owner at a time and epochs only move forward")
struct LeaseTests {
    @Test("a second copy cannot take the lease while the holder's process lives")
    func duplicateWhileHolderLives() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        let me = getpid()
        let first = try f.store.leases.acquire(guestID: guest, host: "host1", pid: me, takeoverAfter: 0)
        #expect(first.epoch == 1)
        let other = try deadPid()  // its own liveness is irrelevant: the holder (this process) is alive
        let r = refusal { try f.store.leases.acquire(guestID: guest, host: "host1", pid: other, takeoverAfter: 0) }
        #expect(r == .leaseHeld(guestID: guest, host: "host1", pid: me, epoch: 1))
        #expect(try f.store.leases.epoch(guestID: guest) == 1)
        #expect(try events(f.store).contains("lease.acquire.refused"))
    }

    @Test("a lease renewed recently is live even if its pid cannot be seen")
    func recentRenewalIsLive() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: try deadPid(), takeoverAfter: 60)
        #expect(refusal { try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 60) } != nil)
    }

    @Test("a stale lease (dead pid) is taken over with epoch + 1, and the takeover is audited")
    func staleTakeover() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        let dead = try deadPid()
        #expect(try f.store.leases.acquire(guestID: guest, host: "host1", pid: dead, takeoverAfter: 0).epoch == 1)
        let taken = try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 0)
        #expect(taken.epoch == 2)
        #expect(taken.pid == getpid())
        let entry = try #require(try f.store.audit.entries().last)
        #expect(entry.event == "lease.takeover")
        #expect(entry.details.contains("\"previousPid\":\(dead)"))
        // The dead owner, should it come back, finds it no longer holds the lease.
        #expect(refusal { try f.store.leases.renew(guestID: guest, pid: dead) } == .leaseNotHeld(guestID: guest, pid: dead))
    }

    @Test("a snapshot from an older epoch is refused after hand-over, and the source cannot renew")
    func oldEpochRefused() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        let me = getpid()
        let lease = try f.store.leases.acquire(guestID: guest, host: "host1", pid: me, takeoverAfter: 30)
        try f.store.leases.checkEpoch(guestID: guest, epoch: lease.epoch)
        let newEpoch = try f.store.leases.handOver(guestID: guest, fromPid: me, toHost: "host2", toPid: 4242)
        #expect(newEpoch == lease.epoch + 1)
        #expect(try f.store.leases.epoch(guestID: guest) == newEpoch)
        #expect(refusal { try f.store.leases.checkEpoch(guestID: guest, epoch: lease.epoch) } ==
            .staleEpoch(guestID: guest, epoch: lease.epoch, current: newEpoch))
        #expect(refusal { try f.store.leases.renew(guestID: guest, pid: me) } != nil)
        #expect(try events(f.store).contains("epoch.check.refused"))
    }

    @Test("released leases keep their epoch; the next owner moves it forward")
    func releaseKeepsEpoch() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 30)
        try f.store.leases.release(guestID: guest, pid: getpid())
        #expect(try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 30).epoch == 2)
    }

    @Test("lowering the epoch in the database is detected")
    func epochRollbackDetected() throws {
        let f = try Fixture()
        defer { f.remove() }
        let guest = UUID()
        try f.store.leases.acquire(guestID: guest, host: "host1", pid: getpid(), takeoverAfter: 30)
        try f.store.leases.handOver(guestID: guest, fromPid: getpid(), toHost: "host1", toPid: getpid())
        try f.attacker("UPDATE leases SET epoch = 1")
        #expect(refusal { try f.store.leases.checkEpoch(guestID: guest, epoch: 1) } ==
            .recordTampered(what: "lease of guest \(guest)"))
    }
}
