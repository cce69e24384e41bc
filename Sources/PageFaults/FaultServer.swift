#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GuestMemory
import Synchronization
import SystemCalls

/// Figures of one lazily filled guest memory.
public struct FaultStats: Sendable, Codable, Equatable {
    /// Missing-page faults read from the userfaultfd (the guest's and this process's).
    public var faults = 0
    /// Of those, faults on a unit the other thread was already fetching (they waited for it).
    public var faultsOnUnitInFlight = 0
    /// Faults whose unit could not be fetched because the source was unavailable: they waited
    /// until it came back (post-copy after a failed link).
    public var faultsPostponed = 0
    /// Units fetched because a fault needed them, and by the background filler.
    public var unitsOnFault = 0
    public var unitsByFiller = 0
    /// Per-fault time from reading the fault to its page being installed, in milliseconds.
    public var medianFaultMs = 0.0
    public var p99FaultMs = 0.0
    public var maxFaultMs = 0.0
    /// Sum of those times: how long faulting threads were blocked in all.
    public var blockedMs = 0.0
    /// From `start()` to the last page installed; nil while pages are still missing.
    public var completeAfterMs: Double?
}

/// Why a fault server stopped its guest.
public struct PageSourceFailure: Error, CustomStringConvertible, Sendable {
    /// The unit that could not be fetched or verified, and why.
    public var unit: Int
    public var reason: String
    public var description: String { "the pages of unit \(unit) could not be fetched and verified: \(reason)" }
}

/// Thrown by a page source whose pages cannot come now but may come later (a post-copy source
/// whose link failed). A server made with `onUnavailable` keeps such a fault waiting (its thread
/// stays asleep on the page) instead of failing, until the unit is offered or `retryPostponed()`
/// fetches it again; without `onUnavailable` it is a failure like any other.
public struct PageSourceUnavailable: Error, CustomStringConvertible, Sendable {
    public var reason: String
    public init(reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// Serves missing-page faults of a guest memory from a `PageSource`, through a userfaultfd.
///
/// Two threads: the **fault thread** polls the userfaultfd and, for each fault, fetches the unit
/// that holds the page (or maps a zero page) and installs it with `UFFDIO_COPY`, which wakes the
/// faulting thread; the **filler** fetches the units no fault asked for yet, in order from just
/// after the last fault's unit, so the memory ends complete. Then the gaps (pages in no unit) get
/// zero pages, the memory is unregistered and the userfaultfd closed: from then on memory is
/// ordinary memory.
///
/// Locking: `state` is held only to read and update bookkeeping, never while fetching or
/// installing, and no thread here touches guest memory except through the userfaultfd ioctls. So
/// a faulting thread (a vCPU in `KVM_RUN`, or a VMM thread reading memory for a device, a beacon
/// or a digest while holding its own locks) never waits for a lock the server needs.
///
/// A unit that cannot be fetched or verified is never installed: the server records the failure,
/// calls `onFailure` (the owner ends the machine there, which kicks its vCPUs), and then
/// unregisters the memory, so that every thread still sleeping on a page wakes (on a zero page)
/// and the kicked vCPUs leave `KVM_RUN` before running the guest again.
public final class FaultServer: Sendable {
    public let memory: GuestMemory
    public let source: any PageSource
    private let uffd: UserFaultFD
    private let onFailure: @Sendable (PageSourceFailure) -> Void
    /// Told when a fetch found the source unavailable (nil: that is a failure).
    private let onUnavailable: (@Sendable (String) -> Void)?
    /// Poked to make the fault thread tear down (complete, failed or stopped).
    private let wakePipe: (read: OwnedFileDescriptor, write: OwnedFileDescriptor)

    private enum UnitState: UInt8 { case missing, inFlight, installed }

    private struct State {
        var units: [UnitState]
        /// Faults waiting for a unit the other thread fetches: their page and when they were read.
        var waiters: [Int: [(pfn: UInt64, readAt: Double)]] = [:]
        /// One bit per guest page: installed (data, zero, or found present).
        var present: [UInt64]
        var latencies: [Double] = []
        var stats = FaultStats()
        var lastFaultUnit = -1
        var startedAt = 0.0
        var failure: PageSourceFailure?
        var stopping = false
        var completing = false
        var tornDown = false

        func isPresent(_ pfn: UInt64) -> Bool { present[Int(pfn / 64)] & (1 << (pfn % 64)) != 0 }
        mutating func mark(_ pfn: UInt64, count: UInt64) {
            for p in pfn..<pfn + count { present[Int(p / 64)] |= 1 << (p % 64) }
        }
    }
    private let state: Mutex<State>
    private let done = NSCondition()

    /// Creates a userfaultfd and registers all of `memory` with it: call before anything touches
    /// the memory. Nothing runs until `start()`.
    ///
    /// `onUnavailable`: for a server started without the filler whose source may go away for a
    /// while (post-copy): a fetch that throws `PageSourceUnavailable` leaves its unit missing and
    /// its faults waiting, and this is told why (nothing fails).
    public init(memory: GuestMemory, source: any PageSource,
                onUnavailable: (@Sendable (String) -> Void)? = nil,
                onFailure: @escaping @Sendable (PageSourceFailure) -> Void) throws {
        self.memory = memory
        self.source = source
        self.onFailure = onFailure
        self.onUnavailable = onUnavailable
        uffd = try UserFaultFD()
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw SystemCallError.last("pipe") }
        for fd in fds {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, O_NONBLOCK)
        }
        wakePipe = (OwnedFileDescriptor(taking: fds[0]), OwnedFileDescriptor(taking: fds[1]))
        state = Mutex(State(units: Array(repeating: .missing, count: source.unitCount),
                            present: Array(repeating: 0, count: Int((memory.pageCount + 63) / 64))))
        try memory.registerMissingPages(with: uffd)
    }

    /// Starts the fault thread, and the filler unless `fill` is false (then pages arrive only on
    /// fault, and the memory stays registered until `stop()`).
    public func start(fill: Bool = true) {
        state.withLock { $0.startedAt = monotonicMilliseconds() }
        startThread(name: "uffd-faults") { [self] in faultLoop() }
        if fill { startThread(name: "uffd-filler") { [self] in fillLoop() } }
    }

    /// The failure that stopped the guest, if one did.
    public var failure: PageSourceFailure? { state.withLock { $0.failure } }

    /// Figures so far.
    public var stats: FaultStats {
        state.withLock { s in
            var stats = s.stats
            let sorted = s.latencies.sorted()
            if !sorted.isEmpty {
                stats.medianFaultMs = sorted[sorted.count / 2]
                stats.p99FaultMs = sorted[min(sorted.count - 1, Int((Double(sorted.count) * 0.99).rounded(.up)) - 1)]
                stats.maxFaultMs = sorted.last!
            }
            stats.blockedMs = sorted.reduce(0, +)
            return stats
        }
    }

    /// Whether every page is in and the userfaultfd is gone (or the server stopped).
    public var isFinished: Bool { state.withLock { $0.tornDown } }

    /// Waits until the server has finished (complete, failed or stopped); false on timeout.
    public func waitUntilFinished(timeout: Double) -> Bool {
        let deadline = Date(timeIntervalSinceNow: timeout)
        done.lock(); defer { done.unlock() }
        while !isFinished { if !done.wait(until: deadline) { return isFinished } }
        return true
    }

    /// Shutdown: the filler stops after its current unit, the memory is unregistered (a thread
    /// still sleeping on a missing page wakes on a zero page) and the userfaultfd closed. Call it
    /// once the machine has been told to end: its vCPUs were kicked, so one that wakes here leaves
    /// `KVM_RUN` before the guest runs again. Returns once the fault thread has torn down.
    public func stop() {
        let started = state.withLock { s -> Bool in
            s.stopping = true
            return s.startedAt > 0
        }
        if started {
            poke()
            _ = waitUntilFinished(timeout: 3600)
        } else {
            tearDown()
        }
    }

    // MARK: - The fault thread

    private func faultLoop() {
        while true {
            let ready: (faults: Bool, other: Bool)
            do { ready = try uffd.waitForFaults(orReadable: wakePipe.read, timeoutMilliseconds: -1) } catch {
                fail(unit: -1, reason: "\(error)")
                break
            }
            if ready.faults {
                let faults: [UserFault]
                do { faults = try uffd.readFaults() } catch {
                    fail(unit: -1, reason: "\(error)")
                    break
                }
                for fault in faults { serve(fault) }
            }
            if state.withLock({ $0.stopping || $0.failure != nil || ($0.completing && $0.units.allSatisfy { $0 == .installed }) }) {
                if ready.faults { continue }  // drain what was read first; the next poll returns at once
                break
            }
        }
        tearDown()
    }

    private func serve(_ fault: UserFault) {
        let readAt = monotonicMilliseconds()
        guard let pfn = memory.pageFrame(ofHostAddress: fault.address) else { return }
        let unit = source.unit(containing: pfn)
        enum Action { case wake, zero, wait, fetch(Int) }
        let action = state.withLock { s -> Action in
            s.stats.faults += 1
            if s.failure != nil || s.tornDown { return .wake }
            if s.isPresent(pfn) { return .wake }
            guard let unit else { return .zero }
            s.lastFaultUnit = unit
            switch s.units[unit] {
            case .installed: return .zero  // a page in the unit's span that the unit does not hold
            case .inFlight:
                s.stats.faultsOnUnitInFlight += 1
                s.waiters[unit, default: []].append((pfn, readAt))
                return .wait
            case .missing:
                s.units[unit] = .inFlight
                return .fetch(unit)
            }
        }
        switch action {
        case .wait: return
        case .wake:
            // Installed meanwhile by the filler (which woke it), or the server is gone: harmless.
            try? memory.wakePages(atPageFrame: pfn, count: 1, through: uffd)
            record(readAt)
        case .zero:
            do {
                try memory.installZeroPages(atPageFrame: pfn, count: 1, through: uffd)
                state.withLock { $0.mark(pfn, count: 1) }
                record(readAt)
                if unit == nil { zeroAhead(after: pfn) }
            } catch {
                fail(unit: unit ?? -1, reason: "mapping a zero page at frame \(pfn): \(error)")
            }
        case let .fetch(unit):
            switch fetchAndInstall(unit, byFiller: false, waiter: (pfn, readAt)) {
            case .installed: record(readAt)
            case .failed, .postponed: break
            }
        }
    }

    /// Pages after a zero page that the server maps zero too, at most.
    static let zeroAheadPages: UInt64 = 64

    /// A thread that touched a page of zeros tends to go on to the next ones (a guest sweeping
    /// through fresh memory): the pages after `pfn` that no unit holds and that are not there yet
    /// get the zero page too, each of which would otherwise be one more fault. Runs after the
    /// faulting thread was woken; stops at the first page in a unit, present or installed, so it
    /// never maps over anything that has or will have content. Best effort: a failure here is
    /// left to the fault that would have come anyway.
    private func zeroAhead(after pfn: UInt64) {
        let limit = min(memory.pageCount, pfn + 1 + Self.zeroAheadPages)
        var end = pfn + 1
        while end < limit && source.unit(containing: end) == nil { end += 1 }
        let first = pfn + 1
        end = state.withLock { s -> UInt64 in
            guard s.failure == nil, !s.stopping, !s.tornDown else { return first }
            var e = first
            while e < end && !s.isPresent(e) { e += 1 }
            return e
        }
        // In pieces, so that a page already there (received before, so the ones after it likely
        // too) ends it after one more ioctl, not one per page.
        var at = first
        while at < end {
            let n = min(8, end - at)
            guard let done = try? memory.installZeroPages(atPageFrame: at, count: n, through: uffd) else { return }
            state.withLock { $0.mark(at, count: n) }
            if done.alreadyPresentBytes > 0 { return }
            at += n
        }
    }

    private func record(_ readAt: Double) {
        let ms = monotonicMilliseconds() - readAt
        state.withLock { $0.latencies.append(ms) }
    }

    // MARK: - Fetching and installing a unit (both threads)

    private enum FetchOutcome { case installed, failed, postponed }

    /// Fetches `unit` (marked in flight by the caller), installs it, and serves the faults that
    /// waited for it. `failed`: the server is failed. `postponed`: the source is unavailable for
    /// now; the unit is missing again and `waiter` (the fault that asked for it, if a fault did)
    /// waits with the others until the unit comes.
    private func fetchAndInstall(_ unit: Int, byFiller: Bool, waiter: (pfn: UInt64, readAt: Double)? = nil) -> FetchOutcome {
        let batch: PageBatch
        do { batch = try source.fetch(unit: unit) } catch let unavailable as PageSourceUnavailable where onUnavailable != nil {
            state.withLock { s in
                s.units[unit] = .missing
                // A thread may raise the same fault again while it waits: it is counted once.
                if let waiter, !(s.waiters[unit] ?? []).contains(where: { $0.pfn == waiter.pfn }) {
                    s.waiters[unit, default: []].append(waiter)
                    s.stats.faultsPostponed += 1
                }
            }
            onUnavailable?(unavailable.reason)
            return .postponed
        } catch {
            fail(unit: unit, reason: "\(error)")
            return .failed
        }
        return install(batch, unit: unit, byFiller: byFiller) ? .installed : .failed
    }

    /// Installs a fetched (or offered) unit and serves the faults that waited for it.
    private func install(_ batch: PageBatch, unit: Int, byFiller: Bool) -> Bool {
        do {
            try batch.bytes.withUnsafeBytes { bytes in
                for run in batch.runs {
                    switch run.content {
                    case let .data(offset):
                        let n = Int(run.count) * Int(GuestMemory.pageSize)
                        guard offset >= 0, offset + n <= bytes.count else {
                            throw PageSourceFailure(unit: unit, reason: "a run of \(run.count) pages at byte \(offset) lies outside the batch's \(bytes.count) bytes")
                        }
                        try memory.installPages(UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + n]),
                                                atPageFrame: run.firstPage, through: uffd)
                    case .zero:
                        try memory.installZeroPages(atPageFrame: run.firstPage, count: run.count, through: uffd)
                    }
                }
            }
        } catch {
            fail(unit: unit, reason: "installing its pages: \(error)")
            return false
        }
        let waiters = state.withLock { s -> [(pfn: UInt64, readAt: Double)] in
            for run in batch.runs { s.mark(run.firstPage, count: run.count) }
            s.units[unit] = .installed
            if byFiller { s.stats.unitsByFiller += 1 } else { s.stats.unitsOnFault += 1 }
            return s.waiters.removeValue(forKey: unit) ?? []
        }
        for waiter in waiters {
            // A waiter on a page the unit does not hold gets a zero page; the others were woken by the copy.
            let missing = state.withLock { !$0.isPresent(waiter.pfn) }
            if missing {
                do {
                    try memory.installZeroPages(atPageFrame: waiter.pfn, count: 1, through: uffd)
                    state.withLock { $0.mark(waiter.pfn, count: 1) }
                } catch {
                    fail(unit: unit, reason: "mapping a zero page at frame \(waiter.pfn): \(error)")
                    return false
                }
            }
            record(waiter.readAt)
        }
        return true
    }

    // MARK: - Units pushed from outside (post-copy)

    /// Installs `batch` as `unit`, which arrived without being asked for (a migration source
    /// pushing the pages no fault needed yet), unless a fault already fetches or installed it.
    /// False if the unit was not missing (nothing done) or installing failed (the server failed).
    @discardableResult
    public func offer(unit: Int, batch: PageBatch) -> Bool {
        let mine = state.withLock { s -> Bool in
            guard unit >= 0, unit < s.units.count, s.units[unit] == .missing, s.failure == nil, !s.stopping else { return false }
            s.units[unit] = .inFlight
            return true
        }
        guard mine else { return false }
        return install(batch, unit: unit, byFiller: true)
    }

    /// For a server started without filler whose units are all offered: waits for the units a
    /// fault is still fetching, then, if every unit is in, maps zero pages over the pages no unit
    /// holds and finishes (the memory becomes ordinary memory; `waitUntilFinished` returns).
    /// False, with nothing changed, while a unit is still missing (a page that was asked for when
    /// its source went away): its page must never read as zero, so the memory stays registered.
    @discardableResult
    public func completeOnceUnitsAreIn() -> Bool {
        while state.withLock({ s in s.failure == nil && !s.stopping && s.units.contains(.inFlight) }) { usleep(200) }
        if state.withLock({ $0.failure != nil || $0.stopping || $0.units.contains(.missing) }) { return false }
        completeIfFilled()
        return true
    }

    /// The units not installed yet (missing, or being fetched or installed).
    public var unitsNotInstalled: [Int] {
        state.withLock { s in s.units.indices.filter { s.units[$0] != .installed } }
    }

    /// The source is back: fetches again, one after another, the units whose faults were
    /// postponed (they wait first), and returns once each is in or the source went away again.
    public func retryPostponed() {
        while true {
            let unit = state.withLock { s -> Int? in
                guard s.failure == nil, !s.stopping,
                      let unit = s.waiters.keys.sorted().first(where: { s.units[$0] == .missing }) else { return nil }
                s.units[unit] = .inFlight
                return unit
            }
            guard let unit else { return }
            if fetchAndInstall(unit, byFiller: false) != .installed { return }
        }
    }

    /// Stops serving because the pages can no longer come (the link to their source failed):
    /// the owner is told through `onFailure`, as for a unit that could not be fetched.
    public func abandon(reason: String) {
        fail(unit: -1, reason: reason)
    }

    // MARK: - The filler

    private func fillLoop() {
        // The first faults are on the guest's way to its first instruction: let them have the
        // CPU (two cores are shared) until one unit came in on fault, or for 20 ms at most.
        let deadline = monotonicMilliseconds() + 20
        while monotonicMilliseconds() < deadline,
              state.withLock({ $0.stats.unitsOnFault == 0 && !$0.stopping && $0.failure == nil }) { usleep(200) }
        while let unit = nextUnitToFill() {
            // Postponed: the source went away; pages then come by fault or offer only.
            if fetchAndInstall(unit, byFiller: true) != .installed { return }
        }
        completeIfFilled()
    }

    /// The next missing unit after the last fault's (wrapping around), marked in flight; nil when
    /// none is missing or the server stops.
    private func nextUnitToFill() -> Int? {
        state.withLock { s -> Int? in
            guard !s.stopping, s.failure == nil, !s.units.isEmpty else { return nil }
            let start = s.lastFaultUnit + 1
            for i in 0..<s.units.count {
                let unit = (start + i) % s.units.count
                if s.units[unit] == .missing {
                    s.units[unit] = .inFlight
                    return unit
                }
            }
            return nil
        }
    }

    /// Once every unit is in (the fault thread may still be installing the last one, and then
    /// finishes the job), maps zero pages over the pages no unit holds and lets the fault thread
    /// tear down.
    private func completeIfFilled() {
        // Wait for a unit the fault thread is still fetching (it does not take long).
        while state.withLock({ s in s.failure == nil && !s.stopping && s.units.contains(.inFlight) }) { usleep(200) }
        let gaps = state.withLock { s -> [(UInt64, UInt64)]? in
            guard s.failure == nil, !s.stopping, !s.completing else { return nil }
            s.completing = true
            var gaps: [(UInt64, UInt64)] = []
            var p: UInt64 = 0
            let total = memory.pageCount
            while p < total {
                if s.isPresent(p) { p += 1; continue }
                let start = p
                while p < total && !s.isPresent(p) { p += 1 }
                gaps.append((start, p - start))
            }
            return gaps
        }
        guard let gaps else { return }
        for (pfn, count) in gaps {
            do { try memory.installZeroPages(atPageFrame: pfn, count: count, through: uffd) } catch {
                fail(unit: -1, reason: "mapping zero pages at frames \(pfn)+\(count): \(error)")
                return
            }
            state.withLock { $0.mark(pfn, count: count) }
        }
        state.withLock { $0.stats.completeAfterMs = monotonicMilliseconds() - $0.startedAt }
        poke()
    }

    // MARK: - Failure and teardown

    /// Records the first failure, tells the owner (who ends the machine), and lets the fault
    /// thread tear down (which wakes every sleeper).
    private func fail(unit: Int, reason: String) {
        let failure = PageSourceFailure(unit: unit, reason: reason)
        let first = state.withLock { s -> Bool in
            guard s.failure == nil, !s.tornDown else { return false }
            s.failure = failure
            return true
        }
        guard first else { return }
        onFailure(failure)
        poke()
    }

    private func poke() {
        var byte: UInt8 = 1
        _ = write(wakePipe.write.raw, &byte, 1)
    }

    /// Unregisters the memory (sleepers wake and retry) and closes the userfaultfd. Once.
    private func tearDown() {
        let first = state.withLock { s -> Bool in
            guard !s.tornDown else { return false }
            s.tornDown = true
            return true
        }
        guard first else { return }
        try? memory.unregisterMissingPages(from: uffd)
        uffd.descriptor.close()
        done.lock(); done.broadcast(); done.unlock()
    }

    private func startThread(name: String, _ body: @escaping @Sendable () -> Void) {
        startNamedThread(name, body)
    }
}
