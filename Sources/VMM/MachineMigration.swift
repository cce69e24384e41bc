#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GuestMemory
import KVM
import Migration
import Billboard
import Snapshot

/// The machine as a migration source and destination.
extension Machine: MigrationSourceVM, MigrationDestinationVM {
    public func machineDescriptionPayload() throws -> [UInt8] {
        Array(try MachineStream.encoder.encode(machineDescription))
    }

    public var migrationIdentity: String? { session?.registration.name }

    public func commitHandover(toHost host: String?, toPid pid: Int32?) throws {
        guard let session else { return }
        guard let host, let pid else {
            throw MigrationError.refused("the destination did not say which host and process take the guest (it runs without a billboard), so the lease cannot be handed over")
        }
        try session.handOver(toHost: host, toPid: pid)
    }

    public var owner: (host: String, pid: Int32)? { session.map { ($0.store.hostName, getpid()) } }

    public func pauseForMigration() -> Bool {
        let wasRunning = state == .running
        let paused = pause()
        control.lock(); pausedByMigration = paused && wasRunning; control.unlock()
        return paused
    }

    /// Resumes only a guest the migration paused (a guest the user had paused stays paused).
    public func resumeAfterMigration() {
        control.lock(); let mine = pausedByMigration; pausedByMigration = false; control.unlock()
        if mine { resume() }
    }

    public func statePayloads() throws -> (vcpu: [UInt8], devices: [UInt8]) {
        let (vcpus, devices) = try captureState()
        return (Array(try MachineStream.encoder.encode(vcpus)), Array(try MachineStream.encoder.encode(devices)))
    }

    public func applyState(vcpu: [UInt8], devices: [UInt8]) throws {
        let states: [VCPUState]
        let device: DeviceState
        do { states = try JSONDecoder().decode([VCPUState].self, from: Data(vcpu)) } catch {
            throw SnapshotError.malformed("vCPU section: \(error)")
        }
        do { device = try JSONDecoder().decode(DeviceState.self, from: Data(devices)) } catch {
            throw SnapshotError.malformed("device section: \(error)")
        }
        try restoreState(vcpus: states, devices: device, description: machineDescription)
    }

    public func startGuest() throws {
        // The lease first: a guest that may not own itself here must not run (the source stays
        // paused and in doubt, and can take its lease back). One transaction of downtime.
        guard let session else { return start() }
        try session.commitIncoming(start: start)
    }

    public func signState(digest: [UInt8]) throws -> [UInt8]? {
        guard let session else { return nil }
        return Array(try MachineStream.encoder.encode(try session.store.stateSignatures.sign(digest: digest)))
    }

    public func verifyState(signature: [UInt8]?, digest: [UInt8]) throws {
        guard let session else { return }
        var decoded: StateSignature?
        if let signature {
            do { decoded = try JSONDecoder().decode(StateSignature.self, from: Data(signature)) } catch {
                throw SnapshotError.malformed("signature section: \(error)")
            }
        }
        try session.verifyIncomingSignature(decoded, digest: digest)
    }

    public func discard() {
        end(with: .stopped(signal: 0))
        session?.end()
    }

    /// Holds the vCPUs paused for `percent` of every 20 ms (auto-converge).
    public func setThrottle(percent: Int) {
        throttle.set(percent: percent, machine: self)
    }
}

/// Slows a guest by pausing it for a share of each period, from its own thread.
final class Throttle: @unchecked Sendable {
    private let condition = NSCondition()
    private var percent = 0        // guarded by condition
    private var running = false    // guarded by condition
    static let periodMs = 20.0

    func set(percent newValue: Int, machine: Machine) {
        condition.lock()
        percent = max(0, min(99, newValue))
        if percent > 0 && !running {
            running = true
            condition.unlock()
            startOSThread(name: "throttle") { [self] in loop(machine) }
            return
        }
        // Turning it off waits until the loop has resumed the guest and left.
        while percent == 0 && running { condition.wait() }
        condition.unlock()
    }

    private func loop(_ machine: Machine) {
        while true {
            condition.lock()
            let p = percent
            if p == 0 {
                running = false
                condition.broadcast()
                condition.unlock()
                return
            }
            condition.unlock()
            let held = Self.periodMs * Double(p) / 100
            guard machine.pause() else {
                condition.lock(); running = false; percent = 0; condition.broadcast(); condition.unlock()
                return
            }
            usleep(UInt32(held * 1000))
            machine.resume()
            usleep(UInt32((Self.periodMs - held) * 1000))
        }
    }
}
