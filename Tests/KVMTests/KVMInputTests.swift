#if canImport(Glibc)
import Glibc
#endif
import Testing
import KVM

@Suite("KVM errors name the device, the ioctl and errno")
struct KVMInputTests {
    @Test("a missing KVM device is a clear error naming the path and what to do")
    func missingKVMDevice() {
        do {
            _ = try KVMSystem(path: "/nonexistent/kvm")
            Issue.record("opened a missing device")
        } catch {
            #expect(error.errno == ENOENT)
            #expect(error.description.contains("/nonexistent/kvm"))
            #expect(error.description.contains("modprobe"))
        }
    }

    @Test("a device that is not KVM fails on KVM_GET_API_VERSION with the ioctl and errno named")
    func notAKVMDevice() {
        do {
            _ = try KVMSystem(path: "/dev/null")
            Issue.record("/dev/null accepted as KVM")
        } catch {
            #expect(error.operation == "KVM_GET_API_VERSION")
            #expect(error.description.contains("ENOTTY"))
        }
    }

    @Test("any KVM API version other than 12 is refused")
    func apiVersionCheck() throws {
        #expect(throws: KVMError.self) { try KVMSystem.checkAPIVersion(11) }
        #expect(throws: KVMError.self) { try KVMSystem.checkAPIVersion(13) }
        try KVMSystem.checkAPIVersion(12)
    }
}
