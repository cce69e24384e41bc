// Here, in the one module every admitting layer (Billboard, VMM, Migration, SecureChannel)
// already depends on, so there is a single definition of "the same name".

/// Whether `a` and `b` are the same UTF-8 bytes (both nil counts as the same).
///
/// Swift's `==` on strings compares by canonical equivalence: "a;b K" == "a\u{37E}b \u{212A}"
/// (GREEK QUESTION MARK for ';', KELVIN SIGN for 'K'), and a Set or Dictionary of strings
/// hashes the same way. What reaches a guest, a log or another host is bytes, so names, command
/// lines, host names and identities are admitted only when their bytes are exactly the ones signed.
public func sameBytes(_ a: String?, _ b: String?) -> Bool {
    switch (a, b) {
    case (nil, nil): true
    case let (a?, b?): a.utf8.elementsEqual(b.utf8)
    default: false
    }
}

extension Sequence<String> {
    /// Whether an element has exactly the UTF-8 bytes of `text` (see `sameBytes`), unlike
    /// `contains(_:)`, which matches a canonically equivalent string.
    public func containsSameBytes(as text: String) -> Bool {
        contains { sameBytes($0, text) }
    }
}

/// `text` with every scalar outside printable ASCII written as `\u{XXXX}`, so that a refusal
/// shows why two strings that look alike differ.
public func visibleBytes(_ text: String) -> String {
    var out = ""
    for scalar in text.unicodeScalars {
        if scalar.value >= 0x20 && scalar.value < 0x7F && scalar != "\\" {
            out.unicodeScalars.append(scalar)
        } else {
            out += "\\u{" + String(scalar.value, radix: 16, uppercase: true) + "}"
        }
    }
    return out
}
