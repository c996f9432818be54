/// Tandem's Redis key layout (Protocol/SPEC.md, "Key layout"). Every Tandem key shares the `{tandem}` hash tag.
/// The kombu ingress lists keep the names kombu gives them (the queue name and its priority siblings).
public enum Keys {
    public static let prefix = "{tandem}"
    /// The version of this layout, kept in `layout`: bumped when a change would make an older process misread what
    /// a newer one writes. A process refuses to run against a layout newer than its own (`RedisBroker.connect`).
    public static let layoutVersion = 1
    public static let layout = "\(prefix):layout"
    public static let sequence = "\(prefix):seq"
    public static let fence = "\(prefix):fence"
    public static let leases = "\(prefix):leases"
    public static let deadLetters = "\(prefix):dlq"
    public static let queues = "\(prefix):queues"
    public static let workers = "\(prefix):workers"
    public static let overrides = "\(prefix):dc-overrides"
    /// Worker id -> when an operator asked it to drain (`executorctl worker drain`): it claims nothing new.
    public static let workerDrains = "\(prefix):worker-drains"
    public static let leader = "\(prefix):leader"
    public static let stats = "\(prefix):stats"
    /// A token claim.lua leaves when it takes work: room has appeared in some datacenter queue.
    public static let capacity = "\(prefix):capacity"
    /// Revoked Celery task ids -> expiry (ms). Written by the pidbox (Sources/Pidbox); claim.lua counts it.
    public static let revoked = "\(prefix):revoked"
    /// Datacenter queue key -> the depth at or below which the dispatcher wants a capacity token (claim.lua).
    public static let refillMarks = "\(prefix):refill"

    public static func job(_ id: String) -> String { "\(prefix):job:\(id)" }
    public static func queue(datacenter: String, queue: String) -> String { "\(prefix):q:\(datacenter):\(queue)" }
    /// Where an idle dispatcher's blocking BLMOVE parks the message it woke up for, until dispatch.lua moves it
    /// on (a durable place of its own, drained first: it holds the oldest plain-priority message).
    public static func staging(queue: String) -> String { "\(prefix):staging:\(queue)" }
    public static func wake(datacenter: String) -> String { "\(prefix):wake:\(datacenter)" }
    public static func worker(_ id: String) -> String { "\(prefix):worker:\(id)" }

    /// The kombu lists of an Airflow queue, in the order kombu's Redis transport consumes them
    /// (priority 0–2 is the plain list and is consumed first).
    public static func ingressLists(queue: String) -> [String] {
        ["", "\u{06}\u{16}3", "\u{06}\u{16}6", "\u{06}\u{16}9"].map { queue + $0 }
    }

    /// What dispatch.lua drains, in order: the staging list, then kombu's lists.
    public static func dispatchSources(queue: String) -> [String] { [staging(queue: queue)] + ingressLists(queue: queue) }
}
