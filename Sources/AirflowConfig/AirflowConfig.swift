import Foundation

/// Airflow's own configuration as an operator left it: `$AIRFLOW_CONFIG` or `$AIRFLOW_HOME/airflow.cfg`
/// (default `~/airflow/airflow.cfg`), with `AIRFLOW__<SECTION>__<KEY>` environment variables above the file.
/// Tandem's flags sit above both. `*_cmd` and `*_secret` variants are not evaluated (Tandem runs no commands
/// from a config file); set the plain key or the environment variable instead.
public struct AirflowConfig: Sendable {
    /// section → key → value, both lower-cased.
    public var sections: [String: [String: String]]
    public var environment: [String: String]
    /// The file read, if any.
    public var path: String?

    public init(sections: [String: [String: String]] = [:], environment: [String: String] = [:], path: String? = nil) {
        self.sections = sections
        self.environment = environment
        self.path = path
    }

    /// Reads the config file Airflow would read; a missing file gives an empty config (environment only).
    public static func load(environment: [String: String] = ProcessInfo.processInfo.environment) -> AirflowConfig {
        let home = environment["AIRFLOW_HOME"].map { ($0 as NSString).expandingTildeInPath }
            ?? (NSHomeDirectory() + "/airflow")
        let file = environment["AIRFLOW_CONFIG"].map { ($0 as NSString).expandingTildeInPath } ?? home + "/airflow.cfg"
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
            return AirflowConfig(environment: environment)
        }
        var c = parse(text)
        c.environment = environment
        c.path = file
        return c
    }

    /// Parses INI as Python's configparser does for airflow.cfg: `[section]`, `key = value` or `key: value`,
    /// `#`/`;` comment lines, indented continuation lines appended with a newline.
    public static func parse(_ text: String) -> AirflowConfig {
        var sections: [String: [String: String]] = [:]
        var section: String?
        var lastKey: String?
        for rawLine in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline) {
            let line = String(rawLine)
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            if trimmed.isEmpty || trimmed.hasPrefix("#") || trimmed.hasPrefix(";") { continue }
            if let first = line.first, first == " " || first == "\t", let s = section, let k = lastKey {
                let prev = sections[s]?[k] ?? ""
                sections[s]?[k] = prev + "\n" + trimmed
                continue
            }
            if trimmed.hasPrefix("["), trimmed.hasSuffix("]") {
                let name = String(trimmed.dropFirst().dropLast()).trimmingCharacters(in: .whitespaces).lowercased()
                section = name
                if sections[name] == nil { sections[name] = [:] }
                lastKey = nil
                continue
            }
            guard let s = section else { continue }
            let sep = trimmed.firstIndex { $0 == "=" || $0 == ":" }
            guard let sep else { continue }
            let key = trimmed[..<sep].trimmingCharacters(in: .whitespaces).lowercased()
            let value = trimmed[trimmed.index(after: sep)...].trimmingCharacters(in: .whitespaces)
            sections[s]?[key] = value
            lastKey = key
        }
        return AirflowConfig(sections: sections)
    }

    /// `AIRFLOW__SECTION__KEY` first, then the file. Empty values count as unset.
    public func value(_ section: String, _ key: String) -> String? {
        let envName = "AIRFLOW__\(section.uppercased())__\(key.uppercased())"
        if let v = environment[envName], !v.isEmpty { return v }
        if let v = sections[section.lowercased()]?[key.lowercased()], !v.isEmpty { return v }
        return nil
    }

    // MARK: What a Tandem worker reads

    public var brokerURL: String? { value("celery", "broker_url") }

    /// `[celery] result_backend`; unset, Airflow uses its metadata database (`db+` + `[database] sql_alchemy_conn`).
    public var resultBackend: String? {
        if let r = value("celery", "result_backend") { return r }
        if let conn = value("database", "sql_alchemy_conn"), conn.hasPrefix("postgres") { return "db+" + conn }
        return nil
    }

    public var workerConcurrency: Int? { value("celery", "worker_concurrency").flatMap { Int($0) } }

    /// The broker's TLS settings when `[celery] ssl_active` is on: what Airflow's CeleryExecutor hands Celery as
    /// `broker_use_ssl` (certificate required; `ssl_cacert` as the CA file; `ssl_cert`/`ssl_key` as the client
    /// certificate unless `ssl_mutual_tls` is off). Empty settings are left out. nil when `ssl_active` is off.
    public var brokerSSL: BrokerSSL? {
        guard Self.bool(value("celery", "ssl_active")) == true else { return nil }
        let mutual = Self.bool(value("celery", "ssl_mutual_tls")) ?? true
        return BrokerSSL(caFile: value("celery", "ssl_cacert"),
                         certFile: mutual ? value("celery", "ssl_cert") : nil,
                         keyFile: mutual ? value("celery", "ssl_key") : nil)
    }

    /// `[celery] ssl_*` as files.
    public struct BrokerSSL: Sendable, Equatable {
        public var caFile: String?
        public var certFile: String?
        public var keyFile: String?
        public init(caFile: String?, certFile: String?, keyFile: String?) {
            self.caFile = caFile
            self.certFile = certFile
            self.keyFile = keyFile
        }
    }

    /// configparser's booleans (Airflow's `getboolean`): true/t/1/yes/on, false/f/0/no/off; nil for unset or other.
    static func bool(_ v: String?) -> Bool? {
        switch v?.lowercased() {
        case "true", "t", "1", "yes", "on": return true
        case "false", "f", "0", "no", "off": return false
        default: return nil
        }
    }

    /// `[celery_broker_transport_options] master_name` (Sentinel).
    public var masterName: String? { value("celery_broker_transport_options", "master_name") }

    /// `[celery_broker_transport_options] visibility_timeout` is read but not used: Tandem's leases replace
    /// kombu's visibility timeout (a running task is never redelivered while its worker renews).
    public var visibilityTimeout: Int? { value("celery_broker_transport_options", "visibility_timeout").flatMap { Int($0) } }

    public var baseLogFolder: String? { value("logging", "base_log_folder").map { ($0 as NSString).expandingTildeInPath } }

    /// `[logging] worker_log_server_port` (default 8793).
    public var workerLogServerPort: Int? { value("logging", "worker_log_server_port").flatMap { Int($0) } }

    /// `[webserver] log_request_clock_grace` (default 30 s).
    public var logRequestClockGrace: Double? { value("webserver", "log_request_clock_grace").flatMap { Double($0) } }

    /// Airflow 3: `[api] secret_key`; Airflow 2: `[webserver] secret_key`.
    public var secretKey: String? { value("api", "secret_key") ?? value("webserver", "secret_key") }

    /// Airflow 3.x: `[core] execution_api_server_url`, else `[api] base_url` + `/execution/`.
    public var executionAPIServerURL: String? {
        if let u = value("core", "execution_api_server_url") { return u }
        if let base = value("api", "base_url"), !base.hasPrefix("/") {
            return base.hasSuffix("/") ? base + "execution/" : base + "/execution/"
        }
        return nil
    }

    /// `[celery] worker_queues` is not an Airflow key; Airflow's default queue is `[operators] default_queue`.
    public var defaultQueue: String? { value("operators", "default_queue") }
}
