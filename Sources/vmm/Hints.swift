import GuestMemory
import KVM
import Loader

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
    default:
        return nil
    }
}

/// An error as printed by the CLI: its own text, then the flag to use, if one applies.
func describeWithFlagHint(_ error: any Error) -> String {
    guard let hint = flagHint(for: error) else { return "\(error)" }
    return "\(error) (use \(hint))"
}
