import Foundation
import Logging
@testable import Setup
import Testing

@Suite("--log-json lines")
struct JSONLogLineTests {
    @Test("one JSON object per line: every field a string, escaped, keys sorted, ts in UTC to the second")
    func lineIsValidSortedJSON() throws {
        let tricky = "quote \" backslash \\ newline \n tab \t bell \u{07} é 日本"
        let bytes = JSONLogHandler.line(
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
        #expect(JSONLogHandler.utcTimestamp(0) == "1970-01-01T00:00:00Z")
        #expect(JSONLogHandler.utcTimestamp(1_704_070_861) == "2024-01-01T01:01:01Z")
    }
}
