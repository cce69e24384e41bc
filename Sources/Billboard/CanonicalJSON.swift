import Foundation

/// A JSON value with exactly one byte encoding: what signatures and hashes are computed over.
///
/// Foundation's JSONEncoder is deliberately not used for signed bytes: its number and
/// escaping rules are not a documented contract, and a signature must still verify after
/// a toolchain upgrade. Here: object keys sorted by UTF-8 bytes, no whitespace, integers
/// only (no floats), strings escaped minimally (`"`, `\`, control characters).
public enum CanonicalJSON: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case uint(UInt64)
    case string(String)
    case array([CanonicalJSON])
    case object([String: CanonicalJSON])

    /// The canonical text.
    public var text: String {
        var out = ""
        write(to: &out)
        return out
    }

    /// The canonical bytes (UTF-8 of `text`).
    public var bytes: Data { Data(text.utf8) }

    private func write(to out: inout String) {
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .uint(let u): out += String(u)
        case .string(let s): Self.writeString(s, to: &out)
        case .array(let items):
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += "," }
                item.write(to: &out)
            }
            out += "]"
        case .object(let members):
            out += "{"
            // Byte order, not String's locale-free but normalisation-aware ordering,
            // so the order is defined by the bytes actually written.
            let keys = members.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
            for (i, key) in keys.enumerated() {
                if i > 0 { out += "," }
                Self.writeString(key, to: &out)
                out += ":"
                members[key]!.write(to: &out)
            }
            out += "}"
        }
    }

    private static func writeString(_ s: String, to out: inout String) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    out += "\\u" + String(format: "%04x", scalar.value)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
    }
}

extension CanonicalJSON {
    /// `.string` or `.null`, for optional fields (an absent field is encoded as null, never omitted,
    /// so adding a value cannot be confused with a different field set).
    static func optional(_ s: String?) -> CanonicalJSON { s.map(CanonicalJSON.string) ?? .null }
}

private let hexDigits = Array("0123456789abcdef".utf8)

extension Data {
    /// Lower-case hexadecimal. (By table: `String(format:)` costs about 1.4 µs a byte here, and
    /// a lease's hand-over inside a migration's pause hashes and MACs two 32-byte values.)
    var hex: String {
        var out = [UInt8]()
        out.reserveCapacity(count * 2)
        for byte in self {
            out.append(hexDigits[Int(byte >> 4)])
            out.append(hexDigits[Int(byte & 0x0f)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Parses lower- or upper-case hexadecimal; nil on odd length or a non-hex character.
    init?(hex: String) {
        let chars = Array(hex.utf8)
        guard chars.count % 2 == 0 else { return nil }
        var bytes = [UInt8]()
        bytes.reserveCapacity(chars.count / 2)
        func nibble(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: return c - 48
            case 97...102: return c - 87
            case 65...70: return c - 55
            default: return nil
            }
        }
        var i = 0
        while i < chars.count {
            guard let hi = nibble(chars[i]), let lo = nibble(chars[i + 1]) else { return nil }
            bytes.append(hi << 4 | lo)
            i += 2
        }
        self.init(bytes)
    }
}
