import KVM
import Loader

/// Turns the loader's boot state into KVM register values.
enum CPUSetup {
    static let cr0ProtectionEnable: UInt64 = 1 << 0
    static let cr0Paging: UInt64 = 1 << 31
    static let cr4PAE: UInt64 = 1 << 5
    static let eferLME: UInt64 = 1 << 8
    static let eferLMA: UInt64 = 1 << 10

    static func apply(_ boot: BootCPUState, to vcpu: VCPU) throws(KVMError) {
        var s = try vcpu.specialRegisters()
        switch boot.kind {
        case .real16:
            var code = Segment()
            code.selector = boot.realModeSegment
            code.base = UInt64(boot.realModeSegment) << 4
            code.limit = 0xFFFF
            code.type = 0xB // execute/read, accessed
            var data = code
            data.type = 0x3 // read/write, accessed
            var stack = data
            stack.selector = 0
            stack.base = 0
            s.cs = code; s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = stack
            s.cr0 &= ~(cr0ProtectionEnable | cr0Paging)
        case .protected32, .long64:
            let long = boot.kind == .long64
            var code = Segment()
            code.selector = 0x08
            code.base = 0
            code.limit = 0xFFFF_FFFF
            code.type = 0xB
            code.g = 1
            code.db = long ? 0 : 1
            code.l = long ? 1 : 0
            var data = Segment()
            data.selector = 0x10
            data.limit = 0xFFFF_FFFF
            data.type = 0x3
            data.g = 1
            data.db = 1
            s.cs = code; s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
            s.gdt = DescriptorTable(base: boot.gdtBase, limit: boot.gdtLimit)
            s.cr0 |= cr0ProtectionEnable
            if long {
                s.cr3 = boot.cr3
                s.cr4 |= cr4PAE
                s.cr0 |= cr0Paging
                s.efer |= eferLME | eferLMA
            }
        }
        try vcpu.setSpecialRegisters(s)
        var r = Registers()
        r.rip = boot.rip
        r.rsp = boot.rsp
        r.rflags = boot.rflags
        r.rax = boot.rax
        r.rbx = boot.rbx
        r.rsi = boot.rsi
        try vcpu.setRegisters(r)
    }
}
