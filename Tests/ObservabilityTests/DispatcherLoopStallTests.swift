import ClientSupport
import Dispatcher
import Foundation
import Logging
import Observability
import Redis
import TandemCore
import TandemRedis
import Testing
import TestSupport

/// The dispatcher's cycle runs on one loop thread (`DispatcherRuntime.run(on:)`); held up, nothing moves, so the
/// pool watches it: the stall shows in the gauge and in /readyz's reason, and both clear once the loop runs again.
@Suite("Dispatcher loop stall watch (real Redis)")
struct DispatcherLoopStallTests {
    @Test("a held-up dispatcher loop is reported (gauge, not ready with the reason) and clears once it runs again")
    func heldUpLoopIsReported() async throws {
        let server = try RedisServer.start()
        let loop = EventLoopThread(name: "test-dstall")
        let broker = RedisBroker(
            configuration: try RedisConfiguration(url: server.url), logger: Logger(label: "t"), loop: loop, allCallsOnLoop: true)
        try await broker.connect()
        defer { broker.close() }
        var config = DispatcherConfiguration(policy: RoutingPolicy(), queues: ["default"], dispatcherID: "d-test")
        config.loopStallWarning = .seconds(1)
        let observer = PrometheusDispatcherObserver()
        observer.loopStallLimit = 1
        let runtime = DispatcherRuntime(
            configuration: config, broker: broker, logger: Logger(label: "t", factory: { _ in SwiftLogNoOpLogHandler() }),
            observer: observer)
        let running = Task { await runtime.run(on: loop) }
        defer { runtime.shutdown() }
        #expect(try await eventually(timeout: .seconds(20)) { runtime.epoch != nil }, "the dispatcher never led")
        #expect(observer.readiness() == nil)

        let hold = try await LoopHold.start(loop)
        let reported = try await eventually(timeout: .seconds(20)) {
            (observer.readiness() ?? "").contains("the dispatcher loop has not run for")
        }
        #expect(reported, "readiness while held: \(observer.readiness() ?? "ready")")
        #expect((observer.registry.value("tandem_dispatcher_loop_stall_seconds") ?? 0) >= 1)
        await hold.release()
        let cleared = try await eventually(timeout: .seconds(20)) {
            observer.readiness() == nil && observer.registry.value("tandem_dispatcher_loop_stall_seconds") == 0
        }
        #expect(cleared, "still: \(observer.readiness() ?? "ready")")
        runtime.shutdown()
        await running.value
    }
}
