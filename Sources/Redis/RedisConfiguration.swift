import Foundation

/// Where and how to reach Redis, usually parsed from Celery's `broker_url`.
public struct RedisConfiguration: Sendable {
    /// A host and TCP port.
    public struct HostPort: Sendable, Hashable, CustomStringConvertible {
        /// Host name or IP address (IPv6 without brackets).
        public var host: String
        /// TCP port.
        public var port: Int
        /// Makes a host/port pair.
        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }
        /// `host:port`, with brackets around an IPv6 address.
        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    }

    /// How the connection is made.
    public enum Endpoint: Sendable, Hashable {
        /// A TCP connection to one server.
        case tcp(host: String, port: Int)
        /// A Unix domain socket.
        case unix(path: String)
        /// Ask these Sentinels for the current master named `masterName` on every (re)connect.
        case sentinel(nodes: [HostPort], masterName: String, sentinelPassword: String?)
    }

    /// TLS settings for `rediss://` (the names are redis-py's, as in kombu's URL query and Celery's
    /// `broker_use_ssl`, which Airflow fills from `[celery] ssl_*`).
    public struct TLS: Sendable, Hashable {
        /// Check the server's certificate against `caFile` (else the system's CA store): `ssl_cert_reqs`
        /// required or optional (the same thing for a client, as in Python's `ssl`); false for `none`.
        public var verifyPeer: Bool = true
        /// With `verifyPeer`: the certificate must name the host connected to (`ssl_check_hostname`, default on).
        public var checkHostname: Bool = true
        /// `ssl_ca_certs`: a PEM file of the CA certificates to trust.
        public var caFile: String?
        /// `ssl_ca_path`: a directory of CA certificates (hashed names, `openssl rehash`).
        public var caPath: String?
        /// `ssl_certfile` / `ssl_keyfile`: a client certificate, for a Redis with `tls-auth-clients yes`.
        public var certFile: String?
        public var keyFile: String?
        /// `ssl_password`: the client key's password, when it is encrypted.
        public var keyPassword: String?
        /// Set only by a bare `rediss://` (no `ssl_*` parameter): kombu then connects without checking the
        /// certificate (and warns); so does Tandem, and Airflow's `[celery] ssl_active` settings may replace it.
        public var schemeOnly = false
        /// Checks the server's certificate and name against the system's CA store.
        public init() {}
    }

    /// How the connection is made.
    public var endpoint: Endpoint
    /// TLS (`rediss://`), or nil for plain TCP.
    public var tls: TLS?
    /// ACL user name for `AUTH user password`; nil means `AUTH password`.
    public var username: String?
    /// Password for AUTH; nil means no AUTH.
    public var password: String?
    /// Database index selected after every (re)connect.
    public var database: Int
    /// Limit on establishing one TCP/Unix connection (and on each Sentinel query).
    public var connectTimeout: Duration = .seconds(2)
    /// Limit on waiting for a reply; nil waits forever (for blocking commands on their own client).
    public var commandTimeout: Duration? = .seconds(10)
    /// What a person should check when Redis cannot be reached; appended to connection errors.
    public var connectHint: String = "is redis-server running? set --broker or AIRFLOW__CELERY__BROKER_URL"
    /// With Sentinel: listen for `+switch-master` on every sentinel (one extra connection each) and drop the
    /// connection as soon as the master changes, instead of writing to a demoted master until it turns
    /// read-only. Without it a READONLY reply (or an I/O error) is what makes the client re-resolve.
    public var followSwitchMaster: Bool = true

    /// Makes a configuration from its parts.
    public init(
        endpoint: Endpoint,
        username: String? = nil,
        password: String? = nil,
        database: Int = 0
    ) {
        self.endpoint = endpoint
        self.username = username
        self.password = password
        self.database = database
    }

    /// Parses a Celery/kombu broker URL.
    ///
    /// Accepted: `redis://[user[:pass]@]host[:port][/db]`, `redis+socket:///path[?virtual_host=db]`,
    /// `unix:///path[?db=N]`, and `sentinel://[:pass@]h1:26379[/db];sentinel://h2:26379` (which needs
    /// `masterName`). User and password are percent-decoded. TLS as kombu decides it: any `ssl_*` query
    /// parameter (`ssl_cert_reqs` required, optional or none, `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`,
    /// `ssl_check_hostname`) turns it on, with those settings; a bare `rediss://` is TLS without checking the
    /// certificate (kombu's default). Other parameters are ignored, as kombu ignores them.
    public init(url: String, masterName: String? = nil, sentinelPassword: String? = nil) throws(RedisError) {
        let trimmed = url.trimmingCharacters(in: .whitespacesAndNewlines)
        func bad(_ why: String) -> RedisError {
            RedisError(
                code: .invalidURL,
                message: "invalid Redis broker URL '\(RedisConfiguration.redactRaw(trimmed))': \(why)"
            )
        }
        guard let sep = trimmed.range(of: "://") else {
            throw bad("expected redis://host:port/db, unix:///path or sentinel://host:port")
        }
        let scheme = trimmed[..<sep.lowerBound].lowercased()
        let rest = String(trimmed[sep.upperBound...])
        switch scheme {
        case "redis", "rediss":
            let parts = try Self.parseNetloc(rest, defaultPort: 6379, bad: bad)
            self.init(endpoint: .tcp(host: parts.host, port: parts.port), username: parts.user,
                      password: parts.password, database: parts.db ?? 0)
            tls = try Self.tlsOptions(parts.query, bad: bad)
            if tls == nil, scheme == "rediss" {
                tls = TLS()
                tls?.verifyPeer = false
                tls?.schemeOnly = true
            }
        case "unix", "redis+socket":
            var body = rest
            var user: String?
            var password: String?
            if !body.hasPrefix("/"), let at = body.firstIndex(of: "@") {
                (user, password) = try Self.parseUserInfo(String(body[..<at]), bad: bad)
                body = String(body[body.index(after: at)...])
            }
            var query = ""
            if let q = body.firstIndex(of: "?") {
                query = String(body[body.index(after: q)...])
                body = String(body[..<q])
            }
            guard body.hasPrefix("/"), body.count > 1 else { throw bad("expected an absolute socket path, as in unix:///run/redis.sock") }
            var db = 0
            for item in query.split(separator: "&") {
                let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2, kv[0] == "db" || kv[0] == "virtual_host" else { continue }
                guard let n = Int(kv[1]), n >= 0 else { throw bad("database '\(kv[1])' is not a non-negative integer") }
                db = n
            }
            self.init(endpoint: .unix(path: body.removingPercentEncoding ?? body), username: user,
                      password: password, database: db)
        case "sentinel":
            var nodes: [HostPort] = []
            var user: String?
            var password: String?
            var db: Int?
            for piece in trimmed.split(separator: ";") {
                let p = piece.trimmingCharacters(in: .whitespaces)
                guard p.lowercased().hasPrefix("sentinel://") else {
                    throw bad("every ';'-separated part must start with sentinel:// ('\(Self.redactRaw(p))' does not)")
                }
                let parts = try Self.parseNetloc(String(p.dropFirst("sentinel://".count)), defaultPort: 26379, bad: bad)
                nodes.append(HostPort(host: parts.host, port: parts.port))
                if user == nil { user = parts.user }
                if password == nil { password = parts.password }
                if db == nil { db = parts.db }
            }
            guard let masterName, !masterName.isEmpty else {
                throw RedisError(
                    code: .invalidURL,
                    message: "sentinel:// broker URL '\(Self.redactRaw(trimmed))' needs a master name — set [celery_broker_transport_options] master_name / AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__MASTER_NAME"
                )
            }
            self.init(endpoint: .sentinel(nodes: nodes, masterName: masterName, sentinelPassword: sentinelPassword),
                      username: user, password: password, database: db ?? 0)
        default:
            throw bad("unsupported scheme '\(scheme)://' — use redis://, unix://, redis+socket:// or sentinel://")
        }
    }

    private struct Netloc {
        var user: String?
        var password: String?
        var host: String
        var port: Int
        var db: Int?
        /// The query's parameters, percent-decoded.
        var query: [String: String]
    }

    /// TLS settings from a URL's `ssl_*` query parameters, as kombu and redis-py read them; nil when there are none.
    static func tlsOptions(_ query: [String: String], bad: (String) -> RedisError) throws(RedisError) -> TLS? {
        guard query.keys.contains(where: { $0.hasPrefix("ssl_") }) else { return nil }
        // a TLS setting silently ignored could weaken what the operator asked for: refuse what is not done here
        if let unknown = query.keys.filter({ $0.hasPrefix("ssl_") && !supportedTLSParameters.contains($0) }).sorted().first {
            throw bad("\(unknown) is not supported by Tandem (supported: \(supportedTLSParameters.sorted().joined(separator: ", "))) — remove it, or give Tandem its own --broker URL without it")
        }
        var tls = TLS()
        if let reqs = query["ssl_cert_reqs"] {
            switch reqs.lowercased() {
            case "required", "cert_required": tls.verifyPeer = true
            case "optional", "cert_optional": tls.verifyPeer = true  // a client always gets a certificate to check
            case "none", "cert_none": tls.verifyPeer = false
            default: throw bad("ssl_cert_reqs must be required, optional or none, not '\(reqs)'")
            }
        }
        if let check = query["ssl_check_hostname"] {
            switch check.lowercased() {
            case "true", "1", "yes", "on": tls.checkHostname = true
            case "false", "0", "no", "off": tls.checkHostname = false
            default: throw bad("ssl_check_hostname must be true or false, not '\(check)'")
            }
        }
        // as Airflow 2 writes them, an empty setting means "none"
        tls.caFile = query["ssl_ca_certs"].flatMap { $0.isEmpty ? nil : $0 }
        tls.certFile = query["ssl_certfile"].flatMap { $0.isEmpty ? nil : $0 }
        tls.keyFile = query["ssl_keyfile"].flatMap { $0.isEmpty ? nil : $0 }
        tls.caPath = query["ssl_ca_path"].flatMap { $0.isEmpty ? nil : $0 }
        tls.keyPassword = query["ssl_password"].flatMap { $0.isEmpty ? nil : $0 }
        return tls
    }

    /// redis-py's `ssl_*` connection arguments that Tandem honours.
    static let supportedTLSParameters: Set<String> = [
        "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_check_hostname",
    ]

    private static func parseUserInfo(_ info: String, bad: (String) -> RedisError) throws(RedisError) -> (String?, String?) {
        func decode(_ s: Substring) throws(RedisError) -> String? {
            if s.isEmpty { return nil }
            guard let d = String(s).removingPercentEncoding else { throw bad("user or password has a bad %-escape") }
            return d
        }
        if let colon = info.firstIndex(of: ":") {
            return (try decode(info[..<colon]), try decode(info[info.index(after: colon)...]))
        }
        return (try decode(info[...]), nil)
    }

    private static func parseNetloc(_ s: String, defaultPort: Int, bad: (String) -> RedisError) throws(RedisError) -> Netloc {
        var body = s
        var query = ""
        if let q = body.firstIndex(of: "?") {
            query = String(body[body.index(after: q)...])
            body = String(body[..<q])
        }
        var path = ""
        // userinfo may contain '/', so find '@' first (the last one before the path).
        var user: String?
        var password: String?
        if let at = body.lastIndex(of: "@") {
            (user, password) = try parseUserInfo(String(body[..<at]), bad: bad)
            body = String(body[body.index(after: at)...])
        }
        if let slash = body.firstIndex(of: "/") {
            path = String(body[body.index(after: slash)...])
            body = String(body[..<slash])
        }
        var host = body
        var port = defaultPort
        if body.hasPrefix("[") {
            guard let close = body.firstIndex(of: "]") else { throw bad("unterminated IPv6 address '\(body)'") }
            host = String(body[body.index(after: body.startIndex)..<close])
            let after = body[body.index(after: close)...]
            if after.hasPrefix(":") {
                guard let p = Int(after.dropFirst()), (1...65535).contains(p) else { throw bad("port '\(after.dropFirst())' is not a number from 1 to 65535") }
                port = p
            } else if !after.isEmpty {
                throw bad("unexpected '\(after)' after IPv6 address")
            }
        } else if let colon = body.lastIndex(of: ":") {
            host = String(body[..<colon])
            let ps = body[body.index(after: colon)...]
            if !ps.isEmpty {
                guard let p = Int(ps), (1...65535).contains(p) else { throw bad("port '\(ps)' is not a number from 1 to 65535") }
                port = p
            }
        }
        if host.isEmpty { host = "localhost" }
        var db: Int?
        if !path.isEmpty {
            guard let n = Int(path), n >= 0 else { throw bad("database '/\(path)' is not a non-negative integer") }
            db = n
        }
        var parameters: [String: String] = [:]
        for item in query.split(separator: "&") {
            let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { continue }
            parameters[kv[0]] = kv[1].removingPercentEncoding ?? kv[1]
            guard kv[0] == "db" || kv[0] == "virtual_host" else { continue }
            guard let n = Int(kv[1]), n >= 0 else { throw bad("database '\(kv[1])' is not a non-negative integer") }
            db = n
        }
        return Netloc(user: user, password: password, host: host, port: port, db: db, query: parameters)
    }

    /// Replaces the password (and a TLS key's `ssl_password`) in a URL the parser could not accept, so error
    /// messages never echo it.
    static func redactRaw(_ url: String) -> String {
        var url = url
        while let r = url.range(of: "ssl_password="), !url[r.upperBound...].hasPrefix("***") {
            let end = url[r.upperBound...].firstIndex(where: { $0 == "&" || $0 == ";" }) ?? url.endIndex
            url.replaceSubrange(r.upperBound..<end, with: "***")
        }
        return url.split(separator: ";", omittingEmptySubsequences: false).map { piece -> String in
            let p = String(piece)
            guard let sep = p.range(of: "://"), let at = p[sep.upperBound...].lastIndex(of: "@") else { return p }
            let info = p[sep.upperBound..<at]
            guard let colon = info.firstIndex(of: ":") else { return p }
            return String(p[..<colon]) + ":***" + String(p[at...])
        }.joined(separator: ";")
    }

    private var userInfo: String {
        switch (username, password) {
        case (nil, nil): return ""
        case (let u?, nil): return "\(u)@"
        case (let u, _?): return "\(u ?? ""):***@"
        }
    }

    /// The URL with the password replaced by `***`, for messages and logs.
    public var redacted: String {
        switch endpoint {
        case .tcp(let host, let port):
            return "\(tls == nil ? "redis" : "rediss")://\(userInfo)\(HostPort(host: host, port: port))/\(database)"
        case .unix(let path):
            return "unix://\(userInfo)\(path)?db=\(database)"
        case .sentinel(let nodes, let master, _):
            let first = nodes.first.map { "sentinel://\(userInfo)\($0)/\(database)" } ?? "sentinel://"
            let others = nodes.dropFirst().map { ";sentinel://\($0)" }.joined()
            return first + others + " (master '\(master)')"
        }
    }

    /// Where this configuration connects, for one-line messages: `127.0.0.1:6390 (db 0)`.
    var location: String {
        switch endpoint {
        case .tcp(let host, let port): return "\(HostPort(host: host, port: port)) (db \(database)\(tls == nil ? "" : ", TLS"))"
        case .unix(let path): return "unix:\(path) (db \(database))"
        case .sentinel(let nodes, let master, _):
            return "master '\(master)' via sentinel \(nodes.map(\.description).joined(separator: ",")) (db \(database))"
        }
    }
}
