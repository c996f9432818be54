import Foundation

/// A Prometheus registry: counters, gauges and histograms with fixed label names, rendered in the text
/// exposition format 0.0.4. Written here rather than taken from swift-prometheus to keep the build small on
/// two cores; the format is the stable part.
///
/// Label sets are bounded: each family keeps at most `maxSeries` label combinations and drops new ones beyond
/// that (counted in `tandem_metrics_dropped_series_total`), so a flood of odd queue names cannot grow memory
/// without end.
public final class MetricsRegistry: @unchecked Sendable {
    public static let maxSeries = 1000
    private let lock = NSLock()
    private var families: [Family] = []
    private var byName: [String: Int] = [:]
    private var droppedSeries = 0
    private var collectors: [@Sendable () -> Void] = []

    public init() {}

    final class Family {
        let name: String
        let help: String
        let type: String
        let labelNames: [String]
        let buckets: [Double]
        var series: [[String]: Series] = [:]
        init(name: String, help: String, type: String, labelNames: [String], buckets: [Double]) {
            self.name = name
            self.help = help
            self.type = type
            self.labelNames = labelNames
            self.buckets = buckets
        }
    }

    struct Series {
        var value: Double = 0
        var counts: [UInt64] = []
        var sum: Double = 0
        var count: UInt64 = 0
    }

    private func family(_ name: String, _ help: String, _ type: String, _ labels: [String], _ buckets: [Double] = []) -> Int {
        lock.withLock {
            if let i = byName[name] { return i }
            families.append(Family(name: name, help: help, type: type, labelNames: labels, buckets: buckets))
            byName[name] = families.count - 1
            return families.count - 1
        }
    }

    /// A monotonically increasing count.
    public func counter(_ name: String, help: String, labels: [String] = []) -> Counter {
        Counter(registry: self, index: family(name, help, "counter", labels), labelCount: labels.count)
    }

    /// A value that goes up and down.
    public func gauge(_ name: String, help: String, labels: [String] = []) -> Gauge {
        Gauge(registry: self, index: family(name, help, "gauge", labels), labelCount: labels.count)
    }

    /// Observations in cumulative buckets (upper bounds, ascending; `+Inf` is implied).
    public func histogram(_ name: String, help: String, labels: [String] = [], buckets: [Double]) -> Histogram {
        Histogram(
            registry: self, index: family(name, help, "histogram", labels, buckets.sorted()), labelCount: labels.count)
    }

    func update(_ index: Int, _ labels: [String], _ body: (inout Series, Family) -> Void) {
        lock.withLock {
            let f = families[index]
            if var s = f.series[labels] {
                body(&s, f)
                f.series[labels] = s
            } else {
                guard f.series.count < MetricsRegistry.maxSeries else {
                    droppedSeries += 1
                    return
                }
                var s = Series(counts: [UInt64](repeating: 0, count: f.buckets.count))
                body(&s, f)
                f.series[labels] = s
            }
        }
    }

    func replaceAll(_ index: Int, _ values: [[String]: Double]) {
        lock.withLock {
            let f = families[index]
            f.series.removeAll()
            for (k, v) in values.prefix(MetricsRegistry.maxSeries) { f.series[k] = Series(value: v) }
            droppedSeries += max(0, values.count - MetricsRegistry.maxSeries)
        }
    }

    /// Runs `body` before every `render()`: for values read at scrape time (busy slots, phase).
    public func onCollect(_ body: @escaping @Sendable () -> Void) {
        lock.withLock { collectors.append(body) }
    }

    /// The current value of one series (tests and readiness use it); nil when never set.
    public func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        lock.withLock {
            guard let i = byName[name] else { return nil }
            let f = families[i]
            let key = f.labelNames.map { labels[$0] ?? "" }
            guard let s = f.series[key] else { return nil }
            return f.type == "histogram" ? Double(s.count) : s.value
        }
    }

    /// Everything, in Prometheus text format 0.0.4.
    public func render() -> String {
        for c in lock.withLock({ collectors }) { c() }
        return lock.withLock {
            var out = ""
            for f in families {
                out += "# HELP \(f.name) \(MetricsRegistry.escapeHelp(f.help))\n# TYPE \(f.name) \(f.type)\n"
                for (labels, s) in f.series.sorted(by: { $0.key.lexicographicallyPrecedes($1.key) }) {
                    let pairs = zip(f.labelNames, labels).map { "\($0)=\"\(MetricsRegistry.escapeLabel($1))\"" }
                    func braces(_ extra: [String] = []) -> String {
                        let all = pairs + extra
                        return all.isEmpty ? "" : "{" + all.joined(separator: ",") + "}"
                    }
                    if f.type == "histogram" {
                        var cumulative: UInt64 = 0
                        for (b, c) in zip(f.buckets, s.counts) {
                            cumulative += c
                            out += "\(f.name)_bucket\(braces(["le=\"\(MetricsRegistry.format(b))\""])) \(cumulative)\n"
                        }
                        out += "\(f.name)_bucket\(braces(["le=\"+Inf\""])) \(s.count)\n"
                        out += "\(f.name)_sum\(braces()) \(MetricsRegistry.format(s.sum))\n"
                        out += "\(f.name)_count\(braces()) \(s.count)\n"
                    } else {
                        out += "\(f.name)\(braces()) \(MetricsRegistry.format(s.value))\n"
                    }
                }
            }
            out += "# HELP tandem_metrics_dropped_series_total Label combinations dropped because a family reached \(MetricsRegistry.maxSeries) series.\n"
            out += "# TYPE tandem_metrics_dropped_series_total counter\ntandem_metrics_dropped_series_total \(droppedSeries)\n"
            return out
        }
    }

    static func format(_ v: Double) -> String {
        if v.isNaN { return "NaN" }
        if v.isInfinite { return v > 0 ? "+Inf" : "-Inf" }
        if v == v.rounded() && abs(v) < 1e15 { return String(Int64(v)) }
        return String(v)
    }

    static func escapeLabel(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            .replacingOccurrences(of: "\n", with: "\\n")
    }

    static func escapeHelp(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\n", with: "\\n")
    }
}

/// A counter family; `labels` are values in the order of the family's label names.
public struct Counter: Sendable {
    let registry: MetricsRegistry
    let index: Int
    let labelCount: Int
    public func inc(_ labels: [String] = [], by amount: Double = 1) {
        precondition(labels.count == labelCount, "label values must match the family's label names")
        guard amount > 0 else { return }
        registry.update(index, labels) { s, _ in s.value += amount }
    }
    /// Makes the series exist at 0 (so rate() and alerts see it before the first event).
    public func touch(_ labels: [String] = []) { registry.update(index, labels) { _, _ in } }
}

/// A gauge family.
public struct Gauge: Sendable {
    let registry: MetricsRegistry
    let index: Int
    let labelCount: Int
    /// Sets the unlabelled series.
    public func set(_ value: Double) { set([], value) }
    public func set(_ labels: [String], _ value: Double) {
        precondition(labels.count == labelCount, "label values must match the family's label names")
        registry.update(index, labels) { s, _ in s.value = value }
    }
    /// Replaces every series with `values` at once (a fresh snapshot: vanished queues disappear).
    public func replace(_ values: [[String]: Double]) {
        precondition(values.keys.allSatisfy { $0.count == labelCount }, "label values must match the family's label names")
        registry.replaceAll(index, values)
    }
}

/// A histogram family.
public struct Histogram: Sendable {
    let registry: MetricsRegistry
    let index: Int
    let labelCount: Int
    public func observe(_ labels: [String] = [], _ value: Double) {
        precondition(labels.count == labelCount, "label values must match the family's label names")
        registry.update(index, labels) { s, f in
            s.sum += value
            s.count += 1
            if let i = f.buckets.firstIndex(where: { value <= $0 }) { s.counts[i] += 1 }
        }
    }
}
