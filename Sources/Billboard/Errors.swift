import Foundation

/// Why the billboard refused a guest, a signer or a lease; each description names the guest, the reason and the fix.
public enum BillboardRefusal: Error, Equatable, Sendable, CustomStringConvertible {
    case notRegistered(guest: String)
    case imageNotRegistered(sha256: String)
    case ambiguousImage(sha256: String, guests: [String])
    case alreadyRegistered(guest: String)
    case imageChanged(guest: String, actual: String, registered: String)
    case configurationChanged(guest: String, field: String, actual: String, registered: String)
    case hostNotAllowed(guest: String, host: String, allowed: [String])
    case revoked(guest: String)
    case badSignature(guest: String)
    case signerNotAdministrator(guest: String?, signer: String)
    case signerRemoved(guest: String, signer: String)
    case sealedFieldsTampered(guest: String)
    case recordTampered(what: String)
    case bootstrapNotAllowed
    case leaseHeld(guestID: UUID, host: String, pid: Int32, epoch: Int64)
    case leaseNotHeld(guestID: UUID, pid: Int32)
    case staleEpoch(guestID: UUID, epoch: Int64, current: Int64)
    case handoverIntentMissing(guestID: UUID)
    case copiedStore(directory: String)
    case badSnapshotSignature(reason: String)
    case invalidHostIdentity(reason: String)
    case hostCertificateInvalid(reason: String)
    case invalidAuditExport(reason: String)

    public var description: String {
        switch self {
        case .notRegistered(let g):
            return "guest '\(g)' is not registered: an administrator must register it (`vmm billboard register`) before it can run here"
        case .imageNotRegistered(let d):
            return "no registered guest has image sha256 \(d): an administrator must register it (`vmm billboard register`) before it can run here"
        case .ambiguousImage(let d, let gs):
            return "image sha256 \(d) is registered for several guests (\(gs.joined(separator: ", "))): name the guest"
        case .alreadyRegistered(let g):
            return "guest '\(g)' is already registered: revoke it first (vmm billboard revoke \(g)) to register a new version"
        case .imageChanged(let g, let a, let r):
            return "image of '\(g)' changed: sha256 \(a), registered \(r); if the change is intended, revoke and re-register it"
        case .configurationChanged(let g, let f, let a, let r):
            return "configuration of '\(g)' changed: \(f) \(a), registered \(r); start it as registered or re-register it"
        case .hostNotAllowed(let g, let h, let allowed):
            return "guest '\(g)' may not run on host '\(h)' (allowed: \(allowed.joined(separator: ", "))); re-register it with this host allowed"
        case .revoked(let g):
            return "guest '\(g)' is revoked: register it again if it should run"
        case .badSignature(let g):
            return "signature of registration '\(g)' does not verify (forged or altered): do not run it; re-register it from a trusted source"
        case .signerNotAdministrator(let g, let s):
            let what = g.map { "registration '\($0)' is " } ?? "request is "
            return what + "signed by '\(s)', who is not an administrator: have an enrolled administrator sign it"
        case .signerRemoved(let g, let s):
            return "registration '\(g)' was signed by '\(s)', who is no longer an administrator: have a current administrator re-register it"
        case .sealedFieldsTampered(let g):
            return "encrypted fields of '\(g)' fail authentication (tampered, or a different at-rest key): do not run it; re-register it"
        case .recordTampered(let what):
            return "\(what) was altered outside the billboard (its integrity code does not verify): inspect vmm billboard audit and restore the store"
        case .bootstrapNotAllowed:
            return "an administrator already exists: further administrators must be enrolled with the signature of an existing one"
        case .leaseHeld(let id, let h, let p, let e):
            return "guest \(id) is already running (host '\(h)', pid \(p), epoch \(e)): stop that copy first. A lease whose VMM died here is taken over once the lease timeout has passed since its last renewal; one held by another host is freed only when that host hands the guest back, or by an administrator releasing it"
        case .leaseNotHeld(let id, let p):
            return "pid \(p) does not hold the lease of guest \(id): it was taken over or released; stop this copy"
        case .handoverIntentMissing(let id):
            return "the hand-over intent of guest \(id) that this commit relies on is not in the store as it was written (withdrawn, resolved, or changed): the commit is made the durable way instead"
        case .copiedStore(let d):
            return "the billboard in \(d) is a copy (or was moved): it was created elsewhere, and a copy would let a second VMM run a guest the original already runs (a ghost). Use the original store, or create a new one with `vmm billboard init`"
        case .badSnapshotSignature(let r):
            return "the snapshot's signature does not verify: \(r). It was edited after it was written, or written by a host this billboard does not know; refusing it"
        case .invalidHostIdentity(let r):
            return "the host identity document is refused: \(r). Nothing was added; ask that host's administrator for a fresh export of its identity, and check it reached you unchanged"
        case .hostCertificateInvalid(let r):
            return "this host's TLS certificate in the billboard is not valid: \(r). It was altered outside the billboard (inspect the audit log); opening the store again replaces it with a new one, audited"
        case .invalidAuditExport(let r):
            return "the audit export is refused: \(r)"
        case .staleEpoch(let id, let e, let c):
            return "state of guest \(id) is from epoch \(e) but the current epoch is \(c): refusing to roll back to an old snapshot (a second copy of the guest). If this rollback is intended, an administrator can allow this one restore"
        }
    }
}

/// Why a store or key file could not be created, opened or used (operational, not a security decision about a guest).
public enum BillboardError: Error, Equatable, Sendable, CustomStringConvertible {
    case notInitialized(directory: String)
    case alreadyInitialized(directory: String)
    case keyFileMissing(path: String)
    case insecurePermissions(path: String, mode: UInt16, fix: String)
    case wrongOwner(path: String, owner: UInt32)
    case keyFileMismatch(path: String)
    case malformedKeyFile(path: String, reason: String)
    case invalidRegistration(String)
    case invalidName(String)
    case unknownAdministrator(String)
    case administratorExists(String)
    case lastAdministrator(String)
    case hostExists(String)
    case hostKeyInUse(key: String, by: String)
    case unknownHost(String)
    case io(path: String, errno: Int32)

    public var description: String {
        switch self {
        case .notInitialized(let d):
            return "no billboard at \(d): run vmm billboard init to create one there, or name the existing one"
        case .alreadyInitialized(let d):
            return "a billboard already exists at \(d); refusing to overwrite its keys"
        case .keyFileMissing(let p):
            return "host key file \(p) is missing: restore it from backup (the billboard cannot be opened without it)"
        case .insecurePermissions(let p, let m, let fix):
            return "\(p) is accessible by group or others (mode \(String(m, radix: 8))): \(fix)"
        case .wrongOwner(let p, let o):
            return "\(p) is owned by uid \(o), not by the current user: fix ownership (chown) or run as its owner"
        case .keyFileMismatch(let p):
            return "the key file does not match this billboard (\(p)): it belongs to another store; restore the right host.key"
        case .malformedKeyFile(let p, let r):
            return "key file \(p) is malformed: \(r)"
        case .invalidRegistration(let r):
            return "invalid registration: \(r)"
        case .invalidName(let n):
            return "invalid name '\(n)': use 1-64 characters from A-Z a-z 0-9 . _ -"
        case .unknownAdministrator(let n):
            return "no enrolled administrator named '\(n)'"
        case .administratorExists(let n):
            return "an administrator named '\(n)' or with this key is already enrolled"
        case .lastAdministrator(let n):
            return "'\(n)' is the last administrator; enroll another before removing it"
        case .hostExists(let n):
            return "a host named '\(n)' is already known: remove it first to enrol it with new keys"
        case .hostKeyInUse(let k, let h):
            return "signing key \(k.prefix(16))… already belongs to host '\(h)': one key identifies one host; remove that host first if it was renamed"
        case .unknownHost(let n):
            return "no peer host named '\(n)' is enrolled (or it was already removed): list the peer hosts to see their names"
        case .io(let p, let e):
            return "\(p): \(String(cString: strerror(e)))"
        }
    }
}

/// Names of guests, administrators and hosts: short, printable, safe in messages and file names.
func validateName(_ name: String) throws {
    let ok = (1...64).contains(name.utf8.count) && name.utf8.allSatisfy { c in
        (c >= 48 && c <= 57) || (c >= 65 && c <= 90) || (c >= 97 && c <= 122) || c == 46 || c == 95 || c == 45
    }
    guard ok else { throw BillboardError.invalidName(name) }
}
