import ArgumentParser

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Benchmarks that print figures and write JSON.",
                                                    subcommands: [BootBench.self])
}

struct BootBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "boot", abstract: "Boot latency of the hello guest.")
    func run() throws {}
}
