import Crypto
import Foundation
import Testing
@testable import Billboard

@Suite("An exported audit chain, checked with the host's public identity only")
struct AuditExportTests {
    /// A store with a dozen audit entries, its export and its public identity.
    func exported() throws -> (Fixture, Data, HostIdentityDocument) {
        let f = try Fixture()
        let r = try f.store.registry.register(web1(), signedBy: f.admin)
        try f.store.leases.acquire(guestID: r.id, host: "host1", pid: getpid(), takeoverAfter: 10)
        try f.store.leases.release(guestID: r.id, pid: getpid())
        try f.store.registry.revoke(name: "web1", signedBy: f.admin)
        return (f, try f.store.audit.export(), try HostIdentityDocument.decode(try f.store.hostIdentity().encoded()))
    }

    /// The export with `change` applied to its JSON, as someone editing the file would.
    func edited(_ data: Data, _ change: (inout [String: Any]) -> Void) throws -> Data {
        var object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        change(&object)
        return try JSONSerialization.data(withJSONObject: object)
    }

    func entries(_ object: [String: Any]) -> [[String: Any]] { object["entries"] as! [[String: Any]] }

    func invalid(_ body: () throws -> AuditVerification, sourceLocation: SourceLocation = #_sourceLocation) -> String? {
        do {
            let result = try body()
            Issue.record("expected a refused export, got \(result)", sourceLocation: sourceLocation)
        } catch let BillboardRefusal.invalidAuditExport(reason) {
            return reason
        } catch {
            Issue.record("expected invalidAuditExport, got \(error)", sourceLocation: sourceLocation)
        }
        return nil
    }

    @Test("an untouched export verifies with the host's identity, and says how many entries the signed head covers")
    func intact() throws {
        let (f, data, identity) = try exported()
        defer { f.remove() }
        let count = try f.store.audit.entries().count
        #expect(count >= 5)
        #expect(try AuditExport.verify(data, identity: identity) == .intact(entries: count, headSeq: Int64(count)))
        // The format is documented: these names are what other tools read.
        let object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(object["format"] as? String == "swift-vmm billboard audit export" && object["version"] as? Int == 1)
        #expect(Set((object["head"] as? [String: Any])?.keys.map { $0 } ?? []) == ["seq", "hash", "signature"])
    }

    @Test("an edited entry, a removed one, a removed last one, two swapped, and a forged head signature are each named")
    func tampering() throws {
        let (f, data, identity) = try exported()
        defer { f.remove() }
        func verdict(_ change: (inout [String: Any]) -> Void) throws -> AuditVerification {
            try AuditExport.verify(try edited(data, change), identity: identity)
        }
        let edit = try verdict { o in var e = entries(o); e[2]["details"] = "{\"reason\":\"nothing to see\"}"; o["entries"] = e }
        #expect(edit.firstBadSeq == 3 && "\(edit)".contains("edited"), "\(edit)")
        let removed = try verdict { o in var e = entries(o); e.remove(at: 2); o["entries"] = e }
        #expect(removed.firstBadSeq == 3 && "\(removed)".contains("entry 3 is missing"), "\(removed)")
        let cut = try verdict { o in var e = entries(o); e.removeLast(); o["entries"] = e }
        #expect("\(cut)".contains("tail truncated"), "\(cut)")
        let swapped = try verdict { o in var e = entries(o); e.swapAt(2, 3); o["entries"] = e }
        #expect(swapped.firstBadSeq == 3 && "\(swapped)".contains("reordered"), "\(swapped)")
        // A head re-signed by someone else's key over the same payload.
        let forger = Curve25519.Signing.PrivateKey()
        let forged = try verdict { o in
            var head = o["head"] as! [String: Any]
            let payload = AuditChain.headPayload(host: "host1", seq: head["seq"] as! Int64, hash: head["hash"] as! String)
            head["signature"] = try! forger.signature(for: payload).base64EncodedString()
            o["head"] = head
        }
        #expect("\(forged)".contains("head signature does not verify with host 'host1''s signing key"), "\(forged)")
    }

    @Test("another host's identity is refused: by its name, or, under the same name, by its key")
    func wrongHost() throws {
        let (f, data, _) = try exported()
        defer { f.remove() }
        let other = try Fixture(hostName: "host2")
        defer { other.remove() }
        let reason = invalid { try AuditExport.verify(data, identity: try other.store.hostIdentity()) }
        #expect(reason?.contains("audit log of host 'host1', but the identity is of host 'host2'") == true, "\(reason ?? "")")
        let namesake = try Fixture(hostName: "host1")
        defer { namesake.remove() }
        let result = try AuditExport.verify(data, identity: try namesake.store.hostIdentity())
        #expect("\(result)".contains("head signature does not verify"), "\(result)")
    }

    @Test("a truncated file, an empty one, another format and a malformed signature are refused before any entry is checked")
    func malformed() throws {
        let (f, data, identity) = try exported()
        defer { f.remove() }
        let truncated = invalid { try AuditExport.verify(data.prefix(data.count - 100), identity: identity) }
        #expect(truncated?.contains("truncated or damaged") == true, "\(truncated ?? "")")
        #expect(invalid { try AuditExport.verify(Data(), identity: identity) } == "it is empty")
        let format = invalid { try AuditExport.verify(try edited(data) { $0["format"] = "something else" }, identity: identity) }
        #expect(format?.contains("format is 'something else'") == true)
        let signature = invalid {
            try AuditExport.verify(try edited(data) { o in var h = o["head"] as! [String: Any]; h["signature"] = "AAAA"; o["head"] = h }, identity: identity)
        }
        #expect(signature?.contains("not a base64 Ed25519 signature") == true)
    }

    @Test("a file larger than the limit is refused before it is read whole; the export is written once, owner-only")
    func sizeAndFile() throws {
        let (f, data, identity) = try exported()
        defer { f.remove() }
        let path = f.root + "/audit.json"
        try AuditExport.write(data, to: path)
        #expect { try AuditExport.write(data, to: path) } throws: { error in
            "\(error)".contains("the audit export '\(path)' already exists and is not overwritten")
        }
        let attributes = try FileManager.default.attributesOfItem(atPath: path)
        #expect((attributes[.posixPermissions] as? Int) == 0o600)
        #expect(try AuditExport.verify(try AuditExport.load(path: path), identity: identity).isIntact)

        let huge = f.root + "/huge.json"
        #expect(FileManager.default.createFile(atPath: huge, contents: nil))
        #expect(truncate(huge, off_t(AuditExport.maximumSize + 1)) == 0)
        #expect(refusal { _ = try AuditExport.load(path: huge) } == .invalidAuditExport(reason: "it is larger than \(AuditExport.maximumSize) bytes"))
    }
}
