#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Billboard

/// Stops another process the Billboard's scan found to be a false or duplicate VM. The scan only
/// judges; signalling processes is the VMM's business, so it lives here.
public struct FalseVMStopper: Sendable {
    /// Where the evidence of each stop is recorded.
    public let scan: Scan

    public init(scan: Scan) {
        self.scan = scan
    }

    /// SIGSTOP freezes its vCPUs at once, the evidence goes into the audit log, then SIGKILL ends
    /// the process (a ghost cannot be trusted to exit on request). Throws only if the evidence
    /// could not be recorded; the process is killed all the same.
    public func stop(_ finding: ScanFinding, actor: String? = nil) throws {
        let frozen = kill(finding.pid, SIGSTOP) == 0
        // Whatever happens to the audit write, the frozen process must not stay frozen.
        defer { kill(finding.pid, SIGKILL) }
        try scan.recordStopped(finding, frozen: frozen, actor: actor)
    }
}
