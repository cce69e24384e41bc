/// Where the pages of a lazily filled guest come from: a sealed snapshot file's chunks (lazy
/// restore), a migration source (post-copy), anything that can hand over pages by number.
///
/// Pages are grouped in **units** (a sealed file's chunk of up to 512 pages; one page or a run
/// of pages for a network source): the unit is what is fetched and verified as a whole. A page
/// in no unit is zero.
///
/// `fetch` is called from the fault server's threads, possibly two at once for different
/// units; it must not touch the guest memory being filled (that would fault on itself).
public protocol PageSource: Sendable {
    /// How many units there are; the background filler fetches them by index.
    var unitCount: Int { get }
    /// The unit holding page frame `pfn`, or nil if none does (the page is zero).
    func unit(containing pfn: UInt64) -> Int?
    /// Fetches, verifies and decodes one unit. Throws if it cannot be verified: the server then
    /// stops and nothing of the unit is installed.
    func fetch(unit: Int) throws -> PageBatch
}

/// The pages of one unit, as runs of consecutive page frames: each run is either data (whole
/// pages in `bytes`) or zero.
public struct PageBatch: Sendable {
    public enum Content: Sendable, Equatable {
        /// The run's pages are `count` pages of `bytes` from this byte offset.
        case data(offset: Int)
        case zero
    }

    public struct Run: Sendable, Equatable {
        public var firstPage: UInt64
        public var count: UInt64
        public var content: Content
    }

    public private(set) var runs: [Run] = []
    public let bytes: [UInt8]

    /// A batch over `bytes`; add its pages with `appendData` and `appendZero`, in increasing order.
    public init(bytes: [UInt8]) { self.bytes = bytes }

    /// Page `pfn` is the 4 KiB at `offset` in `bytes` (joins the previous run when it continues it).
    public mutating func appendData(page pfn: UInt64, offset: Int) {
        if let last = runs.last, case let .data(start) = last.content, last.firstPage + last.count == pfn,
           start + Int(last.count) * 4096 == offset {
            runs[runs.count - 1].count += 1
        } else {
            runs.append(Run(firstPage: pfn, count: 1, content: .data(offset: offset)))
        }
    }

    /// Page `pfn` is zero.
    public mutating func appendZero(page pfn: UInt64) {
        if let last = runs.last, last.content == .zero, last.firstPage + last.count == pfn {
            runs[runs.count - 1].count += 1
        } else {
            runs.append(Run(firstPage: pfn, count: 1, content: .zero))
        }
    }

    /// Number of pages in the batch.
    public var pageCount: UInt64 { runs.reduce(0) { $0 + $1.count } }
}
