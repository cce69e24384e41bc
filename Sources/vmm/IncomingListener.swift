import Billboard
import Migration

/// The listener `vmm receive` waits on: mutually authenticated TLS between enrolled hosts, or
/// plain TCP when the operator consented with --insecure-plaintext.
enum IncomingListener {
    static func open(_ address: String, store: BillboardStore, plaintext: Bool) throws -> any MigrationListener {
        if plaintext { return try TCPListener(listen: address) }
        throw CLIError("TLS migration is not wired here yet; use --insecure-plaintext on both sides")
    }
}
