import Foundation

/// ISO-8601 dates the way Python's `datetime.isoformat()` / `fromisoformat()` write and read them.
///
/// Celery writes `eta`/`expires` with `isoformat()` (`2030-01-02T03:04:05.678901+00:00`; naive values
/// mean UTC) and the result backends write `date_done` the same way. Parsing is hand-rolled: it runs for
/// every message, and Foundation's ISO8601DateFormatter neither reads microseconds nor is cheap.
public enum CeleryDate {
    /// Parses `YYYY-MM-DD[(T| )HH:MM[:SS[.f{1,6}]]][Z|±HH:MM|±HHMM|±HH]`. Naive means UTC. Nil if malformed.
    public static func parse(_ s: String) -> Date? {
        let b = Array(s.utf8)
        var i = 0
        func num(_ n: Int) -> Int? {
            guard i + n <= b.count else { return nil }
            var v = 0
            for k in 0..<n {
                let c = b[i + k]
                guard c >= 0x30 && c <= 0x39 else { return nil }
                v = v * 10 + Int(c - 0x30)
            }
            i += n
            return v
        }
        func eat(_ c: UInt8) -> Bool {
            if i < b.count && b[i] == c {
                i += 1
                return true
            }
            return false
        }
        guard let y = num(4), eat(UInt8(ascii: "-")), let mo = num(2), eat(UInt8(ascii: "-")), let d = num(2),
            (1...12).contains(mo), (1...31).contains(d)
        else { return nil }
        var h = 0
        var mi = 0
        var sec = 0
        var frac = 0.0
        var offset = 0
        if i < b.count {
            guard eat(UInt8(ascii: "T")) || eat(UInt8(ascii: " ")) else { return nil }
            guard let hh = num(2), eat(UInt8(ascii: ":")), let mm = num(2) else { return nil }
            h = hh
            mi = mm
            if eat(UInt8(ascii: ":")) {
                guard let ss = num(2) else { return nil }
                sec = ss
                if eat(UInt8(ascii: ".")) || eat(UInt8(ascii: ",")) {
                    var scale = 0.1
                    let start = i
                    while i < b.count, b[i] >= 0x30, b[i] <= 0x39 {
                        frac += Double(b[i] - 0x30) * scale
                        scale /= 10
                        i += 1
                    }
                    guard i > start else { return nil }
                }
            }
            guard h < 24, mi < 60, sec < 61 else { return nil }
            if eat(UInt8(ascii: "Z")) || eat(UInt8(ascii: "z")) {
                offset = 0
            } else if i < b.count, b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: "-") {
                let sign = b[i] == UInt8(ascii: "-") ? -1 : 1
                i += 1
                guard let oh = num(2) else { return nil }
                var om = 0
                if eat(UInt8(ascii: ":")) {
                    guard let m = num(2) else { return nil }
                    om = m
                } else if i < b.count {
                    guard let m = num(2) else { return nil }
                    om = m
                }
                // Python allows seconds in offsets; accept and ignore sub-minute parts.
                if eat(UInt8(ascii: ":")) { guard num(2) != nil else { return nil } }
                offset = sign * (oh * 3600 + om * 60)
            }
            guard i == b.count else { return nil }
        }
        let days = daysFromCivil(y, mo, d)
        let secs = Double(days * 86400 + h * 3600 + mi * 60 + sec - offset) + frac
        return Date(timeIntervalSince1970: secs)
    }

    /// `datetime.isoformat()` of the UTC time: `2024-01-01T00:00:00.123456+00:00`; the fraction is left
    /// out when it is zero microseconds, exactly as Python does.
    public static func isoformat(_ date: Date) -> String {
        let t = date.timeIntervalSince1970
        var micros = Int64((t * 1_000_000).rounded())
        var secs = micros / 1_000_000
        micros %= 1_000_000
        if micros < 0 {
            micros += 1_000_000
            secs -= 1
        }
        var days = secs / 86400
        var rem = secs % 86400
        if rem < 0 {
            rem += 86400
            days -= 1
        }
        let (y, m, d) = civilFromDays(Int(days))
        func p(_ v: Int, _ w: Int) -> String {
            let s = String(v)
            return s.count >= w ? s : String(repeating: "0", count: w - s.count) + s
        }
        var out = "\(p(y, 4))-\(p(m, 2))-\(p(d, 2))T\(p(Int(rem / 3600), 2)):\(p(Int(rem % 3600 / 60), 2)):"
        out += p(Int(rem % 60), 2)
        if micros != 0 { out += "." + p(Int(micros), 6) }
        return out + "+00:00"
    }

    // Howard Hinnant's civil-calendar algorithms (proleptic Gregorian).
    static func daysFromCivil(_ y0: Int, _ m: Int, _ d: Int) -> Int {
        let y = m <= 2 ? y0 - 1 : y0
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146097 + doe - 719468
    }

    static func civilFromDays(_ z0: Int) -> (Int, Int, Int) {
        let z = z0 + 719468
        let era = (z >= 0 ? z : z - 146096) / 146097
        let doe = z - era * 146097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365
        let y = yoe + era * 400
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (m <= 2 ? y + 1 : y, m, d)
    }
}
