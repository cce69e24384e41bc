#if canImport(Glibc)
import Glibc
#endif
import Billboard
import Foundation
import MachineCore
import NetworkFrames
import SystemCalls
import Synchronization

/// The Billboard on the wire for one admitted guest's network card: the MAC and IP its signed
/// registration gives it, the egress filter (`SourceGuard`) over every frame it sends, the
/// audit of each frame dropped, and the verdict once too many were.
///
/// It decides and records; stopping the guest is its owner's business (`onFalse`).
public final class EgressPolicy: Sendable {
    public let guest: String
    public let mac: MACAddress
    public let ip: IPv4Address?
    private let filter: Mutex<SourceGuard>
    private let scan: Scan
    private let log: @Sendable (String) -> Void
    private let onFalse: @Sendable (ScanFinding) -> Void

    init(guest: String, mac: MACAddress, ip: IPv4Address?, threshold: Int, scan: Scan,
         log: @escaping @Sendable (String) -> Void, onFalse: @escaping @Sendable (ScanFinding) -> Void) {
        self.guest = guest
        self.mac = mac
        self.ip = ip
        filter = Mutex(SourceGuard(mac: mac, ip: ip, threshold: threshold))
        self.scan = scan
        self.log = log
        self.onFalse = onFalse
    }

    public var threshold: Int { filter.withLock { $0.threshold } }
    public var dropped: Int { filter.withLock { $0.dropped } }
    public var isFalse: Bool { filter.withLock { $0.isFalse } }

    /// Whether the frame the guest sent may leave for the host's network. A dropped frame is
    /// audited (`network.spoof`, with what it claimed) until the guest is found false; the drop
    /// that reaches the threshold calls `onFalse` once, and from then on nothing leaves.
    public func admit(_ frame: [UInt8]) -> Bool {
        let (verdict, dropped, threshold) = filter.withLock { g in (g.inspect(frame), g.dropped, g.threshold) }
        guard case let .drop(evidence, becameFalse) = verdict else { return true }
        if evidence.kind != .guestFalse {
            do { try scan.recordSpoofedFrame(guest: guest, evidence: evidence.description, dropped: dropped, threshold: threshold) } catch {
                log("billboard: could not audit a spoofed frame of '\(guest)' (\(evidence)): \(error)")
            }
        }
        if becameFalse {
            onFalse(ScanFinding(kind: .spoofedTraffic, pid: getpid(), guest: guest,
                                evidence: "its network card sent \(dropped) frames claiming another MAC or IP than registered (\(mac)\(ip.map { ", \($0)" } ?? "")); the last: \(evidence)"))
        }
        return false
    }
}

/// Why a guest may not have the network card asked for.
public struct NetworkRefusal: Error, CustomStringConvertible {
    public let description: String
}

extension GuestSession {
    /// The network card of this admitted guest, attached to host tap `tap`: its MAC comes from
    /// the signed registration, never from the caller. A guest registered without a MAC is
    /// refused a card.
    public func networkConfiguration(tap: String) throws -> NetworkConfiguration {
        guard let network = registration.network else {
            throw NetworkRefusal(description: "guest '\(registration.name)' is registered without a MAC address, so it cannot be given a network card; an administrator must register it with --mac (and --ip) first")
        }
        guard TapDevice.isValidName(tap) else {
            throw NetworkRefusal(description: "'\(tap)' is not a tap interface name (1 to 15 bytes, no '/' or spaces)")
        }
        return NetworkConfiguration(mac: network.mac.bytes, tap: tap)
    }
}
