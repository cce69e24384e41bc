#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KVM

/// Which of KVM's saveable MSRs (`KVM_GET_MSR_INDEX_LIST`) this host's vCPUs can
/// actually save and restore. The list names MSRs for every CPU model and PV
/// feature KVM knows; reading one the vCPU lacks fails, and some PV MSRs refuse
/// writes unless their CPUID feature is exposed. Probing once (read, then write
/// the same value back) keeps those out of snapshots, so that a later short
/// `KVM_GET_MSRS` or `KVM_SET_MSRS` count is a real error.
enum MSRProbe {
    private static let cache = NSLock()
    // nonisolated(unsafe): read and written only with `cache` held.
    nonisolated(unsafe) private static var probed: [UInt32]?

    static func saveable(kvm: KVMSystem, vcpu: VCPU) throws -> [UInt32] {
        cache.lock(); defer { cache.unlock() }
        if let probed { return probed }
        let all = try kvm.msrIndexList()
        var ok: [UInt32] = []
        for index in all {
            guard let value = try? vcpu.msrs([index]), (try? vcpu.setMSRs(value)) != nil else { continue }
            ok.append(index)
        }
        probed = ok
        return ok
    }
}
