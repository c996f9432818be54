import CeleryWire
import Foundation
import Logging
import Synchronization

/// Logging to stderr, plain or one JSON object per line.
public func bootstrapLogging(level: String?, json: Bool) {
    let lvl = Logger.Level(rawValue: (level ?? "info").lowercased()) ?? .info
    LoggingSystem.bootstrap { label in
        var h = StderrLogHandler(label: label, format: json ? .json : .text)
        h.logLevel = lvl
        return h
    }
}

/// One line per event on stderr, in one write(2), as plain text (`TextLogLine`) or JSON (`JSONLogLine`). Metadata
/// (the logger's, then the call's) is formatted once, when a line is written: swift-log's `StreamLogHandler`
/// re-formatted it on every change too (five per task in the worker), about 8% of the worker loop's time.
public struct StderrLogHandler: LogHandler {
    public enum Format: Sendable { case text, json }
    public var metadata: Logger.Metadata = [:]
    public var logLevel: Logger.Level = .info
    let label: String
    let format: Format

    public init(label: String, format: Format) {
        self.label = label
        self.format = format
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var fields = metadata
        if let extra = event.metadata { fields.merge(extra) { $1 } }
        let message = event.message.description
        let bytes: [UInt8]
        switch format {
        case .json:
            if let error = event.error { fields["error"] = .string("\(error)") }
            bytes = JSONLogLine.line(metadata: fields, level: event.level, label: label, message: message)
        case .text:
            if let error = event.error {
                fields["error.message"] = .string("\(error)")
                fields["error.type"] = .string(String(reflecting: type(of: error)))
            }
            bytes = Array(TextLogLine.line(
                timestamp: TextLogLine.timestamp(), metadata: fields, level: event.level, label: label,
                source: event.source, message: message).utf8)
        }
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }  // stderr closed or full: nothing better to do with a log line
            off += n
        }
    }
}

/// `--log-json`: one JSON object per line, metadata as fields (task_id, dc, queue, attempt …), keys sorted.
/// Written without Foundation's formatters: an `ISO8601DateFormatter` and `JSONSerialization` per line doubled the
/// worker's CPU per task (diag_switches, c=2: 0.5 → 1.0–1.2 ms) and cut throughput by a third.
enum JSONLogLine {
    /// One log line, newline included: `ts` (UTC, seconds, as ISO 8601: 2026-11-26T07:58:24Z), `level`,
    /// `logger`, `msg` and every metadata field, as JSON strings.
    static func line(metadata: Logger.Metadata, level: Logger.Level, label: String, message: String, at now: time_t = time(nil))
        -> [UInt8]
    {
        var fields = metadata.mapValues { "\($0)" }
        fields["ts"] = utcTimestamp(now)
        fields["level"] = level.rawValue
        fields["logger"] = label
        fields["msg"] = message
        var out: [UInt8] = []
        out.reserveCapacity(256)
        JSONValue.object(JSONObject(fields.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) }))
            .write(to: &out)
        out.append(UInt8(ascii: "\n"))
        return out
    }

    static func utcTimestamp(_ now: time_t) -> String {
        var t = now
        var parts = tm()
        gmtime_r(&t, &parts)
        func two(_ n: Int32) -> String { n < 10 ? "0\(n)" : "\(n)" }
        return "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T"
            + "\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))Z"
    }
}

/// The plain format, swift-log's `StreamLogHandler` line byte for byte
/// (`2026-12-05T19:29:34+0000 info tandem.worker: k=v … [Module] message`), with the timestamp formatted once per
/// second (StreamLogHandler's `localtime` stat'ed /etc/localtime on every line).
enum TextLogLine {
    static func line(
        timestamp: String, metadata: Logger.Metadata, level: Logger.Level, label: String, source: String, message: String
    ) -> String {
        var out = "\(timestamp) \(level)\(label.isEmpty ? "" : " ")\(label):"
        for (key, value) in metadata.sorted(by: { $0.key < $1.key }) { out += " \(key)=\(value)" }
        out += " [\(source)] \(message)\n"
        return out
    }

    private static let lastStamp = Mutex<(second: time_t, text: String)>((-1, ""))

    /// Local time to the second with its UTC offset (2026-12-05T19:29:34+0000), formatted once per second.
    static func timestamp(_ now: time_t = time(nil)) -> String {
        if let known = lastStamp.withLock({ $0.second == now ? $0.text : nil }) { return known }
        var t = now
        var parts = tm()
        localtime_r(&t, &parts)
        var buffer = [CChar](repeating: 0, count: 64)
        let n = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S%z", &parts)
        let text = String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        lastStamp.withLock { $0 = (now, text) }
        return text
    }
}
