import Billboard
import ControlAPI
import GuestMemory
import KVM
import Loader
import MachineCore
import VMM

/// The command-line flag that acts on an error, for the errors of layers below the
/// CLI: they say what to do ("give the guest more memory") without knowing which
/// flag does it, and the CLI, which owns the flags, names it when it prints them.
func flagHint(for error: any Error) -> String? {
    switch error {
    case LoaderError.notMultiboot:
        return "--mode real, --mode protected or --mode long"
    case LoaderError.imageTooLarge:
        return "a larger --memory"
    case let LoaderError.addressOutOfMemory(_, start, _, _) where start >= BootLayout.imageBase:
        return "a larger --memory"
    case GuestMemoryError.mapFailed:
        return "a smaller --memory"
    case let error as KVMError where error.operation == "KVM_CAP_DIRTY_LOG_RING":
        return "--dirty-tracker bitmap"
    case let error as ImageFile.ReadError where error.tooLargeForMemory:
        return "a larger --memory"
    case SnapshotError.memoryMismatch:
        return "the snapshot's size with --memory, or leave --memory out"
    case BillboardError.notInitialized:
        return "--billboard DIR for an existing store, or vmm billboard init --billboard DIR --host NAME"
    case let BillboardError.hostExists(name):
        return "vmm billboard host remove \(name) --signed-by KEY, then host add again"
    case BillboardError.unknownHost:
        return "vmm billboard host list"
    case let refusal as GuestRefusal:
        return billboardHint(refusal.refusal, guest: refusal.guest)
    case let refusal as BillboardRefusal:
        return billboardHint(refusal, guest: nil)
    case is ControlClient.ConnectionError:
        return "vmm run, restore or receive with --api-socket PATH to serve it"
    default:
        return nil
    }
}

/// The command that acts on a Billboard refusal.
private func billboardHint(_ refusal: BillboardRefusal, guest: String?) -> String? {
    let name = guest ?? "GUEST"
    switch refusal {
    case let .notRegistered(g):
        return "--name \(g) --image FILE --signed-by KEY"
    case .imageNotRegistered:
        return "--name NAME --image FILE --signed-by KEY"
    case .leaseHeld:
        return "vmm billboard release-lease --name \(name) --signed-by KEY; a dead VMM's lease here is taken over after --lease-timeout seconds"
    case .staleEpoch:
        return "vmm billboard authorize-restore --name \(name) --snapshot FILE --signed-by KEY"
    case .invalidHostIdentity:
        return "a file written by vmm billboard host export on that host"
    default:
        return nil
    }
}

/// An error as printed by the CLI: its own text, then the flag to use, if one applies.
func describeWithFlagHint(_ error: any Error) -> String {
    guard let hint = flagHint(for: error) else { return "\(error)" }
    return "\(error) (use \(hint))"
}
