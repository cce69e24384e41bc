// swift-tools-version: 6.2
import PackageDescription

let package = Package(
    name: "SwiftVMM",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vmm", targets: ["vmm"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
    ],
    targets: [
        // <linux/kvm.h>, ioctl request numbers as constants, non-variadic shims. No logic.
        .target(name: "CKVM", path: "CKVM"),
        // Owned file descriptors and mappings, errors that name the call and errno, EINTR retry.
        .target(name: "SystemCalls", dependencies: ["CSystemCalls", .product(name: "SystemPackage", package: "swift-system")]),
        // glibc's errno names, which Swift's Glibc module hides behind _GNU_SOURCE. No logic.
        .target(name: "CSystemCalls"),
        // Guest-physical address space; bounds-checked access; dirty bitmaps and the tracker protocol.
        .target(name: "GuestMemory", dependencies: ["SystemCalls"]),
        // Missing-page faults served through a userfaultfd from a page source (lazy restore, post-copy).
        .target(name: "PageFaults", dependencies: ["GuestMemory", "SystemCalls"]),
        // One Swift method per ioctl, from one table of requests; typed errors. No policy.
        .target(name: "KVM", dependencies: ["CKVM", "GuestMemory", "SystemCalls"]),
        // Dirty-page tracking policy over KVM's dirty log and dirty ring.
        .target(name: "DirtyTrackers", dependencies: ["KVM", "GuestMemory"]),
        // Ethernet/ARP/IPv4 frames from hostile bytes; announce frames and their schedule; the
        // per-guest egress source filter. Pure: no KVM, no sockets, no clock.
        .target(name: "NetworkFrames"),
        // Pure device state machines (UART, exit port, beacon port, PCI, virtio-net). No KVM, no
        // threads. Its one MAC type is NetworkFrames' (pure too).
        .target(name: "Devices", dependencies: ["NetworkFrames"]),
        // Image formats (flat, Multiboot) -> guest memory + initial CPU state.
        .target(name: "Loader", dependencies: ["GuestMemory"]),
        // The versioned, checksummed stream shared by snapshot files and migration.
        .target(name: "Snapshot", dependencies: ["GuestMemory", "SystemCalls", .product(name: "Crypto", package: "swift-crypto")]),
        // Pre-copy protocol, sender and receiver, transport behind one interface.
        .target(name: "Migration", dependencies: ["Snapshot", "GuestMemory", "SystemCalls", "PageFaults", .product(name: "Crypto", package: "swift-crypto")]),
        // Mutually authenticated TLS 1.3 transport for migration: pinned Ed25519 host keys, no CA.
        .target(name: "SecureChannel", dependencies: [
            "Migration", "SystemCalls",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // The machine: VM + vCPU runners + buses + devices + state capture. Knows nothing of the Billboard.
        .target(name: "MachineCore", dependencies: [
            "KVM", "DirtyTrackers", "GuestMemory", "Devices", "Loader", "Snapshot", "SystemCalls", "NetworkFrames",
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // Signed guest registry, keys, leases, audit (SQLite through GRDB).
        .target(name: "Billboard", dependencies: [
            "SystemCalls", "NetworkFrames",
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
        ]),
        // The admitted guest (a machine and its Billboard session), the doors that make one,
        // snapshot files and the migration service.
        .target(name: "VMM", dependencies: [
            "MachineCore", "KVM", "DirtyTrackers", "GuestMemory", "Devices", "Loader", "Snapshot", "Migration", "Billboard", "SystemCalls",
            "SecureChannel", "NetworkFrames", "PageFaults",
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        // HTTP/JSON control API on a Unix socket, and its client.
        .target(name: "ControlAPI", dependencies: [
            "VMM", "MachineCore", "Migration", "Billboard", "SystemCalls",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(
            name: "vmm",
            dependencies: [
                "VMM", "MachineCore", "ControlAPI", "Migration", "KVM", "GuestMemory", "Loader", "Billboard", "SystemCalls",
                "NetworkFrames", "PageFaults",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Hummingbird", package: "hummingbird"),
            ]
        ),
        // Shared by the test targets that boot guests (not a test target itself).
        .target(name: "TestSupport", dependencies: ["KVM", "SystemCalls"], path: "Tests/TestSupport"),
        .testTarget(name: "SystemCallsTests", dependencies: ["SystemCalls", "TestSupport"]),
        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory"]),
        .testTarget(name: "PageFaultsTests", dependencies: ["PageFaults", "GuestMemory", "SystemCalls"]),
        .testTarget(name: "KVMTests", dependencies: ["KVM"]),
        .testTarget(name: "LoaderTests", dependencies: ["Loader", "GuestMemory"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "NetworkFrames"]),
        .testTarget(name: "NetworkFramesTests", dependencies: ["NetworkFrames"]),
        .testTarget(name: "MachineCoreTests", dependencies: ["TestSupport", "MachineCore", "KVM", "Loader", "GuestMemory", "DirtyTrackers",
                                                     "Devices", "SystemCalls", "NetworkFrames", "Snapshot"]),
        .testTarget(name: "MigrationTests", dependencies: ["Migration", "Snapshot", "GuestMemory", "PageFaults"]),
        .testTarget(name: "SecureChannelTests", dependencies: [
            "SecureChannel", "Migration", "SystemCalls",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "Crypto", package: "swift-crypto"),
        ]),
        .testTarget(name: "BillboardTests", dependencies: [
            "Billboard", "SystemCalls",
            .product(name: "GRDB", package: "GRDB.swift"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "X509", package: "swift-certificates"),
            .product(name: "SwiftASN1", package: "swift-asn1"),
        ]),
        .testTarget(name: "SnapshotTests", dependencies: ["Snapshot", "GuestMemory", "SystemCalls", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "VMMTests", dependencies: ["TestSupport", "SystemCalls", "VMM", "MachineCore", "KVM", "Loader", "GuestMemory", "ControlAPI", "Snapshot", "Migration", "CKVM", "Billboard", "Devices", "NetworkFrames", "PageFaults",
                                               .product(name: "GRDB", package: "GRDB.swift")]),
    ]
)
