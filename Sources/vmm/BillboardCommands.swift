import ArgumentParser
import Billboard
import Crypto
import Foundation
import MachineCore
import SystemCalls
import VMM

/// `vmm billboard ...`: the per-host registry of guests, administrators and peer hosts.
struct BillboardCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "billboard",
        abstract: "The Billboard: a signed registry of the guests this host may run, with an audit log.",
        discussion: "The store lives in --billboard DIR (default \(BillboardStore.defaultDirectory)). Registrations are signed by an enrolled administrator key.",
        subcommands: [Init.self, AdminKeyCommand.self, AdminCommand.self, HostCommand.self, Register.self,
                      List.self, Show.self, Revoke.self, Check.self, Audit.self, Scan.self, Instances.self,
                      AuthorizeRestore.self, ReleaseLease.self])

    struct Store: ParsableArguments {
        @Option(help: "The billboard directory.")
        var billboard: String = BillboardStore.defaultDirectory
        func open() throws -> BillboardStore { try BillboardStore(directory: billboard) }
    }

    struct Signer: ParsableArguments {
        @Option(help: "The administrator key file that signs this request.")
        var signedBy: String
        func load() throws -> AdminKey { try AdminKey.load(path: signedBy) }
    }

    /// Runs a body, printing errors in one line and exiting 1.
    static func run(_ body: () throws -> Void) throws {
        _ = try CommandRunner.fail { try body(); return 0 }
    }

    static func base64(_ d: Data) -> String { d.base64EncodedString() }

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create the store and this host's keys (Ed25519, X25519, at-rest key).")
        @OptionGroup var store: Store
        @Option(help: "This host's name.") var host: String = ProcessInfo.processInfo.hostName
        @Option(help: "Also create the first administrator key at this path and enroll it.") var adminKey: String?
        @Option(help: "Name of that first administrator.") var adminName: String = "admin"
        func run() throws {
            try BillboardCommand.run {
                let first = try adminKey.map { try BillboardStore.createAdminKey(name: adminName, path: $0) }
                let s = try BillboardStore.initialize(directory: store.billboard, hostName: host, firstAdmin: first)
                print("billboard created in \(s.directory) for host '\(s.hostName)'")
                print("host signing key:   \(base64(s.hostSigningKey.rawRepresentation))")
                print("host agreement key: \(base64(s.hostAgreementKey.rawRepresentation))")
                if let adminKey { print("administrator '\(adminName)' enrolled; its key is in \(adminKey) (keep it secret)") }
            }
        }
    }

    struct AdminKeyCommand: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "admin-key", abstract: "Administrator key files.",
                                                        subcommands: [Create.self])
        struct Create: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Create an administrator key file (owner-only) and print its public key.")
            @Option(help: "The administrator's name.") var name: String
            @Option(help: "Where to write the key file.") var out: String
            func run() throws {
                try BillboardCommand.run {
                    let key = try BillboardStore.createAdminKey(name: name, path: out)
                    print("public key: \(base64(key.publicKey.rawRepresentation))")
                }
            }
        }
    }

    struct AdminCommand: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "admin", abstract: "Enroll or list administrators.",
                                                        subcommands: [Enroll.self, ListAdmins.self])
        struct Enroll: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Enroll another administrator (signed by an enrolled one).")
            @OptionGroup var store: Store
            @OptionGroup var signer: Signer
            @Option(help: "The new administrator's name.") var name: String
            @Option(help: "The new administrator's public key (base64, from admin-key create).") var publicKey: String
            func run() throws {
                try BillboardCommand.run {
                    guard let raw = Data(base64Encoded: publicKey) else { throw CLIError("--public-key is not base64") }
                    let key = try Curve25519.Signing.PublicKey(rawRepresentation: raw)
                    try store.open().administrators.enroll(publicKey: key, name: name, signedBy: signer.load())
                    print("administrator '\(name)' enrolled")
                }
            }
        }
        struct ListAdmins: ParsableCommand {
            static let configuration = CommandConfiguration(commandName: "list", abstract: "List administrators.")
            @OptionGroup var store: Store
            func run() throws {
                try BillboardCommand.run {
                    for a in try store.open().administrators.list() {
                        print("\(a.name)\t\(a.removed ? "removed" : "active")\tenrolled by \(a.enrolledBy)\t\(base64(a.publicKey))")
                    }
                }
            }
        }
    }

    struct HostCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "host", abstract: "This host's identity, and the peer hosts this store trusts.",
            discussion: "To trust host B on host A: on B, `vmm billboard host export --output b.host`; carry b.host to A; on A, `vmm billboard host add --signed-by KEY b.host`.",
            subcommands: [Export.self, Add.self, Remove.self, ListHosts.self])
        struct Export: ParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Write this host's public identity (name, public keys, TLS certificate) for another host's administrator to add.")
            @OptionGroup var store: Store
            @Option(help: "The file to write (not overwritten if it exists); default standard output.") var output: String?
            func run() throws {
                try BillboardCommand.run {
                    let document = try store.open().hostIdentity().encoded()
                    guard let output else { FileHandle.standardOutput.write(document); return }
                    do {
                        try AtomicFileWriter.write([UInt8](document), to: output, what: "host identity file", replacing: false)
                    } catch { throw CLIError("\(error)") }
                }
            }
        }
        struct Add: ParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Add a peer host from the file its `vmm billboard host export` wrote (signed by an administrator).")
            @OptionGroup var store: Store
            @OptionGroup var signer: Signer
            @Argument(help: "The host identity file.") var file: String
            func run() throws {
                try BillboardCommand.run {
                    let identity = try HostIdentityDocument.load(path: file)
                    try store.open().peerHosts.add(identity, signedBy: signer.load())
                    print("host '\(identity.hostName)' added (signing key \(base64(identity.signingKey)), certificate sha256 \(identity.certificateSHA256.prefix(16))…)")
                }
            }
        }
        struct Remove: ParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Remove a peer host (signed by an administrator): its TLS certificate and the snapshots and migrations it signed are refused from then on.",
                discussion: "Leases it holds stay until an administrator releases them (release-lease). It can be added again from a new export.")
            @OptionGroup var store: Store
            @OptionGroup var signer: Signer
            @Argument(help: "The peer host's name.") var name: String
            func run() throws {
                try BillboardCommand.run {
                    try store.open().peerHosts.remove(name: name, signedBy: signer.load())
                    print("host '\(name)' removed")
                }
            }
        }
        struct ListHosts: ParsableCommand {
            static let configuration = CommandConfiguration(commandName: "list", abstract: "List peer hosts, removed ones included.")
            @OptionGroup var store: Store
            func run() throws {
                try BillboardCommand.run {
                    for h in try store.open().peerHosts.list() {
                        let state = h.removed ? "removed by \(h.removedBy ?? "?")" : "active"
                        print("\(h.name)\t\(state)\tadded by \(h.addedBy)\t\(base64(h.signingKey))")
                    }
                }
            }
        }
    }

    struct Register: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Register a guest: its image digest, configuration and identity, signed by an administrator.")
        @OptionGroup var store: Store
        @OptionGroup var signer: Signer
        @Option(help: "The guest's name.") var name: String
        @Option(help: "The guest image; its SHA-256 is recorded.") var image: String
        @Option(help: "Guest memory, as for vmm run.") var memory: String = "64M"
        @Option(help: "vCPUs.") var vcpus: Int = 1
        @Option(help: "Boot mode, as for vmm run (omit for Multiboot autodetection).") var mode: String?
        @Option(help: "The command line the guest boots with.") var cmdline: String?
        @Option(help: "MAC address.") var mac: String?
        @Option(help: "IP address.") var ip: String?
        @Option(help: "Operating system.") var os: String?
        @Option(parsing: .singleValue, help: "A host the guest may run on (repeatable; default this host).") var allowedHost: [String] = []
        @Option(help: "Whether the guest must send beacons: required (our guests) or none (a foreign image that cannot; then only its lease and VMM vouch for it).") var beacons: String = "required"
        func run() throws {
            try BillboardCommand.run {
                let bytes = try MemorySize.parse(memory)
                guard let policy = BeaconPolicy(rawValue: beacons) else { throw CLIError("--beacons must be required or none") }
                let digest = try ImageDigest.sha256(path: image)
                let r = try store.open().registry.register(GuestRegistration(
                    name: name, imageSHA256: digest, memoryBytes: bytes, vcpus: vcpus, mode: mode, commandLine: cmdline,
                    mac: mac, ip: ip, os: os, allowedHosts: allowedHost, beacons: policy), signedBy: signer.load())
                print("registered '\(r.name)' as \(r.id) (image sha256 \(r.imageSHA256))")
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List registered guests.")
        @OptionGroup var store: Store
        func run() throws {
            try BillboardCommand.run {
                for r in try store.open().registry.list() {
                    print("\(r.name)\t\(r.id)\t\(r.memoryBytes >> 20) MiB\t\(r.vcpus) vCPU\t\(r.revoked ? "revoked" : "active")\t\(r.imageSHA256.prefix(16))…")
                }
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show one registration, decrypted.")
        @OptionGroup var store: Store
        @Argument(help: "The guest's name.") var name: String
        func run() throws {
            try BillboardCommand.run {
                guard let r = try store.open().registry.show(name: name) else { throw CLIError("no guest named '\(name)' is registered") }
                print("""
                name:          \(r.name)
                id:            \(r.id)
                image sha256:  \(r.imageSHA256)
                memory:        \(r.memoryBytes >> 20) MiB, vCPUs: \(r.vcpus), mode: \(r.mode ?? "multiboot (autodetected)")
                command line:  \(r.commandLine ?? "")
                mac / ip / os: \(r.mac ?? "-") / \(r.ip ?? "-") / \(r.os ?? "-")
                allowed hosts: \(r.allowedHosts.isEmpty ? "this host" : r.allowedHosts.joined(separator: ", "))
                beacons:       \(r.beacons.rawValue)
                state:         \(r.revoked ? "revoked" : "active")
                """)
            }
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Revoke a guest (signed by an administrator).")
        @OptionGroup var store: Store
        @OptionGroup var signer: Signer
        @Argument(help: "The guest's name.") var name: String
        func run() throws {
            try BillboardCommand.run {
                try store.open().registry.revoke(name: name, signedBy: signer.load())
                print("'\(name)' revoked")
            }
        }
    }

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Ask whether this host may run an image with a configuration (the admission check, audited); exits 1 if refused.")
        @OptionGroup var store: Store
        @Option(help: "The guest's name (default: found by the image digest).") var name: String?
        @Option(help: "The image.") var image: String
        @Option(help: "Guest memory.") var memory: String = "64M"
        @Option(help: "vCPUs.") var vcpus: Int = 1
        @Option(help: "Boot mode.") var mode: String?
        @Option(help: "Command line.") var cmdline: String?
        func run() throws {
            try BillboardCommand.run {
                let s = try store.open()
                let r = try s.registry.admit(name: name, imageSHA256: try ImageDigest.sha256(path: image),
                                             memoryBytes: try MemorySize.parse(memory), vcpus: vcpus, mode: mode,
                                             commandLine: cmdline, host: s.hostName)
                print("admitted: '\(r.name)' (\(r.id)) may run on '\(s.hostName)'")
            }
        }
    }

    struct Audit: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print the audit log; with --verify, check its hash chain and signed head.",
            discussion: "--export FILE writes the chain with its signed head; anyone can check it with --verify-export FILE --host-identity HOSTFILE (the host's `vmm billboard host export`), without host.key or the store.")
        @OptionGroup var store: Store
        @Flag(help: "Verify the chain; exits 1 if an entry was edited, deleted, inserted or the tail cut.") var verify = false
        @Option(help: "Show only the last N entries.") var last: Int = 50
        @Option(help: "Write the whole chain and its signed head to this new file (0600, never overwritten).") var export: String?
        @Option(help: "Check an exported chain with the host's public identity only; exits 1 if it is not intact.") var verifyExport: String?
        @Option(help: "The host identity file (from `vmm billboard host export`) that --verify-export checks against.") var hostIdentity: String?
        func run() throws {
            try BillboardCommand.run {
                if let verifyExport {
                    // Public material only: the store (and host.key) is never opened here.
                    guard let hostIdentity else { throw CLIError("--verify-export needs --host-identity HOSTFILE (from `vmm billboard host export`)") }
                    let identity = try HostIdentityDocument.load(path: hostIdentity)
                    let result = try AuditExport.verify(try AuditExport.load(path: verifyExport), identity: identity)
                    guard case .intact(let entries, let head) = result else {
                        throw CLIError("the exported audit log has been tampered with: \(result)")
                    }
                    print("audit export intact: \(entries) entries, head \(head) signed by host '\(identity.hostName)'")
                    return
                }
                let s = try store.open()
                if let export {
                    let data = try s.audit.export()
                    try AuditExport.write(data, to: export)
                    print("audit log of '\(s.hostName)' written to \(export) (\(data.count) bytes)")
                    return
                }
                if verify {
                    let result = try s.audit.verify()
                    print(result.description)
                    guard result.isIntact else { throw CLIError("the audit log has been tampered with: \(result)") }
                    return
                }
                let entries = try s.audit.entries()
                let f = ISO8601DateFormatter()
                for e in entries.suffix(last) {
                    print("\(e.seq)\t\(f.string(from: e.time))\t\(e.actor)\t\(e.event)\t\(e.guest ?? "-")\t\(e.details)")
                }
            }
        }
    }

    struct Scan: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Run the active scan now: find stale, false and duplicate (ghost) VMs on this host and stop the false ones.",
            discussion: "Every running VMM also scans every --scan-interval. Findings are audited with their evidence. Exits 0; prints one line per finding.")
        @OptionGroup var store: Store
        @Option(help: "Seconds without a beacon before a running guest that must beacon is reported stale.") var staleAfter: Double = 10
        @Flag(help: "Report only; stop nothing (records of processes that are gone are still removed and audited).") var reportOnly = false
        func run() throws {
            try BillboardCommand.run {
                let s = try store.open()
                try s.ensureOriginal()
                let findings = try s.scan.run(staleAfter: staleAfter, actor: "vmm billboard scan (pid \(getpid()))")
                if findings.isEmpty { print("scan: nothing wrong") }
                for f in findings {
                    print("scan: \(f)")
                    if f.mustStop && !reportOnly {
                        do {
                            try FalseVMStopper(scan: s.scan).stop(f, actor: "vmm billboard scan (pid \(getpid()))")
                            print("scan: stopped pid \(f.pid)")
                        } catch {
                            print("scan: could not record stopping pid \(f.pid) (it was killed): \(error)")
                        }
                    }
                }
            }
        }
    }

    struct Instances: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the guests VMM processes on this host hold, with their leases and beacons.")
        @OptionGroup var store: Store
        func run() throws {
            try BillboardCommand.run {
                let s = try store.open()
                let f = ISO8601DateFormatter()
                f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
                for i in try s.instances.list() {
                    let lease = try s.leases.current(guestID: i.guestID)
                    let holds = lease?.pid == i.pid && lease?.host == i.host
                    print([i.guestName, "pid \(i.pid)", i.state.rawValue, holds ? "lease epoch \(lease!.epoch)" : "no lease",
                           "beacons \(i.beaconCount)", i.lastBeaconAt.map { "last \(f.string(from: $0))" } ?? "last -",
                           i.falseBeacon.map { "FALSE: \($0)" } ?? ""].joined(separator: "\t"))
                }
            }
        }
    }

    struct AuthorizeRestore: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "authorize-restore",
            abstract: "Allow one restore of a snapshot older than its guest's latest epoch (a deliberate rollback); signed and audited.")
        @OptionGroup var store: Store
        @OptionGroup var signer: Signer
        @Option(help: "The registered guest.") var name: String
        @Option(help: "The snapshot file that may be restored once.") var snapshot: String
        func run() throws {
            try BillboardCommand.run {
                let digest = try ImageDigest.sha256(path: snapshot)
                try store.open().leases.authorizeRestore(guestName: name, snapshotSHA256: digest, signedBy: signer.load())
                print("one restore of \(snapshot) (sha256 \(digest.prefix(16))…) authorised for '\(name)'")
            }
        }
    }

    struct ReleaseLease: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "release-lease",
            abstract: "Free a guest's lease that no VMM here can free (held by another host after an in-doubt migration, or by a host that is gone); signed and audited.",
            discussion: "Refused while the holder is a live process on this host. Only do this when you know the holder does not run the guest: afterwards this host may start it.")
        @OptionGroup var store: Store
        @OptionGroup var signer: Signer
        @Option(help: "The registered guest.") var name: String
        func run() throws {
            try BillboardCommand.run {
                try store.open().leases.release(guestName: name, signedBy: signer.load())
                print("the lease of '\(name)' is released")
            }
        }
    }
}
