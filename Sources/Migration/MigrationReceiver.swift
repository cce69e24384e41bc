import Foundation
import GuestMemory
import Snapshot

/// What the receiver needs of the VM it reserved; the VMM's machine provides it.
public protocol MigrationDestinationVM: AnyObject, Sendable {
    var memory: GuestMemory { get }
    /// Applies the vCPU and device sections to the paused, not yet started VM.
    func applyState(vcpu: [UInt8], devices: [UInt8]) throws
    /// Checks the source's signature over the state stream (nil: the stream had none) before
    /// anything is applied; throws to refuse.
    func verifyState(signature: [UInt8]?, digest: [UInt8]) throws
    /// Starts the guest (after GO); throws if it may not run here after all (nothing started).
    func startGuest() throws
    /// Throws away the reserved VM (a failure before GO).
    func discard()
    /// The host and process that will own the guest (sent in the accept), if it has an owner record.
    var owner: (host: String, pid: Int32)? { get }
}

/// Faults a test can ask the destination to commit, to prove the source's side.
public enum InjectedFault: String, Sendable, CaseIterable {
    /// Close the connection right after the hello.
    case closeAfterHello = "close-after-hello"
    /// Close the connection once the first memory section arrived, during pre-copy.
    case closeDuringPrecopy = "close-during-precopy"
    /// Refuse the final state instead of answering READY.
    case refuseReady = "refuse-ready"
    /// Start the guest on GO but cut the link before answering RUNNING.
    case closeAfterGo = "close-after-go"
    /// Answer READY with a malformed control message.
    case malformedReady = "malformed-ready"
}

/// The destination side: admission, reservation, verified reception, READY,
/// and the resume on GO.
public final class MigrationReceiver: Sendable {
    /// Checks the hello and reserves the VM (memory, vCPUs), or throws to refuse.
    public typealias Admit = @Sendable (_ machine: [UInt8], _ identity: String?) throws -> any MigrationDestinationVM

    let admit: Admit
    let fault: InjectedFault?

    public init(fault: InjectedFault? = nil, admit: @escaping Admit) {
        self.admit = admit
        self.fault = fault
    }

    /// Figures the destination knows.
    public struct Result: Sendable {
        public var pages: Int
        public var zeroPages: Int
        public var bytes: UInt64
        public var resumedAt: Double
    }

    /// Receives one migration. Returns once the guest runs here; throws (with the
    /// reserved VM discarded) on any failure before GO.
    public func run(transport: any MigrationTransport) throws -> (any MigrationDestinationVM, Result) {
        var reader = try StreamReader(source: TransportSource(transport))
        var replies = try StreamWriter(sink: TransportSink(transport))
        func refuse(_ reason: String) {
            try? replies.writeSection(.control, payload: ControlMessage(kind: .refuse, reason: reason).encoded())
            try? replies.sink.flush()
        }

        guard let first = try reader.nextSection(), first.type == .control else {
            throw MigrationError.protocolViolation("the stream does not start with a hello")
        }
        let hello = try ControlMessage.decode(first.payload)
        guard hello.kind == .hello else { throw MigrationError.protocolViolation("expected hello, got \(hello.kind)") }
        guard hello.version == migrationProtocolVersion else {
            let reason = "protocol version \(hello.version.map(String.init) ?? "none") is not supported (this VMM speaks \(migrationProtocolVersion))"
            refuse(reason)
            throw MigrationError.refused(reason)
        }
        guard let machine = hello.machine else {
            refuse("the hello carries no machine description")
            throw MigrationError.protocolViolation("the hello carries no machine description")
        }
        let vm: any MigrationDestinationVM
        do { vm = try admit(Array(machine), hello.identity) } catch {
            refuse("\(error)")
            throw error
        }
        var committed = false
        defer { if !committed { vm.discard() } }
        try replies.writeSection(.control, payload: ControlMessage(kind: .accept, host: vm.owner?.host, pid: vm.owner?.pid).encoded())
        try replies.sink.flush()
        if fault == .closeAfterHello { transport.close(); throw MigrationError.aborted("injected fault: \(InjectedFault.closeAfterHello.rawValue)") }

        var pages = 0, zeroPages = 0, memorySections = 0
        var vcpu: [UInt8]?, devices: [UInt8]?
        var signature: [UInt8]?, signedDigest: [UInt8] = []
        var ended = false
        // Stop at the end section: the connection stays open, so reading on would block.
        while !ended, let section = try reader.nextSection() {
            if signature != nil && section.type != .end {
                throw MigrationError.protocolViolation("a \(section.type) section follows the signature, which must be last")
            }
            switch section.type {
            case .signature:
                signature = section.payload
                signedDigest = reader.digestBeforeLastSection
            case .memory:
                let r = try MemorySection.apply(section.payload, to: vm.memory)
                pages += r.pages
                zeroPages += r.zeroPages
                memorySections += 1
                if fault == .closeDuringPrecopy && memorySections == 1 {
                    transport.close()
                    throw MigrationError.aborted("injected fault: \(InjectedFault.closeDuringPrecopy.rawValue)")
                }
            case .vcpu:
                guard vcpu == nil else { throw MigrationError.protocolViolation("two vCPU sections") }
                vcpu = section.payload
            case .devices:
                guard devices == nil else { throw MigrationError.protocolViolation("two device sections") }
                devices = section.payload
            case .end:
                ended = true
            default:
                throw MigrationError.protocolViolation("unexpected \(section.type) section at offset \(section.offset)")
            }
        }
        guard ended, let vcpu, let devices else {
            throw MigrationError.protocolViolation("the state stream ended without vCPU and device state")
        }
        do { try vm.verifyState(signature: signature, digest: signedDigest) } catch {
            refuse("the state stream is not signed by a host this destination trusts: \(error)")
            throw error
        }
        // Everything verified (checksums, stream digest, signature); apply it to the paused VM.
        do { try vm.applyState(vcpu: vcpu, devices: devices) } catch {
            refuse("the state does not apply here: \(error)")
            throw error
        }
        switch fault {
        case .refuseReady:
            refuse("injected fault: \(InjectedFault.refuseReady.rawValue)")
            throw MigrationError.aborted("injected fault: refuse-ready")
        case .malformedReady:
            try replies.writeSection(.control, payload: Array("{not json".utf8))
            try replies.sink.flush()
            throw MigrationError.aborted("injected fault: malformed-ready")
        default:
            try replies.writeSection(.control, payload: ControlMessage(kind: .ready).encoded())
            try replies.sink.flush()
        }

        var commit = try StreamReader(source: TransportSource(transport))
        guard let goSection = try commit.nextSection(), goSection.type == .control,
              try ControlMessage.decode(goSection.payload).kind == .go else {
            throw MigrationError.protocolViolation("expected GO")
        }
        guard let end = try commit.nextSection(), end.type == .end else {
            throw MigrationError.protocolViolation("GO was not followed by the end of its stream")
        }
        try vm.startGuest()
        committed = true
        let resumedAt = monotonicMs()
        if fault == .closeAfterGo {
            transport.close()
        } else {
            // The guest runs here now, whatever happens to this reply.
            try? replies.writeSection(.control, payload: ControlMessage(kind: .running, resumedAt: resumedAt).encoded())
            try? replies.finish()
            try? replies.sink.flush()
        }
        return (vm, Result(pages: pages, zeroPages: zeroPages, bytes: 0, resumedAt: resumedAt))
    }
}
