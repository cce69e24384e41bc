#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
import SystemCalls

/// The attacker's account: the tests plant files as `nobody` the way a local user would.
private let nobody: uid_t = 65534

/// A scratch tree under /tmp, removed afterwards:
/// `private/victim.conf` (root's file, which no write may change), `pub` (owned by nobody,
/// mode 1777: the attacker's own directory), `shared` (owned by root, mode 1777, like /tmp).
private final class Scratch {
    let root: String
    var victim: String { root + "/private/victim.conf" }
    var pub: String { root + "/pub" }
    var shared: String { root + "/shared" }
    static let victimContents = "root's configuration\n"

    init() throws {
        var template = Array("/tmp/swift-vmm-safe-files-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        root = String(cString: try #require(made))
        // nobody must reach the directories below to plant anything.
        #expect(chmod(root, 0o755) == 0)
        #expect(mkdir(root + "/private", 0o755) == 0)
        try Data(Self.victimContents.utf8).write(to: URL(fileURLWithPath: victim))
        #expect(chmod(victim, 0o644) == 0)
        for (dir, owner) in [(pub, nobody), (shared, uid_t(0))] {
            #expect(mkdir(dir, 0o755) == 0)
            #expect(chown(dir, owner, owner) == 0)
            #expect(chmod(dir, 0o1777) == 0)
        }
    }

    deinit { try? FileManager.default.removeItem(atPath: root) }

    /// Runs a command as nobody (setpriv, util-linux) and requires it to succeed.
    func asNobody(_ arguments: String...) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        process.arguments = ["--reuid=\(nobody)", "--regid=\(nobody)", "--clear-groups", "--"] + arguments
        try process.run()
        process.waitUntilExit()
        try #require(process.terminationStatus == 0, "as nobody: \(arguments.joined(separator: " "))")
    }

    func contents(_ path: String) -> String? {
        FileManager.default.contents(atPath: path).map { String(decoding: $0, as: UTF8.self) }
    }

    func status(_ path: String) -> stat? {
        var info = stat()
        return lstat(path, &info) == 0 ? info : nil
    }

    func names(in dir: String) -> Set<String> {
        Set((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [])
    }

    /// The victim still holds exactly what root wrote, still root's.
    func expectVictimUntouched() {
        #expect(contents(victim) == Self.victimContents)
        #expect(status(victim)?.st_uid == 0)
    }
}

/// What this host's kernel would have stopped by itself; both are 0 on the development host,
/// so the refusals below are the VMM's own.
private let kernelProtectionsLogged: Void = logKernelProtections()

private func logKernelProtections() {
    for name in ["protected_symlinks", "protected_regular", "protected_hardlinks"] {
        let value = (try? String(contentsOfFile: "/proc/sys/fs/\(name)", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? "unreadable"
        print("sysctl fs.\(name) = \(value)")
    }
}

private func refusal(_ body: () throws -> Void) -> FileSafetyError.Problem? {
    do { try body() } catch let error as FileSafetyError { return error.problem } catch { return nil }
    return nil
}

private let snapshotBytes = Array("guest RAM".utf8)

@Suite("Files are created without following anyone's symlinks or writing into anyone's file",
       .enabled(if: geteuid() == 0, "planting files as nobody needs root"))
struct SafeFilesTests {
    init() { kernelProtectionsLogged }

    @Test("in a directory another user owns, nothing is written and the planted symlinks and file stay as they were")
    func attackerOwnedDirectoryIsRefused() throws {
        let scratch = try Scratch()
        try scratch.asNobody("ln", "-s", scratch.victim, scratch.pub + "/snap.bin.partial")
        try scratch.asNobody("ln", "-s", scratch.victim, scratch.pub + "/snap.bin")
        try scratch.asNobody("sh", "-c", "umask 0; printf planted > \(scratch.pub)/s2.bin")
        let before = scratch.names(in: scratch.pub)

        for name in ["snap.bin", "s2.bin", "fresh.bin"] {
            let problem = refusal { try AtomicFileWriter.write(snapshotBytes, to: scratch.pub + "/" + name, what: "snapshot") }
            #expect(problem == .directoryOwnedByAnotherUser(directory: scratch.pub, owner: nobody))
        }
        let serial = refusal { _ = try StreamedFile.openForWriting(scratch.pub + "/snap.bin", what: "serial log") }
        #expect(serial == .directoryOwnedByAnotherUser(directory: scratch.pub, owner: nobody))

        scratch.expectVictimUntouched()
        #expect(scratch.contents(scratch.pub + "/s2.bin") == "planted")
        #expect(scratch.status(scratch.pub + "/s2.bin")?.st_uid == nobody)
        #expect(scratch.status(scratch.pub + "/snap.bin").map { $0.st_mode & S_IFMT } == S_IFLNK)
        #expect(scratch.names(in: scratch.pub) == before, "no temporary or new file was left behind")
    }

    @Test("in a sticky directory like /tmp, a symlink at the old .partial name is never opened and the file is root's, 0600")
    func plantedPartialNameIsNotUsed() throws {
        let scratch = try Scratch()
        let target = scratch.shared + "/snap.bin"
        try scratch.asNobody("ln", "-s", scratch.victim, target + ".partial")

        try AtomicFileWriter.write(snapshotBytes, to: target, what: "snapshot")

        scratch.expectVictimUntouched()
        let written = try #require(scratch.status(target))
        #expect(written.st_mode & S_IFMT == S_IFREG)
        #expect(written.st_mode & 0o7777 == 0o600)
        #expect(written.st_uid == 0)
        #expect(scratch.contents(target) == "guest RAM")
        #expect(scratch.names(in: scratch.shared) == ["snap.bin", "snap.bin.partial"], "no temporary left behind")
    }

    @Test("a symlink at the target and another user's 0666 file at the target are refused, and both stay as they were")
    func plantedTargetsAreRefused() throws {
        let scratch = try Scratch()
        try scratch.asNobody("ln", "-s", scratch.victim, scratch.shared + "/snap.bin")
        try scratch.asNobody("sh", "-c", "umask 0; printf planted > \(scratch.shared)/s2.bin")

        let symlink = refusal { try AtomicFileWriter.write(snapshotBytes, to: scratch.shared + "/snap.bin", what: "snapshot") }
        #expect(symlink == .finalSymlink)
        let foreign = refusal { try AtomicFileWriter.write(snapshotBytes, to: scratch.shared + "/s2.bin", what: "snapshot") }
        #expect(foreign == .ownedByAnotherUser(owner: nobody))

        scratch.expectVictimUntouched()
        #expect(scratch.contents(scratch.shared + "/s2.bin") == "planted")
        #expect(scratch.status(scratch.shared + "/s2.bin")?.st_mode == S_IFREG | 0o666)
        #expect(scratch.status(scratch.shared + "/snap.bin").map { $0.st_mode & S_IFMT } == S_IFLNK)
        #expect(scratch.names(in: scratch.shared) == ["snap.bin", "s2.bin"], "no temporary left behind")
    }

    @Test("the message says what was wrong and what to do")
    func messageNamesTheProblemAndTheRemedy() throws {
        let error = FileSafetyError(what: "snapshot", path: "/x", problem: .finalSymlink)
        #expect(error.description == "the snapshot '/x' is a symlink; refusing to follow it — give a path whose last component is not a symlink")
    }

    @Test("root's own file is replaced whole by rename: the new one is root's, 0600, and a reader of the old one keeps it")
    func ownFileIsReplacedByRename() throws {
        let scratch = try Scratch()
        let target = scratch.shared + "/own.bin"
        try Data("old".utf8).write(to: URL(fileURLWithPath: target))
        #expect(chmod(target, 0o644) == 0)
        let reader = open(target, O_RDONLY | O_CLOEXEC)
        defer { close(reader) }

        try AtomicFileWriter.write(snapshotBytes, to: target, what: "snapshot")

        #expect(scratch.contents(target) == "guest RAM")
        #expect(scratch.status(target)?.st_mode == S_IFREG | 0o600)
        var old = [UInt8](repeating: 0, count: 8)
        #expect(read(reader, &old, old.count) == 3, "the old inode was replaced, not written into")
    }

    @Test("another user's symlink on the way to the directory is not followed; root's own is")
    func symlinksInTheDirectoryPart() throws {
        let scratch = try Scratch()
        try scratch.asNobody("ln", "-s", scratch.root + "/private", scratch.shared + "/elsewhere")
        let problem = refusal { try AtomicFileWriter.write(snapshotBytes, to: scratch.shared + "/elsewhere/victim.conf", what: "snapshot") }
        #expect(problem == .untrustedSymlink(link: scratch.shared + "/elsewhere", owner: nobody))
        scratch.expectVictimUntouched()

        #expect(symlink("private", scratch.root + "/mine") == 0)
        try AtomicFileWriter.write(snapshotBytes, to: scratch.root + "/mine/new.bin", what: "snapshot")
        #expect(scratch.contents(scratch.root + "/private/new.bin") == "guest RAM")
    }

    @Test("a directory others may write to without the sticky bit is refused")
    func worldWritableNonStickyDirectory() throws {
        let scratch = try Scratch()
        let open = scratch.root + "/open"
        #expect(mkdir(open, 0o755) == 0 && chmod(open, 0o777) == 0)
        let problem = refusal { try AtomicFileWriter.write(snapshotBytes, to: open + "/report.json", what: "report") }
        #expect(problem == .directoryWritableByOthers(directory: open, mode: S_IFDIR | 0o777))
        #expect(scratch.names(in: open).isEmpty)
    }

    @Test("a write abandoned before commit leaves the old file as it was and no temporary")
    func abandonedWriteLosesNothing() throws {
        let scratch = try Scratch()
        let target = scratch.shared + "/report.json"
        try Data("old".utf8).write(to: URL(fileURLWithPath: target))
        do {
            let writer = try AtomicFileWriter(path: target, what: "report")
            try writer.writeAll(snapshotBytes)
            // Goes away uncommitted, as when the snapshot stream throws.
        }
        #expect(scratch.contents(target) == "old")
        #expect(scratch.names(in: scratch.shared) == ["report.json"])
    }

    @Test("never-replace refuses an existing file, also one that appears between create and commit")
    func neverReplaceRefusesExisting() throws {
        let scratch = try Scratch()
        let target = scratch.shared + "/identity.host"
        let writer = try AtomicFileWriter(path: target, what: "host identity", replacing: false)
        try writer.writeAll(snapshotBytes)
        try Data("first".utf8).write(to: URL(fileURLWithPath: target))
        let late = refusal { try writer.commit() }
        #expect(late == .exists)
        #expect(scratch.contents(target) == "first")
        #expect(scratch.names(in: scratch.shared) == ["identity.host"])

        let early = refusal { try AtomicFileWriter.write(snapshotBytes, to: target, what: "host identity", replacing: false) }
        #expect(early == .exists)
        #expect(scratch.contents(target) == "first")
    }
}

@Suite("The serial log is opened without following symlinks or writing into another user's file",
       .enabled(if: geteuid() == 0, "planting files as nobody needs root"))
struct StreamedFileTests {
    init() { kernelProtectionsLogged }

    @Test("a symlink at the log's name is refused and its target untouched")
    func symlinkIsRefused() throws {
        let scratch = try Scratch()
        let log = scratch.shared + "/serial.log"
        try scratch.asNobody("ln", "-s", scratch.victim, log)
        #expect(refusal { _ = try StreamedFile.openForWriting(log, what: "serial log") } == .finalSymlink)
        scratch.expectVictimUntouched()
    }

    @Test("another user's regular file or FIFO is refused, and the file keeps its contents")
    func foreignFileIsRefused() throws {
        let scratch = try Scratch()
        let log = scratch.shared + "/serial.log", fifo = scratch.shared + "/serial.fifo"
        try scratch.asNobody("sh", "-c", "umask 0; printf planted > \(log)")
        try scratch.asNobody("mkfifo", "-m", "666", fifo)
        #expect(refusal { _ = try StreamedFile.openForWriting(log, what: "serial log") } == .ownedByAnotherUser(owner: nobody))
        // Refused without waiting for a reader: the check comes before the open that would wait.
        #expect(refusal { _ = try StreamedFile.openForWriting(fifo, what: "serial log") } == .ownedByAnotherUser(owner: nobody))
        #expect(scratch.contents(log) == "planted")
    }

    @Test("a new log is created 0600; our own existing log is truncated and written from the start")
    func ownLogIsTruncated() throws {
        let scratch = try Scratch()
        let log = scratch.shared + "/serial.log"
        do {
            let file = try StreamedFile.openForWriting(log, what: "serial log")
            #expect(write(file.raw, "first run, longer", 17) == 17)
        }
        #expect(scratch.status(log)?.st_mode == S_IFREG | 0o600)
        let file = try StreamedFile.openForWriting(log, what: "serial log")
        #expect(write(file.raw, "second", 6) == 6)
        #expect(scratch.contents(log) == "second")
    }

    @Test("a regular file with another name is refused: truncating it would change that one too")
    func hardLinkedFileIsRefused() throws {
        let scratch = try Scratch()
        let log = scratch.shared + "/serial.log"
        #expect(link(scratch.victim, log) == 0)
        #expect(refusal { _ = try StreamedFile.openForWriting(log, what: "serial log") } == .hardLinked(links: 2))
        scratch.expectVictimUntouched()
    }

    @Test("our own FIFO works: the reader gets the bytes")
    func fifoWorks() async throws {
        let scratch = try Scratch()
        let fifo = scratch.root + "/serial.fifo"
        #expect(mkfifo(fifo, 0o600) == 0)
        // The reader opens on another thread: opening a FIFO waits for the other end.
        let reader = Task.detached { () -> String in
            let fd = open(fifo, O_RDONLY | O_CLOEXEC)
            defer { close(fd) }
            var bytes: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 64)
            while true {
                let n = read(fd, &buffer, buffer.count)
                if n <= 0 { break }
                bytes += buffer[0..<n]
            }
            return String(decoding: bytes, as: UTF8.self)
        }
        do {
            let file = try StreamedFile.openForWriting(fifo, what: "serial log")
            #expect(write(file.raw, "hello", 5) == 5)
        }
        #expect(await reader.value == "hello")
    }
}
