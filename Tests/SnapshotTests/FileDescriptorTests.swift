#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Testing
import GuestMemory
@testable import Snapshot
import SystemCalls

@Suite("File descriptor sinks and sources")
struct FileDescriptorTests {
    /// An unlinked temporary file, open read-write.
    private func temporaryFile() throws -> Int32 {
        var template = Array("/tmp/snapshot-test-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        try #require(fd >= 0)
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        return fd
    }

    @Test("a stream written to a file reads back through a file descriptor")
    func fileRoundTrip() throws {
        let fd = try temporaryFile()
        defer { close(fd) }
        let memory = try GuestMemory(size: 1 << 20)
        try fillPages(memory, [4, 9])
        var writer = try StreamWriter(sink: FileDescriptorSink(fd: fd))
        try writer.writeSection(.machine, payload: machineJSON)
        try writer.writeMemoryPages([4, 5, 9], from: memory)
        try writer.finish()
        #expect(lseek(fd, 0, SEEK_END) == off_t(writer.bytesWritten))

        #expect(lseek(fd, 0, SEEK_SET) == 0)
        let sections = try StreamReader.readAll(from: FileDescriptorSource(fd: fd))
        #expect(sections.map(\.type) == [.machine, .memory])
        let target = try GuestMemory(size: 1 << 20)
        _ = try MemorySection.apply(sections[1], to: target)
        #expect(try target.read(at: GuestAddress(0), count: 1 << 20) == memory.read(at: GuestAddress(0), count: 1 << 20))
    }

    @Test("a sink and a source given the descriptor's owner keep it open until they go away")
    func ownedDescriptor() throws {
        let path = "/tmp/snapshot-test-owned-\(getpid())"
        defer { unlink(path) }
        var sink: FileDescriptorSink? = FileDescriptorSink(try OwnedFileDescriptor.open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC))
        let number = try #require(sink?.fd)
        var info = stat()
        try #require(fstat(number, &info) == 0)
        // Parallel tests reuse a freed number at once, so ask whether the number still
        // refers to this file, not whether it is open.
        let inode = info.st_ino
        func openOnThisFile() -> Bool {
            var now = stat()
            return fstat(number, &now) == 0 && now.st_ino == inode && now.st_dev == info.st_dev
        }
        var writer = try StreamWriter(sink: sink!)
        try writer.writeSection(.machine, payload: machineJSON)
        try writer.finish()
        sink = nil
        // The writer holds the sink, and the sink the owner: still open.
        #expect(openOnThisFile())
        _ = consume writer
        #expect(!openOnThisFile())

        let sections = try StreamReader.readAll(from: FileDescriptorSource(try OwnedFileDescriptor.open(path, O_RDONLY | O_CLOEXEC)))
        #expect(sections.map(\.type) == [.machine])
    }

    @Test("a truncated file is refused as truncated at the offset where it ends")
    func truncatedFile() throws {
        let fd = try temporaryFile()
        defer { close(fd) }
        let bytes = try smallStream()
        let sink = FileDescriptorSink(fd: fd)
        try bytes[0..<1000].withUnsafeBytes { try sink.write($0) }
        #expect(lseek(fd, 0, SEEK_SET) == 0)
        #expect(throws: SnapshotFormatError.self) { try StreamReader.readAll(from: FileDescriptorSource(fd: fd)) }
        #expect(lseek(fd, 0, SEEK_SET) == 0)
        var reader = try StreamReader(source: FileDescriptorSource(fd: fd))
        var error: SnapshotFormatError?
        do { while try reader.nextSection() != nil {} } catch let e as SnapshotFormatError { error = e }
        guard case let .truncated(offset, _) = try #require(error) else {
            Issue.record("expected truncated, got \(String(describing: error))")
            return
        }
        #expect(offset == 1000)
    }

    @Test("a bad file descriptor reports the failing call and errno")
    func badDescriptor() throws {
        let sink = FileDescriptorSink(fd: -1)
        let error = SnapshotIOError(operation: "write", errno: EBADF)
        #expect(throws: error) { try [1, 2, 3].withUnsafeBytes { try sink.write($0) } }
        #expect(error.description.contains("write"))
        #expect(error.description.contains("errno \(EBADF)"))
        #expect(throws: SnapshotIOError(operation: "read", errno: EBADF)) {
            try StreamReader(source: FileDescriptorSource(fd: -1))
        }
    }
}
