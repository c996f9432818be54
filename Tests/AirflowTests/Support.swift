import Foundation
import Logging
import TestSupport

/// Paths and Python helpers for the Airflow tests. The venv comes from `scripts/pyenv airflow`; a missing one
/// fails the test with that instruction (never a silent skip).
enum AF {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    static let python = root + "/.venv/airflow/bin/python"
    static let runner = root + "/Workers/runner/tandem_runner.py"

    static func requirePython() throws -> String {
        guard FileManager.default.isExecutableFile(atPath: python) else {
            throw TestSupportError("\(python) missing — run scripts/pyenv airflow")
        }
        return python
    }

    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    /// Runs a Python script with the Airflow venv; blocking, so call it through `offPool` from async tests.
    static func run(_ script: String, args: [String] = [], env: [String: String] = [:], stdin: String? = nil) throws -> Output {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try requirePython())
        p.arguments = ["-c", script] + args
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        p.environment = e
        let out = Pipe()
        let err = Pipe()
        let input = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = input
        try p.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try? input.fileHandleForWriting.close()
        // read both pipes concurrently so neither fills up
        let errData = LockedData()
        let t = Thread { errData.set(err.fileHandleForReading.readDataToEndOfFile()) }
        t.start()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        while !errData.done { usleep(1000) }
        return Output(
            status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
            stderr: String(decoding: errData.get(), as: UTF8.self))
    }

    final class LockedData: @unchecked Sendable {
        private let lock = NSLock()
        private var data = Data()
        private(set) var done = false
        func set(_ d: Data) { lock.withLock { data = d; done = true } }
        func get() -> Data { lock.withLock { data } }
    }

    static func tempDir(_ prefix: String) -> String {
        let d = NSTemporaryDirectory() + "\(prefix)-\(getpid())-\(UUID().uuidString.prefix(8))"
        try? FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        return d
    }

    static var logger: Logger {
        var l = Logger(label: "airflow-tests")
        l.logLevel = .warning
        return l
    }
}
