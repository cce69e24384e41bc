import Foundation
import Loader

/// Reads an image file with errors that say what is wrong.
public enum ImageFile {
    public struct ReadError: Error, CustomStringConvertible {
        public let path: String
        public let reason: String
        /// The image is larger than the guest's memory.
        public var tooLargeForMemory = false
        public var description: String { "cannot use image '\(path)': \(reason)" }
    }

    /// Reads the file, refusing missing, unreadable, empty and oversized images
    /// before any VM is created.
    public static func read(_ path: String, limit: UInt64) throws(ReadError) -> [UInt8] {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw ReadError(path: path, reason: "no such file; check the path (guest images are built by `make guests` into GuestImages/build/)")
        }
        guard !isDirectory.boolValue else { throw ReadError(path: path, reason: "it is a directory, not an image file") }
        guard FileManager.default.isReadableFile(atPath: path) else {
            throw ReadError(path: path, reason: "permission denied; make it readable")
        }
        let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? UInt64) ?? 0
        guard size > 0 else { throw ReadError(path: path, reason: "the file is empty") }
        guard size <= limit else {
            throw ReadError(path: path, reason: "it is \(size) bytes, larger than guest memory (\(limit) bytes); give the guest more memory",
                            tooLargeForMemory: true)
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ReadError(path: path, reason: "it could not be read")
        }
        return [UInt8](data)
    }
}
