#if canImport(Glibc)
import Glibc
#endif
import CSystemCalls

// The one place the VMM creates files. The VMM often runs as root and is handed paths
// by people and scripts, sometimes in directories other users can write to (/tmp).
// The rules, also in docs/files.md:
//
// - The last component of a path is never followed if it is a symlink: it is refused.
// - Symlinks on the way to the directory are followed only when owned by root or by the
//   effective user: another user's symlink could point the write anywhere (the idea of
//   fs.protected_symlinks, enforced here whatever the sysctl says).
// - The directory the file goes into must be owned by root or the effective user, and if
//   group or others may write to it, it must be sticky (like /tmp): otherwise someone else
//   could rename, replace or remove the file under us. It is opened once, and every later
//   step is relative to that descriptor, so renaming directories on the path after the
//   check cannot redirect the write.
// - An existing file is written into or replaced only if it is a regular file (or, for a
//   stream, a FIFO) owned by the effective user; another user's file is left alone.

/// A file the VMM refused to write, or could not: what was wrong and what to do instead.
public struct FileSafetyError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Problem: Equatable, Sendable {
        /// The path is empty, ends in `/`, `.` or `..`: it names no file.
        case notAFileName
        /// The last component is a symlink.
        case finalSymlink
        /// A symlink on the way to the directory, owned by someone other than root or us.
        case untrustedSymlink(link: String, owner: UInt32)
        /// The directory the file goes into is owned by someone other than root or us.
        case directoryOwnedByAnotherUser(directory: String, owner: UInt32)
        /// The directory is writable by group or others and not sticky.
        case directoryWritableByOthers(directory: String, mode: UInt32)
        /// Something other than a regular file (or FIFO, for streams) is at the path.
        case notRegularFile(kind: String)
        /// A file owned by another user is at the path.
        case ownedByAnotherUser(owner: UInt32)
        /// A regular file with other names: truncating it would change those too.
        case hardLinked(links: Int)
        /// The file exists and the caller asked never to replace one.
        case exists
        /// A system call failed.
        case systemCall(SystemCallError)
    }

    /// What the file is, for messages: "snapshot", "serial log", "migration report".
    public var what: String
    public var path: String
    public var problem: Problem

    public init(what: String, path: String, problem: Problem) {
        self.what = what
        self.path = path
        self.problem = problem
    }

    public var description: String {
        let target = "the \(what) '\(path)'"
        switch problem {
        case .notAFileName:
            return "\(target) does not name a file — give a path that ends in a file name"
        case .finalSymlink:
            return "\(target) is a symlink; refusing to follow it — give a path whose last component is not a symlink"
        case let .untrustedSymlink(link, owner):
            return "the path of \(target) goes through the symlink '\(link)', owned by uid \(owner), who could point it anywhere; refusing to follow it — give a path whose symlinks belong to root or to you"
        case let .directoryOwnedByAnotherUser(directory, owner):
            return "the directory '\(directory)' of \(target) is owned by uid \(owner), who could replace or move the file in it; refusing — write into a directory owned by root or by you"
        case let .directoryWritableByOthers(directory, mode):
            return "the directory '\(directory)' of \(target) is writable by others and not sticky (mode \(String(mode & 0o7777, radix: 8))), so anyone could replace the file in it; refusing — use another directory, or `chmod o-w,g-w` or `chmod +t` this one"
        case let .notRegularFile(kind):
            return "\(target) exists and is a \(kind); refusing to write to it — remove it or give another path"
        case let .ownedByAnotherUser(owner):
            return "\(target) exists and belongs to uid \(owner); refusing to write into or replace another user's file — remove it or give another path"
        case let .hardLinked(links):
            return "\(target) has \(links) hard links, so writing to it would change the other names too; refusing — remove it or give another path"
        case .exists:
            return "\(target) already exists and is not overwritten — give a new path, or remove the old file first"
        case let .systemCall(error):
            return "cannot write \(target): \(error)"
        }
    }
}

/// Runs a call through `retryingOnInterrupt`, failing as a `FileSafetyError` about `path`.
private func checked<Result: FixedWidthInteger>(
    _ what: String, _ path: String, _ call: @autoclosure () -> String, _ body: () -> Result
) throws(FileSafetyError) -> Result {
    do { return try retryingOnInterrupt(call(), body) } catch {
        throw FileSafetyError(what: what, path: path, problem: .systemCall(error))
    }
}

private let openPath = csystemcalls_o_path()

/// The kind of a file, from `st_mode`, for messages.
private func kind(_ mode: mode_t) -> String {
    switch mode & S_IFMT {
    case S_IFREG: "regular file"
    case S_IFDIR: "directory"
    case S_IFLNK: "symlink"
    case S_IFIFO: "FIFO"
    case S_IFSOCK: "socket"
    case S_IFCHR: "character device"
    case S_IFBLK: "block device"
    default: "file of unknown type"
    }
}

/// Whether `uid` is one the VMM trusts with its files: root, or whoever it runs as.
private func isTrustedOwner(_ uid: uid_t) -> Bool { uid == 0 || uid == geteuid() }

/// The directory a file goes into, opened by walking the path one component at a time
/// (symlinks followed only when trusted) and checked as the rules at the top of this file say,
/// and the file's name in it.
struct CheckedDirectory {
    let descriptor: OwnedFileDescriptor
    let fileName: String
    let what: String
    let path: String

    init(containing path: String, what: String) throws(FileSafetyError) {
        self.what = what
        self.path = path
        let components = path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        guard !path.hasSuffix("/"), let last = components.last, last != ".", last != ".." else {
            throw FileSafetyError(what: what, path: path, problem: .notAFileName)
        }
        fileName = last
        let absolute = path.hasPrefix("/")
        var current = try Self.openRoot(absolute ? "/" : ".", what: what, path: path)
        // Components still to walk, the next one last; symlink targets are pushed here.
        var pending = Array(components.dropLast().reversed())
        var walked = absolute ? "" : "."
        var symlinksFollowed = 0
        while let component = pending.popLast() {
            if component == "." { continue }
            let here = walked + "/" + component
            var info = stat()
            _ = try checked(what, path, "fstatat(\(here))") { fstatat(current.raw, component, &info, AT_SYMLINK_NOFOLLOW) }
            if info.st_mode & S_IFMT == S_IFLNK {
                guard isTrustedOwner(info.st_uid) else {
                    throw FileSafetyError(what: what, path: path, problem: .untrustedSymlink(link: here, owner: info.st_uid))
                }
                symlinksFollowed += 1
                guard symlinksFollowed <= 40 else {
                    throw FileSafetyError(what: what, path: path, problem: .systemCall(SystemCallError("readlinkat(\(here))", errno: ELOOP)))
                }
                var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
                let length = try checked(what, path, "readlinkat(\(here))") {
                    readlinkat(current.raw, component, &buffer, buffer.count - 1)
                }
                let target = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
                if target.hasPrefix("/") {
                    current = try Self.openRoot("/", what: what, path: path)
                    walked = ""
                }
                pending += target.split(separator: "/", omittingEmptySubsequences: true).map(String.init).reversed()
                continue
            }
            // O_NOFOLLOW: if the component was swapped for a symlink since the fstatat, this
            // opens the link itself, which the check below refuses as not a directory.
            let next = OwnedFileDescriptor(taking: try checked(what, path, "openat(\(here))") {
                openat(current.raw, component, openPath | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            })
            _ = try checked(what, path, "fstat(\(here))") { fstat(next.raw, &info) }
            guard info.st_mode & S_IFMT == S_IFDIR else {
                throw FileSafetyError(what: what, path: path, problem: .systemCall(SystemCallError("openat(\(here))", errno: ENOTDIR)))
            }
            current = next
            walked = component == ".." ? walked + "/.." : here
        }
        // Read access, for fsync of the directory after a rename.
        descriptor = OwnedFileDescriptor(taking: try checked(what, path, "openat(\(walked.isEmpty ? "/" : walked))") {
            openat(current.raw, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        })
        var directoryName = String(path.dropLast(last.count))
        while directoryName.count > 1 && directoryName.hasSuffix("/") { directoryName.removeLast() }
        if directoryName.isEmpty { directoryName = "." }
        var info = stat()
        _ = try checked(what, path, "fstat(\(directoryName))") { fstat(descriptor.raw, &info) }
        guard isTrustedOwner(info.st_uid) else {
            throw FileSafetyError(what: what, path: path, problem: .directoryOwnedByAnotherUser(directory: directoryName, owner: info.st_uid))
        }
        if info.st_mode & (S_IWGRP | S_IWOTH) != 0 && info.st_mode & S_ISVTX == 0 {
            throw FileSafetyError(what: what, path: path, problem: .directoryWritableByOthers(directory: directoryName, mode: info.st_mode))
        }
    }

    private static func openRoot(_ start: String, what: String, path: String) throws(FileSafetyError) -> OwnedFileDescriptor {
        OwnedFileDescriptor(taking: try checked(what, path, "open(\(start))") { open(start, openPath | O_DIRECTORY | O_CLOEXEC) })
    }

    /// `fstatat` of `name` in this directory, not following a symlink; nil if nothing is there.
    func status(of name: String) throws(FileSafetyError) -> stat? {
        var info = stat()
        if fstatat(descriptor.raw, name, &info, AT_SYMLINK_NOFOLLOW) == 0 { return info }
        if errno == ENOENT { return nil }
        throw FileSafetyError(what: what, path: path, problem: .systemCall(.last("fstatat(\(path))")))
    }

    func fail(_ problem: FileSafetyError.Problem) -> FileSafetyError {
        FileSafetyError(what: what, path: path, problem: problem)
    }
}

/// A whole file written under a fresh name in the target's directory, then renamed into place,
/// so that readers see the old file or the complete new one, never a part.
///
/// The temporary is created with `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600, under a random name:
/// nothing planted there (a symlink, another user's file) is ever opened. `commit()` fsyncs it,
/// renames it over the target and fsyncs the directory. Until then the target is untouched; a
/// writer that goes away uncommitted (an error, a throw) removes its temporary.
public final class AtomicFileWriter {
    /// Write the contents here; do not close it (`commit()` does).
    public let file: OwnedFileDescriptor
    private let directory: CheckedDirectory
    private let temporaryName: String
    private let replacing: Bool
    private var finished = false

    /// Checks `path` (see the rules at the top of this file) and creates its temporary.
    /// `what` names the file in errors. With `replacing` false, an existing file is refused
    /// now and at the rename (which is atomic: `RENAME_NOREPLACE`).
    public init(path: String, what: String, replacing: Bool = true) throws(FileSafetyError) {
        directory = try CheckedDirectory(containing: path, what: what)
        self.replacing = replacing
        if let existing = try directory.status(of: directory.fileName) {
            try Self.checkReplaceable(existing, in: directory, replacing: replacing)
        }
        var created: (OwnedFileDescriptor, String)?
        // A name someone else took (planted, or by chance) is skipped, never opened.
        for _ in 0..<16 where created == nil {
            let name = ".\(directory.fileName).\(Self.randomSuffix()).partial"
            let fd = openat(directory.descriptor.raw, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            if fd >= 0 { created = (OwnedFileDescriptor(taking: fd), name); break }
            if errno != EEXIST && errno != EINTR { throw directory.fail(.systemCall(.last("openat(\(path) temporary \(name))"))) }
        }
        guard let (file, name) = created else {
            throw directory.fail(.systemCall(SystemCallError("openat(\(path) temporary)", errno: EEXIST)))
        }
        self.file = file
        temporaryName = name
        // The umask may narrow 0600 but nothing may widen it; fchmod makes it exact.
        _ = try checked(what, path, "fchmod(\(name))") { fchmod(file.raw, 0o600) }
    }

    deinit { if !finished { abandon() } }

    /// Makes the written contents the file at the path: fsync, rename, fsync of the directory.
    /// On failure before the rename the temporary is removed and the target left as it was.
    public func commit() throws(FileSafetyError) {
        precondition(!finished, "an AtomicFileWriter commits once")
        let path = directory.path, what = directory.what
        do throws(FileSafetyError) {
            if let existing = try directory.status(of: directory.fileName) {
                try Self.checkReplaceable(existing, in: directory, replacing: replacing)
            }
            _ = try checked(what, path, "fsync(\(temporaryName))") { fsync(file.raw) }
            file.close()
            let dir = directory.descriptor.raw
            if replacing {
                _ = try checked(what, path, "renameat(\(temporaryName), \(path))") {
                    renameat(dir, temporaryName, dir, directory.fileName)
                }
            } else if csystemcalls_renameat_noreplace(dir, temporaryName, dir, directory.fileName) != 0 {
                throw directory.fail(errno == EEXIST ? .exists : .systemCall(.last("renameat2(\(temporaryName), \(path), RENAME_NOREPLACE)")))
            }
        } catch {
            abandon()
            throw error
        }
        finished = true
        // The rename is durable only once the directory is; the file is in place either way.
        _ = try checked(what, path, "fsync(directory of \(path))") { fsync(directory.descriptor.raw) }
    }

    /// Removes the temporary; the target stays as it was.
    public func abandon() {
        guard !finished else { return }
        finished = true
        file.close()
        unlinkat(directory.descriptor.raw, temporaryName, 0)
    }

    /// Writes all of `bytes` as the file at `path`, as `init` and `commit` describe.
    public static func write(_ bytes: [UInt8], to path: String, what: String, replacing: Bool = true) throws(FileSafetyError) {
        let writer = try AtomicFileWriter(path: path, what: what, replacing: replacing)
        try writer.writeAll(bytes)
        try writer.commit()
    }

    /// Writes all of `bytes` at the file's current offset.
    public func writeAll(_ bytes: [UInt8]) throws(FileSafetyError) {
        let fd = file.raw, path = directory.path, what = directory.what, name = temporaryName
        let failure: FileSafetyError? = bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                do throws(FileSafetyError) { offset += try checked(what, path, "write(\(name))") { Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset) } }
                catch { return error }
            }
            return nil
        }
        if let failure { throw failure }
    }

    /// Refuses what is at the target unless it is our own regular file and we may replace it.
    private static func checkReplaceable(_ existing: stat, in directory: CheckedDirectory, replacing: Bool) throws(FileSafetyError) {
        switch existing.st_mode & S_IFMT {
        case S_IFLNK: throw directory.fail(.finalSymlink)
        case S_IFREG: break
        default: throw directory.fail(.notRegularFile(kind: kind(existing.st_mode)))
        }
        guard existing.st_uid == geteuid() else { throw directory.fail(.ownedByAnotherUser(owner: existing.st_uid)) }
        guard replacing else { throw directory.fail(.exists) }
    }

    private static func randomSuffix() -> String {
        let hex = String(UInt64.random(in: .min ... .max), radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }
}

/// Files written as a stream for as long as the VMM runs (the serial log), which a person may
/// follow with `tail -f` or point at a FIFO.
public enum StreamedFile {
    /// Opens `path` for writing from the start. A new file is created 0600 with
    /// `O_CREAT|O_EXCL|O_NOFOLLOW`. An existing one is first opened with `O_PATH|O_NOFOLLOW`
    /// (which neither waits for a FIFO's reader nor truncates) and checked: it must be a FIFO,
    /// or a regular file with one link, owned by the effective user; then it is opened for
    /// writing through that very descriptor, and a regular file is truncated.
    /// The directory rules at the top of this file apply too.
    public static func openForWriting(_ path: String, what: String) throws(FileSafetyError) -> OwnedFileDescriptor {
        let directory = try CheckedDirectory(containing: path, what: what)
        let dir = directory.descriptor.raw, name = directory.fileName
        let fresh = openat(dir, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        if fresh >= 0 { return OwnedFileDescriptor(taking: fresh) }
        guard errno == EEXIST else { throw directory.fail(.systemCall(.last("openat(\(path), O_CREAT|O_EXCL)"))) }

        let handle = OwnedFileDescriptor(taking: try checked(what, path, "openat(\(path), O_PATH|O_NOFOLLOW)") {
            openat(dir, name, openPath | O_NOFOLLOW | O_CLOEXEC)
        })
        var info = stat()
        _ = try checked(what, path, "fstat(\(path))") { fstat(handle.raw, &info) }
        switch info.st_mode & S_IFMT {
        case S_IFLNK: throw directory.fail(.finalSymlink)
        case S_IFREG, S_IFIFO: break
        default: throw directory.fail(.notRegularFile(kind: kind(info.st_mode)))
        }
        guard info.st_uid == geteuid() else { throw directory.fail(.ownedByAnotherUser(owner: info.st_uid)) }
        let isRegular = info.st_mode & S_IFMT == S_IFREG
        if isRegular && info.st_nlink > 1 { throw directory.fail(.hardLinked(links: Int(info.st_nlink))) }

        // Reopening through /proc/self/fd opens the inode just checked, not whatever the name
        // points to now. For a FIFO this waits for a reader, as opening a FIFO does.
        let file = OwnedFileDescriptor(taking: try checked(what, path, "open(/proc/self/fd/\(handle.raw) for \(path))") {
            open("/proc/self/fd/\(handle.raw)", O_WRONLY | O_CLOEXEC)
        })
        if isRegular {
            _ = try checked(what, path, "ftruncate(\(path))") { ftruncate(file.raw, 0) }
        }
        return file
    }
}
