import Testing
import Devices

@Suite("The 16550 UART as a state machine")
struct SerialTests {
    // @unchecked: each test uses its sink from one thread only.
    final class Sink: @unchecked Sendable { var bytes: [UInt8] = [] }

    @Test("transmit goes to the output and LSR always reports the transmitter empty")
    func transmit() {
        let sink = Sink()
        let uart = Serial16550 { sink.bytes.append($0) }
        uart.write(offset: 0, value: 0x41)
        #expect(sink.bytes == [0x41])
        #expect(uart.read(offset: 5) & 0x60 == 0x60)
        #expect(uart.read(offset: 5) & 0x01 == 0)
    }

    @Test("DLAB switches offsets 0 and 1 to the divisor latch")
    func divisorLatch() {
        let sink = Sink()
        let uart = Serial16550 { sink.bytes.append($0) }
        uart.write(offset: 3, value: 0x80)
        uart.write(offset: 0, value: 0x01)
        uart.write(offset: 1, value: 0x02)
        #expect(uart.read(offset: 0) == 0x01)
        #expect(uart.read(offset: 1) == 0x02)
        uart.write(offset: 3, value: 0x03)
        #expect(sink.bytes.isEmpty)
        #expect(uart.saveState().divisorLow == 1 && uart.saveState().divisorHigh == 2)
    }

    @Test("loopback returns transmitted bytes to the receiver instead of the output")
    func loopback() {
        let sink = Sink()
        let uart = Serial16550 { sink.bytes.append($0) }
        uart.write(offset: 4, value: 0x10)
        uart.write(offset: 0, value: 0xAE)
        #expect(sink.bytes.isEmpty)
        #expect(uart.read(offset: 5) & 0x01 == 1)
        #expect(uart.read(offset: 0) == 0xAE)
        #expect(uart.read(offset: 5) & 0x01 == 0)
    }

    @Test("scratch register and state restore round-trip")
    func stateRoundTrip() {
        let a = Serial16550 { _ in }
        a.write(offset: 7, value: 0x5A)
        a.write(offset: 1, value: 0x0F)
        let b = Serial16550 { _ in }
        b.restoreState(a.saveState())
        #expect(b.read(offset: 7) == 0x5A)
        #expect(b.saveState() == a.saveState())
    }
}
