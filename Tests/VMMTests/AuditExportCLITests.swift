import Foundation
import Testing
import TestSupport

@Suite("vmm billboard audit --export and --verify-export")
struct AuditExportCLITests {
    @Test("an export verifies with the host's identity file alone (no store anywhere); an edited one exits 1 naming the entry; an existing file is not overwritten")
    func exportAndVerify() throws {
        let store = try TestBillboard(host: "auditexport")
        _ = try store.register(try Fixtures.guest("hello-protected.bin"), mode: "protected", beacons: "none")
        let export = store.root + "/audit.json", identity = store.root + "/host.json"
        #expect(try store.cli(["host", "export", "--output", identity]).status == 0)
        let written = try store.cli(["audit", "--export", export])
        #expect(written.status == 0, "\(written.stderr)")
        #expect(try store.cli(["audit", "--export", export]).status == 1, "an existing export is not overwritten")

        // --billboard names a directory that does not exist: nothing of a store is needed or opened.
        func verify(_ file: String) throws -> (status: Int32, stdout: String, stderr: String) {
            try runVMM(["billboard", "audit", "--verify-export", file, "--host-identity", identity,
                        "--billboard", store.root + "/no-store-here"])
        }
        let ok = try verify(export)
        #expect(ok.status == 0 && ok.stdout.contains("audit export intact") && ok.stdout.contains("'auditexport'"), "\(ok.stdout)\(ok.stderr)")

        let text = try String(contentsOfFile: export, encoding: .utf8)
        let edited = store.root + "/edited.json"
        try text.replacingOccurrences(of: "\"event\":\"guest.register\"", with: "\"event\":\"guest.rename\"")
            .write(toFile: edited, atomically: false, encoding: .utf8)
        let bad = try verify(edited)
        #expect(bad.status == 1 && bad.stderr.contains("broken at entry") && bad.stderr.contains("edited"), "\(bad.stdout)\(bad.stderr)")
    }
}
