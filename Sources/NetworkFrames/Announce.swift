/// What a migrated guest's host sends so that the switches between it and its peers learn
/// the guest's MAC on its new port: the frames, and when.
public enum Announcement {
    /// QEMU's self-announce frame (`announce_self_create` in net/announce.c): broadcast from
    /// the guest's MAC, EtherType RARP (0x8035), a RARP "request reverse" (operation 3) whose
    /// sender and target hardware addresses are both the guest's MAC and whose protocol
    /// addresses are 0.0.0.0, zero-padded to 60 bytes. It needs no IP address: switches learn
    /// from the source MAC alone.
    public static func rarp(mac: MACAddress) -> [UInt8] {
        let packet = ARPPacket(operation: ARPPacket.reverseRequest, senderMAC: mac, senderIP: .unspecified,
                               targetMAC: mac, targetIP: .unspecified)
        return FrameBuilder.ethernet(destination: .broadcast, source: mac, etherType: EtherType.rarp, payload: packet.bytes)
    }

    /// A gratuitous ARP for `ip` (an ARP announcement, RFC 5227 section 2.3): broadcast, an ARP
    /// request whose sender and target protocol addresses are both `ip`, sender hardware address
    /// the guest's MAC, target hardware address zero; padded to 60 bytes. Hosts that cache the
    /// guest's IP update the entry; switches learn the MAC as from the RARP.
    public static func gratuitousARP(mac: MACAddress, ip: IPv4Address) -> [UInt8] {
        let packet = ARPPacket(operation: ARPPacket.request, senderMAC: mac, senderIP: ip, targetMAC: .zero, targetIP: ip)
        return FrameBuilder.ethernet(destination: .broadcast, source: mac, etherType: EtherType.arp, payload: packet.bytes)
    }

    /// The frames of one round: the RARP, then the gratuitous ARP when the guest has an IP.
    public static func round(mac: MACAddress, ip: IPv4Address?) -> [[UInt8]] {
        [rarp(mac: mac)] + (ip.map { [gratuitousARP(mac: mac, ip: $0)] } ?? [])
    }
}

/// When the rounds of an announcement go out, as QEMU times them (`qemu_announce_self`,
/// `qemu_announce_timer_step` in net/announce.c).
///
/// QEMU sends round 1 at once, then counts `round` down from `rounds`; after each send, while
/// rounds remain, the next one is `initial + (rounds - round - 1) * step` ms after the previous
/// (with `round` already decremented), capped at `max` (a negative value also becomes `max`).
/// So the delay before round k (1-based, k >= 2) is `min(initial + (k - 2) * step, max)`.
/// With QEMU's defaults (initial 50, step 100, rounds 5, max 550) the delays are
/// 50, 150, 250, 350 ms and the rounds go out at 0, 50, 200, 450, 800 ms.
public struct AnnounceSchedule: Sendable, Equatable {
    public var initialMs: Int
    public var stepMs: Int
    /// 0: no announcement at all.
    public var rounds: Int
    public var maxMs: Int

    /// QEMU's defaults (qapi/net.json AnnounceParameters).
    public static let qemuDefault = AnnounceSchedule(initialMs: 50, stepMs: 100, rounds: 5, maxMs: 550)
    public static let off = AnnounceSchedule(initialMs: 50, stepMs: 100, rounds: 0, maxMs: 550)

    public init(initialMs: Int = 50, stepMs: Int = 100, rounds: Int = 5, maxMs: Int = 550) {
        self.initialMs = initialMs
        self.stepMs = stepMs
        self.rounds = rounds
        self.maxMs = maxMs
    }

    /// Why these parameters make no schedule, or nil when they do.
    public var problem: String? {
        if rounds < 0 || rounds > 1000 { return "rounds must be 0 to 1000" }
        if initialMs < 1 || initialMs > 100_000 { return "the initial delay must be 1 to 100000 ms" }
        if stepMs < 0 || stepMs > 100_000 { return "the step must be 0 to 100000 ms" }
        if maxMs < 1 || maxMs > 100_000 { return "the maximum delay must be 1 to 100000 ms" }
        return nil
    }

    /// The wait before each round after the first (`rounds - 1` values), in ms.
    public var delays: [Int] {
        guard rounds > 1 else { return [] }
        return (2...rounds).map { k in
            let step = initialMs + (k - 2) * stepMs
            return step < 0 || step > maxMs ? maxMs : step
        }
    }

    /// When each round goes out, in ms after the first (`rounds` values; empty when off).
    public var offsets: [Int] {
        guard rounds > 0 else { return [] }
        return delays.reduce(into: [0]) { $0.append($0.last! + $1) }
    }
}
