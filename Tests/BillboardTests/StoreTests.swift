#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import Testing
@testable import Billboard

@Suite("The store is owner-only and opens only with its own key file")
struct StoreTests {
    private func mode(_ path: String) -> mode_t {
        var st = stat()
        _ = stat(path, &st)
        return st.st_mode & 0o777
    }

    @Test("initialize creates a 0700 directory with 0600 database and key files; admin keys are 0600")
    func ownerOnly() throws {
        let f = try Fixture()
        defer { f.remove() }
        #expect(mode(f.storeDir) == 0o700)
        #expect(mode(f.databasePath) == 0o600)
        #expect(mode(f.keyPath) == 0o600)
        #expect(mode(f.root + "/alice.key") == 0o600)
        // Reopening works and sees the same data.
        let again = try BillboardStore(directory: f.storeDir)
        #expect(again.hostName == "host1")
        #expect(try again.administrators.list().map(\.name) == ["alice"])
        #expect(try events(again).prefix(3) == ["store.init", "host.certificate", "admin.bootstrap"])
    }

    @Test("a missing store is refused with the command that creates one")
    func missing() throws {
        let e = storeError { _ = try BillboardStore(directory: "/tmp/billboard-test-does-not-exist-\(getpid())") }
        #expect(e?.description.contains("run vmm billboard init") == true)
    }

    @Test("initialize refuses to overwrite an existing store")
    func noOverwrite() throws {
        let f = try Fixture()
        defer { f.remove() }
        #expect(storeError { try BillboardStore.initialize(directory: f.storeDir, hostName: "host1") } ==
            .alreadyInitialized(directory: f.storeDir))
    }

    @Test("store files readable by group or others (chmod 644) are refused with the chmod that fixes them")
    func wrongPermissions() throws {
        let f = try Fixture()
        defer { f.remove() }
        for path in [f.databasePath, f.keyPath] {
            chmod(path, 0o644)
            let e = storeError { _ = try BillboardStore(directory: f.storeDir) }
            #expect(e == .insecurePermissions(path: path, mode: 0o644, fix: "chmod 600 \(path)"))
            #expect(e?.description.contains("chmod 600 \(path)") == true)
            chmod(path, 0o600)
        }
        chmod(f.storeDir, 0o755)
        #expect(storeError { _ = try BillboardStore(directory: f.storeDir) }?.description.contains("chmod 700") == true)
        chmod(f.storeDir, 0o700)
        _ = try BillboardStore(directory: f.storeDir)
    }

    @Test("an admin key file readable by others is refused")
    func adminKeyPermissions() throws {
        let f = try Fixture()
        defer { f.remove() }
        let path = f.root + "/alice.key"
        #expect(try AdminKey.load(path: path).publicKey.rawRepresentation == f.admin.publicKey.rawRepresentation)
        chmod(path, 0o640)
        #expect(storeError { _ = try AdminKey.load(path: path) } != nil)
    }

    @Test("a key file from another store is refused: the key file does not match this billboard")
    func wrongKeyFile() throws {
        let f = try Fixture()
        defer { f.remove() }
        let other = try Fixture(hostName: "host1")
        defer { other.remove() }
        try FileManager.default.removeItem(atPath: f.keyPath)
        try FileManager.default.copyItem(atPath: other.keyPath, toPath: f.keyPath)
        chmod(f.keyPath, 0o600)
        let e = storeError { _ = try BillboardStore(directory: f.storeDir) }
        #expect(e == .keyFileMismatch(path: f.keyPath))
        #expect(e?.description.contains("the key file does not match this billboard") == true)
    }

    @Test("a missing key file is refused (a copied database alone cannot be opened)")
    func missingKeyFile() throws {
        let f = try Fixture()
        defer { f.remove() }
        unlink(f.keyPath)
        #expect(storeError { _ = try BillboardStore(directory: f.storeDir) } == .keyFileMissing(path: f.keyPath))
    }

    @Test("canonical JSON sorts keys by bytes and escapes only what it must")
    func canonical() {
        let v = CanonicalJSON.object(["b": .int(-1), "a": .array([.null, .bool(true), .string("x\"\n\u{1}é")]), "B": .uint(2)])
        #expect(v.text == #"{"B":2,"a":[null,true,"x\"\n\u0001é"],"b":-1}"#)
    }

    @Test("peer hosts are added only with an administrator's signature")
    func peerHosts() throws {
        let f = try Fixture()
        defer { f.remove() }
        let peer = try Fixture(hostName: "host2")
        defer { peer.remove() }
        try f.store.peerHosts.add(name: "host2", signingKey: peer.store.hostSigningKey,
                                  agreementKey: peer.store.hostAgreementKey, signedBy: f.admin)
        #expect(try f.store.peerHosts.list().map(\.name) == ["host2"])
        let mallory = try AdminKey(name: "mallory")
        #expect(refusal {
            try f.store.peerHosts.add(name: "evil", signingKey: mallory.publicKey,
                                      agreementKey: peer.store.hostAgreementKey, signedBy: mallory)
        } == .signerNotAdministrator(guest: nil, signer: "mallory"))
    }
}
