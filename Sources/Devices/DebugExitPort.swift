/// The exit port: a byte written to I/O port 0xf4 ends the run with that byte as
/// exit status. QEMU's `isa-debug-exit,iobase=0xf4` sits on the same port, so the
/// same guests end under QEMU (which exits with `(status << 1) | 1`).
public final class DebugExitPort: BusDevice {
    public static let port: UInt16 = 0xF4

    public init() {}

    /// Reads float high, as on an empty ISA port.
    public func read(offset: UInt64, into data: inout [UInt8]) {
        for i in data.indices { data[i] = 0xFF }
    }

    public func write(offset: UInt64, data: [UInt8]) -> BusEvent? {
        .exitRequested(status: data.first ?? 0)
    }
}
