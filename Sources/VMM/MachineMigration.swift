#if canImport(Glibc)
import Glibc
#endif
import Billboard
import Foundation
import GuestMemory
import MachineCore
import Migration
import PageFaults
import Snapshot
import SystemCalls

/// An admitted guest as a migration source: the machine gives memory, dirty pages and state;
/// the session signs the stream and hands the lease over at the commit point.
extension AdmittedGuest: MigrationSourceVM {
    public var memory: GuestMemory { machine.memory }
    public var dirtyTracker: any DirtyTracker { machine.dirtyTracker }

    public func machineDescriptionPayload() throws -> [UInt8] { try stateHeader.encoded() }

    public var migrationIdentity: String? { name }

    public var hostName: String { session.store.hostName }

    public func prepareHandover(toHost host: String?, toPid pid: Int32?, challenge: String) throws {
        // The last step before the pause: the state's first encoding must not be inside it.
        machine.warmStateCodec()
        // Without a destination process there is nothing to intend; `commitHandover` refuses.
        guard let host, let pid else { return }
        try session.prepareHandover(toHost: host, toPid: pid, challenge: challenge)
    }

    public func abandonHandover() { session.abandonHandover() }

    public func commitHandover(toHost host: String?, toPid pid: Int32?) throws {
        guard let host, let pid else {
            throw MigrationError.refused("the destination did not say which host and process take the guest (it runs without a billboard), so the lease cannot be handed over")
        }
        try session.handOver(toHost: host, toPid: pid)
    }

    public func statePayloads() throws -> (vcpu: [UInt8], devices: [UInt8]) {
        let payloads = try MachineStateCodec.encode(try machine.saveState())
        return (payloads.vcpus, payloads.devices)
    }

    public func signState(digest: [UInt8]) throws -> [UInt8]? {
        try StateJSON.encode(try session.store.stateSignatures.sign(digest: digest))
    }

    public func setThrottle(percent: Int) { machine.setThrottle(percent: percent) }

    public func notePostCopyPageServer(awaitingRecovery: Bool) { session.notePageServer(awaitingRecovery: awaitingRecovery) }
}

/// An admitted guest reserved at a migration destination: memory filled by the receiver, state
/// applied once verified, started on GO if the lease can be taken.
extension AdmittedGuest: MigrationDestinationVM {
    public func applyState(vcpu: [UInt8], devices: [UInt8]) throws {
        let body = StateBody(vcpus: vcpu, devices: devices)
        // The source's description: its TSC rate is what the saved vCPUs ran at.
        try machine.restoreState(try MachineStateCodec.decode(body, description: carriedDescription ?? machine.machineDescription))
    }

    public func verifyState(signature: [UInt8]?, digest: [UInt8]) throws {
        let decoded = try signature.map { try StateJSON.decode(StateSignature.self, from: $0, what: "signature section") }
        try session.verifyIncomingSignature(decoded, digest: digest)
    }

    public func prestartVCPUThreads() {
        machine.prestartVCPUThreads()
        // While the pages arrive: the state's first decoding must not be inside the downtime.
        machine.warmStateCodec()
    }

    public func startGuest() throws { _ = try startGuestTimed() }

    /// The vCPU threads are created now, parked (creating them took about a millisecond of the
    /// downtime here), while READY travels and the source hands the lease over; no guest
    /// instruction runs before `startGuestTimed` takes the lease and releases them. A discard
    /// ends them.
    public func parkVCPUsForStart() {
        if machine.state == .created { machine.startPaused() }
    }

    public func startGuestTimed() throws -> GuestStartTimes {
        // The lease first: a guest that may not own itself here must not run (the source stays
        // paused and in doubt, and can take its lease back). One transaction of downtime.
        var resumedAt = 0.0
        // Post-copy: the beacon block may be among the pages still to come; the token is read
        // off this path (the guest must not wait for it to start, nor a recovery for it).
        let postcopy = incomingPostCopy != nil
        let leaseTaken = try session.commitIncoming(beaconToken: postcopy ? nil : try machine.beaconToken(), tokenLater: postcopy) {
            // The threads wait parked since READY (`parkVCPUsForStart`): released, they run the guest.
            if machine.state == .created { machine.start() } else { machine.resume() }
            resumedAt = monotonicMilliseconds()
        }
        if postcopy { learnBeaconTokenWhenReadable() }
        noteArrival(at: resumedAt)
        // After the resume (not downtime): the switches learn where the guest is now. The
        // first round goes before this returns, so the RUNNING reply can say when.
        announceArrival(resumedAt: resumedAt)
        return GuestStartTimes(leaseTaken: leaseTaken, resumed: resumedAt)
    }

    public var announceSoFar: AnnounceReport? { arrivalAnnounce }

    public var resumedAt: Double? { arrivedAt }

    /// Tests only: as `startGuest`, but the vCPUs start parked, so that the memory a migration
    /// brought can be compared with the source's before the guest changes it.
    func startGuestParked() throws {
        let postcopy = incomingPostCopy != nil
        _ = try session.commitIncoming(beaconToken: postcopy ? nil : try machine.beaconToken(), tokenLater: postcopy) {
            // Parked since READY already (`parkVCPUsForStart`), or parked now.
            if machine.state == .created { machine.startPaused() }
        }
        if postcopy { learnBeaconTokenWhenReadable() }
    }

    /// Post-copy: reads the beacon token on a thread of its own, which may wait for the beacon
    /// block's page (through a recovery, if the link fails meanwhile).
    private func learnBeaconTokenWhenReadable() {
        let machine = self.machine, session = self.session
        startOSThread(name: "beacon-token") {
            session.learnBeaconToken(try? machine.beaconToken())
        }
    }

    public func discard() {
        machine.end(with: .stopped(signal: 0))
        session.end()
    }

    public var owner: (host: String, pid: Int32)? { (session.store.hostName, getpid()) }

    public func attachPostCopy(_ incoming: PostCopyIncoming) { attachPostCopyIncoming(incoming) }

    public func postCopyPaused(reason: String) {
        session.log("migration: \(reason)")
        pauseForPostCopy()
    }

    public func postCopyResumed() { resumeAfterPostCopy() }

    /// The pages cannot come any more: the machine ends before any vCPU runs on without them
    /// (ending kicks the vCPUs out of `KVM_RUN`; the fault server wakes its sleepers only after).
    public func postCopyLost(reason: String) {
        session.log("migration: \(reason)")
        machine.end(with: .fatal(reason: reason, details: ""))
    }
}
