import Yams

/// Which datacenters each Airflow queue may run in.
///
/// ```yaml
/// queues:
///   default: {spread: [east, west]}          # by free capacity across the live ones
///   reports: {pin: east, fallback: west}     # east; west only while east is lost
///   audit:   {pin: east}                     # waits while east is down
/// ```
/// A queue the file does not name (or every queue, without a file) is spread across all live datacenters.
public struct RoutingPolicy: Sendable, Hashable {
    public enum Rule: Sendable, Hashable {
        /// Any of these datacenters (nil: any live datacenter), weighted by free capacity.
        case spread([String]?)
        /// Only `dc`; while it is lost, `fallback` if given, else the work waits.
        case pin(String, fallback: String?)
    }

    public var rules: [String: Rule]
    public var defaultRule: Rule

    public init(rules: [String: Rule] = [:], defaultRule: Rule = .spread(nil)) {
        self.rules = rules
        self.defaultRule = defaultRule
    }

    public func rule(for queue: String) -> Rule { rules[queue] ?? defaultRule }

    /// The queues the policy names explicitly.
    public var namedQueues: [String] { rules.keys.sorted() }

    /// The datacenters that may take new work of `queue` now, given which are alive (accepting work).
    /// An empty answer means: leave the work in the ingress list for now.
    public func eligibleDatacenters(for queue: String, live: Set<String>) -> [String] {
        switch rule(for: queue) {
        case .spread(let dcs):
            return (dcs ?? Array(live)).filter { live.contains($0) }.sorted()
        case .pin(let dc, let fallback):
            if live.contains(dc) { return [dc] }
            if let fallback, live.contains(fallback) { return [fallback] }
            return []
        }
    }

    /// How many more jobs of one queue a datacenter should be given now.
    public struct Room: Sendable, Hashable {
        /// Slots with nothing running and nothing queued for them: a job sent there starts at once.
        public var idleSlots: Int
        /// How many more may wait in its queue beyond those, so a slot that frees finds its next job there.
        public var prefetch: Int
        public init(idleSlots: Int, prefetch: Int) {
            self.idleSlots = idleSlots
            self.prefetch = prefetch
        }
    }

    /// Places `available` messages among `eligible` datacenters: first one per idle slot, each to the datacenter
    /// with the most idle slots left (a job never waits behind busy slots while another datacenter has an idle
    /// one), then into prefetch room, most room first. With no room anywhere the answer is empty: the rest stays
    /// in the shared ingress list, where whichever datacenter frees a slot first takes it, and a datacenter that
    /// dies does not take a backlog with it. Ties go to the first in `eligible` order.
    public static func place(available: Int, eligible: [String], room: [String: Room]) -> [(String, Int)] {
        guard available > 0, !eligible.isEmpty else { return [] }
        var given = [Int](repeating: 0, count: eligible.count)
        var left = available
        for tier in [\Room.idleSlots, \Room.prefetch] {
            var free = eligible.map { max(0, room[$0]?[keyPath: tier] ?? 0) }
            while left > 0, let i = free.indices.max(by: { free[$0] < free[$1] || (free[$0] == free[$1] && $0 > $1) }),
                free[i] > 0
            {
                free[i] -= 1
                given[i] += 1
                left -= 1
            }
        }
        return eligible.indices.filter { given[$0] > 0 }.map { (eligible[$0], given[$0]) }
    }

    /// Parses the YAML policy file; errors name the line to fix.
    public static func parse(yaml: String) throws -> RoutingPolicy {
        let node: Any?
        do { node = try Yams.load(yaml: yaml) } catch {
            throw PolicyError("routing policy is not valid YAML: \(error)")
        }
        guard let top = node as? [String: Any] else {
            if node == nil { return RoutingPolicy() }
            throw PolicyError("routing policy must be a mapping with a 'queues' key, e.g. queues: {default: {spread: [east, west]}}")
        }
        for key in top.keys where key != "queues" {
            throw PolicyError("routing policy: unknown top-level key '\(key)' (only 'queues' is understood)")
        }
        var rules: [String: Rule] = [:]
        if let queues = top["queues"] {
            guard let map = queues as? [String: Any] else {
                throw PolicyError("routing policy: 'queues' must map queue names to rules")
            }
            for (queue, value) in map {
                rules[queue] = try parseRule(queue: queue, value)
            }
        }
        return RoutingPolicy(rules: rules)
    }

    private static func parseRule(queue: String, _ value: Any) throws -> Rule {
        guard let m = value as? [String: Any] else {
            throw PolicyError("routing policy: queue '\(queue)' needs {spread: [dc, ...]} or {pin: dc, fallback: dc}")
        }
        for key in m.keys where !["spread", "pin", "fallback"].contains(key) {
            throw PolicyError("routing policy: queue '\(queue)' has unknown key '\(key)' (use spread, pin, fallback)")
        }
        if let spread = m["spread"] {
            if m["pin"] != nil { throw PolicyError("routing policy: queue '\(queue)' has both spread and pin; choose one") }
            guard let list = spread as? [Any], !list.isEmpty else {
                throw PolicyError("routing policy: queue '\(queue)': spread needs a non-empty list of datacenters")
            }
            let dcs = try list.map { try datacenter($0, queue: queue) }
            return .spread(dcs)
        }
        if let pin = m["pin"] {
            let dc = try datacenter(pin, queue: queue)
            let fallback = try m["fallback"].map { try datacenter($0, queue: queue) }
            if fallback == dc { throw PolicyError("routing policy: queue '\(queue)' falls back to its own pin '\(dc)'") }
            return .pin(dc, fallback: fallback)
        }
        throw PolicyError("routing policy: queue '\(queue)' needs spread or pin")
    }

    private static func datacenter(_ v: Any, queue: String) throws -> String {
        let name = "\(v)"
        if let problem = Names.problem(datacenter: name) {
            throw PolicyError("routing policy: queue '\(queue)': \(problem)")
        }
        return name
    }
}

/// A routing policy that cannot be used, with what to change.
public struct PolicyError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ message: String) { description = message }
}
