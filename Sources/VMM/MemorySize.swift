import Loader

/// Parses memory sizes such as `64M`, `512MiB`, `1G` or `4096` (bytes).
public enum MemorySize {
    public struct ParseError: Error, CustomStringConvertible {
        public let text: String
        public let reason: String
        public var description: String { "invalid memory size '\(text)': \(reason)" }
    }

    public static func parse(_ text: String) throws(ParseError) -> UInt64 {
        let t = text.trimmingCharacters(in: .whitespaces)
        let digits = t.prefix(while: { $0.isASCII && $0.isNumber })
        let suffix = t.dropFirst(digits.count).lowercased()
        guard !digits.isEmpty else { throw ParseError(text: text, reason: "it must start with a number, e.g. 64M") }
        guard let value = UInt64(digits) else { throw ParseError(text: text, reason: "the number is too large") }
        let shift: UInt64
        switch suffix {
        case "", "b": shift = 0
        case "k", "kb", "kib": shift = 10
        case "m", "mb", "mib": shift = 20
        case "g", "gb", "gib": shift = 30
        default: throw ParseError(text: text, reason: "unknown unit '\(suffix)'; use K, M or G")
        }
        let (bytes, overflow) = value.multipliedReportingOverflow(by: 1 << shift)
        guard !overflow else { throw ParseError(text: text, reason: "the size is too large") }
        guard bytes >= BootLayout.minMemory else {
            throw ParseError(text: text, reason: "at least \(BootLayout.minMemory >> 20)M is needed")
        }
        guard bytes <= BootLayout.maxMemory else {
            throw ParseError(text: text, reason: "at most \(BootLayout.maxMemory >> 30)G is supported")
        }
        guard bytes % 4096 == 0 else { throw ParseError(text: text, reason: "it must be a multiple of 4K") }
        return bytes
    }
}

import Foundation
