#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KVM

/// One vCPU's thread, as a small state machine (Firecracker's `vstate/vcpu.rs` is the model).
///
///     created ──start──▶ running ◀──resume── paused
///                          │  └────pause────▶ │
///                          └──finish──▶ finished ◀──finish──┘
///
/// Besides the owner's pause there is a hold (the auto-converge throttle): a held vCPU parks
/// too, but the machine still counts as running, and releasing the hold never undoes the
/// owner's pause.
///
/// The machine sends events by setting `target` and kicking the thread out of `KVM_RUN`; the
/// thread acts on them only after `KVM_RUN` returned EINTR (or before its first run), because
/// KVM completes an I/O exit's pending work only when the vCPU re-enters: a vCPU parked right
/// after an I/O exit would be saved with that I/O half done.
///
/// Thread-safety: `state`, `target` and `thread` are guarded by the machine's `control`
/// condition, which every runner of the machine shares; `@unchecked` for that reason.
final class VCPURunner: @unchecked Sendable {
    enum State: Equatable { case created, running, paused, finished }
    /// What the machine asks of a runner. `parkAtNextExit` is a pause without the kick.
    enum Event: Equatable { case pause, parkAtNextExit, resume, finish, hold, release }

    let vcpu: VCPU
    let index: Int
    private let control: NSCondition
    private(set) var state: State = .created   // guarded by control
    /// Where the last event asked the runner to be: running, paused or finished.
    private(set) var target: State = .running  // guarded by control
    /// Held by the throttle: parked whatever the target, until released.
    private(set) var held = false              // guarded by control
    private var thread: pthread_t?             // guarded by control
    /// The thread exists but waits, still `created`, until the machine starts (`prestart`).
    private(set) var prestarted = false        // guarded by control
    /// The machine started: a prestarted thread may go on.
    private var launched = false               // guarded by control

    init(vcpu: VCPU, index: Int, control: NSCondition) {
        self.vcpu = vcpu
        self.index = index
        self.control = control
    }

    /// Delivers an event; call with `control` held. Pause and finish kick the vCPU out of
    /// `KVM_RUN`; resume wakes a parked thread (the caller broadcasts). A finished runner
    /// stays finished.
    func sendLocked(_ event: Event) {
        switch (event, target) {
        case (_, .finished):
            return
        case (.pause, _):
            target = .paused
            kickLocked()
        case (.parkAtNextExit, _):
            // No signal: the vCPU parks when it next leaves the guest (or enters `KVM_RUN`).
            target = .paused
            if state != .finished { vcpu.immediateExit = true }
        case (.resume, .paused):
            target = .running
        case (.resume, _):
            return
        case (.finish, _):
            target = .finished
            kickLocked()
        case (.hold, _):
            held = true
            kickLocked()
        case (.release, _):
            held = false
        }
    }

    /// Makes a blocked `KVM_RUN` return EINTR, and keeps the next one from entering the guest.
    private func kickLocked() {
        guard state != .finished else { return }
        vcpu.immediateExit = true
        if let thread { pthread_kill(thread, KickSignal.number) }
    }

    /// Starts the thread. `dispatch` handles one exit (nil: go on); `end` ends the machine.
    func start(dispatch: @escaping @Sendable (VCPUExit, VCPU) -> MachineExit?,
               end: @escaping @Sendable (MachineExit) -> Void) {
        startOSThread(name: "vcpu\(index)") { [self] in loop(dispatch: dispatch, end: end) }
    }

    /// Starts the thread ahead of the machine: it waits, `created`, until `launchLocked` (or a
    /// finish), so that a start then costs a wake-up rather than a thread's creation. Call
    /// with `control` held.
    func prestartLocked(dispatch: @escaping @Sendable (VCPUExit, VCPU) -> MachineExit?,
                        end: @escaping @Sendable (MachineExit) -> Void) {
        guard !prestarted else { return }
        prestarted = true
        start(dispatch: dispatch, end: end)
    }

    /// Lets a prestarted thread go on (the caller broadcasts). Call with `control` held.
    func launchLocked() { launched = true }

    private func loop(dispatch: (VCPUExit, VCPU) -> MachineExit?, end: (MachineExit) -> Void) {
        KickSignal.unblockInThisThread()
        control.lock()
        while prestarted && !launched && target != .finished { control.wait() }
        if prestarted && !launched {
            // Ended before the machine started: the thread goes without ever running.
            state = .finished
            control.broadcast()
            control.unlock()
            return
        }
        thread = pthread_self()
        state = .running
        control.broadcast()
        control.unlock()
        defer {
            control.lock()
            state = .finished
            thread = nil
            control.broadcast()
            control.unlock()
        }
        // Nothing is pending before the first run, so the thread may park at once.
        var mayPark = true
        while true {
            if mayPark, !waitUntilRunning() { return }
            let exit: VCPUExit
            do { exit = try vcpu.run() } catch {
                end(.fatal(reason: "\(error)", details: vcpu.registerDump()))
                return
            }
            if exit == .interrupted {
                mayPark = true
                continue
            }
            mayPark = false
            if let ending = dispatch(exit, vcpu) {
                end(ending)
                return
            }
        }
    }

    /// Parks until the next event (call with `control` held).
    private func park() {
        if state != .paused {
            state = .paused
            control.broadcast()
        }
        control.wait()
    }

    /// Acts on the machine's events; returns false when the thread must finish.
    private func waitUntilRunning() -> Bool {
        control.lock(); defer { control.unlock() }
        while true {
            switch target {
            case .finished, .created:
                return false
            case .paused:
                park()
            case .running where held:
                park()
            case .running:
                state = .running
                // A kick from a pause that is already over: clear it under the lock the kicker
                // takes, so a kick after this point still stops the next run.
                vcpu.immediateExit = false
                return true
            }
        }
    }
}

extension VCPU {
    /// A register dump for fatal exits.
    public func registerDump() -> String {
        guard let r = try? registers(), let s = try? specialRegisters() else {
            return "(registers unavailable)"
        }
        func h(_ v: UInt64) -> String {
            let s = String(v, radix: 16)
            return "0x" + String(repeating: "0", count: max(0, 16 - s.count)) + s
        }
        return """
        vCPU \(id) registers:
          rip=\(h(r.rip)) rflags=\(h(r.rflags)) rsp=\(h(r.rsp)) rbp=\(h(r.rbp))
          rax=\(h(r.rax)) rbx=\(h(r.rbx)) rcx=\(h(r.rcx)) rdx=\(h(r.rdx))
          rsi=\(h(r.rsi)) rdi=\(h(r.rdi)) r8=\(h(r.r8)) r9=\(h(r.r9))
          cs=\(String(s.cs.selector, radix: 16)) base=\(h(s.cs.base)) ss=\(String(s.ss.selector, radix: 16)) ds=\(String(s.ds.selector, radix: 16))
          cr0=\(h(s.cr0)) cr2=\(h(s.cr2)) cr3=\(h(s.cr3)) cr4=\(h(s.cr4)) efer=\(h(s.efer))
          gdt=\(h(s.gdt.base))/\(s.gdt.limit) idt=\(h(s.idt.base))/\(s.idt.limit)
        """
    }
}
