import CeleryWire
import Foundation
import Logging
import Redis
import TandemCore

/// Celery's Redis result backend, written the way `celery.backends.redis.RedisBackend` writes it:
/// `celery-task-meta-<id>` with SETEX and a PUBLISH on the same name (AsyncResult.get() listens to the publish).
public final class RedisResultBackend: ResultBackend {
    public let client: RedisClient
    public let expiresSeconds: Int
    /// True when the backend is the broker's own server and database: the write then checks the lease's token in
    /// the same script, so a fenced worker cannot write a result at all.
    public let fencesAgainstBroker: Bool

    public init(configuration: RedisConfiguration, sameServerAsBroker: Bool, expiresSeconds: Int = 86400,
        logger: Logger)
    {
        client = RedisClient(configuration: configuration, label: "results", logger: logger)
        fencesAgainstBroker = sameServerAsBroker
        self.expiresSeconds = expiresSeconds
    }

    public static func key(taskID: String) -> String { "celery-task-meta-\(taskID)" }

    public func store(_ record: ResultRecord, fence: Fence?) async throws -> ResultWriteOutcome {
        var keys = [Self.key(taskID: record.taskId)]
        var token = ""
        if fencesAgainstBroker, let fence {
            keys.append(Keys.job(fence.jobID))
            token = String(fence.token)
        }
        let reply = try await client.eval(
            BrokerScripts.storeResult, keys: keys, args: [record.redisValue(), String(expiresSeconds), token])
        switch reply.int {
        case 1: return .written
        case 0: return .keptSuccess
        default: return .fenced
        }
    }

    public func state(taskID: String) async throws -> CeleryState {
        let v = try await client.send(["GET", Self.key(taskID: taskID)])
        guard let bytes = v.bytes, let json = try? JSONValue.parse(bytes), let s = json["status"]?.string else {
            return .pending
        }
        return CeleryState(rawValue: s) ?? .pending
    }

    public func close() { client.close() }
}
