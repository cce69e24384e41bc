import Foundation
import GuestMemory

/// The one JSON coder for every JSON payload of the stream (machine description, vCPU and
/// device state, signatures, control messages): sorted keys, so equal values give equal bytes.
public enum StateJSON {
    private static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    public static func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        Array(try encoder.encode(value))
    }

    /// Decodes `payload`; a payload that is not a valid `T` is `malformedPayload` naming `what`.
    public static func decode<T: Decodable>(_ type: T.Type, from payload: [UInt8], what: String) throws -> T {
        do { return try JSONDecoder().decode(type, from: Data(payload)) } catch {
            throw SnapshotFormatError.malformedPayload(what: what, reason: "\(error)")
        }
    }
}

/// The machine's state after its description, as read from a stream: vCPU and device payloads
/// (JSON, defined by the VMM), the signature if there was one, and what was applied to memory.
public struct StateBody: Sendable {
    public var vcpus: [UInt8]
    public var devices: [UInt8]
    /// The signature section's payload, if the stream was signed.
    public var signature: [UInt8]?
    /// SHA-256 of every stream byte before the signature section (what it signs); empty if unsigned.
    public var signedDigest: [UInt8]
    /// Page entries applied, zero pages included.
    public var pages: Int
    public var zeroPages: Int
    public var memorySections: Int

    public init(vcpus: [UInt8], devices: [UInt8], signature: [UInt8]? = nil, signedDigest: [UInt8] = [], pages: Int = 0,
                zeroPages: Int = 0, memorySections: Int = 0) {
        self.memorySections = memorySections
        self.vcpus = vcpus
        self.devices = devices
        self.signature = signature
        self.signedDigest = signedDigest
        self.pages = pages
        self.zeroPages = zeroPages
    }
}

/// The order of a machine's state in a stream, written once for snapshot files and migration:
///
///     description         a `machine` section (file) or the hello (migration)
///     memory*  vcpu  devices   in any order; vcpu and devices exactly once; memory sections
///                              are applied to guest memory as they arrive (pre-copy rounds)
///     signature?               the producer's signature over everything before it; last
///     end                      the stream digest
///
/// Admission happens between `readDescription` and `readBody`: the caller reads the
/// description, decides, reserves the machine, and only then hands its memory to `readBody`.
public enum StateSequence {
    /// Reads the first section, which must describe the machine; returns its payload.
    public static func readDescription<S: ByteSource>(from reader: inout StreamReader<S>) throws -> [UInt8] {
        guard let first = try reader.nextSection() else { throw SnapshotFormatError.sectionOrder("the stream is empty") }
        guard first.type == .machine else {
            throw SnapshotFormatError.sectionOrder("the first section must describe the machine, found \(first.type)")
        }
        return first.payload
    }

    /// Reads every section after the description up to and including `end` (and no further: a
    /// connection that stays open is not read past it), applying memory sections to `memory`.
    /// `onControl` (a migration; nil for a file, where a control section is an error) takes the
    /// control sections among the pages, with the pages and memory sections applied before it.
    public static func readBody<S: ByteSource>(from reader: inout StreamReader<S>, into memory: GuestMemory,
                                               onControl: ((_ payload: [UInt8], _ pages: Int, _ memorySections: Int) throws -> Void)? = nil)
        throws -> StateBody {
        var vcpus: [UInt8]?, devices: [UInt8]?
        var signature: [UInt8]?, signedDigest: [UInt8] = []
        var pages = 0, zeroPages = 0, memorySections = 0
        while true {
            // Memory sections are applied as they are read (on an authenticated channel, their
            // pages go from the channel straight into guest memory).
            // After a signature nothing may follow but the end: read whole, refused before applied.
            let item = signature == nil ? try reader.nextSection(applyingMemoryTo: memory) : try reader.nextSection().map { .section($0) }
            let section: Section
            switch item {
            case nil:
                throw SnapshotFormatError.sectionOrder("the stream has no end section")
            case let .appliedMemory(applied, appliedZero, _):
                pages += applied
                zeroPages += appliedZero
                memorySections += 1
                continue
            case let .section(read):
                section = read
            }
            if signature != nil && section.type != .end {
                throw SnapshotFormatError.sectionOrder("a \(section.type) section follows the signature, which must be last")
            }
            switch section.type {
            case .memory:
                let applied = try MemorySection.apply(section, to: memory)
                pages += applied.pages
                zeroPages += applied.zeroPages
                memorySections += 1
            case .vcpu:
                guard vcpus == nil else { throw SnapshotFormatError.sectionOrder("two vCPU sections") }
                vcpus = section.payload
            case .devices:
                guard devices == nil else { throw SnapshotFormatError.sectionOrder("two device sections") }
                devices = section.payload
            case .signature:
                signature = section.payload
                signedDigest = reader.digestBeforeLastSection
            case .end:
                guard let vcpus else { throw SnapshotFormatError.sectionOrder("no vCPU section") }
                guard let devices else { throw SnapshotFormatError.sectionOrder("no device section") }
                return StateBody(vcpus: vcpus, devices: devices, signature: signature, signedDigest: signedDigest,
                                 pages: pages, zeroPages: zeroPages, memorySections: memorySections)
            case .control where onControl != nil && vcpus == nil:
                try onControl?(section.payload, pages, memorySections)
            case .machine, .control:
                throw SnapshotFormatError.sectionOrder("unexpected \(section.type) section at offset \(section.offset)")
            }
        }
    }

    /// Writes the closing part of a state: vCPU and device payloads, the signature `sign` makes
    /// over the stream so far (nil: unsigned), and the end section.
    public static func writeClosing<S: ByteSink>(vcpus: [UInt8], devices: [UInt8], to writer: inout StreamWriter<S>,
                                                 sign: ([UInt8]) throws -> [UInt8]?) throws {
        try writer.writeSection(.vcpu, payload: vcpus)
        try writer.writeSection(.devices, payload: devices)
        if let signature = try sign(writer.digestSoFar) {
            try writer.writeSection(.signature, payload: signature)
        }
        try writer.finish()
    }
}
