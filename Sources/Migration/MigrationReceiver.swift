import Foundation
import GuestMemory
import Snapshot
import SystemCalls

/// What the receiver needs of the VM it reserved; the VMM's admitted guest provides it.
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

/// The destination side: admission, reservation, verified reception, READY, and the resume on
/// GO. Its states are drawn in Protocol.swift: awaiting hello, admitting, reserved (accept
/// sent), receiving, verifying, ready (READY sent), committed (GO read, lease taken, guest
/// started, RUNNING sent). Any failure before `committed` discards the reserved VM; the source
/// keeps its guest.
public final class MigrationReceiver<VM: MigrationDestinationVM>: Sendable {
    /// Checks the hello and reserves the VM (memory, vCPUs), or throws to refuse.
    public typealias Admit = @Sendable (_ machine: [UInt8], _ identity: String?) throws -> VM

    let admit: Admit

    public init(admit: @escaping Admit) {
        self.admit = admit
    }

    /// Figures the destination knows.
    public struct Result: Sendable {
        public var pages: Int
        public var zeroPages: Int
        /// Stream bytes received from the source (state stream and commit stream).
        public var bytes: UInt64
        public var resumedAt: Double
    }

    /// Receives one migration. Returns once the guest runs here; throws (with the
    /// reserved VM discarded) on any failure before GO.
    public func run(transport: any MigrationTransport) throws -> (vm: VM, result: Result) {
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
        let vm: VM
        do { vm = try admit(Array(machine), hello.identity) } catch {
            refuse("\(error)")
            throw error
        }
        var committed = false
        defer { if !committed { vm.discard() } }
        try replies.writeSection(.control, payload: ControlMessage(kind: .accept, host: vm.owner?.host, pid: vm.owner?.pid).encoded())
        try replies.sink.flush()

        // Pre-copy rounds and stop-and-copy: the same section sequence a snapshot file holds.
        let body = try StateSequence.readBody(from: &reader, into: vm.memory)
        do { try vm.verifyState(signature: body.signature, digest: body.signedDigest) } catch {
            refuse("the state stream is not signed by a host this destination trusts: \(error)")
            throw error
        }
        // Everything verified (checksums, stream digest, signature); apply it to the paused VM.
        do { try vm.applyState(vcpu: body.vcpus, devices: body.devices) } catch {
            refuse("the state does not apply here: \(error)")
            throw error
        }
        try replies.writeSection(.control, payload: ControlMessage(kind: .ready).encoded())
        try replies.sink.flush()

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
        let resumedAt = monotonicMilliseconds()
        // The guest runs here now, whatever happens to this reply.
        try? replies.writeSection(.control, payload: ControlMessage(kind: .running, resumedAt: resumedAt).encoded())
        try? replies.finish()
        try? replies.sink.flush()
        return (vm, Result(pages: body.pages, zeroPages: body.zeroPages, bytes: reader.offset + commit.offset, resumedAt: resumedAt))
    }
}
