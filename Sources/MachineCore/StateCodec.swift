import KVM
import Snapshot

/// A machine's state in the stream format: the `StateSequence` of the Snapshot target with this
/// machine's payloads (vCPUs in binary, the rest JSON through `StateJSON`). Snapshot files and
/// migration both use it.
public enum MachineStateCodec {
    /// Writes a paused machine whole: `header` as the machine section, every page that may hold
    /// data (untouched pages read as zero and need no entry: restore starts from zeroed memory),
    /// then the closing sections with the signature `sign` makes (nil: unsigned).
    public static func writeFull<S: ByteSink>(_ machine: Machine, header: [UInt8], to writer: inout StreamWriter<S>,
                                              sign: ([UInt8]) throws -> [UInt8]?) throws -> MemoryWriteStats {
        let state = try machine.saveState()
        try writer.writeSection(.machine, payload: header)
        let pages = machine.memory.possiblyNonZeroPages()?.pageFrames ?? Array(0..<machine.memory.pageCount)
        let stats = try writer.writeMemoryPages(pages, from: machine.memory)
        try writeClosing(state, to: &writer, sign: sign)
        return stats
    }

    /// Writes a paused machine whole into a sealed file: `header` as the description block,
    /// every page that may hold data, vCPU and device blocks, then the index, the signature
    /// `sign` makes and the trailer.
    public static func writeSealed<S: ByteSink>(_ machine: Machine, header: [UInt8], to writer: inout SealedWriter<S>,
                                                sign: ([UInt8]) throws -> [UInt8]) throws -> MemoryWriteStats {
        let state = try machine.saveState()
        try writer.writeBlock(.description, plaintext: header)
        let pages = machine.memory.possiblyNonZeroPages()?.pageFrames ?? Array(0..<machine.memory.pageCount)
        let stats = try writer.writeMemoryPages(pages, from: machine.memory)
        let payloads = try encode(state)
        try writer.writeBlock(.vcpu, plaintext: payloads.vcpus)
        try writer.writeBlock(.devices, plaintext: payloads.devices)
        try writer.finish(sign: sign)
        return stats
    }

    /// Writes vCPU and device state, the signature and the end section.
    public static func writeClosing<S: ByteSink>(_ state: MachineState, to writer: inout StreamWriter<S>,
                                                 sign: ([UInt8]) throws -> [UInt8]?) throws {
        let payloads = try encode(state)
        try StateSequence.writeClosing(vcpus: payloads.vcpus, devices: payloads.devices, to: &writer, sign: sign)
    }

    /// The vCPU and device payloads of `state`: the vCPUs in binary (`VCPUStateCodec`), the
    /// devices in JSON.
    public static func encode(_ state: MachineState) throws -> (vcpus: [UInt8], devices: [UInt8]) {
        (VCPUStateCodec.encode(state.vcpus), try StateJSON.encode(state.devices))
    }

    /// A vcpu section's vCPUs: binary (version 2), or the JSON of version 1 (files and streams
    /// written before).
    public static func decodeVCPUs(_ payload: [UInt8]) throws -> [VCPUState] {
        if VCPUStateCodec.isBinary(payload) { return try VCPUStateCodec.decode(payload) }
        return try StateJSON.decode([VCPUState].self, from: payload, what: "vCPU section")
    }

    /// The machine state a verified body carries, for the machine `description` names.
    public static func decode(_ body: StateBody, description: MachineDescription) throws -> MachineState {
        MachineState(description: description,
                     vcpus: try decodeVCPUs(body.vcpus),
                     devices: try StateJSON.decode(DeviceState.self, from: body.devices, what: "device section"))
    }
}

extension Machine {
    /// Codes this machine's device state to JSON and back once, keeping nothing: the first JSON
    /// coding of these types in a process costs 0.25-0.4 ms here (one-time setup in Foundation
    /// and the types' metadata), which a migration should pay before its pause, not inside it.
    public func warmStateCodec() {
        guard let bytes = try? StateJSON.encode(deviceState) else { return }
        _ = try? StateJSON.decode(DeviceState.self, from: bytes, what: "device section")
    }
}
