#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import SystemCalls

@Suite("Reading a small file someone else may have planted")
struct BoundedFileReadTests {
    /// A fresh directory of its own.
    func directory() throws -> String {
        var template = Array("/tmp/swift-vmm-bounded-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        try #require(made != nil)
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    func refusal(_ path: String, limit: Int = 4096) -> BoundedReadError? {
        do {
            let bytes = try readSmallRegularFile(path, limit: limit)
            Issue.record("read \(bytes.count) bytes of \(path)")
            return nil
        } catch { return error }
    }

    @Test("a small regular file is read whole; one exactly at the limit too")
    func smallFile() throws {
        let dir = try directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let bytes = (0..<100).map { UInt8($0) }
        try Data(bytes).write(to: URL(fileURLWithPath: dir + "/f"))
        #expect(try readSmallRegularFile(dir + "/f", limit: 4096) == bytes)
        #expect(try readSmallRegularFile(dir + "/f", limit: 100) == bytes)
        #expect(refusal(dir + "/f", limit: 99) == .tooLarge(path: dir + "/f", size: 100, limit: 99))
    }

    @Test("a 4 GiB sparse file is refused by its size, before any of it is read")
    func sparseFile() throws {
        let dir = try directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/sparse"
        let fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0o600)
        try #require(fd >= 0)
        #expect(ftruncate(fd, 4 << 30) == 0)
        close(fd)
        #expect(refusal(path) == .tooLarge(path: path, size: 4 << 30, limit: 4096))
    }

    @Test("a FIFO without a writer, a character device and a directory are refused at once by their type")
    func notRegular() throws {
        let dir = try directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(mkfifo(dir + "/fifo", 0o600) == 0)
        let start = monotonicMilliseconds()
        #expect(refusal(dir + "/fifo") == .notRegularFile(path: dir + "/fifo", kind: "a FIFO"))
        #expect(monotonicMilliseconds() - start < 5_000, "opening the FIFO waited for a writer")
        #expect(refusal("/dev/zero") == .notRegularFile(path: "/dev/zero", kind: "a character device"))
        if case .system(let e)? = refusal(dir) { #expect(e.errno == EISDIR) } else {
            // O_RDONLY opens a directory; then fstat judges it.
            #expect(refusal(dir) == .notRegularFile(path: dir, kind: "a directory"))
        }
    }

    @Test("a symbolic link as the last component is refused, to a good file as well as in a loop")
    func symbolicLinks() throws {
        let dir = try directory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data("x".utf8).write(to: URL(fileURLWithPath: dir + "/real"))
        #expect(symlink(dir + "/real", dir + "/link") == 0)
        #expect(symlink(dir + "/b", dir + "/a") == 0 && symlink(dir + "/a", dir + "/b") == 0)
        for path in [dir + "/link", dir + "/a"] {
            guard case .system(let error)? = refusal(path) else { Issue.record("\(path) was not refused by open"); continue }
            #expect(error.errno == ELOOP)
        }
    }
}
