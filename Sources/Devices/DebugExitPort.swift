/// The exit port: a byte written to I/O port 0xf4 ends the run with that byte as
/// exit status. QEMU's `isa-debug-exit,iobase=0xf4` sits on the same port, so the
/// same guests end under QEMU (which exits with `(status << 1) | 1`).
public enum DebugExitPort {
    public static let port: UInt16 = 0xF4
}
