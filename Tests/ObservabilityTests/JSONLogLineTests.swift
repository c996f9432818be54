import Foundation
import Logging
@testable import Setup
import Testing

@Suite("--log-json lines")
struct JSONLogLineTests {
    @Test("one JSON object per line: every field a string, escaped, keys sorted, ts in UTC to the second")
    func lineIsValidSortedJSON() throws {
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{07} é 日本"
        let bytes = JSONLogLine.line(
            metadata: ["task_id": "t-1", "detail": .string(tricky), "attempt": .stringConvertible(2)],
            level: .warning, label: "tandem.worker", message: "line one\nline two", at: 1_795_674_443)
        #expect(bytes.last == UInt8(ascii: "\n"))
        #expect(bytes.dropLast().allSatisfy { $0 != UInt8(ascii: "\n") }, "a record must stay on one line")
        let text = String(decoding: bytes.dropLast(), as: UTF8.self)
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: String])
        #expect(parsed == [
            "attempt": "2", "detail": tricky, "level": "warning", "logger": "tandem.worker",
            "msg": "line one\nline two", "task_id": "t-1", "ts": "2026-11-26T06:27:23Z",
        ])
        let order = ["attempt", "detail", "level", "logger", "msg", "task_id", "ts"].map { text.range(of: "\"\($0)\":")!.lowerBound }
        #expect(order == order.sorted(), "keys are written sorted: \(text)")
    }

    @Test("timestamps pad every field and start at the epoch")
    func timestamps() {
        #expect(JSONLogLine.utcTimestamp(0) == "1970-01-01T00:00:00Z")
        #expect(JSONLogLine.utcTimestamp(1_704_070_861) == "2024-01-01T01:01:01Z")
    }
}

@Suite("plain log lines")
struct TextLogLineTests {
    /// Collects what a StreamLogHandler writes.
    final class Captured: TextOutputStream, @unchecked Sendable {
        var text = ""
        func write(_ string: String) { text += string }
    }

    @Test("the plain handler writes the line swift-log's StreamLogHandler writes, metadata sorted, set and per line")
    func sameLineAsStreamLogHandler() {
        let captured = Captured()
        var stream = StreamLogHandler(label: "tandem.worker", stream: captured, metadataProvider: nil)
        stream[metadataKey: "task_id"] = "t-1"
        stream[metadataKey: "attempt"] = .stringConvertible(2)
        stream[metadataKey: "queue"] = "default"
        let event = LogEvent(
            level: .info, message: "task started", metadata: ["pid": .stringConvertible(4242), "queue": "other"],
            source: "Worker", file: #fileID, function: #function, line: #line)
        stream.log(event: event)
        let theirs = captured.text
        let ours = TextLogLine.line(
            timestamp: "STAMP", metadata: stream.metadata.merging(event.metadata!) { $1 }, level: .info,
            label: "tandem.worker", source: "Worker", message: "task started")
        // their timestamp is the wall clock's; compare what follows it
        #expect(ours == "STAMP info tandem.worker: attempt=2 pid=4242 queue=other task_id=t-1 [Worker] task started\n")
        #expect(theirs.drop { $0 != " " } == ours.drop { $0 != " " }, "swift-log wrote: \(theirs)")
    }

    @Test("the timestamp is local time to the second with its offset, as StreamLogHandler's strftime writes it")
    func timestampFormat() {
        let now = time(nil)
        var t = now
        var parts = tm()
        localtime_r(&t, &parts)
        var buffer = [CChar](repeating: 0, count: 64)
        let n = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S%z", &parts)
        #expect(TextLogLine.timestamp(now) == String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self))
        #expect(TextLogLine.timestamp(now) == TextLogLine.timestamp(now), "the cached second")
        #expect(TextLogLine.timestamp(0) != TextLogLine.timestamp(now), "a new second is formatted afresh")
        #expect(TextLogLine.timestamp(0).hasPrefix("1970-01-01T") || TextLogLine.timestamp(0).hasPrefix("1969-12-31T"))
    }
}
