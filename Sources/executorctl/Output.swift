#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import Postgres
import Redis

/// Exit codes a script can branch on (also listed in `executorctl --help`).
enum Exit {
    static let ok: Int32 = 0
    /// Not found, refused, or declined at the confirmation prompt.
    static let notFound: Int32 = 1
    /// Redis or Postgres cannot be reached.
    static let unreachable: Int32 = 2
    /// Bad usage (sysexits EX_USAGE, as ArgumentParser uses for validation errors).
    static let usage: Int32 = 64
}

/// Prints one line to stderr and exits.
func fail(_ message: String, code: Int32) -> Never {
    FileHandle.standardError.write(("executorctl: " + message + "\n").data(using: .utf8)!)
    exit(code)
}

/// Turns any store error into one line and the exit code that names it: 2 when a server cannot be reached,
/// 1 when it answered with a refusal.
func failForStore(_ error: any Error, server: String) -> Never {
    if let e = error as? RedisError {
        switch e.code {
        case .connectionFailed, .io, .timeout, .closed, .sentinel, .authFailed, .invalidURL:
            fail("cannot reach Redis: \(e.message)", code: Exit.unreachable)
        default:
            fail("Redis refused: \(e.message)", code: Exit.notFound)
        }
    }
    if let e = error as? PostgresError {
        switch e.code {
        case .connectionFailed, .closed, .invalidURL:
            fail("cannot reach Postgres: \(e.description)", code: Exit.unreachable)
        default:
            fail("Postgres refused: \(e.description)", code: Exit.notFound)
        }
    }
    fail("cannot reach \(server): \(error)", code: Exit.unreachable)
}

/// Colour only on a terminal, and never when NO_COLOR is set (no-color.org).
enum Style {
    static let enabled: Bool = isatty(1) != 0 && ProcessInfo.processInfo.environment["NO_COLOR"] == nil
        && ProcessInfo.processInfo.environment["TERM"] != "dumb"
    static let red = "\u{1B}[31m"
    static let green = "\u{1B}[32m"
    static let yellow = "\u{1B}[33m"
    static let bold = "\u{1B}[1m"
    static let dim = "\u{1B}[2m"
    static let reset = "\u{1B}[0m"

    static func paint(_ s: String, _ code: String?) -> String {
        guard enabled, let code else { return s }
        return code + s + reset
    }

    /// Colour of a datacenter or worker state word.
    static func state(_ word: String) -> String? {
        switch word {
        case "alive", "running": green
        case "draining": yellow
        case "lost", "stopped", "expired": red
        default: nil
        }
    }
}

func printJSON(_ value: Any) {
    let data = try! JSONSerialization.data(withJSONObject: value, options: [.prettyPrinted, .sortedKeys])
    print(String(data: data, encoding: .utf8)!)
}

/// Rows as aligned columns; `color` picks an ANSI colour for a cell (row, column, text), applied after padding
/// so escapes never break the alignment.
func table(_ header: [String], _ rows: [[String]], color: (Int, Int, String) -> String? = { _, _, _ in nil }) -> [String] {
    var widths = header.map(\.count)
    for r in rows { for (i, c) in r.enumerated() where i < widths.count { widths[i] = max(widths[i], c.count) } }
    func line(_ cells: [String], row: Int?) -> String {
        cells.enumerated().map { i, c in
            let padded = i == cells.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0)
            guard let row else { return padded }
            return Style.paint(padded, color(row, i, c))
        }.joined(separator: "  ")
    }
    return [Style.paint(line(header, row: nil), Style.bold)] + rows.enumerated().map { line($1, row: $0) }
}

func printTable(_ header: [String], _ rows: [[String]], color: (Int, Int, String) -> String? = { _, _, _ in nil }) {
    for l in table(header, rows, color: color) { print(l) }
}

func seconds(_ ms: Int64) -> String { String(format: "%.1fs", Double(ms) / 1000) }

/// A kombu list name as a person reads it: a priority sibling `q\x06\x166` as `q/prio6`.
func printableList(_ list: String) -> String { list.replacingOccurrences(of: "\u{06}\u{16}", with: "/prio") }

/// Asks on the terminal; without one (a script, CI) refuses with exit 1 and says to pass --yes.
func confirm(_ question: String) -> Bool {
    guard isatty(0) != 0 else {
        fail("\(question): refusing without a terminal to ask on; pass --yes", code: Exit.notFound)
    }
    print("\(question) [y/N] ", terminator: "")
    fflush(nil)
    return (readLine() ?? "").lowercased().hasPrefix("y")
}
