#if canImport(Glibc)
import Glibc
#endif
import Testing
import SystemCalls

/// Whether `fd` is an open descriptor of this process.
private func isOpen(_ fd: Int32) -> Bool { fcntl(fd, F_GETFD) != -1 }

@Suite("An owned file descriptor is closed exactly once")
struct OwnedFileDescriptorTests {
    @Test("close then deinit leaves a file that reused the number open")
    func closeThenDeinitSparesReusedNumber() throws {
        var owner: OwnedFileDescriptor? = try OwnedFileDescriptor.open("/dev/null", O_RDONLY | O_CLOEXEC)
        let number = try #require(owner?.raw)
        owner?.close()
        #expect(!isOpen(number))
        // Descriptors are allocated lowest first, so the next open takes the freed number
        // unless another test's open races it; only then is the check meaningful.
        let reused = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { if reused >= 0 { Glibc.close(reused) } }
        owner = nil
        if reused == number {
            #expect(isOpen(reused), "the owner's deinit closed a number it had already given up")
        }
        #expect(reused >= 0)
    }

    @Test("a second close does nothing, and the number reads -1 once closed")
    func closeIsIdempotent() throws {
        let owner = try OwnedFileDescriptor.open("/dev/null", O_RDONLY | O_CLOEXEC)
        let number = owner.raw
        #expect(isOpen(number) && !owner.isClosed)
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
        var owner: OwnedFileDescriptor? = try OwnedFileDescriptor.open("/dev/null", O_RDONLY | O_CLOEXEC)
        let number = try #require(owner?.raw)
        #expect(isOpen(number))
        owner = nil
        #expect(!isOpen(number))
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
    /// Whether any page of the range is mapped: `msync` fails with ENOMEM on unmapped memory.
    private func isMapped(_ address: UnsafeMutableRawPointer, _ length: Int) -> Bool {
        msync(address, length, MS_ASYNC) == 0
    }

    @Test("deinit unmaps the range")
    func deinitUnmaps() throws {
        let length = 4 * Int(sysconf(Int32(_SC_PAGESIZE)))
        var mapping: MemoryMapping? = try MemoryMapping(length: length, protection: PROT_READ | PROT_WRITE,
                                                        flags: MAP_PRIVATE | MAP_ANONYMOUS, descriptor: nil)
        let base = try #require(mapping?.base)
        mapping?.bytes[length - 1] = 0xAB
        #expect(mapping?.bytes[length - 1] == 0xAB)
        #expect(isMapped(base, length))
        mapping = nil
        // Another test's mmap could take the range in between; that would be rare, and
        // it would show as a failure here, never hide one.
        #expect(!isMapped(base, length))
    }

    @Test("a refused mapping names the call and errno")
    func refusedMapping() {
        #expect(throws: SystemCallError("mmap(test)", errno: EBADF)) {
            _ = try MemoryMapping(length: 4096, protection: PROT_READ, flags: MAP_SHARED, descriptor: nil, call: "mmap(test)")
        }
    }
}
