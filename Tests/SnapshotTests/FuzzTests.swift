import Testing
import GuestMemory
@testable import Snapshot

/// Mutation fuzzing of the decoder. Every outcome must be success or a thrown
/// SnapshotFormatError / GuestMemoryError: a trap, hang or other error type fails.
///
/// SNAPSHOT_FUZZ_ITERATIONS (default 3000) or SNAPSHOT_FUZZ_SECONDS sets the
/// amount of work; SNAPSHOT_FUZZ_SEED changes the base seed. A failure names
/// the iteration's own seed; SNAPSHOT_FUZZ_REPLAY=<seed> runs just that one.
@Suite("Mutated streams never crash the decoder")
struct FuzzTests {
    /// Valid streams of different shapes to mutate.
    private static func corpus() throws -> [[UInt8]] {
        let big = try GuestMemory(size: 4 << 20)
        try fillPages(big, [0, 5, 300, 700])
        var split = try StreamWriter(sink: BufferSink())
        try split.writeSection(.control, payload: Array(#"{"msg":"start"}"#.utf8))
        // 600 entries: two memory sections, the second beyond a 1 MiB target.
        try split.writeMemoryPages(Array(UInt64(0)..<600), from: big)
        try split.finish()
        return [
            try smallStream(),
            try smallStream(dataPages: [0, 255], zeroPages: Array(1..<64), json: false),
            try smallStream(dataPages: [], zeroPages: [7]),
            try smallStream(dataPages: [], zeroPages: []),
            split.sink.bytes,
        ]
    }

    /// Splits a valid stream into (raw type, payload) pairs, end section excluded.
    private static func sections(of bytes: [UInt8]) throws -> [(UInt32, [UInt8])] {
        try decode(bytes).map { ($0.type.rawValue, $0.payload) }
    }

    private static func randomLength(_ rng: inout SplitMix64) -> UInt64 {
        switch rng.next() % 8 {
        case 0: return UInt64.max - rng.next() % 64
        case 1: return rng.next()
        case 2: return (1 << 32) + rng.next() % 16 - 8
        case 3: return SectionType.allCases.randomElement(using: &rng)!.payloadLimit &+ rng.next() % 3 &- 1
        case 4: return rng.next() % 64
        default: return rng.next() % (3 << 20)
        }
    }

    /// One random byte-level mutation. `headers` are section header offsets in the original.
    private static func mutate(_ bytes: inout [UInt8], headers: [Int], _ rng: inout SplitMix64) {
        func position() -> Int { bytes.isEmpty ? 0 : Int(rng.next() % UInt64(bytes.count)) }
        switch rng.next() % 9 {
        case 0:
            guard !bytes.isEmpty else { return }
            bytes[position()] ^= 1 << (rng.next() % 8)
        case 1:
            guard !bytes.isEmpty else { return }
            bytes[position()] = UInt8(truncatingIfNeeded: rng.next())
        case 2:
            bytes.removeLast(bytes.isEmpty ? 0 : Int(rng.next() % UInt64(bytes.count + 1)))
        case 3:
            let insert = (0..<(1 + rng.next() % 16)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            bytes.insert(contentsOf: insert, at: position())
        case 4:
            guard !bytes.isEmpty else { return }
            let start = position()
            let chunk = Array(bytes[start..<min(bytes.count, start + 1 + Int(rng.next() % 8192))])
            bytes.insert(contentsOf: chunk, at: position())
        case 5:
            guard !bytes.isEmpty else { return }
            let start = position()
            bytes.removeSubrange(start..<min(bytes.count, start + 1 + Int(rng.next() % 8192)))
        case 6, 7:
            // Length field rewrite, where it matters most.
            guard let header = headers.randomElement(using: &rng), header + 16 <= bytes.count else { return }
            let length = randomLength(&rng)
            for i in 0..<8 { bytes[header + 8 + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt64(i))) }
        default:
            // Type rewrite, to a neighbouring or arbitrary value.
            guard let header = headers.randomElement(using: &rng), header + 4 <= bytes.count else { return }
            let type = rng.next() % 2 == 0 ? UInt32(rng.next() % 8) : UInt32(truncatingIfNeeded: rng.next())
            for i in 0..<4 { bytes[header + i] = UInt8(truncatingIfNeeded: type >> (8 * UInt32(i))) }
        }
    }

    /// Mutates the payload of one section, then re-frames the stream with valid
    /// checksums and end digest, so the structure checks behind them are reached.
    /// Also returns the same sections framed inside an authenticated channel (no checksums), whose
    /// memory sections a reader applies page by page as it reads them.
    private static func mutateStructure(_ sections: [(UInt32, [UInt8])], _ rng: inout SplitMix64) -> ([UInt8], [UInt8]?, channel: [UInt8]) {
        guard !sections.isEmpty else { return (rawStream([]), nil, rawChannelStream([])) }
        var sections = sections
        let index = Int(rng.next() % UInt64(sections.count))
        var payload = sections[index].1
        for _ in 0..<(1 + rng.next() % 3) {
            switch rng.next() % 6 {
            case 0 where payload.count >= 8:
                // Count field: boundary and hostile values.
                let counts: [UInt32] = [0, 1, 511, 512, 513, 0x2000_0000, .max, UInt32(truncatingIfNeeded: rng.next())]
                let count = counts.randomElement(using: &rng)!
                for i in 0..<4 { payload[i] = UInt8(truncatingIfNeeded: count >> (8 * UInt32(i))) }
            case 1 where payload.count >= 16:
                // One table entry: random frame, flags and reserved bits.
                let entries = max(1, (payload.count - 8) / 8)
                let at = 8 + 8 * Int(rng.next() % UInt64(min(entries, 512)))
                guard at + 8 <= payload.count else { break }
                let value = rng.next() % 2 == 0 ? rng.next() % 1024 | (rng.next() & (1 << 63)) : rng.next()
                for i in 0..<8 { payload[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
            case 2:
                payload.removeLast(Int(rng.next() % UInt64(min(payload.count, 4100) + 1)))
            case 3:
                payload += [UInt8](repeating: UInt8(truncatingIfNeeded: rng.next()), count: Int(rng.next() % 4097))
            default:
                guard !payload.isEmpty else { break }
                payload[Int(rng.next() % UInt64(payload.count))] ^= UInt8(truncatingIfNeeded: rng.next() | 1)
            }
        }
        sections[index].1 = payload
        if rng.next() % 8 == 0 {
            sections.insert(sections[Int(rng.next() % UInt64(sections.count))], at: Int(rng.next() % UInt64(sections.count + 1)))
        }
        let stream = rawStream(sections.map { frame(type: $0.0, payload: $0.1) })
        return (stream, sections[index].0 == SectionType.memory.rawValue ? payload : nil,
                rawChannelStream(sections.map { (type: $0.0, payload: $0.1) }))
    }

    @Test("thousands of random mutations of valid streams decode to success or a format/memory error, never a crash")
    func mutationFuzz() throws {
        let iterations = environment("SNAPSHOT_FUZZ_ITERATIONS").flatMap { Int($0) } ?? 3000
        let seconds = environment("SNAPSHOT_FUZZ_SECONDS").flatMap { Double($0) }
        let baseSeed = environment("SNAPSHOT_FUZZ_SEED").flatMap { UInt64($0) } ?? 0x5EED_5A4E_0001
        let onlySeed = environment("SNAPSHOT_FUZZ_REPLAY").flatMap { UInt64($0) }

        let corpus = try Self.corpus()
        let parsed = try corpus.map { try Self.sections(of: $0) }
        let headers = try corpus.map { try layout(of: $0).map(\.offset) }
        let channels = parsed.map { rawChannelStream($0.map { (type: $0.0, payload: $0.1) }) }
        // Header offsets of the channel framing: each section 16 bytes of header and its payload.
        let channelHeaders = parsed.map { sections in
            sections.reduce(into: [16]) { offsets, section in offsets.append(offsets.last! + 16 + section.1.count) }
        }
        let memory = try GuestMemory(size: 1 << 20)
        // The unmutated corpus must decode (4 MiB holds every page it names).
        let roomy = try GuestMemory(size: 4 << 20)
        for stream in corpus { try decodeFully(stream, into: roomy) }
        for stream in channels { try decodeChannelFully(stream, into: roomy) }

        let clock = ContinuousClock()
        let started = clock.now
        let deadline = seconds.map { started + .milliseconds(Int64($0 * 1000)) }
        var done = 0
        var successes = 0
        var formatErrors = 0
        var memoryErrors = 0
        var errorKinds: [String: Int] = [:]

        func check(_ seed: UInt64, _ what: String, _ body: () throws -> Void) {
            do {
                try body()
                successes += 1
            } catch let error as SnapshotFormatError {
                _ = error.description
                formatErrors += 1
                // Tally by case name, to show which checks the mutations reached.
                let name = Mirror(reflecting: error).children.first?.label ?? "badMagic"
                errorKinds[name, default: 0] += 1
            } catch let error as GuestMemoryError {
                _ = error.description
                memoryErrors += 1
            } catch {
                Issue.record("seed \(seed) (\(what)): unexpected error type \(type(of: error)): \(error)")
            }
        }

        while true {
            if onlySeed != nil, done == 1 { break }
            if let deadline { if clock.now >= deadline { break } } else if done >= iterations { break }
            var seeder = SplitMix64(seed: baseSeed &+ UInt64(done))
            let seed = onlySeed ?? seeder.next()
            var rng = SplitMix64(seed: seed)
            let pick = Int(rng.next() % UInt64(corpus.count))

            if rng.next() % 3 == 0 {
                let (stream, memoryPayload, channel) = Self.mutateStructure(parsed[pick], &rng)
                check(seed, "re-framed stream") { try decodeFully(stream, into: memory) }
                check(seed, "re-framed channel stream, pages applied as read") { try decodeChannelFully(channel, into: memory) }
                if let memoryPayload {
                    check(seed, "bare memory payload") { _ = try MemorySection.apply(memoryPayload, to: memory) }
                }
            } else {
                var bytes = corpus[pick]
                for _ in 0..<(1 + rng.next() % 4) { Self.mutate(&bytes, headers: headers[pick], &rng) }
                check(seed, "mutated stream") { try decodeFully(bytes, into: memory) }
                if rng.next() % 2 == 0 {
                    // The same byte mutations of the stream re-framed for a channel.
                    var channel = channels[pick]
                    for _ in 0..<(1 + rng.next() % 4) { Self.mutate(&channel, headers: channelHeaders[pick], &rng) }
                    check(seed, "mutated channel stream") { try decodeChannelFully(channel, into: memory) }
                }
            }
            done += 1
        }
        let elapsed = clock.now - started
        print("snapshot fuzz: \(done) iterations in \(elapsed) (base seed \(baseSeed)); outcomes: \(successes) accepted, \(formatErrors) format errors, \(memoryErrors) memory errors")
        print("snapshot fuzz: format errors by kind: " + errorKinds.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        #expect(formatErrors > 0)
    }
}
