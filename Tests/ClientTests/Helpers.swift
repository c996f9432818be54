import Foundation
import Logging
import Redis
import Testing
import Worker

let quietLogger = Logger(label: "client-tests", factory: { _ in SwiftLogNoOpLogHandler() })

/// How a test's Redis client does its I/O: on a connection thread of its own, or on the worker's loop (an IOLoop).
enum Driver: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case thread, loop
    var testDescription: String { rawValue }
}

func redisClient(
    _ url: String, database: Int? = nil, commandTimeout: Duration? = .seconds(10), driver: Driver = .thread
) throws -> RedisClient {
    var config = try RedisConfiguration(url: url)
    if let database { config.database = database }
    config.commandTimeout = commandTimeout
    return RedisClient(configuration: config, logger: quietLogger, loop: driver == .loop ? WorkerLoop.shared : nil)
}

/// The RedisError `call` threw, or nil when it succeeded.
func redisError(_ call: () async throws -> Void) async -> RedisError? {
    do {
        try await call()
        return nil
    } catch { return error as? RedisError }
}

/// `command`'s reply from a client with a deliberately short command timeout, for the calls around what a test
/// times out on purpose: on a machine busy with the whole suite a healthy server can miss a 300 ms limit, so a
/// timeout here is retried (a few times; anything else is thrown). The call under test is never sent through this.
func sendAllowingSlowMachine(_ client: RedisClient, _ command: [String], attempts: Int = 5) async throws(RedisError) -> RedisValue {
    var attempt = 1
    while true {
        do { return try await client.send(command) } catch {
            if error.code != .timeout || attempt == attempts { throw error }
            attempt += 1
        }
    }
}

/// Polls `body` until it returns true or `timeout` passes.
func eventually(_ timeout: Duration = .seconds(20), every: Duration = .milliseconds(100),
                _ body: () async throws -> Bool) async throws -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if (try? await body()) == true { return true }
        try await Task.sleep(for: every)
    }
    return try await body()
}

import TestSupport

func startRedis(extraArguments: [String] = [], password: String? = nil) async throws -> RedisServer {
    try await offPool { try RedisServer.start(extraArguments: extraArguments, password: password) }
}

func startSentinel(masterPort: Int, masterName: String, quorum: Int) async throws -> RedisServer {
    try await offPool { try RedisServer.startSentinel(masterPort: masterPort, masterName: masterName, quorum: quorum) }
}

func freshDatabase() async throws -> String {
    try await offPool { try PostgresServer.shared().createDatabase() }
}

extension RedisValue {
    func isError(endingWith suffix: String) -> Bool {
        if case .error(let e) = self { return e.hasSuffix(suffix) }
        return false
    }
}
