// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "SwiftVMM",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vmm", targets: ["vmm"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        // <linux/kvm.h>, ioctl request numbers as constants, non-variadic shims. No logic.
        .target(name: "CKVM", path: "CKVM"),
        // Guest-physical address space; bounds-checked access; raw pointers stay inside.
        .target(name: "GuestMemory"),
        // One Swift method per ioctl; owning fds; typed errors.
        .target(name: "KVM", dependencies: ["CKVM", "GuestMemory"]),
        // Pure device state machines (UART, exit port). No KVM, no threads.
        .target(name: "Devices"),
        // Image formats (flat, Multiboot) -> guest memory + initial CPU state.
        .target(name: "Loader", dependencies: ["GuestMemory"]),
        // The machine: VM + vCPU threads + exit dispatch.
        .target(name: "VMM", dependencies: ["KVM", "GuestMemory", "Devices", "Loader"]),
        .executableTarget(
            name: "vmm",
            dependencies: ["VMM", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(name: "GuestMemoryTests", dependencies: ["GuestMemory", "Loader", "Devices"]),
        .testTarget(name: "VMMTests", dependencies: ["VMM", "KVM", "Loader", "GuestMemory"]),
    ]
)
