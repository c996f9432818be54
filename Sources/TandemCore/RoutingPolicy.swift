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

    /// Splits `available` messages between `eligible` datacenters in proportion to their headroom (free slots
    /// plus a prefetch allowance, minus what is already queued there), so a datacenter with more idle workers
    /// takes more. With no headroom anywhere the answer is empty: the rest stays in the ingress list until
    /// slots free up, so a datacenter that dies does not take a large backlog with it.
    public static func split(available: Int, eligible: [String], headroom: [String: Int]) -> [(String, Int)] {
        guard available > 0, !eligible.isEmpty else { return [] }
        let free = eligible.map { max(0, headroom[$0] ?? 0) }
        let totalFree = free.reduce(0, +)
        guard totalFree > 0 else { return [] }
        let budget = min(available, totalFree)
        var shares: [(String, Int)] = []
        var given = 0
        for (i, dc) in eligible.enumerated() where free[i] > 0 {
            let share = max(1, budget * free[i] / totalFree)
            let n = min(share, free[i], budget - given)
            if n > 0 {
                shares.append((dc, n))
                given += n
            }
        }
        return shares
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
