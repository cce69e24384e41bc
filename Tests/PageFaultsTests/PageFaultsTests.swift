#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GuestMemory
import PageFaults
import Synchronization
import SystemCalls
import Testing

/// Waits up to `seconds` for `condition`.
private func waitUntil(_ seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = Date(timeIntervalSinceNow: seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(1000)
    }
    return condition()
}

/// The byte a test page holds at `offset`: differs per page, so a page in the wrong place shows.
private func patternByte(page: UInt64, offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: page &* 31 &+ UInt64(offset) &* 7 &+ 1) }

/// What `TestSource` says page `pfn` holds (below `end`; multiples of 5 are zero).
private func expectedPage(_ pfn: UInt64, end: UInt64) -> [UInt8] {
    pfn >= end || pfn % 5 == 0 ? [UInt8](repeating: 0, count: 4096) : (0..<4096).map { patternByte(page: pfn, offset: $0) }
}

@Suite("userfaultfd, alone")
struct UserFaultFDTests {
    @Test("a thread touching a registered missing page sleeps until UFFDIO_COPY installs it, then reads the copied bytes; a second copy is 'already there'")
    func copyInstallsAndWakes() throws {
        let uffd = try UserFaultFD()
        let mapping = try MemoryMapping(length: 4 * 4096, protection: PROT_READ | PROT_WRITE,
                                        flags: MAP_PRIVATE | MAP_ANONYMOUS, descriptor: nil)
        let base = UInt64(UInt(bitPattern: mapping.base))
        try uffd.register(address: base, length: 4 * 4096)

        let seen = Mutex<UInt8?>(nil)
        let address = UInt(base) + 2 * 4096 + 100
        let thread = Thread {
            // SAFETY: inside the mapping, which outlives the test's wait below.
            let value = UnsafePointer<UInt8>(bitPattern: address)!.pointee
            seen.withLock { $0 = value }
        }
        thread.start()

        var faults: [UserFault] = []
        #expect(waitUntil(10) {
            faults += (try? uffd.readFaults()) ?? []
            return !faults.isEmpty
        }, "no fault was reported")
        #expect(faults.first?.address == base + 2 * 4096)
        #expect(faults.first?.isWrite == false)
        usleep(20_000)
        #expect(seen.withLock { $0 } == nil, "the toucher read before the page was installed")

        let page = (0..<4096).map { patternByte(page: 2, offset: $0) }
        let outcome = try page.withUnsafeBytes { try uffd.copy(from: $0.baseAddress!, to: base + 2 * 4096, length: 4096) }
        #expect(outcome.installedBytes == 4096)
        #expect(waitUntil(10) { seen.withLock { $0 } != nil })
        #expect(seen.withLock { $0 } == patternByte(page: 2, offset: 100))

        // The same page again (two servers racing): already there, not an error, bytes unchanged.
        let zeros = [UInt8](repeating: 0, count: 4096)
        let again = try zeros.withUnsafeBytes { try uffd.copy(from: $0.baseAddress!, to: base + 2 * 4096, length: 4096) }
        #expect(again == { var o = UserFaultInstall(); o.alreadyPresentBytes = 4096; return o }())
        #expect(mapping.bytes[2 * 4096 + 100] == patternByte(page: 2, offset: 100))

        // A range over a present page: the missing pages around it are installed, the present one skipped.
        let three = [UInt8](repeating: 0xAB, count: 3 * 4096)
        let mixed = try three.withUnsafeBytes { try uffd.copy(from: $0.baseAddress!, to: base + 1 * 4096, length: 3 * 4096) }
        #expect(mixed.installedBytes == 2 * 4096 && mixed.alreadyPresentBytes == 4096)
        #expect(mapping.bytes[4096] == 0xAB && mapping.bytes[3 * 4096] == 0xAB && mapping.bytes[2 * 4096] == patternByte(page: 2, offset: 0))
        let zero = try uffd.zeroPages(at: base, length: 4096)
        #expect(zero.installedBytes == 4096 && mapping.bytes[0] == 0)
        try uffd.unregister(address: base, length: 4 * 4096)
    }
}

/// Pages from memory, in units of `unitPages`; pages whose frame is a multiple of 5 are zero
/// entries and frames at or above `end` are in no unit. `bad` units fail to verify.
private final class TestSource: PageSource {
    let unitPages: UInt64
    let end: UInt64
    let bad: Set<Int>
    let fetched = Mutex<[Int]>([])
    init(unitPages: UInt64, end: UInt64, bad: Set<Int> = []) {
        self.unitPages = unitPages
        self.end = end
        self.bad = bad
    }
    var unitCount: Int { Int((end + unitPages - 1) / unitPages) }
    func unit(containing pfn: UInt64) -> Int? { pfn < end ? Int(pfn / unitPages) : nil }
    func fetch(unit: Int) throws -> PageBatch {
        fetched.withLock { $0.append(unit) }
        if bad.contains(unit) { throw CocoaError(.fileReadCorruptFile) }
        let first = UInt64(unit) * unitPages
        var bytes: [UInt8] = []
        var pages: [(UInt64, Int?)] = []
        for pfn in first..<min(first + unitPages, end) {
            if pfn % 5 == 0 { pages.append((pfn, nil)); continue }
            pages.append((pfn, bytes.count))
            bytes += (0..<4096).map { patternByte(page: pfn, offset: $0) }
        }
        var batch = PageBatch(bytes: bytes)
        for (pfn, offset) in pages {
            if let offset { batch.appendData(page: pfn, offset: offset) } else { batch.appendZero(page: pfn) }
        }
        return batch
    }
}

/// One-page units at `frames`, each holding its pattern (as post-copy's missing pages).
private final class PagesSource: PageSource {
    let frames: [UInt64]
    let fetched = Mutex<[Int]>([])
    init(_ frames: [UInt64]) { self.frames = frames }
    var unitCount: Int { frames.count }
    func unit(containing pfn: UInt64) -> Int? { frames.firstIndex(of: pfn) }
    func fetch(unit: Int) throws -> PageBatch {
        fetched.withLock { $0.append(unit) }
        let pfn = frames[unit]
        var batch = PageBatch(bytes: (0..<4096).map { patternByte(page: pfn, offset: $0) })
        batch.appendData(page: pfn, offset: 0)
        return batch
    }
}

@Suite("The fault server")
struct FaultServerTests {
    @Test("a page in no unit brings the zero page to the pages after it too: a sweep through fresh pages faults once or twice, not on each; the next unit still comes from its source and a page already there keeps its bytes")
    func zeroAhead() throws {
        let memory = try GuestMemory(size: 1 << 20)
        // Written before the server registers the memory: there, as a page received in pre-copy.
        let kept = [UInt8](repeating: 0xCD, count: 4096)
        try memory.write(kept, at: GuestAddress(40 * 4096))
        let source = PagesSource([20, 60])
        let server = try FaultServer(memory: memory, source: source, onFailure: { _ in })
        server.start(fill: false)
        let zeros = [UInt8](repeating: 0, count: 4096)
        func page(_ pfn: UInt64) throws -> [UInt8] { try memory.read(at: GuestAddress(pfn * 4096), count: 4096) }
        // One thread reads in order: a fault raised while the server maps the pages after the first
        // one is served once that is done, and then the rest are there.
        for pfn in UInt64(10)..<20 { #expect(try page(pfn) == zeros) }
        #expect(server.stats.faults <= 2, "\(server.stats)")
        #expect(try page(20) == (0..<4096).map { patternByte(page: 20, offset: $0) })
        #expect(source.fetched.withLock { $0 } == [0])
        for pfn in UInt64(30)..<40 { #expect(try page(pfn) == zeros) }
        #expect(try page(40) == kept)
        #expect(try page(59) == zeros)
        #expect(try page(60) == (0..<4096).map { patternByte(page: 60, offset: $0) })
        server.stop()
        #expect(server.isFinished && server.failure == nil)
    }

    @Test("faults from another thread are served from the units that hold them (across a region boundary), a page in no unit or a zero entry reads zero, each unit fetched once")
    func servesAndFills() throws {
        let memory = try GuestMemory(size: 4 << 20, regionSize: 1 << 20)
        let source = TestSource(unitPages: 64, end: 900)
        let server = try FaultServer(memory: memory, source: source, onFailure: { _ in })
        server.start(fill: false)
        // Reads across a region boundary and in no unit, from this (non-server) thread.
        #expect(try memory.read(at: GuestAddress(301 * 4096 + 5), count: 1) == [patternByte(page: 301, offset: 5)])
        #expect(try memory.read(at: GuestAddress(254 * 4096), count: 3 * 4096)
                == expectedPage(254, end: 900) + expectedPage(255, end: 900) + expectedPage(256, end: 900))
        #expect(try memory.read(at: GuestAddress(1000 * 4096), count: 8) == [UInt8](repeating: 0, count: 8))
        #expect(try memory.read(at: GuestAddress(5 * 4096), count: 8) == [UInt8](repeating: 0, count: 8))
        // The reader wakes as the page lands, a moment before the server's bookkeeping.
        #expect(waitUntil(10) { server.stats.unitsOnFault == 3 })
        let early = server.stats
        #expect(early.faults == 4 && early.unitsOnFault == 3 && early.unitsByFiller == 0 && early.completeAfterMs == nil, "\(early)")
        #expect(Set(source.fetched.withLock { $0 }) == [4, 3, 0])
        server.stop()
        #expect(server.isFinished && server.failure == nil)
    }

    @Test("with the filler, every page arrives without faults, each unit is fetched once, and the server finishes")
    func fillerCompletes() throws {
        let memory = try GuestMemory(size: 2 << 20)
        let source = TestSource(unitPages: 32, end: 400)
        let server = try FaultServer(memory: memory, source: source, onFailure: { _ in })
        server.start()
        #expect(try memory.read(at: GuestAddress(201 * 4096), count: 1) == [patternByte(page: 201, offset: 0)])
        #expect(server.waitUntilFinished(timeout: 60))
        let fetched = source.fetched.withLock { $0 }
        #expect(fetched.sorted() == Array(0..<source.unitCount))
        #expect(server.stats.completeAfterMs != nil)
        for pfn: UInt64 in [1, 5, 199, 399, 400, 511] {
            #expect(try memory.read(at: GuestAddress(pfn * 4096), count: 4096) == expectedPage(pfn, end: 400), "page \(pfn)")
        }
    }

    @Test("a unit that fails to verify is never installed: the owner hears of it, the faulting thread wakes, and the server stops")
    func failureStops() throws {
        let memory = try GuestMemory(size: 1 << 20)
        let source = TestSource(unitPages: 16, end: 256, bad: [3])
        let heard = Mutex<PageSourceFailure?>(nil)
        let server = try FaultServer(memory: memory, source: source, onFailure: { f in heard.withLock { $0 = f } })
        server.start(fill: false)
        #expect(try memory.read(at: GuestAddress(17 * 4096 + 1), count: 1) == [patternByte(page: 17, offset: 1)])
        // Unit 3 (pages 48...63) is bad: the read returns (it does not hang), and never the unit's bytes.
        let bytes = try memory.read(at: GuestAddress(50 * 4096), count: 4096)
        #expect(bytes != (0..<4096).map { patternByte(page: 50, offset: $0) })
        #expect(heard.withLock { $0?.unit } == 3)
        #expect(server.failure?.unit == 3)
        #expect(server.waitUntilFinished(timeout: 30))
    }
}
