#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in milliseconds: the one clock for durations and for comparing moments
/// between processes on one host (a migration's pause and resume).
public func monotonicMilliseconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) * 1000 + Double(ts.tv_nsec) / 1_000_000
}

/// This boot of the kernel (`/proc/sys/kernel/random/boot_id`), nil if it cannot be read. Two
/// moments with the same boot id are on one CLOCK_MONOTONIC; a write made without fsync survives
/// exactly as long as the boot it was made in (it sits in that kernel's page cache until written
/// back), so a record stamped with an older boot id may have lost whatever followed it unsynced.
public let kernelBootID: String? = {
    guard let bytes = try? readSmallRegularFile("/proc/sys/kernel/random/boot_id", limit: 64) else { return nil }
    let text = String(decoding: bytes.filter { $0 > 0x20 }, as: UTF8.self)
    return text.isEmpty ? nil : text
}()
