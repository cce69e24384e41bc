#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import Foundation
import GRDB
import SwiftASN1
import Testing
import X509
@testable import Billboard

/// An identity document as JSON fields, to edit as an attacker or a careless copy would.
private func fields(_ data: Data) throws -> [String: Any] {
    try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
}

private func json(_ fields: [String: Any]) throws -> Data { try JSONSerialization.data(withJSONObject: fields) }

private func pem(_ der: [UInt8]) throws -> String { try Certificate(derEncoded: der).serializeAsPEM().pemString }

private func der(_ certificate: Certificate) throws -> [UInt8] {
    var serializer = DER.Serializer()
    try serializer.serialize(certificate)
    return serializer.serializedBytes
}

@Suite("host identities: TLS certificates, export and add by file, removal")
struct HostIdentityTests {
    @Test("initialize makes a self-signed Ed25519 certificate for the host's signing key, not a CA, for TLS server and client")
    func certificateAtInit() throws {
        let f = try Fixture()
        defer { f.remove() }
        let identity = try f.store.tlsIdentity()
        #expect(identity.hostName == "host1")
        #expect(identity.privateKey.publicKey.rawRepresentation == f.store.hostSigningKey.rawRepresentation)
        let certificate = try Certificate(derEncoded: identity.certificateDER)
        let expectedName = try DistinguishedName { CommonName("host1") }
        #expect(certificate.subject == expectedName)
        #expect(certificate.issuer == expectedName)
        #expect(Curve25519.Signing.PublicKey(certificate.publicKey)?.rawRepresentation == f.store.hostSigningKey.rawRepresentation)
        #expect(certificate.signatureAlgorithm == .ed25519)
        #expect(certificate.publicKey.isValidSignature(certificate.signature, for: certificate))
        #expect(!certificate.serialNumber.bytes.isEmpty)
        #expect(certificate.notValidBefore <= Date())
        #expect(certificate.notValidAfter == HostCertificate.notValidAfter)
        let extensions = certificate.extensions
        #expect(try extensions.basicConstraints == .notCertificateAuthority)
        #expect(try extensions.keyUsage == KeyUsage(digitalSignature: true))
        let usages = try #require(try extensions.extendedKeyUsage)
        #expect(usages.contains(.serverAuth) && usages.contains(.clientAuth))
        #expect(try extensions.subjectAlternativeNames.map(Array.init) == [.dnsName("host1")])
        #expect(try events(f.store).contains("host.certificate"))

        // Two hosts' certificates have different serials; reopening keeps the certificate and writes nothing.
        let peer = try Fixture(hostName: "host2")
        defer { peer.remove() }
        #expect(try Certificate(derEncoded: peer.store.tlsIdentity().certificateDER).serialNumber != certificate.serialNumber)
        let before = try f.store.audit.entries().count
        let reopened = try BillboardStore(directory: f.storeDir)
        #expect(try reopened.tlsIdentity().certificateDER == identity.certificateDER)
        #expect(try reopened.audit.entries().count == before)
    }

    @Test("a store made before certificates (schema v2, legacy peer row) gets one when opened, audited; its peer stays trusted")
    func certificateForOldStore() throws {
        let f = try Fixture()
        defer { f.remove() }
        let peer = try Fixture(hostName: "host2")
        defer { peer.remove() }
        let s = peer.store.hostSigningKey.rawRepresentation, a = peer.store.hostAgreementKey.rawRepresentation
        let legacyMAC = f.store.database.rowMAC(PeerHosts.legacyHostState(name: "host2", signingKey: s, agreementKey: a))
        // Undo what this change added, so the store is as the previous version left it.
        try f.attacker("""
            DELETE FROM meta WHERE key = 'host_certificate';
            DROP INDEX hosts_signing_key;
            ALTER TABLE hosts DROP COLUMN removed; ALTER TABLE hosts DROP COLUMN removed_by; ALTER TABLE hosts DROP COLUMN removed_at;
            ALTER TABLE hosts DROP COLUMN removal_request; ALTER TABLE hosts DROP COLUMN removal_signature;
            DELETE FROM grdb_migrations WHERE identifier = 'v3';
            """)
        try f.attacker("""
            INSERT INTO hosts(name, signing_key, agreement_key, added_by, added_at, request, signature, mac)
            VALUES ('host2', ?, ?, 'alice', 0, x'00', x'00', ?)
            """, [s, a, legacyMAC])
        #expect(try f.attackerRead("SELECT COUNT(*) FROM meta WHERE key = 'host_certificate'") == 0)

        let opened = try BillboardStore(directory: f.storeDir)
        let certificate = try Certificate(derEncoded: opened.tlsIdentity().certificateDER)
        #expect(Curve25519.Signing.PublicKey(certificate.publicKey)?.rawRepresentation == f.store.hostSigningKey.rawRepresentation)
        let entry = try #require(try opened.audit.entries().last)
        #expect(entry.event == "host.certificate")
        #expect(entry.details.contains("made before host certificates"))
        #expect(opened.peerHosts.authorizedHost(signingKey: [UInt8](s)) == "host2")
        #expect(try opened.peerHosts.list().map(\.removed) == [false])
        #expect(try opened.audit.verify().isIntact)
    }

    @Test("a certificate swapped in the database is never handed to TLS; opening the store makes a new one, audited")
    func swappedCertificate() throws {
        let f = try Fixture()
        defer { f.remove() }
        let peer = try Fixture(hostName: "host2")
        defer { peer.remove() }
        try f.attacker("UPDATE meta SET value = ? WHERE key = 'host_certificate'", [Data(try peer.store.tlsIdentity().certificateDER)])
        guard case .hostCertificateInvalid(let reason)? = refusal({ _ = try f.store.tlsIdentity() }) else {
            Issue.record("a swapped certificate was accepted"); return
        }
        #expect(reason.contains("another key"))
        let reopened = try BillboardStore(directory: f.storeDir)
        let certificate = try Certificate(derEncoded: reopened.tlsIdentity().certificateDER)
        #expect(Curve25519.Signing.PublicKey(certificate.publicKey)?.rawRepresentation == f.store.hostSigningKey.rawRepresentation)
        #expect(try reopened.audit.entries().last?.details.contains("the stored one was refused") == true)
    }

    @Test("export, then add the file on a second store: authorizedHost knows the peer by the key in its certificate")
    func exportAddRoundTrip() throws {
        let f = try Fixture()
        defer { f.remove() }
        let peer = try Fixture(hostName: "host2")
        defer { peer.remove() }
        let file = f.root + "/host2.host"
        try peer.store.hostIdentity().encoded().write(to: URL(fileURLWithPath: file))
        let document = try HostIdentityDocument.load(path: file)
        #expect(document == (try peer.store.hostIdentity()))
        let peerCertificate = try Certificate(derEncoded: peer.store.tlsIdentity().certificateDER)
        let peerKey = try #require(Curve25519.Signing.PublicKey(peerCertificate.publicKey)).rawRepresentation
        #expect(f.store.peerHosts.authorizedHost(signingKey: [UInt8](peerKey)) == nil)

        try f.store.peerHosts.add(document, signedBy: f.admin)
        #expect(f.store.peerHosts.authorizedHost(signingKey: [UInt8](peerKey)) == "host2")
        #expect(f.store.peerHosts.authorizedHost(signingKey: [UInt8](f.store.hostSigningKey.rawRepresentation)) == "host1")
        #expect(f.store.peerHosts.authorizedHost(signingKey: [UInt8](Curve25519.Signing.PrivateKey().publicKey.rawRepresentation)) == nil)
        #expect(f.store.peerHosts.authorizedHost(signingKey: [1, 2, 3]) == nil)
        let host = try #require(try f.store.peerHosts.list().first)
        #expect(host.name == "host2" && host.signingKey == peerKey && host.agreementKey == document.agreementKey && !host.removed)
        let entry = try #require(try f.store.audit.entries().last)
        #expect(entry.event == "host.add" && entry.details.contains(document.certificateSHA256))
        // Its own export, or the same peer twice, is refused.
        #expect(throws: BillboardError.hostExists("host1")) { try f.store.peerHosts.add(try f.store.hostIdentity(), signedBy: f.admin) }
        #expect(throws: BillboardError.hostExists("host2")) { try f.store.peerHosts.add(document, signedBy: f.admin) }
    }

    @Test("refused files: tampered certificate, certificate for another key or signed by another, wrong format or version, bad name, truncated, oversized")
    func refusedDocuments() throws {
        let f = try Fixture()
        defer { f.remove() }
        let peer = try Fixture(hostName: "host2")
        defer { peer.remove() }
        let good = try peer.store.hostIdentity().encoded()
        let original = try fields(good)
        func edited(_ change: (inout [String: Any]) throws -> Void) throws -> Data {
            var copy = original
            try change(&copy)
            return try json(copy)
        }
        let certificateDER = try peer.store.tlsIdentity().certificateDER
        let mallory = Curve25519.Signing.PrivateKey()
        var flipped = certificateDER
        flipped[flipped.count - 1] ^= 1  // the last byte is the signature's
        let name = try DistinguishedName { CommonName("host2") }
        let signedByMallory = try Certificate(
            version: .v3, serialNumber: .init(), publicKey: .init(peer.store.hostSigningKey), notValidBefore: Date(),
            notValidAfter: HostCertificate.notValidAfter, issuer: name, subject: name, signatureAlgorithm: .ed25519,
            extensions: .init(), issuerPrivateKey: .init(mallory))

        let cases: [(what: String, data: Data, reason: String)] = [
            ("tampered certificate", try edited { $0["certificate"] = try pem(flipped) }, "self-signature does not verify"),
            ("certificate for another key", try edited { $0["certificate"] = try pem(HostCertificate.make(hostName: "host2", key: mallory)) },
             "another key"),
            ("certificate signed by another key", try edited { $0["certificate"] = try pem(der(signedByMallory)) }, "self-signature does not verify"),
            ("certificate for another name", try edited { $0["hostName"] = "host3" }, "does not name host 'host3'"),
            ("not a certificate", try edited { $0["certificate"] = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" }, "not a PEM X.509"),
            ("wrong format", try edited { $0["format"] = "swift-vmm billboard host key" }, "format"),
            ("wrong version", try edited { $0["version"] = 2 }, "version 2 is not supported"),
            ("invalid name", try edited { $0["hostName"] = "host 2" }, "host name is not valid"),
            ("short key", try edited { $0["signingKey"] = Data(repeating: 1, count: 31).base64EncodedString() }, "signing key"),
            ("missing field", try edited { $0["agreementKey"] = nil }, "not a host identity document"),
            ("truncated", good.prefix(good.count / 2), "not a host identity document"),
            ("empty", Data(), "empty"),
            ("oversized", good + Data(repeating: 0x20, count: HostIdentityDocument.maximumSize), "larger than"),
            ("oversized certificate", try edited { $0["certificate"] = String(repeating: "A", count: 9000) }, "certificate is larger"),
        ]
        let before = try f.store.audit.entries().count
        for c in cases {
            guard case .invalidHostIdentity(let reason)? = refusal({ _ = try HostIdentityDocument.decode(c.data) }) else {
                Issue.record("\(c.what) was not refused as an invalid identity"); continue
            }
            #expect(reason.contains(c.reason), "\(c.what): \(reason)")
        }
        // The size limit holds when reading a file, before it is read whole.
        let big = f.root + "/big.host"
        try (good + Data(repeating: 0x20, count: 1 << 20)).write(to: URL(fileURLWithPath: big))
        #expect(refusal { _ = try HostIdentityDocument.load(path: big) } == .invalidHostIdentity(reason: "it is larger than \(HostIdentityDocument.maximumSize) bytes"))
        #expect(try f.store.peerHosts.list().isEmpty)
        #expect(try f.store.audit.entries().count == before)

        // A good file signed by someone who is not an administrator: refused, audited, nothing added.
        let stranger = try AdminKey(name: "mallory")
        #expect(refusal { try f.store.peerHosts.add(try HostIdentityDocument.decode(good), signedBy: stranger) }
                == .signerNotAdministrator(guest: nil, signer: "mallory"))
        #expect(try f.store.peerHosts.list().isEmpty)
        #expect(f.store.peerHosts.authorizedHost(signingKey: [UInt8](peer.store.hostSigningKey.rawRepresentation)) == nil)
        #expect(try events(f.store).last == "host.add.refused")
    }

    @Test("remove: authorizedHost forgets the peer, its signed states are refused, its lease stays, both events audited; re-adding works")
    func removeAndReadd() throws {
        let f = try Fixture()
        defer { f.remove() }
        let peer = try Fixture(hostName: "host2")
        defer { peer.remove() }
        let peerKey = [UInt8](peer.store.hostSigningKey.rawRepresentation)
        try f.store.peerHosts.add(try peer.store.hostIdentity(), signedBy: f.admin)
        let digest = [UInt8](repeating: 9, count: 32)
        let signed = try peer.store.stateSignatures.sign(digest: digest)
        #expect(try f.store.stateSignatures.verify(signed, digest: digest) == "host2")
        // host2 holds a guest's lease here (it migrated there).
        let r = try f.store.registry.register(web1(allowedHosts: ["host1", "host2"]), signedBy: f.admin)
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 0)
        _ = try f.store.leases.handOver(guestID: r.id, fromPid: getpid(), toHost: "host2", toPid: 4242)
        let lease = try f.store.leases.current(guestID: r.id)

        // Only an administrator may remove it; a refused removal changes nothing.
        let stranger = try AdminKey(name: "mallory")
        #expect(refusal { try f.store.peerHosts.remove(name: "host2", signedBy: stranger) } == .signerNotAdministrator(guest: nil, signer: "mallory"))
        #expect(f.store.peerHosts.authorizedHost(signingKey: peerKey) == "host2")
        #expect(throws: BillboardError.unknownHost("host9")) { try f.store.peerHosts.remove(name: "host9", signedBy: f.admin) }

        try f.store.peerHosts.remove(name: "host2", signedBy: f.admin)
        #expect(f.store.peerHosts.authorizedHost(signingKey: peerKey) == nil)
        guard case .badSnapshotSignature(let reason)? = refusal({ try f.store.stateSignatures.verify(signed, digest: digest) }) else {
            Issue.record("a removed peer's signature was accepted"); return
        }
        #expect(reason.contains("removed"))
        let listed = try #require(try f.store.peerHosts.list().first)
        #expect(listed.removed && listed.removedBy == "alice" && listed.removedAt != nil)
        #expect(try f.store.leases.current(guestID: r.id) == lease)
        #expect(throws: BillboardError.unknownHost("host2")) { try f.store.peerHosts.remove(name: "host2", signedBy: f.admin) }
        let log = try events(f.store)
        #expect(log.contains("host.add") && log.last == "host.remove" && log.contains("host.remove.refused"))

        // Someone without host.key cannot put it back by flipping the flag.
        try f.attacker("UPDATE hosts SET removed = 0 WHERE name = 'host2'")
        #expect(f.store.peerHosts.authorizedHost(signingKey: peerKey) == nil)
        #expect(refusal { _ = try f.store.peerHosts.list() } == .recordTampered(what: "peer host 'host2'"))
        #expect(refusal { try f.store.stateSignatures.verify(signed, digest: digest) } == .recordTampered(what: "peer host 'host2'"))
        try f.attacker("UPDATE hosts SET removed = 1 WHERE name = 'host2'")

        // An administrator enrols it again from its file: a new enrolment, audited.
        try f.store.peerHosts.add(try HostIdentityDocument.decode(try peer.store.hostIdentity().encoded()), signedBy: f.admin)
        #expect(f.store.peerHosts.authorizedHost(signingKey: peerKey) == "host2")
        #expect(try f.store.stateSignatures.verify(signed, digest: digest) == "host2")
        #expect(try f.store.peerHosts.list().map(\.removed) == [false])
        #expect(try events(f.store).filter { $0 == "host.add" }.count == 2)
        #expect(try f.store.audit.verify().isIntact)
    }

    @Test("a host re-made with new keys under a removed name is a new enrolment; its old key stays refused")
    func readdWithNewKeys() throws {
        let f = try Fixture()
        defer { f.remove() }
        let old = try Fixture(hostName: "host2")
        defer { old.remove() }
        let renewed = try Fixture(hostName: "host2")
        defer { renewed.remove() }
        try f.store.peerHosts.add(try old.store.hostIdentity(), signedBy: f.admin)
        #expect(throws: BillboardError.hostExists("host2")) { try f.store.peerHosts.add(try renewed.store.hostIdentity(), signedBy: f.admin) }
        try f.store.peerHosts.remove(name: "host2", signedBy: f.admin)
        try f.store.peerHosts.add(try renewed.store.hostIdentity(), signedBy: f.admin)
        #expect(f.store.peerHosts.authorizedHost(signingKey: [UInt8](renewed.store.hostSigningKey.rawRepresentation)) == "host2")
        #expect(f.store.peerHosts.authorizedHost(signingKey: [UInt8](old.store.hostSigningKey.rawRepresentation)) == nil)
        // One key identifies one host: the same key under a second name, or this host's own key, is refused.
        #expect(throws: BillboardError.hostKeyInUse(key: renewed.store.hostSigningKey.rawRepresentation.hex, by: "host2")) {
            try f.store.peerHosts.add(name: "alias", signingKey: renewed.store.hostSigningKey,
                                      agreementKey: renewed.store.hostAgreementKey, signedBy: f.admin)
        }
        #expect(throws: BillboardError.hostKeyInUse(key: f.store.hostSigningKey.rawRepresentation.hex, by: "host1")) {
            try f.store.peerHosts.add(name: "alias", signingKey: f.store.hostSigningKey,
                                      agreementKey: f.store.hostAgreementKey, signedBy: f.admin)
        }
        #expect(try f.store.peerHosts.list().map(\.name) == ["host2"])
    }
}
