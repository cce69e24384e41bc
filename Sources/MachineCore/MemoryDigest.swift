import Crypto
import GuestMemory

/// SHA-256 over all of guest RAM, page by page, straight from the mapping.
public enum MemoryDigest {
    public static func sha256(_ memory: GuestMemory) throws -> String {
        var hasher = SHA256()
        var address: UInt64 = 0
        let chunk: UInt64 = 1 << 20
        while address < memory.size {
            let n = Int(min(chunk, memory.size - address))
            try memory.withBytes(at: GuestAddress(address), count: n) { hasher.update(bufferPointer: $0) }
            address += UInt64(n)
        }
        return hasher.finalize().map { String(format: "%02x", $0) }.joined()
    }
}

import Foundation
