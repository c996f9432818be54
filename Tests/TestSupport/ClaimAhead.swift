import Foundation
import Logging
import Redis
import TandemRedis

extension Cluster {
    /// A c=1 worker `east-1` with `--claim-ahead 1` that has run one quick task (claiming ahead starts once the
    /// worker has seen its tasks run shorter than --claim-ahead-max-run; the stand-in airflow takes ~0.1 s, hence
    /// 60 s), then a `hold` task running and an `ok` task claimed ahead behind it. Jobs go straight into east's
    /// queue (no dispatcher: a slow task gets no prefetch, so the dispatcher would keep the second in the ingress
    /// list). `extra` adds worker flags. Returns the worker and the two task ids; fails the test (thrown) if the
    /// worker never got there.
    public func holdOneBehindALongTask(redis: RedisClient, run: String, extra: [String] = []) async throws
        -> (worker: TandemProcess, hold: String, next: String)
    {
        let broker = RedisBroker(configuration: try RedisConfiguration(url: self.redis.url), logger: Logger(label: "t"))
        defer { broker.close() }
        _ = try await publishAirflowCommand(redis, task: "ok", run: "warm")
        guard try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil) == 1 else {
            throw TestSupportError("the warm-up task did not reach east's queue")
        }
        let w = try startWorker(
            dc: "east", name: "east-1", extra: ["--concurrency", "1", "--claim-ahead", "1", "--claim-ahead-max-run", "60000"] + extra)
        // c=1: the worker claims the next job only once it has reaped the warm-up (and so timed its run)
        let warmed = try await eventually(timeout: .seconds(30)) {
            taskEvents().contains { $0.event == "end" && $0.key == "dag.ok.warm" }
        }
        guard warmed else { throw TestSupportError("the warm-up task never ran: \(logs())") }
        let hold = try await publishAirflowCommand(redis, task: "hold", run: run)
        let next = try await publishAirflowCommand(redis, task: "ok", run: run)
        guard try await broker.dispatch(queue: "default", to: "east", max: 10, epoch: nil) == 2 else {
            throw TestSupportError("the two tasks did not reach east's queue")
        }
        // one running (the hold), one leased to the worker but not started
        let holding = try await eventually(timeout: .seconds(30)) {
            try await redis.send(["ZCARD", Keys.leases]).int == 2
                && taskEvents().contains { $0.event == "start" && $0.key == "dag.hold.\(run)" }
        }
        guard holding else { throw TestSupportError("no job was held ahead behind the running one: \(logs())") }
        return (w, hold, next)
    }
}
