import Foundation
import Testing
@testable import Billboard

/// "a;b K" and "a\u{37E}b \u{212A}" (GREEK QUESTION MARK, KELVIN SIGN) are canonically equivalent,
/// so Swift's `==` calls them equal, but a guest would receive different bytes than were signed.
private let signedCommandLine = "a;b K"
private let lookAlikeCommandLine = "a\u{037E}b \u{212A}"

private func registration(name: String = "web1", commandLine: String? = "console=ttyS0",
                          allowedHosts: [String] = []) -> GuestRegistration {
    var r = web1(allowedHosts: allowedHosts)
    r.name = name
    r.commandLine = commandLine
    return r
}

@Suite("Admission compares bytes, not canonically equivalent text")
struct ExactBytesTests {
    @Test("the look-alike strings are equal to Swift's == and differ in bytes: the premise of the tests below")
    func premise() {
        #expect(signedCommandLine == lookAlikeCommandLine)
        #expect(Array(signedCommandLine.utf8) != Array(lookAlikeCommandLine.utf8))
        #expect(Set([signedCommandLine]).contains(lookAlikeCommandLine))
    }

    @Test("a canonically equivalent but byte-different command line is refused, showing the difference; the exact bytes still admit")
    func lookAlikeCommandLineRefused() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(registration(commandLine: signedCommandLine), signedBy: f.admin)

        let r = refusal { try admitWeb1(f.store, commandLine: lookAlikeCommandLine) }
        #expect(r == .configurationChanged(guest: "web1", field: "command line",
                                           actual: "'a\\u{37E}b \\u{212A}'", registered: "'a;b K'"))
        #expect(r?.description == "configuration of 'web1' changed: command line 'a\\u{37E}b \\u{212A}', registered 'a;b K'; start it as registered or re-register it")

        let admitted = try admitWeb1(f.store, commandLine: signedCommandLine)
        #expect(Array(try #require(admitted.commandLine).utf8) == Array(signedCommandLine.utf8))
        #expect(try events(f.store).suffix(2) == ["admit.refused", "admit.accepted"])
    }

    @Test("a canonically equivalent but byte-different guest name is not the registered guest; the exact name still admits")
    func lookAlikeNameRefused() throws {
        let f = try Fixture()
        defer { f.remove() }
        try f.store.registry.register(registration(name: "Kweb"), signedBy: f.admin)

        #expect(refusal { try admitWeb1(f.store, name: "\u{212A}web") } == .notRegistered(guest: "\u{212A}web"))
        #expect(try admitWeb1(f.store, name: "Kweb").name == "Kweb")
    }

    @Test("a canonically equivalent but byte-different host name is not an allowed host; the exact host still admits")
    func lookAlikeHostRefused() throws {
        let f = try Fixture(hostName: "Khost")
        defer { f.remove() }
        try f.store.registry.register(registration(allowedHosts: ["Khost"]), signedBy: f.admin)

        #expect(refusal { try admitWeb1(f.store, host: "\u{212A}host") } ==
            .hostNotAllowed(guest: "web1", host: "\u{212A}host", allowed: ["Khost"]))
        #expect(try admitWeb1(f.store, host: "Khost").name == "web1")
    }

    @Test("hexadecimal, which hashes and integrity codes are computed over, is two lower-case digits a byte, as printf's %02x")
    func hexIsPrintfHex() {
        let bytes = Data((0...255).map { UInt8($0) })
        #expect(bytes.hex == bytes.map { String(format: "%02x", $0) }.joined())
        #expect(Data().hex == "")
        #expect(Data(hex: bytes.hex) == bytes)
    }
}
