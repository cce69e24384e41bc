import Foundation
import GRDB
import Testing
@testable import Billboard

@Suite("Admission refuses anything not registered exactly as signed")
struct AdmissionTests {
    @Test("a registered guest started as registered is admitted, its sealed fields round-trip, and it is audited")
    func admitsRegistered() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(web1(), signedBy: f.admin)
        let r = try admitWeb1(f.store)
        #expect(r.mac == "52:54:00:12:34:56" && r.ip == "10.0.0.5" && r.os == "tinyos")
        #expect(r.commandLine == "console=ttyS0" && r.beacons == .required)
        // By digest alone, too, when exactly one registration has it.
        #expect(try admitWeb1(f.store, name: nil).name == "web1")
        #expect(try events(f.store).filter { $0 == "admit.accepted" }.count == 2)
        #expect(try f.store.audit.verify().isIntact)
    }

    @Test("an unregistered guest is refused by name and by image digest, and the refusal is audited")
    func unregistered() throws {
        let f = try Fixture()
        defer { f.remove() }
        let byName = refusal { try admitWeb1(f.store) }
        #expect(byName == .notRegistered(guest: "web1"))
        #expect(byName?.description.contains("vmm billboard register") == true)
        #expect(refusal { try admitWeb1(f.store, name: nil) } == .imageNotRegistered(sha256: imageDigest))
        #expect(try events(f.store).filter { $0 == "admit.refused" }.count == 2)
    }

    @Test("an image changed by one byte is refused, naming both digests")
    func imageChanged() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(web1(), signedBy: f.admin)
        let altered = ImageDigest.sha256(flipByte(imageBytes, at: 1000))
        let r = refusal { try admitWeb1(f.store, image: altered) }
        #expect(r == .imageChanged(guest: "web1", actual: altered, registered: imageDigest))
        #expect(r?.description.hasPrefix("image of 'web1' changed: sha256 \(altered), registered \(imageDigest)") == true)
    }

    @Test("a changed configuration (memory, vCPUs, command line) is refused")
    func configurationChanged() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(web1(), signedBy: f.admin)
        let memory = refusal { try admitWeb1(f.store, memory: 128 << 20) }
        #expect(memory?.description.contains("memory 128 MiB, registered 64 MiB") == true)
        #expect(refusal { try admitWeb1(f.store, vcpus: 4) } ==
            .configurationChanged(guest: "web1", field: "vcpus", actual: "4", registered: "2"))
        #expect(refusal { try admitWeb1(f.store, commandLine: "console=ttyS0 init=/bin/sh") } != nil)
        #expect(refusal { try admitWeb1(f.store, mode: nil) } != nil)
    }

    @Test("a forged signature (one byte of the stored signature flipped) is refused")
    func forgedSignature() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(web1(), signedBy: f.admin)
        let signature: Data = try #require(try f.attackerRead("SELECT signature FROM guests WHERE name = 'web1'"))
        try f.attacker("UPDATE guests SET signature = ? WHERE name = 'web1'", [flipByte(signature, at: 7)])
        let r = refusal { try admitWeb1(f.store) }
        #expect(r == .badSignature(guest: "web1"))
        #expect(r?.description.contains("does not verify (forged or altered)") == true)
    }

    @Test("a registration edited in the database to match a bigger guest fails its signature")
    func editedRow() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(web1(), signedBy: f.admin)
        try f.attacker("UPDATE guests SET memory_bytes = ? WHERE name = 'web1'", [Int64(4 << 30)])
        #expect(refusal { try admitWeb1(f.store, memory: 4 << 30) } == .badSignature(guest: "web1"))
    }

    @Test("a registration signed by a key that is not an enrolled administrator is refused and audited")
    func nonAdminSigner() throws {
        let f = try Fixture()
        defer { f.remove() }
        let mallory = try AdminKey(name: "mallory")
        let r = refusal { try f.store.registry.register(web1(), signedBy: mallory) }
        #expect(r == .signerNotAdministrator(guest: "web1", signer: "mallory"))
        #expect(r?.description.contains("signed by 'mallory', who is not an administrator") == true)
        #expect(try f.store.registry.list().isEmpty)
        #expect(try events(f.store).contains("guest.register.refused"))
        // Nor can mallory enroll herself, or bootstrap once an administrator exists.
        #expect(refusal { try f.store.administrators.enroll(publicKey: mallory.publicKey, name: "mallory", signedBy: mallory) } != nil)
        #expect(refusal { try f.store.administrators.bootstrap(mallory) } == .bootstrapNotAllowed)
    }

    @Test("an administrator row inserted directly into the database does not make its key an administrator")
    func insertedAdminRow() throws {
        let f = try Fixture()
        defer { f.remove() }
        let mallory = try AdminKey(name: "mallory")
        try f.attacker("""
            INSERT INTO admins(name, public_key, enrolled_at, enrolled_by, request, signature, removed, mac)
            VALUES ('mallory', ?, 0, 'alice', x'', x'', 0, zeroblob(32))
            """, [mallory.publicKey.rawRepresentation])
        #expect(refusal { try f.store.registry.register(web1(), signedBy: mallory) } ==
            .recordTampered(what: "administrator 'mallory'"))
    }

    @Test("a revoked guest is refused; flipping the revoked flag back in the database is detected")
    func revoked() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(web1(), signedBy: f.admin)
        try f.store.registry.revoke(name: "web1", signedBy: f.admin)
        #expect(refusal { try admitWeb1(f.store) } == .revoked(guest: "web1"))
        #expect(refusal { try admitWeb1(f.store, name: nil) } == .revoked(guest: "web1"))
        try f.attacker("UPDATE guests SET revoked = 0 WHERE name = 'web1'")
        #expect(refusal { try admitWeb1(f.store) } == .recordTampered(what: "revocation state of guest 'web1'"))
    }

    @Test("a tampered encrypted field (one ciphertext byte flipped) is refused")
    func tamperedCiphertext() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(web1(), signedBy: f.admin)
        let sealed: Data = try #require(try f.attackerRead("SELECT sealed FROM guests WHERE name = 'web1'"))
        // The identifying fields are not in the clear in the database.
        #expect(sealed.range(of: Data("10.0.0.5".utf8)) == nil)
        try f.attacker("UPDATE guests SET sealed = ? WHERE name = 'web1'", [flipByte(sealed, at: 20)])
        #expect(refusal { try admitWeb1(f.store) } == .sealedFieldsTampered(guest: "web1"))
        #expect(throws: BillboardRefusal.sealedFieldsTampered(guest: "web1")) { try f.store.registry.list() }
    }

    @Test("a guest is refused on a host it is not allowed on")
    func hostNotAllowed() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(web1(), signedBy: f.admin)
        #expect(refusal { try admitWeb1(f.store, host: "host2") } ==
            .hostNotAllowed(guest: "web1", host: "host2", allowed: ["host1"]))
    }

    @Test("registrations signed by a removed administrator are no longer admitted")
    func removedSigner() throws {
        let f = try Fixture()
        defer { f.remove() }
        let bob = try AdminKey(name: "bob")
        try f.store.administrators.enroll(publicKey: bob.publicKey, name: "bob", signedBy: f.admin)
        try f.store.registry.register(web1(), signedBy: bob)
        try admitWeb1(f.store)
        try f.store.administrators.remove(name: "bob", signedBy: f.admin)
        #expect(refusal { try admitWeb1(f.store) } == .signerRemoved(guest: "web1", signer: "bob"))
        #expect(refusal { try f.store.registry.register(web1(), signedBy: bob) } != nil)
    }
}
