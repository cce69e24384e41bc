/// The saved state of a 16550 UART: every register and anything buffered.
public struct Serial16550State: Sendable, Equatable, Codable {
    public var interruptEnable: UInt8 = 0
    public var lineControl: UInt8 = LineControl.eightBits
    public var modemControl: UInt8 = ModemControl.out2
    public var scratch: UInt8 = 0
    public var divisorLow: UInt8 = 0x0C   // 9600 baud at reset (115200 / 12)
    public var divisorHigh: UInt8 = 0
    public var fifoControl: UInt8 = 0
    /// Bytes waiting to be read by the guest (loopback or host input).
    public var receiveBuffer: [UInt8] = []
    public init() {}
}

// The UART's register bits, by register, named as in the 16550 data sheet (and rust-vmm's
// `vm-superio` serial device), so the code says which bit it means.

/// Line control register (LCR).
public enum LineControl {
    /// Word length 8 bits (bits 0-1 set): the reset value guests expect.
    public static let eightBits: UInt8 = 0x03
    /// Divisor latch access: offsets 0 and 1 reach the baud divisor instead of data and IER.
    public static let divisorLatchAccess: UInt8 = 0x80
}

/// Modem control register (MCR); only its low five bits exist.
public enum ModemControl {
    public static let dataTerminalReady: UInt8 = 0x01
    public static let requestToSend: UInt8 = 0x02
    public static let out1: UInt8 = 0x04
    public static let out2: UInt8 = 0x08
    public static let loopback: UInt8 = 0x10
    public static let writableMask: UInt8 = 0x1F
}

/// Line status register (LSR).
public enum LineStatus {
    public static let dataReady: UInt8 = 0x01
    /// Transmit holding register empty.
    public static let transmitHoldingEmpty: UInt8 = 0x20
    /// Transmitter idle (holding and shift registers empty).
    public static let transmitterEmpty: UInt8 = 0x40
}

/// Modem status register (MSR).
public enum ModemStatus {
    public static let clearToSend: UInt8 = 0x10
    public static let dataSetReady: UInt8 = 0x20
    public static let ringIndicator: UInt8 = 0x40
    public static let dataCarrierDetect: UInt8 = 0x80
}

/// Interrupt identification register (IIR, read) and FIFO control register (FCR, written at
/// the same offset).
public enum InterruptIdentification {
    /// Bit 0 set: no interrupt pending.
    public static let noInterruptPending: UInt8 = 0x01
    /// Bits 6-7: FIFOs enabled.
    public static let fifosEnabled: UInt8 = 0xC0
}

public enum FIFOControl {
    public static let enable: UInt8 = 0x01
    public static let clearReceive: UInt8 = 0x02
}

/// Interrupt enable register (IER); only its low four bits exist.
public enum InterruptEnable {
    public static let writableMask: UInt8 = 0x0F
}

/// A 16550 UART subset, as a pure state machine (no threads, no KVM).
///
/// Transmit goes to `output` byte by byte; the line status always reports the
/// transmitter empty, so guests that poll LSR bit 5 never wait. No interrupts
/// are raised: the tiny guests here run without an interrupt controller.
/// Loopback (MCR bit 4) is honoured because some kernels probe the port with it.
public final class Serial16550: BusDevice {
    /// Register offsets from the base port (COM1 is 0x3f8).
    public enum Register: UInt16 { case data = 0, interruptEnable, interruptId, lineControl, modemControl, lineStatus, modemStatus, scratch }
    public static let com1Base: UInt16 = 0x3F8
    /// Ports the UART decodes.
    public static let registerCount: UInt64 = 8
    /// Receive buffer limit: a guest that never reads cannot make us grow without bound.
    public static let receiveLimit = 64

    private var state: Serial16550State
    private let output: (UInt8) -> Void

    public init(state: Serial16550State = Serial16550State(), output: @escaping (UInt8) -> Void) {
        self.state = state
        self.output = output
    }

    private var dlab: Bool { state.lineControl & LineControl.divisorLatchAccess != 0 }
    private var loopback: Bool { state.modemControl & ModemControl.loopback != 0 }

    /// Every register and the receive buffer.
    public func saveState() -> Serial16550State { state }

    /// Replaces the whole state (restore from a snapshot or a migration).
    public func restoreState(_ state: Serial16550State) { self.state = state }

    /// Queues host input for the guest to read.
    public func receive(_ byte: UInt8) {
        if state.receiveBuffer.count < Self.receiveLimit { state.receiveBuffer.append(byte) }
    }

    public func read(offset: UInt16) -> UInt8 {
        switch Register(rawValue: offset) {
        case .data:
            if dlab { return state.divisorLow }
            return state.receiveBuffer.isEmpty ? 0 : state.receiveBuffer.removeFirst()
        case .interruptEnable:
            return dlab ? state.divisorHigh : state.interruptEnable
        case .interruptId:
            // No interrupt pending; report FIFOs enabled when the guest turned them on.
            let fifos = state.fifoControl & FIFOControl.enable != 0 ? InterruptIdentification.fifosEnabled : 0
            return fifos | InterruptIdentification.noInterruptPending
        case .lineControl:
            return state.lineControl
        case .modemControl:
            return state.modemControl
        case .lineStatus:
            let ready = state.receiveBuffer.isEmpty ? 0 : LineStatus.dataReady
            return LineStatus.transmitHoldingEmpty | LineStatus.transmitterEmpty | ready
        case .modemStatus:
            if loopback {
                // Loopback wires the modem control outputs back to the status inputs:
                // DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                let m = state.modemControl
                var status: UInt8 = 0
                if m & ModemControl.dataTerminalReady != 0 { status |= ModemStatus.dataSetReady }
                if m & ModemControl.requestToSend != 0 { status |= ModemStatus.clearToSend }
                if m & ModemControl.out1 != 0 { status |= ModemStatus.ringIndicator }
                if m & ModemControl.out2 != 0 { status |= ModemStatus.dataCarrierDetect }
                return status
            }
            // A cable is attached and ready.
            return ModemStatus.dataCarrierDetect | ModemStatus.dataSetReady | ModemStatus.clearToSend
        case .scratch:
            return state.scratch
        case nil:
            return 0xFF
        }
    }

    public func write(offset: UInt16, value: UInt8) {
        switch Register(rawValue: offset) {
        case .data:
            if dlab { state.divisorLow = value }
            else if loopback { receive(value) }
            else { output(value) }
        case .interruptEnable:
            if dlab { state.divisorHigh = value } else { state.interruptEnable = value & InterruptEnable.writableMask }
        case .interruptId:
            state.fifoControl = value
            if value & FIFOControl.clearReceive != 0 { state.receiveBuffer.removeAll() }
        case .lineControl:
            state.lineControl = value
        case .modemControl:
            state.modemControl = value & ModemControl.writableMask
        case .lineStatus, .modemStatus, nil:
            break // read-only or outside the device
        case .scratch:
            state.scratch = value
        }
    }

    // MARK: BusDevice: byte registers; a wider access reads the register into its low byte
    // and writes its low byte.

    public func read(offset: UInt64, into data: inout [UInt8]) {
        guard !data.isEmpty else { return }
        for i in data.indices { data[i] = 0 }
        data[0] = read(offset: UInt16(truncatingIfNeeded: offset))
    }

    public func write(offset: UInt64, data: [UInt8]) -> BusEvent? {
        if let value = data.first { write(offset: UInt16(truncatingIfNeeded: offset), value: value) }
        return nil
    }
}
