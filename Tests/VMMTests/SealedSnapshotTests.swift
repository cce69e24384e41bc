import Billboard
import Foundation
import MachineCore
import Snapshot
import Synchronization
import Testing
import TestSupport
@testable import VMM

/// A third host that knows the guest and trusts the source, but that no snapshot is sealed for.
private func outsiderHost(allowing name: String, image: [UInt8], configuration c: MachineConfiguration) throws -> BillboardStore {
    let hosts = try localHosts()
    let store = try BillboardStore.initialize(directory: temporaryPath("outsider"), hostName: "outsider", firstAdmin: hosts.admin)
    try store.peerHosts.add(name: "src", signingKey: hosts.source.hostSigningKey, agreementKey: hosts.source.hostAgreementKey, signedBy: hosts.admin)
    try store.registry.register(GuestRegistration(name: name, imageSHA256: ImageDigest.sha256(Data(image)), memoryBytes: c.memorySize,
                                                  vcpus: c.vcpuCount, mode: c.mode?.rawValue, commandLine: c.commandLine,
                                                  allowedHosts: ["src", "dst", "outsider"], beacons: .required), signedBy: hosts.admin)
    return store
}

private func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
    guard haystack.count >= needle.count else { return false }
    return haystack.withUnsafeBufferPointer { h in
        (0...(h.count - needle.count)).contains { i in needle.indices.allSatisfy { h[i + $0] == needle[$0] } }
    }
}

@Suite("Sealed snapshots of real guests", .enabled(if: KVMAvailability.present, "needs /dev/kvm"))
struct SealedSnapshotTests {
    static let canary = "SEALED-CANARY-5d1f0e9b7c3a"

    /// A counter booted on the source host with the canary in its command line (and so in its
    /// memory), run for a moment, then paused.
    private func pausedCounter() throws -> (AdmittedGuest, String, MachineConfiguration, [UInt8]) {
        let image = try Fixtures.guestBytes("counter.elf")
        let c = MachineConfiguration(commandLine: "count=0 ticks=400000 note=\(Self.canary)")
        let name = try localHosts().register(image, c)
        let output = Mutex<[UInt8]>([])
        let guest = try GuestDoors.boot(image: image, name: name, configuration: c, store: localHosts().source,
                                        settings: localHosts().settings, log: { _ in }, serialOutput: { b in output.withLock { $0.append(b) } })
        guest.start()
        #expect(waitUntil(30) { output.withLock { $0.count } > 20 }, "the counter printed nothing")
        #expect(guest.pause())
        return (guest, name, c, image)
    }

    @Test("a sealed snapshot holds no byte of the guest's command line or memory in clear; an unsealed one does (the search works)")
    func canaryAbsentWhenSealed() throws {
        let (guest, _, _, _) = try pausedCounter()
        defer { guest.end(with: .shutdown); guest.end() }
        let sealedPath = temporaryPath("sealed.snap"), clearPath = temporaryPath("clear.snap")
        let sealed = try guest.snapshot(to: sealedPath)
        #expect(sealed.sealedFor == ["src", "dst"])
        let unsealed = try guest.snapshot(to: clearPath, sealed: false)
        #expect(unsealed.warnings?.first?.contains("unsealed") == true)
        let canary = Array(Self.canary.utf8)
        #expect(contains(Array(try Data(contentsOf: URL(fileURLWithPath: clearPath))), canary))
        #expect(!contains(Array(try Data(contentsOf: URL(fileURLWithPath: sealedPath))), canary))
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: sealedPath)).prefix(8)) == SealedFormat.magic)
    }

    @Test("a sealed snapshot restores on an allowed peer host and runs there; a host it is not sealed for refuses it by name, and an edited copy is refused; the intact file still restores")
    func restoreOnPeerRefuseElsewhere() throws {
        let hosts = try localHosts()
        let (guest, name, c, image) = try pausedCounter()
        let path = temporaryPath("peer.snap")
        _ = try guest.snapshot(to: path)
        guest.end(with: .shutdown)
        guest.end()

        // A host that is neither this one nor an allowed, enrolled peer: refused before admission.
        let outsider = try outsiderHost(allowing: name, image: image, configuration: c)
        #expect {
            _ = try GuestDoors.restore(path: path, requestedMemory: nil, store: outsider, settings: hosts.settings,
                                       log: { _ in }, serialOutput: { _ in })
        } throws: { error in
            "\(error)".contains("sealed for 'src', 'dst'; this host 'outsider' holds none of their keys")
        }
        #expect(try outsider.audit.entries().contains { $0.event == "state.signature.refused" })

        // One byte flipped in the middle: refused by the AEAD, and audited.
        var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        bytes[bytes.count / 2] ^= 0x01
        let edited = temporaryPath("edited.snap")
        try Data(bytes).write(to: URL(fileURLWithPath: edited))
        #expect {
            _ = try GuestDoors.restore(path: edited, requestedMemory: nil, store: hosts.destination, settings: hosts.settings,
                                       log: { _ in }, serialOutput: { _ in })
        } throws: { error in
            "\(error)".contains("fails authentication")
        }

        // The allowed peer restores the intact file and the counter counts on.
        let output = Mutex<[UInt8]>([])
        let (restored, stats) = try GuestDoors.restore(path: path, requestedMemory: nil, store: hosts.destination, settings: hosts.settings,
                                                       log: { _ in }, serialOutput: { b in output.withLock { $0.append(b) } })
        defer { restored.end(with: .shutdown); restored.end() }
        #expect(stats.pages > 0)
        try restored.takeRestoredLease()
        restored.start()
        #expect(waitUntil(30) { output.withLock { $0.count } > 20 }, "the restored counter printed nothing")
    }

    @Test("an allowed host that is not an enrolled peer gets no key and is named in a warning")
    func allowedButNotEnrolledIsWarned() throws {
        let hosts = try localHosts()
        let image = try Fixtures.guestBytes("counter.elf")
        let c = MachineConfiguration(commandLine: "count=0 ticks=400000")
        let name = "warned-\(UInt32.random(in: 0...UInt32.max))"
        try hosts.source.registry.register(GuestRegistration(name: name, imageSHA256: ImageDigest.sha256(Data(image)), memoryBytes: c.memorySize,
                                                             vcpus: c.vcpuCount, commandLine: c.commandLine,
                                                             allowedHosts: ["src", "dst", "stranger"], beacons: .required), signedBy: hosts.admin)
        let guest = try GuestDoors.boot(image: image, name: name, configuration: c, store: hosts.source, settings: hosts.settings,
                                        log: { _ in }, serialOutput: { _ in })
        guest.startPaused()
        defer { guest.end(with: .shutdown); guest.end() }
        let stats = try guest.snapshot(to: temporaryPath("warned.snap"))
        #expect(stats.sealedFor == ["src", "dst"])
        #expect(stats.warnings?.contains { $0.contains("'stranger', which is not an enrolled peer") } == true)
    }
}
