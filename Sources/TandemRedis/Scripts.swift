import Foundation
import Redis

/// The Lua scripts of Resources/Scripts, loaded once per process and called by SHA.
public enum BrokerScripts {
    public static let dispatch = load("dispatch")
    public static let claim = load("claim")
    public static let renew = load("renew")
    public static let ack = load("ack")
    public static let requeue = load("requeue")
    public static let deadLetter = load("deadletter")
    public static let reclaim = load("reclaim")
    public static let rebalance = load("rebalance")
    public static let heartbeat = load("heartbeat")
    public static let storeResult = load("store_result")
    public static let replay = load("replay")
    public static let purge = load("purge")
    public static let leader = load("leader")
    public static let handBack = load("handback")
    public static let unpark = load("unpark")
    public static let adopt = load("adopt")

    public static let all = [dispatch, claim, renew, ack, requeue, deadLetter, reclaim, rebalance, heartbeat, storeResult, replay, purge, leader, handBack, unpark, adopt]

    private static func load(_ name: String) -> RedisScript {
        guard let url = Bundle.module.url(forResource: name, withExtension: "lua", subdirectory: "Scripts"),
            let source = try? String(contentsOf: url, encoding: .utf8)
        else {
            // A build that lost its resources cannot run at all; say so plainly.
            fatalError("Lua script \(name).lua is missing from the TandemRedis resource bundle; rebuild Tandem")
        }
        return RedisScript(name: name, source: source)
    }
}
