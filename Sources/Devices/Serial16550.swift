/// The saved state of a 16550 UART: every register and anything buffered.
public struct Serial16550State: Sendable, Equatable, Codable {
    public var interruptEnable: UInt8 = 0
    public var lineControl: UInt8 = 0x03
    public var modemControl: UInt8 = 0x08
    public var scratch: UInt8 = 0
    public var divisorLow: UInt8 = 0x0C   // 9600 baud at reset
    public var divisorHigh: UInt8 = 0
    public var fifoControl: UInt8 = 0
    /// Bytes waiting to be read by the guest (loopback or host input).
    public var receiveBuffer: [UInt8] = []
    public init() {}
}

/// A 16550 UART subset, as a pure state machine (no threads, no KVM).
///
/// Transmit goes to `output` byte by byte; the line status always reports the
/// transmitter empty, so guests that poll LSR bit 5 never wait. No interrupts
/// are raised: the tiny guests here run without an interrupt controller.
/// Loopback (MCR bit 4) is honoured because some kernels probe the port with it.
public final class Serial16550 {
    /// Register offsets from the base port (COM1 is 0x3f8).
    public enum Register: UInt16 { case data = 0, interruptEnable, interruptId, lineControl, modemControl, lineStatus, modemStatus, scratch }
    public static let com1Base: UInt16 = 0x3F8
    /// Receive buffer limit: a guest that never reads cannot make us grow without bound.
    public static let receiveLimit = 64

    public private(set) var state: Serial16550State
    private let output: (UInt8) -> Void

    public init(state: Serial16550State = Serial16550State(), output: @escaping (UInt8) -> Void) {
        self.state = state
        self.output = output
    }

    private var dlab: Bool { state.lineControl & 0x80 != 0 }
    private var loopback: Bool { state.modemControl & 0x10 != 0 }

    /// Replaces the whole state (restore from a snapshot).
    public func restore(_ state: Serial16550State) { self.state = state }

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
            return (state.fifoControl & 0x01 != 0 ? 0xC0 : 0x00) | 0x01
        case .lineControl:
            return state.lineControl
        case .modemControl:
            return state.modemControl
        case .lineStatus:
            // THR empty (bit 5) and transmitter empty (bit 6); data ready (bit 0) when buffered.
            return 0x60 | (state.receiveBuffer.isEmpty ? 0 : 0x01)
        case .modemStatus:
            if loopback {
                // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                let m = state.modemControl
                return (m & 0x01) << 5 | (m & 0x02) << 3 | (m & 0x04) << 4 | (m & 0x08) << 4
            }
            return 0xB0 // DCD, DSR, CTS: a cable is attached and ready
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
            if dlab { state.divisorHigh = value } else { state.interruptEnable = value & 0x0F }
        case .interruptId:
            state.fifoControl = value
            if value & 0x02 != 0 { state.receiveBuffer.removeAll() }
        case .lineControl:
            state.lineControl = value
        case .modemControl:
            state.modemControl = value & 0x1F
        case .lineStatus, .modemStatus, nil:
            break // read-only or outside the device
        case .scratch:
            state.scratch = value
        }
    }
}
