import CLibpq
import Foundation

/// Where and how to reach Postgres, usually parsed from Celery's `result_backend`.
public struct PostgresConfiguration: Sendable {
    /// A keyword/value conninfo string for `PQconnectdb`; always sets `options=-c TimeZone=UTC`
    /// (Celery's `date_done` is a timestamp without time zone, in UTC), an `application_name` and a
    /// `connect_timeout` unless the URL sets them.
    public var conninfo: String
    /// The URL with the password replaced by `***`, for messages and logs.
    public var redacted: String
    /// What a person should check when Postgres cannot be reached; appended to connection errors.
    public var connectHint: String = "is postgres running? set --result-backend or AIRFLOW__CELERY__RESULT_BACKEND"
    /// How long a statement's reply may take before the connection is given up as lost (nil: wait forever).
    /// Tandem's statements are small; a reply this late means a hung server or a dead link, and a worker whose
    /// writes wait on it can neither finish tasks nor spool their results. Env TANDEM_POSTGRES_REPLY_TIMEOUT
    /// (seconds; 0: wait forever); default 30 s.
    public var replyTimeout: Duration? = PostgresConfiguration.defaultReplyTimeout

    static var defaultReplyTimeout: Duration? {
        guard let text = ProcessInfo.processInfo.environment["TANDEM_POSTGRES_REPLY_TIMEOUT"], let s = Double(text), s >= 0 else {
            return .seconds(30)
        }
        return s == 0 ? nil : .milliseconds(Int64(s * 1000))
    }

    /// Parses a result-backend URL or a plain conninfo.
    ///
    /// Accepts `postgresql://`, `postgres://`, Celery/SQLAlchemy spellings (`db+postgresql://`,
    /// `db+postgresql+psycopg2://`, `db+postgresql+psycopg://`, `postgresql+psycopg2://`), multi-host URLs
    /// (`postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write`) and `host=... dbname=...`.
    public init(url: String, applicationName: String = "tandem") throws(PostgresError) {
        let trimmed = url.trimmingCharacters(in: .whitespacesAndNewlines)
        var text = trimmed
        if let sep = text.range(of: "://") {
            var scheme = text[..<sep.lowerBound].lowercased()
            if scheme.hasPrefix("db+") { scheme.removeFirst(3) }
            if let plus = scheme.firstIndex(of: "+") { scheme = String(scheme[..<plus]) }
            guard scheme == "postgresql" || scheme == "postgres" else {
                throw PostgresError(
                    code: .invalidURL,
                    message: "invalid Postgres result backend '\(Self.redactRaw(trimmed))': unsupported scheme '\(trimmed[..<sep.lowerBound])://' — use postgresql://user@host:port/db or db+postgresql://..."
                )
            }
            text = "postgresql://" + text[sep.upperBound...]
        } else if !text.contains("=") {
            throw PostgresError(
                code: .invalidURL,
                message: "invalid Postgres result backend '\(Self.redactRaw(trimmed))': expected postgresql://user@host:port/db or a conninfo such as 'host=... dbname=...'"
            )
        }

        var errmsg: UnsafeMutablePointer<CChar>?
        guard let parsed = PQconninfoParse(text, &errmsg) else {
            let why = errmsg.map { String(cString: $0) }?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "out of memory"
            if let errmsg { PQfreemem(errmsg) }
            throw PostgresError(
                code: .invalidURL,
                message: "invalid Postgres result backend '\(Self.redactRaw(trimmed))': \(why)",
                underlying: why
            )
        }
        defer { PQconninfoFree(parsed) }
        var options: [(String, String)] = []
        var i = 0
        while let keyword = parsed[i].keyword {
            if let val = parsed[i].val { options.append((String(cString: keyword), String(cString: val))) }
            i += 1
        }
        func value(_ k: String) -> String? { options.first { $0.0 == k }?.1 }
        func set(_ k: String, _ v: String) {
            if let idx = options.firstIndex(where: { $0.0 == k }) { options[idx].1 = v } else { options.append((k, v)) }
        }
        let existing = value("options") ?? ""
        var opts = existing
        if !opts.contains("TimeZone=") { opts += (opts.isEmpty ? "" : " ") + "-c TimeZone=UTC" }
        // NOTICEs ("relation … already exists, skipping") would go raw to stderr and break --log-json
        if !opts.contains("client_min_messages=") { opts += " -c client_min_messages=warning" }
        set("options", opts)
        if value("application_name") == nil { set("application_name", applicationName) }
        if value("connect_timeout") == nil { set("connect_timeout", "5") }
        // a link that dies without a FIN or RST (a partition, a dead host) is noticed in seconds rather than after
        // the kernel's ~15 minutes of retransmissions: unacknowledged data after 20 s, or an idle connection after
        // 10 s + 3 × 5 s of unanswered keepalive probes
        if value("tcp_user_timeout") == nil { set("tcp_user_timeout", "20000") }
        if value("keepalives_idle") == nil { set("keepalives_idle", "10") }
        if value("keepalives_interval") == nil { set("keepalives_interval", "5") }
        if value("keepalives_count") == nil { set("keepalives_count", "3") }

        self.conninfo = options.map { "\($0.0)=\(Self.quote($0.1))" }.joined(separator: " ")
        self.redacted = Self.redact(options)
    }

    private static func quote(_ v: String) -> String {
        let escaped = v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "'", with: "\\'")
        return "'\(escaped)'"
    }

    private static func redact(_ options: [(String, String)]) -> String {
        func value(_ k: String) -> String? { options.first { $0.0 == k }?.1 }
        let hosts = (value("host") ?? value("hostaddr") ?? "localhost").split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let ports = (value("port") ?? "").split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let hostList = hosts.enumerated().map { i, h -> String in
            let port = ports.count == 1 ? ports[0] : (i < ports.count ? ports[i] : "")
            return port.isEmpty ? h : "\(h):\(port)"
        }.joined(separator: ",")
        var user = value("user") ?? ""
        if value("password") != nil { user += ":***" }
        let auth = user.isEmpty ? "" : "\(user)@"
        var s = "postgresql://\(auth)\(hostList)/\(value("dbname") ?? "")"
        if let t = value("target_session_attrs") { s += "?target_session_attrs=\(t)" }
        return s
    }

    /// Replaces the password in a URL or conninfo the parser could not accept.
    static func redactRaw(_ s: String) -> String {
        if let sep = s.range(of: "://") {
            let rest = s[sep.upperBound...]
            guard let at = rest.lastIndex(of: "@") else { return s }
            let info = rest[..<at]
            guard let colon = info.firstIndex(of: ":") else { return s }
            return String(s[..<colon]) + ":***" + String(s[at...])
        }
        return s.split(separator: " ").map { $0.lowercased().hasPrefix("password=") ? "password=***" : String($0) }
            .joined(separator: " ")
    }
}
