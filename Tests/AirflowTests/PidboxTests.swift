import CeleryWire
import Foundation
import Logging
import Pidbox
import Redis
import Testing
import TestSupport

/// Revoke and ping with the real Python celery client (5.6, from the Airflow venv).
@Suite("pidbox", .serialized)
struct PidboxTests {
    final class Signals: @unchecked Sendable {
        let lock = NSLock()
        var got: [(String, Int32)] = []
        func add(_ id: String, _ s: Int32) { lock.withLock { got.append((id, s)) } }
        var all: [(String, Int32)] { lock.withLock { got } }
    }

    static let client = """
        import sys, json
        from celery import Celery
        app = Celery(broker=sys.argv[1])
        cmd = sys.argv[2]
        if cmd == "revoke":
            app.control.revoke(sys.argv[3], terminate=True, signal="SIGKILL")
            app.control.revoke(sys.argv[4])
            print("sent")
        elif cmd == "ping":  # limit=1: back on the one reply; the long timeout is for a busy machine
            print(json.dumps(app.control.ping(timeout=15.0, limit=1)))
        elif cmd == "inspect":
            print(json.dumps(app.control.inspect(timeout=15.0, limit=1).ping()))
        elif cmd == "inspect-other":
            print(json.dumps(app.control.inspect(timeout=1.0, destination=["celery@nowhere"]).ping()))
        """

    /// Redis drops what is published before a subscription exists: wait until the service's is in place (a fixed
    /// pause was too short once in a loaded full-suite run and the revokes were never seen).
    static func waitSubscribed(_ config: RedisConfiguration) async throws {
        let c = RedisClient(configuration: config, logger: AF.logger)
        defer { c.close() }
        let channel = PidboxMessage.channel(db: config.database)
        for _ in 0..<1500 {
            let r = try await c.send(["PUBSUB", "NUMSUB", channel])
            if let n = r.array?.last?.int, n > 0 { return }
            try await Task.sleep(for: .milliseconds(20))
        }
        Issue.record("the pidbox service never subscribed to \(channel)")
    }

    @Test("revoke with terminate from app.control: recorded durably, running task signalled, a late worker honours it")
    func revoke() async throws {
        let redis = try await offPool { try RedisServer.start() }
        defer { redis.stop() }
        let config = try RedisConfiguration(url: redis.url)
        let svc = PidboxService(configuration: config, nodeName: "tandem@test-east", logger: AF.logger)
        let signals = Signals()
        svc.start { id, sig in signals.add(id, sig) }
        defer { svc.stop() }
        try await Self.waitSubscribed(config)
        let out = try await offPoolRun(Self.client, args: [redis.url, "revoke", "task-running", "task-queued"])
        #expect(out.status == 0, "\(out.stderr)")
        // both broadcasts handled (up to 20 s on a loaded machine; it usually takes milliseconds)
        for _ in 0..<1000 where svc.handledCount("revoke") < 2 { try await Task.sleep(for: .milliseconds(20)) }
        #expect(svc.handledCount("revoke") == 2)
        #expect(signals.all.map(\.0) == ["task-running"])
        #expect(signals.all.first?.1 == SIGKILL)
        #expect(await svc.isRevoked("task-running"))
        #expect(await svc.isRevoked("task-queued"))
        #expect(!(await svc.isRevoked("other")))

        // a worker that was not listening still sees both revokes (from Redis)
        let late = PidboxService(configuration: config, nodeName: "tandem@test-west", logger: AF.logger)
        defer { late.stop() }
        #expect(await late.isRevoked("task-queued"))
        let c = RedisClient(configuration: config, logger: AF.logger)
        defer { c.close() }
        let score = try await c.send(["ZSCORE", PidboxService.revokedKey, "task-queued"]).string.flatMap { Double($0) } ?? 0
        let now = Double(try await c.time().milliseconds)
        #expect(score > now + 86_000_000 && score <= now + 86_400_000, "expires in 24 h")
    }

    /// Celery's broadcasts expire a second after they are sent. Whether one is stale is judged by when it came off
    /// the wire, not by when its turn to be handled came (behind a slow earlier message).
    @Test("a revoke that arrived in time is honoured even when handled after its expiry; one that arrived late is not")
    func expiryIsJudgedOnArrival() async throws {
        let redis = try await offPool { try RedisServer.start() }
        defer { redis.stop() }
        let config = try RedisConfiguration(url: redis.url)
        let tap = RedisSubscriber(configuration: config, logger: AF.logger)
        defer { tap.close() }
        var messages = tap.subscribe(channels: [PidboxMessage.channel(db: config.database)]).makeAsyncIterator()
        try await Self.waitSubscribed(config)
        let out = try await offPoolRun(Self.client, args: [redis.url, "revoke", "task-a", "task-b"])
        #expect(out.status == 0, "\(out.stderr)")
        guard let first = try await messages.next() else { Issue.record("no broadcast seen"); return }
        let expires = try #require(try PidboxMessage.decode(first.message).expires)
        // wait until the broadcast has expired
        while Date().timeIntervalSince1970 <= expires { try await Task.sleep(for: .milliseconds(50)) }

        let svc = PidboxService(configuration: config, nodeName: "tandem@test-east", logger: AF.logger)
        await svc.handle(first.message)  // as if it came off the wire only now: stale
        #expect(svc.handledCount("revoke") == 0)
        #expect(!(await svc.isRevoked("task-a")))
        await svc.handle(first.message, receivedAt: first.receivedAt)  // it came in time
        #expect(svc.handledCount("revoke") == 1)
        #expect(await svc.isRevoked("task-a"))
    }

    @Test("app.control.ping() and inspect().ping() see the worker")
    func ping() async throws {
        let redis = try await offPool { try RedisServer.start() }
        defer { redis.stop() }
        let config = try RedisConfiguration(url: redis.url)
        let svc = PidboxService(configuration: config, nodeName: "tandem@test-east", logger: AF.logger)
        svc.start { _, _ in }
        defer { svc.stop() }
        try await Self.waitSubscribed(config)
        let p = try await offPoolRun(Self.client, args: [redis.url, "ping"])
        #expect(p.status == 0, "\(p.stderr)")
        #expect(p.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == #"[{"tandem@test-east": {"ok": "pong"}}]"#)
        let i = try await offPoolRun(Self.client, args: [redis.url, "inspect"])
        #expect(i.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == #"{"tandem@test-east": {"ok": "pong"}}"#)
        let o = try await offPoolRun(Self.client, args: [redis.url, "inspect-other"])
        #expect(o.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "null", "a ping for another node gets no reply")
    }
}
