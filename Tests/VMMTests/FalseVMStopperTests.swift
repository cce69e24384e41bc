import Foundation
import Testing
import TestSupport
@testable import Billboard
import VMM

@Suite("The VMM stops what the Billboard's scan found")
struct FalseVMStopperTests {
    @Test("a false VM is frozen, its stop audited (frozen, with the evidence) while it is frozen, then killed")
    func freezeRecordKill() throws {
        let root = temporaryPath("stopper")
        defer { try? FileManager.default.removeItem(atPath: root) }
        let store = try BillboardStore.initialize(directory: root, hostName: "stopper", firstAdmin: try AdminKey(name: "tests"))
        let planted = Process()
        planted.executableURL = URL(fileURLWithPath: "/bin/sleep")
        planted.arguments = ["60"]
        try planted.run()
        defer { kill(planted.processIdentifier, SIGKILL); planted.waitUntilExit() }

        let finding = ScanFinding(kind: .falseBeacon, pid: planted.processIdentifier, guest: "planted",
                                  evidence: "planted for this test")
        try FalseVMStopper(scan: store.scan).stop(finding, actor: "stopper test")
        planted.waitUntilExit()
        #expect(planted.terminationReason == .uncaughtSignal && planted.terminationStatus == SIGKILL)
        let entry = try #require(try store.audit.entries().last)
        #expect(entry.event == "scan.stopped" && entry.actor == "stopper test" && entry.guest == "planted")
        #expect(entry.details.contains("\"frozen\":true") && entry.details.contains("planted for this test"))
        #expect(try store.audit.verify().isIntact)
    }
}
