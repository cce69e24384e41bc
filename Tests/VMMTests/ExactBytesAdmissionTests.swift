import Foundation
import Testing
import TestSupport
import Billboard
import MachineCore
import VMM

@Suite("The doors admit the command line's bytes, not canonically equivalent text",
       .enabled(if: KVMAvailability.present, KVMAvailability.skipMessage))
struct ExactBytesAdmissionTests {
    /// GREEK QUESTION MARK for ';' and KELVIN SIGN for 'K': equal to Swift's `==`, not in bytes.
    static let signed = "a;b K"
    static let lookAlike = "a\u{037E}b \u{212A}"

    @Test("a guest registered with 'a;b K' is refused before any VM when run with its look-alike, and a session admitted with the exact bytes gives no machine for the look-alike; the exact bytes boot and run")
    func lookAlikeCommandLine() throws {
        #expect(Self.signed == Self.lookAlike, "the premise: Swift's == calls them equal")
        let hosts = try localHosts()
        let image = try Fixtures.guestBytes("hello-protected.bin")
        let exact = MachineConfiguration(mode: .protected, commandLine: Self.signed)
        let lookAlike = MachineConfiguration(mode: .protected, commandLine: Self.lookAlike)
        let name = try hosts.register(image, exact)

        do {
            let guest = try GuestDoors.boot(image: image, name: name, configuration: lookAlike, store: hosts.source,
                                            settings: hosts.settings, log: { _ in }, serialOutput: { _ in })
            guest.end()
            Issue.record("the look-alike command line was admitted")
        } catch {
            #expect("\(error)".contains("command line 'a\\u{37E}b \\u{212A}', registered 'a;b K'"), "\(error)")
        }

        let session = try GuestSession.admitBoot(store: hosts.source, name: name, image: image, configuration: exact,
                                                 settings: hosts.settings, log: { _ in })
        #expect(throws: SessionError.self) {
            try GuestDoors.boot(session: session, image: image, configuration: lookAlike, serialOutput: { _ in })
        }
        let machine = try GuestDoors.boot(session: session, image: image, configuration: exact, serialOutput: { _ in })
        machine.start()
        #expect(machine.waitForExit() == .exitPort(status: 0))
        session.end()
    }
}
