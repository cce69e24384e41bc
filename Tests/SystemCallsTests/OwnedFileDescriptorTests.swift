#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import SystemCalls

/// A file no other test can open: created, then unlinked, so its inode is ours alone.
/// Tests run in parallel in one process and descriptor numbers are reused lowest first,
/// so "is number N open" proves nothing; "does number N refer to this file" does.
private struct PrivateFile {
    let device: UInt64
    let inode: UInt64

    /// Opens a fresh private file and returns its raw descriptor.
    static func open() -> (PrivateFile, Int32)? {
        var template = Array("/tmp/swift-vmm-fd-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { return nil }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { Glibc.close(fd); return nil }
        return (PrivateFile(device: UInt64(info.st_dev), inode: UInt64(info.st_ino)), fd)
    }

    /// Whether descriptor `fd` is open on this very file.
    func isOpen(as fd: Int32) -> Bool {
        var info = stat()
        return fstat(fd, &info) == 0 && UInt64(info.st_dev) == device && UInt64(info.st_ino) == inode
    }
}

@Suite("An owned file descriptor is closed exactly once")
struct OwnedFileDescriptorTests {
    @Test("close then deinit leaves a file that reused the number open")
    func closeThenDeinitSparesReusedNumber() throws {
        let (ownedFile, raw) = try #require(PrivateFile.open())
        var owner: OwnedFileDescriptor? = OwnedFileDescriptor(taking: raw)
        owner?.close()
        #expect(!ownedFile.isOpen(as: raw))
        // Descriptors are allocated lowest first, so the next open takes the freed number
        // unless another test's open races it; only then is the check meaningful.
        let (reusedFile, reused) = try #require(PrivateFile.open())
        defer { Glibc.close(reused) }
        owner = nil
        if reused == raw {
            #expect(reusedFile.isOpen(as: reused), "the owner's deinit closed a number it had already given up")
        }
    }

    @Test("a second close does nothing, and the number reads -1 once closed")
    func closeIsIdempotent() throws {
        let owner = try OwnedFileDescriptor.open("/dev/null", O_RDONLY | O_CLOEXEC)
        #expect(fcntl(owner.raw, F_GETFD) != -1 && !owner.isClosed)
        #expect(owner.close(after: { _ in }))
        #expect(!owner.close(after: { _ in Issue.record("the last use ran twice") }))
        owner.close()
        #expect(owner.isClosed)
        #expect(owner.raw == -1)
    }

    @Test("closing from many threads at once closes once")
    func concurrentClose() async throws {
        let owner = try OwnedFileDescriptor.open("/dev/null", O_RDONLY | O_CLOEXEC)
        let closers = await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<16 { group.addTask { owner.close(after: { _ in }) } }
            return await group.reduce(0) { $0 + ($1 ? 1 : 0) }
        }
        #expect(closers == 1)
    }

    @Test("the owner's deinit closes a descriptor still open")
    func deinitCloses() throws {
        let (file, raw) = try #require(PrivateFile.open())
        var owner: OwnedFileDescriptor? = OwnedFileDescriptor(taking: raw)
        #expect(file.isOpen(as: raw) && owner?.isClosed == false)
        owner = nil
        #expect(!file.isOpen(as: raw))
    }

    @Test("opening a missing file names the call and ENOENT")
    func missingFileNamesErrno() {
        #expect(throws: SystemCallError("open(/nonexistent/swift-vmm-test)", errno: ENOENT)) {
            _ = try OwnedFileDescriptor.open("/nonexistent/swift-vmm-test", O_RDONLY)
        }
        do {
            _ = try OwnedFileDescriptor.open("/nonexistent/swift-vmm-test", O_RDONLY)
        } catch {
            #expect(error.errnoName == "ENOENT")
            #expect(error.description == "open(/nonexistent/swift-vmm-test) failed: ENOENT (No such file or directory)")
        }
    }

    @Test("a created file gets the mode asked for")
    func createdFileMode() throws {
        let path = "/tmp/swift-vmm-owned-fd-\(getpid())"
        defer { unlink(path) }
        let owner = try OwnedFileDescriptor.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode: 0o640)
        var info = stat()
        #expect(fstat(owner.raw, &info) == 0)
        #expect(info.st_mode & 0o777 == 0o640 & ~currentUmask())
    }

    private func currentUmask() -> mode_t {
        let old = umask(0o022)
        umask(old)
        return old
    }
}

@Suite("System call errors name the errno from the C library")
struct SystemCallErrorTests {
    @Test("errno names come from glibc, for common and rare values alike",
          arguments: [(ENOENT, "ENOENT"), (EINTR, "EINTR"), (ENOTTY, "ENOTTY"), (EHWPOISON, "EHWPOISON")])
    func names(_ code: Int32, _ name: String) {
        #expect(SystemCallError("x", errno: code).errnoName == name)
    }

    @Test("an errno glibc does not know is shown as its number")
    func unknownErrno() {
        #expect(SystemCallError("x", errno: 100_000).errnoName == "errno 100000")
    }

    @Test("an interrupted call is retried; other failures are thrown with the call named")
    func retry() throws {
        var attempts = 0
        let r = try retryingOnInterrupt("read") { () -> Int in
            attempts += 1
            if attempts < 3 { errno = EINTR; return -1 }
            return 7
        }
        #expect(r == 7 && attempts == 3)
        #expect(throws: SystemCallError("read", errno: EBADF)) {
            try retryingOnInterrupt("read") { read(-1, nil, 0) }
        }
    }
}

@Suite("A memory mapping is unmapped when its owner goes away")
struct MemoryMappingTests {
    /// Whether any mapping of this process is backed by the given inode, read from
    /// /proc/self/maps. Asking about the range's address instead would race other tests'
    /// mmaps, which may take the range the moment it is freed.
    private func isMapped(inode: UInt64) throws -> Bool {
        // Read to the end by hand: procfs files report size 0 and come in pieces.
        let fd = Glibc.open("/proc/self/maps", O_RDONLY | O_CLOEXEC)
        try #require(fd >= 0)
        defer { Glibc.close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            try #require(n >= 0)
            if n == 0 { break }
            bytes += chunk[0..<n]
        }
        let maps = String(decoding: bytes, as: UTF8.self)
        return maps.split(separator: "\n").contains { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            return fields.count >= 5 && UInt64(fields[4]) == inode
        }
    }

    @Test("deinit unmaps the range")
    func deinitUnmaps() throws {
        let length = 4 * Int(sysconf(Int32(_SC_PAGESIZE)))
        let (file, raw) = try #require(PrivateFile.open())
        let backing = OwnedFileDescriptor(taking: raw)
        try #require(ftruncate(backing.raw, off_t(length)) == 0)
        var mapping: MemoryMapping? = try MemoryMapping(length: length, protection: PROT_READ | PROT_WRITE,
                                                        flags: MAP_SHARED, descriptor: backing)
        mapping?.bytes[length - 1] = 0xAB
        #expect(mapping?.bytes[length - 1] == 0xAB)
        #expect(try isMapped(inode: file.inode))
        mapping = nil
        #expect(try !isMapped(inode: file.inode))
    }

    @Test("a refused mapping names the call and errno")
    func refusedMapping() {
        #expect(throws: SystemCallError("mmap(test)", errno: EBADF)) {
            _ = try MemoryMapping(length: 4096, protection: PROT_READ, flags: MAP_SHARED, descriptor: nil, call: "mmap(test)")
        }
    }
}
