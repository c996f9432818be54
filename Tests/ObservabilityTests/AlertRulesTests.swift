import Foundation
import Testing
import TestSupport

/// The shipped alert rules (`examples/monitoring`) are valid and fire as their unit tests say, by Prometheus's
/// own `promtool`: a rule whose expression cannot see a failure (`max()` over no series at all) fails here.
@Suite("Alert rules, checked by promtool")
struct AlertRulesTests {
    func promtool(_ args: [String]) async throws -> (code: Int32, output: String) {
        let binary = try TestEnvironment.requirePromtool()
        return try await offPool {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: binary)
            p.arguments = args
            p.currentDirectoryURL = URL(fileURLWithPath: Repo.root + "/examples/monitoring")
            let pipe = Pipe()
            p.standardOutput = pipe
            p.standardError = pipe
            try p.run()
            let out = pipe.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            return (p.terminationStatus, String(decoding: out, as: UTF8.self))
        }
    }

    @Test func rulesAreValidAndTheirUnitTestsPass() async throws {
        let check = try await promtool(["check", "rules", "tandem-alerts.yml"])
        #expect(check.code == 0 && check.output.contains("SUCCESS"), "\(check.output)")
        let test = try await promtool(["test", "rules", "tandem-alerts.test.yml"])
        #expect(test.code == 0 && test.output.contains("SUCCESS"), "\(test.output)")
    }
}
