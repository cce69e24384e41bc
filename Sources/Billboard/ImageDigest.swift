#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Crypto
import SystemCalls
import Foundation

/// SHA-256 of guest images, in the lower-case hex form registrations and `admit` use.
public enum ImageDigest {
    /// Digest of bytes already in memory.
    public static func sha256(_ data: Data) -> String { Data(SHA256.hash(data: data)).hex }

    /// Digest of a file, read in 1 MiB chunks so large images are never held in memory.
    public static func sha256(path: String) throws -> String {
        do {
            let file = try OwnedFileDescriptor.open(path, O_RDONLY | O_CLOEXEC)
            var hasher = SHA256()
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            while true {
                let n = try buffer.withUnsafeMutableBytes { b in try retryingOnInterrupt("read(\(path))") { read(file.raw, b.baseAddress!, b.count) } }
                if n == 0 { break }
                buffer.withUnsafeBytes { hasher.update(bufferPointer: UnsafeRawBufferPointer(rebasing: $0[..<n])) }
            }
            return Data(hasher.finalize()).hex
        } catch let error as SystemCallError {
            throw BillboardError.io(path: path, errno: error.errno)
        }
    }
}
