#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// The one directory API snapshots may be written to (`--snapshot-dir`). Whoever can reach the
/// control socket chooses the file name, so a name must not lead anywhere else: no `..`, no
/// other directory, no symlink, no directory or device as the target.
public struct SnapshotDirectory: Sendable, Equatable {
    /// As the operator wrote it.
    public let configured: String
    /// With every symlink resolved, when the VMM started; a path is accepted only directly in it.
    public let canonical: String

    /// Longest file name accepted: NAME_MAX (255) leaves room for the writer's temporary suffix.
    public static let maximumNameBytes = 200

    /// Checks that `path` is an existing directory and remembers where it really is.
    public init(_ path: String) throws {
        guard !path.isEmpty, !path.utf8.contains(0) else { throw Refusal("--snapshot-dir needs a directory path") }
        guard let resolved = realpath(path, nil) else {
            throw Refusal("the snapshot directory '\(path)' cannot be used: \(String(cString: strerror(errno))); create it first (mkdir -p), owner-only is best")
        }
        defer { free(resolved) }
        let canonical = String(cString: resolved)
        var st = stat()
        guard stat(canonical, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
            throw Refusal("the snapshot directory '\(path)' is not a directory; give an existing directory")
        }
        self.configured = path
        self.canonical = canonical
    }

    /// A refused snapshot path, with what was wrong and what to do, and the HTTP status that says so.
    public struct Refusal: Error, CustomStringConvertible, Equatable {
        public enum Kind: Sendable, Equatable {
            /// Not a usable name at all (empty, NUL, control characters, `..`, too long).
            case malformed
            /// Somewhere the API may not write: outside the directory, through a symlink, not writable.
            case forbidden
            /// The name is taken by something that is not a regular file (a directory, a symlink, a device).
            case occupied
        }
        public let kind: Kind
        public let description: String
        init(_ description: String, _ kind: Kind = .malformed) { self.description = description; self.kind = kind }
    }

    /// Where a snapshot requested as `requested` goes: a plain file name inside this directory, or
    /// an absolute path whose parent is this directory (as configured or as resolved, with no
    /// `.`/`..` and no symlinked component). The target may be a regular file (it is replaced) or
    /// not exist yet.
    public func resolve(_ requested: String) throws -> String {
        let inside = "give a file name (it is written inside \(canonical)) or an absolute path directly in that directory"
        guard !requested.isEmpty else { throw Refusal("the snapshot path is empty; \(inside)") }
        guard !requested.utf8.contains(0) else { throw Refusal("the snapshot path contains a NUL byte; \(inside)") }
        let name: String
        if requested.hasPrefix("/") {
            var components = requested.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
            if requested.hasSuffix("/") { throw Refusal("'\(requested)' ends in '/', so it names a directory; \(inside)") }
            guard let last = components.popLast() else { throw Refusal("'/' is not a snapshot file; \(inside)") }
            if components.contains(where: { $0 == "." || $0 == ".." }) || last == "." || last == ".." {
                throw Refusal("'\(requested)' contains '.' or '..'; \(inside)", .forbidden)
            }
            let parent = components
            // The directory as configured counts too (the operator chose that spelling), if absolute.
            let spellings = configured.hasPrefix("/") ? [canonical, configured] : [canonical]
            let allowed = spellings.map { $0.split(separator: "/", omittingEmptySubsequences: true).map(String.init) }
            guard allowed.contains(parent) else {
                throw Refusal("'\(requested)' is outside the snapshot directory \(canonical); API snapshots are written only there; \(inside)", .forbidden)
            }
            name = last
        } else {
            guard !requested.contains("/") else {
                let dots = requested.split(separator: "/").contains { $0 == ".." }
                throw Refusal("'\(requested)' \(dots ? "climbs out with '..'" : "has a directory part"); \(inside)", .forbidden)
            }
            name = requested
        }
        try Self.checkName(name, inside: inside)
        try checkDirectoryUnchanged()
        let target = canonical + "/" + name
        try Self.checkTarget(target)
        guard access(canonical, W_OK) == 0 else {
            throw Refusal("the snapshot directory \(canonical) is not writable by the VMM: \(String(cString: strerror(errno))); make it writable for the VMM's user or start the VMM with another --snapshot-dir", .forbidden)
        }
        return target
    }

    static func checkName(_ name: String, inside: String) throws {
        if name == "." || name == ".." { throw Refusal("'\(name)' is not a file name; \(inside)", .forbidden) }
        if name.utf8.count > maximumNameBytes {
            throw Refusal("the snapshot file name is \(name.utf8.count) bytes long; at most \(maximumNameBytes) are accepted")
        }
        if name.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f }) {
            throw Refusal("the snapshot file name contains control characters; use printable characters")
        }
    }

    /// The directory is resolved once at start; if a component was swapped for a symlink since,
    /// writing "inside" it would land elsewhere.
    func checkDirectoryUnchanged() throws {
        guard let resolved = realpath(configured, nil) else {
            throw Refusal("the snapshot directory \(configured) is gone (\(String(cString: strerror(errno)))); recreate it or restart the VMM with another --snapshot-dir", .forbidden)
        }
        defer { free(resolved) }
        let now = String(cString: resolved)
        guard now == canonical else {
            throw Refusal("the snapshot directory \(configured) now resolves to \(now), not \(canonical) as when the VMM started; restore it or restart the VMM", .forbidden)
        }
    }

    /// An existing target must be a regular file the VMM may replace.
    static func checkTarget(_ target: String) throws {
        var st = stat()
        guard lstat(target, &st) == 0 else {
            if errno == ENOENT { return }
            throw Refusal("cannot inspect '\(target)': \(String(cString: strerror(errno)))", .forbidden)
        }
        switch st.st_mode & S_IFMT {
        case S_IFREG:
            // An immutable or read-only file cannot be replaced even by root: say so now, not after writing.
            guard access(target, W_OK) == 0 else {
                throw Refusal("'\(target)' exists and cannot be replaced: \(String(cString: strerror(errno))); choose another name", .forbidden)
            }
        case S_IFDIR: throw Refusal("'\(target)' is a directory; choose a file name that is not taken by a directory", .occupied)
        case S_IFLNK: throw Refusal("'\(target)' is a symbolic link; snapshots are not written through links; choose another name", .occupied)
        default: throw Refusal("'\(target)' exists and is not a regular file; choose another name", .occupied)
        }
    }
}
