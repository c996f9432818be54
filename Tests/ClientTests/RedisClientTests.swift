import Foundation
import Redis
import Testing
import TestSupport

@Suite("Redis against a real redis-server")
struct RedisClientTests {
    @Test func everyReplyType() async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url)
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

    @Test func binarySafeArguments() async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url)
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

    @Test func pipelineKeepsErrorsInPlace() async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url)
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

    @Test func scriptsBySHAReloadAfterFlush() async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url)
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

    @Test func serverTime() async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url)
        defer { client.close() }
        let t = try await client.time()
        let now = Int64(Date().timeIntervalSince1970)
        #expect(abs(t.seconds - now) < 5)
        #expect((0..<1_000_000).contains(t.microseconds))
        #expect(t.milliseconds / 1000 == t.seconds)
    }

    @Test func authWithRequirepassAndACLUser() async throws {
        let server = try await startRedis(password: "p@ss:w/rd")
        let admin = try redisClient(server.url)
        defer { admin.close() }
        #expect(try await admin.send(["PING"]) == .simpleString("PONG"))
        _ = try await admin.send(["ACL", "SETUSER", "alice", "on", ">s3cret", "~*", "+@all"])

        let alice = try redisClient("redis://alice:s3cret@127.0.0.1:\(server.port)/0")
        defer { alice.close() }
        #expect(try await alice.send(["ACL", "WHOAMI"]).string == "alice")

        let wrong = try redisClient("redis://alice:nope@127.0.0.1:\(server.port)/0")
        let err = await #expect(throws: RedisError.self) { try await wrong.connect() }
        #expect(err?.code == .authFailed)
        #expect(err?.message.contains("127.0.0.1:\(server.port)") == true)
        #expect(err?.message.contains("nope") == false)

        let none = try redisClient("redis://127.0.0.1:\(server.port)/0")
        let noauth = await #expect(throws: RedisError.self) { try await none.send(["GET", "x"]) }
        #expect(noauth?.underlying?.hasPrefix("NOAUTH") == true)
    }

    @Test func databaseIndexIsSelectedOnConnect() async throws {
        let server = try await startRedis()
        let db3 = try redisClient("redis://127.0.0.1:\(server.port)/3")
        let db0 = try redisClient(server.url)
        defer { db3.close(); db0.close() }
        _ = try await db3.send(["SET", "where", "three"])
        #expect(try await db0.send(["GET", "where"]) == .null)
        #expect(try await db3.send(["GET", "where"]).string == "three")
        #expect(try await db0.send(["SELECT", "3"]) == .simpleString("OK"))
        #expect(try await db0.send(["GET", "where"]).string == "three")
    }

    @Test func reconnectsAfterServerRestart() async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url)
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

    @Test func deadServerAtStartupSaysWhatToDo() async throws {
        let port = freeLoopbackPort()
        let client = try redisClient("redis://:secret@127.0.0.1:\(port)/0")
        let err = await #expect(throws: RedisError.self) { try await client.connect() }
        #expect(err?.code == .connectionFailed)
        #expect(err?.message.hasPrefix("cannot connect to Redis at 127.0.0.1:\(port) (db 0): Connection refused") == true)
        #expect(err?.message.contains("AIRFLOW__CELERY__BROKER_URL") == true)
        #expect(err?.message.contains("secret") == false)
        #expect(err?.underlying != nil)
    }

    @Test func commandTimeoutResetsTheConnection() async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url, commandTimeout: .milliseconds(200))
        defer { client.close() }
        let err = await #expect(throws: RedisError.self) { try await client.send(["BLPOP", "nothing", "5"]) }
        #expect(err?.code == .timeout)
        #expect(try await client.send(["PING"]) == .simpleString("PONG"))
    }

    @Test func fiftyConcurrentSends() async throws {
        let server = try await startRedis()
        let client = try redisClient(server.url)
        defer { client.close() }
        let results = try await withThrowingTaskGroup(of: Int64.self) { group in
            for i in 0..<50 {
                group.addTask {
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

    @Test func unixSocket() async throws {
        let dir = NSTemporaryDirectory() + "tandem-sock-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = try await startRedis(extraArguments: ["--unixsocket", dir + "/r.sock", "--unixsocketperm", "700"])
        let client = try redisClient("redis+socket://\(dir)/r.sock?virtual_host=2")
        defer { client.close() }
        _ = try await client.send(["SET", "via", "socket"])
        let tcp = try redisClient("redis://127.0.0.1:\(server.port)/2")
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
