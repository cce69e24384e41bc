import Foundation
import NetworkFrames
import Testing

let guestMAC = MACAddress(parsing: "52:54:00:12:34:56")!
let guestIP = IPv4Address(parsing: "10.200.1.5")!

@Suite("Announce frames and their schedule")
struct AnnounceTests {
    @Test("the RARP announce is byte for byte QEMU's announce_self_create frame")
    func rarpBytes() {
        let mac: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        var expected: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] + mac + [0x80, 0x35]  // broadcast, source, RARP
        expected += [0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03]  // Ethernet, IPv4, 6, 4, request reverse
        expected += mac + [0, 0, 0, 0] + mac + [0, 0, 0, 0]  // sender, target
        expected += [UInt8](repeating: 0, count: 18)  // padding to 60
        #expect(expected.count == 60)
        #expect(Announcement.rarp(mac: guestMAC) == expected)
    }

    @Test("the gratuitous ARP is a broadcast ARP request with sender and target IP both the guest's")
    func garpBytes() {
        let mac: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]
        var expected: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] + mac + [0x08, 0x06]
        expected += [0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01]
        expected += mac + [10, 200, 1, 5] + [0, 0, 0, 0, 0, 0] + [10, 200, 1, 5]
        expected += [UInt8](repeating: 0, count: 18)
        #expect(Announcement.gratuitousARP(mac: guestMAC, ip: guestIP) == expected)
        let arp = ARPPacket(EthernetFrame(expected)!.payload)
        #expect(arp?.operation == ARPPacket.request && arp?.senderIP == guestIP && arp?.targetIP == guestIP)
    }

    @Test("a round is the RARP, then the gratuitous ARP only when the guest has an IP")
    func rounds() {
        #expect(Announcement.round(mac: guestMAC, ip: nil) == [Announcement.rarp(mac: guestMAC)])
        #expect(Announcement.round(mac: guestMAC, ip: guestIP) == [Announcement.rarp(mac: guestMAC),
                                                                   Announcement.gratuitousARP(mac: guestMAC, ip: guestIP)])
    }

    @Test("QEMU's defaults: rounds at 0, 50, 200, 450 and 800 ms")
    func qemuDefaults() {
        let s = AnnounceSchedule.qemuDefault
        #expect(s.delays == [50, 150, 250, 350])
        #expect(s.offsets == [0, 50, 200, 450, 800])
        #expect(AnnounceSchedule() == s)
    }

    @Test("delays are capped at max, one round has no delay, zero rounds is off")
    func capsAndEdges() {
        let s = AnnounceSchedule(initialMs: 100, stepMs: 300, rounds: 6, maxMs: 550)
        #expect(s.delays == [100, 400, 550, 550, 550])
        #expect(AnnounceSchedule(rounds: 1).offsets == [0])
        #expect(AnnounceSchedule.off.offsets == [] && AnnounceSchedule.off.delays == [])
        #expect(AnnounceSchedule(initialMs: 20, stepMs: 0, rounds: 3, maxMs: 550).offsets == [0, 20, 40])
        #expect(AnnounceSchedule(rounds: -1).problem != nil && AnnounceSchedule(initialMs: 0).problem != nil)
        #expect(AnnounceSchedule.qemuDefault.problem == nil)
    }
}

@Suite("Addresses")
struct AddressTests {
    @Test("MAC and IPv4 parse only their exact spellings")
    func parsing() {
        #expect(MACAddress(parsing: "52-54-00-12-34-56") == guestMAC)
        #expect(MACAddress(parsing: "52:54:00:12:34:56")?.description == "52:54:00:12:34:56")
        for bad in ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "5:54:00:12:34:56", "52:54:00:12:34:zz", "525400123456",
                    "52:54-00:12:34:56", "+2:54:00:12:34:56"] {
            #expect(MACAddress(parsing: bad) == nil, "\(bad)")
        }
        #expect(MACAddress(parsing: "ff:ff:ff:ff:ff:ff")!.isUnicast == false)
        #expect(MACAddress(parsing: "01:00:5e:00:00:01")!.isUnicast == false)
        #expect(MACAddress.zero.isUnicast == false && guestMAC.isUnicast)
        #expect(IPv4Address(parsing: "10.200.1.5") == guestIP && guestIP.description == "10.200.1.5")
        for bad in ["", "10.200.1", "10.200.1.5.6", "10.200.1.256", "10..1.5", "10.200.1.+5", "10.200.1.0005", " 10.200.1.5"] {
            #expect(IPv4Address(parsing: bad) == nil, "\(bad)")
        }
    }

    @Test("a MAC is saved as its text and read back only from a valid spelling (saved device state comes from files and peers)")
    func macCodable() throws {
        struct Saved: Codable, Equatable { var mac: MACAddress }
        let data = try JSONEncoder().encode(Saved(mac: guestMAC))
        #expect(String(decoding: data, as: UTF8.self) == #"{"mac":"52:54:00:12:34:56"}"#)
        #expect(try JSONDecoder().decode(Saved.self, from: data) == Saved(mac: guestMAC))
        for bad in [#"{"mac":"52:54:00:12:34"}"#, #"{"mac":"zz:54:00:12:34:56"}"#, #"{"mac":[82,84,0,18,52,86]}"#] {
            #expect(throws: DecodingError.self, "\(bad)") { try JSONDecoder().decode(Saved.self, from: Data(bad.utf8)) }
        }
    }
}
