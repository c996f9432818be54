import Foundation

/// What one run of the executorctl binary did.
public struct Run: CustomStringConvertible, Sendable {
    public var code: Int32
    public var out: String
    public var err: String
    public var description: String { "exit \(code)\n--- stdout\n\(out)\n--- stderr\n\(err)" }
    public func json() throws -> Any { try JSONSerialization.jsonObject(with: Data(out.utf8)) }
    public var errLines: [Substring] { err.split(separator: "\n") }
}

/// Runs the built executorctl with stdin from /dev/null (no terminal: confirmations refuse) and stdout to a file.
public func executorctl(_ args: [String], env: [String: String] = [:]) async throws -> Run {
    let bin = try Repo.binary("executorctl")
    return try await offPool {
        let dir = NSTemporaryDirectory() + "ctl-" + UUID().uuidString.prefix(8)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        FileManager.default.createFile(atPath: dir + "/out", contents: nil)
        FileManager.default.createFile(atPath: dir + "/err", contents: nil)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: bin)
        p.arguments = args
        var e = ProcessInfo.processInfo.environment
        for k in e.keys where k.hasPrefix("AIRFLOW__") || k.hasPrefix("TANDEM_") { e[k] = nil }
        for (k, v) in env { e[k] = v }
        p.environment = e
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle(forWritingAtPath: dir + "/out")!
        p.standardError = FileHandle(forWritingAtPath: dir + "/err")!
        try p.run()
        p.waitUntilExit()
        return Run(
            code: p.terminationStatus,
            out: (try? String(contentsOfFile: dir + "/out", encoding: .utf8)) ?? "",
            err: (try? String(contentsOfFile: dir + "/err", encoding: .utf8)) ?? "")
    }
}
