import Foundation
import Redis
import Testing
import TestSupport
import Worker

/// Every test that takes a `Driver` runs twice: a client with a thread of its own, and one the worker's loop drives.
@Suite("Redis against a real redis-server")
struct RedisClientTests {
    @Test(arguments: Driver.allCases) func everyReplyType(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, driver: driver)
        defer { client.close() }
        try await client.connect()
        #expect(client.isConnected)
        #expect(try await client.send(["SET", "k", "v"]) == .simpleString("OK"))
        #expect(try await client.send(["GET", "k"]) == .bulk(Array("v".utf8)))
        #expect(try await client.send(["GET", "missing"]) == .null)
        #expect(try await client.send(["INCRBY", "n", "41"]) == .integer(41))
        _ = try await client.send(["RPUSH", "l", "a", "b"])
        #expect(try await client.send(["LRANGE", "l", "0", "-1"]) == .array([.bulk([97]), .bulk([98])]))
        let nested = try await client.send(["EVAL", "return {1, {'x', 2}, redis.status_reply('FINE')}", "0"])
        #expect(nested == .array([.integer(1), .array([.bulk([120]), .integer(2)]), .simpleString("FINE")]))
        #expect(try await client.send(["BLPOP", "nothing", "0.01"]) == .null)

        let err = await #expect(throws: RedisError.self) { try await client.send(["NOSUCHCOMMAND"]) }
        #expect(err?.code == .server)
        #expect(err?.underlying?.hasPrefix("ERR") == true)
        // An error reply does not break the connection.
        #expect(try await client.send(["PING"]) == .simpleString("PONG"))
    }

    @Test(arguments: Driver.allCases) func binarySafeArguments(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, driver: driver)
        defer { client.close() }
        let key: [UInt8] = [0x06, 0x16, 0x00, 0x41, 0xff]
        let value: [UInt8] = [0, 1, 2, 0, 0xfe, 0x0d, 0x0a, 0]
        _ = try await client.send(bytes: [Array("SET".utf8), key, value])
        #expect(try await client.send(bytes: [Array("GET".utf8), key]) == .bulk(value))
        #expect(try await client.send(bytes: [Array("STRLEN".utf8), key]) == .integer(8))
        // The \x06\x16 separator kombu uses in its keys.
        let kombuKey = "_kombu.binding.default\u{06}\u{16}"
        _ = try await client.send(["SADD", kombuKey, "x\u{06}\u{16}y"])
        #expect(try await client.send(["SMEMBERS", kombuKey]) == .array([.bulk(Array("x\u{06}\u{16}y".utf8))]))
        #expect(try await client.send(["SET", "empty", ""]) == .simpleString("OK"))
        #expect(try await client.send(["GET", "empty"]) == .bulk([]))
    }

    @Test(arguments: Driver.allCases) func pipelineKeepsErrorsInPlace(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, driver: driver)
        defer { client.close() }
        let replies = try await client.pipeline([
            ["SET", "a", "1"], ["INCR", "a"], ["LPUSH", "a", "x"], ["GET", "a"], ["PING"],
        ])
        #expect(replies.count == 5)
        #expect(replies[0] == .simpleString("OK"))
        #expect(replies[1] == .integer(2))
        guard case .error(let e) = replies[2] else { Issue.record("expected WRONGTYPE, got \(replies[2])"); return }
        #expect(e.hasPrefix("WRONGTYPE"))
        #expect(replies[3] == .bulk(Array("2".utf8)))
        #expect(replies[4] == .simpleString("PONG"))
        #expect(try await client.pipeline([]) == [])
    }

    @Test(arguments: Driver.allCases) func scriptsBySHAReloadAfterFlush(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, driver: driver)
        defer { client.close() }
        let script = RedisScript(name: "add", source: "return redis.call('INCRBY', KEYS[1], ARGV[1])")
        let loaded = try await client.send(["SCRIPT", "LOAD", script.source])
        #expect(loaded.string == script.sha1)
        #expect(try await client.eval(script, keys: ["c"], args: ["5"]) == .integer(5))
        _ = try await client.send(["SCRIPT", "FLUSH"])
        #expect(try await client.eval(script, keys: ["c"], args: ["2"]) == .integer(7))

        let bare = await #expect(throws: RedisError.self) {
            _ = try await client.send(["SCRIPT", "FLUSH"])
            _ = try await client.send(["EVALSHA", script.sha1, "1", "c", "1"])
        }
        #expect(bare?.code == .noScript)

        let other = RedisScript(name: "get", source: "return redis.call('GET', KEYS[1])")
        let failing = RedisScript(name: "fail", source: "return redis.error_reply('NOPE')")
        let replies = try await client.evalPipeline([
            (script, keys: ["c"], args: ["1"]), (other, keys: ["c"], args: []), (failing, keys: [], args: []),
            (script, keys: ["c"], args: ["1"]),
        ])
        #expect(replies[0] == .integer(8))
        #expect(replies[1] == .bulk(Array("8".utf8)))
        #expect(replies[2].isError(endingWith: "NOPE"))
        #expect(replies[3] == .integer(9))

        let thrown = await #expect(throws: RedisError.self) { try await client.eval(failing, keys: [], args: []) }
        #expect(thrown?.code == .server)
        #expect(thrown?.message.contains("fail") == true)
    }

    @Test(arguments: Driver.allCases) func serverTime(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, driver: driver)
        defer { client.close() }
        // between the moments just before and just after the call (how long it took does not matter: the loop a
        // loop-driven client shares with other tests may be held up for a while)
        let before = Int64(Date().timeIntervalSince1970)
        let t = try await client.time()
        let after = Int64(Date().timeIntervalSince1970)
        #expect(t.seconds >= before - 1 && t.seconds <= after + 1)
        #expect((0..<1_000_000).contains(t.microseconds))
        #expect(t.milliseconds / 1000 == t.seconds)
    }

    @Test(arguments: Driver.allCases) func authWithRequirepassAndACLUser(driver: Driver) async throws {
        let server = try await startRedis(password: "p@ss:w/rd")
        let admin = try redisClient(server.url, driver: driver)
        defer { admin.close() }
        #expect(try await admin.send(["PING"]) == .simpleString("PONG"))
        _ = try await admin.send(["ACL", "SETUSER", "alice", "on", ">s3cret", "~*", "+@all"])

        let alice = try redisClient("redis://alice:s3cret@127.0.0.1:\(server.port)/0", driver: driver)
        defer { alice.close() }
        #expect(try await alice.send(["ACL", "WHOAMI"]).string == "alice")

        let wrong = try redisClient("redis://alice:nope@127.0.0.1:\(server.port)/0", driver: driver)
        let err = await #expect(throws: RedisError.self) { try await wrong.connect() }
        #expect(err?.code == .authFailed)
        #expect(err?.message.contains("127.0.0.1:\(server.port)") == true)
        #expect(err?.message.contains("nope") == false)

        let none = try redisClient("redis://127.0.0.1:\(server.port)/0", driver: driver)
        let noauth = await #expect(throws: RedisError.self) { try await none.send(["GET", "x"]) }
        #expect(noauth?.underlying?.hasPrefix("NOAUTH") == true)
    }

    @Test(arguments: Driver.allCases) func databaseIndexIsSelectedOnConnect(driver: Driver) async throws {
        let server = try await startRedis()
        let db3 = try redisClient("redis://127.0.0.1:\(server.port)/3", driver: driver)
        let db0 = try redisClient(server.url, driver: driver)
        defer { db3.close(); db0.close() }
        _ = try await db3.send(["SET", "where", "three"])
        #expect(try await db0.send(["GET", "where"]) == .null)
        #expect(try await db3.send(["GET", "where"]).string == "three")
        #expect(try await db0.send(["SELECT", "3"]) == .simpleString("OK"))
        #expect(try await db0.send(["GET", "where"]).string == "three")
    }

    @Test(arguments: Driver.allCases) func reconnectsAfterServerRestart(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, driver: driver)
        defer { client.close() }
        _ = try await client.send(["SET", "k", "1"])
        server.kill(signal: SIGKILL)

        let first = await #expect(throws: RedisError.self) { try await client.send(["GET", "k"]) }
        #expect(first?.code == .io || first?.code == .connectionFailed)
        #expect(!client.isConnected)
        let down = await #expect(throws: RedisError.self) { try await client.send(["GET", "k"]) }
        #expect(down?.code == .connectionFailed)
        #expect(down?.message.contains("127.0.0.1:\(server.port) (db 0)") == true)
        #expect(down?.message.contains("Connection refused") == true)

        try await offPool { try server.restart() }
        #expect(try await client.send(["SET", "k", "2"]) == .simpleString("OK"))
        #expect(client.isConnected)
        #expect(try await client.send(["GET", "k"]).string == "2")
    }

    @Test(arguments: Driver.allCases) func deadServerAtStartupSaysWhatToDo(driver: Driver) async throws {
        let port = freeLoopbackPort()
        let client = try redisClient("redis://:secret@127.0.0.1:\(port)/0", driver: driver)
        let err = await #expect(throws: RedisError.self) { try await client.connect() }
        #expect(err?.code == .connectionFailed)
        #expect(err?.message.hasPrefix("cannot connect to Redis at 127.0.0.1:\(port) (db 0): Connection refused") == true)
        #expect(err?.message.contains("AIRFLOW__CELERY__BROKER_URL") == true)
        #expect(err?.message.contains("secret") == false)
        #expect(err?.underlying != nil)
    }

    @Test(arguments: Driver.allCases) func commandTimeoutResetsTheConnection(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, commandTimeout: .milliseconds(200), driver: driver)
        defer { client.close() }
        let err = await #expect(throws: RedisError.self) { try await client.send(["BLPOP", "nothing", "5"]) }
        #expect(err?.code == .timeout)
        #expect(try await sendAllowingSlowMachine(client, ["PING"]) == .simpleString("PONG"))
    }

    @Test(arguments: Driver.allCases) func fiftyConcurrentSends(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, driver: driver)
        defer { client.close() }
        let results = try await withThrowingTaskGroup(of: Int64.self) { group in
            for i in 0..<50 {
                // half from the worker loop's own thread (a loop-driven client then writes at once, no hand-over)
                group.addTask(executorPreference: i.isMultiple(of: 2) ? WorkerLoop.shared : nil) {
                    _ = try await client.send(["SET", "key:\(i)", "\(i)"])
                    return try await client.send(["INCR", "counter"]).int ?? -1
                }
            }
            var all: [Int64] = []
            for try await r in group { all.append(r) }
            return all
        }
        #expect(Set(results) == Set(1...50))
        #expect(try await client.send(["GET", "key:49"]).string == "49")
    }

    /// Values far larger than a socket buffer, pipelined: a write that does not fit goes out in parts (a
    /// loop-driven client waits for the socket to be writable again) and a reply arrives over many reads.
    @Test(arguments: Driver.allCases) func largeValuesCrossTheSocketBuffer(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, driver: driver)
        defer { client.close() }
        // filled with memset, marked at a few places (a byte-by-byte build kept the shared test pool's threads busy
        // for seconds in a debug build and starved other tests)
        let big = (0..<4).map { i -> [UInt8] in
            var v = [UInt8](repeating: UInt8(i + 1), count: 6 << 20)
            for at in [0, 65_535, 65_536, 3 << 20, (6 << 20) - 1] { v[at] = UInt8(200 + i) }
            return v
        }
        for (i, value) in big.enumerated() { _ = try await client.send(bytes: [Array("SET".utf8), Array("big:\(i)".utf8), value]) }
        let strlens = try await client.pipeline((0..<4).map { ["STRLEN", "big:\($0)"] })
        #expect(strlens == Array(repeating: .integer(6 << 20), count: 4))
        let back = try await client.pipeline((0..<4).map { ["GET", "big:\($0)"] })
        #expect(back.map(\.bytes) == big.map { Optional($0) })
        #expect(try await client.send(["PING"]) == .simpleString("PONG"))
    }

    /// A frozen server (SIGSTOP): every call waiting for it fails with a timeout that says what happened, and
    /// once the server runs again the next call reconnects and works.
    @Test(arguments: Driver.allCases) func frozenServerTimesOutEveryWaitingCall(driver: Driver) async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, commandTimeout: .milliseconds(300), driver: driver)
        defer { client.close() }
        _ = try await sendAllowingSlowMachine(client, ["SET", "k", "1"])  // connected before the freeze
        server.kill(signal: SIGSTOP)
        let errors = await withTaskGroup(of: RedisError?.self) { group in
            for i in 0..<8 {
                group.addTask { await redisError { _ = try await client.send(["INCR", "n\(i)"]) } }
            }
            var all: [RedisError?] = []
            for await e in group { all.append(e) }
            return all
        }
        server.kill(signal: SIGCONT)
        #expect(errors.count == 8)
        #expect(errors.allSatisfy { $0?.code == .timeout })
        #expect(errors.allSatisfy { $0?.message.contains("did not answer INCR within 300ms") == true })
        #expect(try await sendAllowingSlowMachine(client, ["GET", "k"]).string == "1")
    }

    /// Closing a loop-driven client fails its unanswered calls at once (they do not wait out the command
    /// timeout) and refuses new ones.
    @Test func closedLoopClientFailsUnansweredCalls() async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, commandTimeout: .seconds(30), driver: .loop)
        try await client.connect()
        server.kill(signal: SIGSTOP)
        defer { server.kill(signal: SIGCONT) }
        let call = Task { await redisError { _ = try await client.send(["PING"]) } }
        try await Task.sleep(for: .milliseconds(100))  // the PING is on the wire
        client.close()
        let error = await call.value
        #expect(error?.code == .closed)  // not .timeout: it did not wait out the 30 s
        let after = await #expect(throws: RedisError.self) { try await client.send(["PING"]) }
        #expect(after?.code == .closed)
    }

    /// A loop-driven client dropped without `close()` does not leave its socket open and registered with the loop.
    @Test func droppedLoopClientClosesItsConnection() async throws {
        let server = try await startRedis()
        let observer = try redisClient(server.url)
        defer { observer.close() }
        func connections() async throws -> Int {
            (try await observer.send(["CLIENT", "LIST"]).string ?? "").split(separator: "\n").count
        }
        let before = try await connections()
        do {
            let client = try redisClient(server.url, driver: .loop)
            #expect(try await client.send(["PING"]) == .simpleString("PONG"))
            #expect(try await connections() == before + 1)
        }
        #expect(try await eventually(.seconds(10)) { try await connections() == before })
    }

    /// A descriptor this process has open, not close-on-exec, while the harness starts a server (a socket another
    /// test opened a moment earlier): the server must not hold it — a dropped client's connection then stayed open
    /// in CLIENT LIST for that server's whole life (droppedLoopClientClosesItsConnection failed that way once).
    @Test func serversInheritNoDescriptors() async throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)  // plain pipe(): not close-on-exec
        defer { close(fds[0]); close(fds[1]) }
        let server = try await startRedis()
        let inherited = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(server.pid)/fd").compactMap(Int32.init)
            .filter { $0 > 2 }
            .compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(server.pid)/fd/\($0)") }
        let ours = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fds[0])")
        #expect(!inherited.contains(ours), "redis-server holds the test's pipe \(ours): \(inherited)")
    }

    @Test(arguments: Driver.allCases) func unixSocket(driver: Driver) async throws {
        let dir = NSTemporaryDirectory() + "tandem-sock-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = try await startRedis(extraArguments: ["--unixsocket", dir + "/r.sock", "--unixsocketperm", "700"])
        let client = try redisClient("redis+socket://\(dir)/r.sock?virtual_host=2", driver: driver)
        defer { client.close() }
        _ = try await client.send(["SET", "via", "socket"])
        let tcp = try redisClient("redis://127.0.0.1:\(server.port)/2", driver: driver)
        defer { tcp.close() }
        #expect(try await tcp.send(["GET", "via"]).string == "socket")
    }

    @Test func subscriberReceivesAndResubscribesAfterRestart() async throws {
        let server = try await startRedis()
        let publisher = try redisClient(server.url)
        let subscriber = RedisSubscriber(configuration: try RedisConfiguration(url: server.url), logger: quietLogger)
        defer { publisher.close(); subscriber.close() }
        let stream = subscriber.subscribe(channels: ["ch1", "ch2"])
        var iterator = stream.makeAsyncIterator()

        #expect(try await eventually { try await publisher.send(["PUBLISH", "ch2", "hello\u{0}"]).int == 1 })
        let first = try await iterator.next()
        #expect(first?.channel == "ch2")
        #expect(first?.message == Array("hello\u{0}".utf8))

        try await offPool { try server.restart() }
        #expect(try await eventually { try await publisher.send(["PUBLISH", "ch1", "again"]).int == 1 })
        let second = try await iterator.next()
        #expect(second?.channel == "ch1")
        #expect(second?.message == Array("again".utf8))

        subscriber.close()
        #expect(try await iterator.next() == nil)
    }
}
