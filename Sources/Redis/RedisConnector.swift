import Logging

/// Logger metadata keys used by this module, in one place.
enum RedisLogKey {
    static let endpoint = "redis.endpoint"
    static let label = "redis.label"
    static let error = "redis.error"
    static let master = "redis.master"
    static let tls = "redis.tls"
}

/// Opens a ready connection for a configuration: resolve (Sentinel), connect, AUTH, SELECT, set timeouts.
enum RedisConnector {
    static func establish(_ config: RedisConfiguration, logger: Logger) throws(RedisError) -> RedisConnection {
        let conn: RedisConnection
        switch config.endpoint {
        case .tcp(let host, let port):
            conn = try RedisConnection.open(host: host, port: port, tls: config.tls, timeout: config.connectTimeout,
                                            location: config.location, hint: config.connectHint)
        case .unix(let path):
            conn = try RedisConnection.open(unixPath: path, timeout: config.connectTimeout,
                                            location: config.location, hint: config.connectHint)
        case .sentinel(let nodes, let master, let sentinelPassword):
            let addr = try resolveMaster(config, nodes: nodes, master: master, sentinelPassword: sentinelPassword, logger: logger)
            let location = "\(addr) (db \(config.database), master '\(master)'\(config.tls == nil ? "" : ", TLS"))"
            conn = try RedisConnection.open(host: addr.host, port: addr.port, tls: config.tls, timeout: config.connectTimeout,
                                            location: location, hint: config.connectHint)
        }
        conn.setTimeout(config.commandTimeout ?? config.connectTimeout)
        try handshake(conn, config)
        if case .sentinel(_, let master, _) = config.endpoint {
            let role = try conn.command(["ROLE"].argBytes, timeout: config.connectTimeout)
            let name = role.array?.first?.string ?? "unknown"
            guard name == "master" else {
                throw RedisError(
                    code: .sentinel,
                    message: "Sentinel named \(conn.location) as master '\(master)' but it reports role '\(name)' — a failover is probably in progress; the next call asks the sentinels again"
                )
            }
        }
        conn.setTimeout(config.commandTimeout)
        logger.debug("connected to Redis", metadata: [
            RedisLogKey.endpoint: "\(conn.location)", RedisLogKey.tls: "\(conn.tlsVersion ?? "off")",
        ])
        return conn
    }

    private static func handshake(_ conn: RedisConnection, _ config: RedisConfiguration) throws(RedisError) {
        if let password = config.password {
            var args = ["AUTH"]
            if let user = config.username { args.append(user) }
            args.append(password)
            let reply = try conn.command(args.argBytes, timeout: config.connectTimeout)
            if case .error(let e) = reply {
                let who = config.username.map { "user '\($0)'" } ?? "the password"
                throw RedisError(
                    code: .authFailed,
                    message: "Redis at \(conn.location) refused AUTH for \(who): \(e) — check the user and password in the broker URL",
                    underlying: e
                )
            }
        }
        if config.database != 0 {
            let reply = try conn.command(["SELECT", String(config.database)].argBytes, timeout: config.connectTimeout)
            if case .error(let e) = reply {
                let code: RedisError.Code = e.hasPrefix("NOAUTH") ? .authFailed : .server
                throw RedisError(
                    code: code,
                    message: "Redis at \(conn.location) refused SELECT \(config.database): \(e) — check the database number (and password) in the broker URL",
                    underlying: e
                )
            }
        }
    }

    private static func resolveMaster(
        _ config: RedisConfiguration,
        nodes: [RedisConfiguration.HostPort],
        master: String,
        sentinelPassword: String?,
        logger: Logger
    ) throws(RedisError) -> RedisConfiguration.HostPort {
        var failures: [String] = []
        for node in nodes {
            do {
                let s = try RedisConnection.open(host: node.host, port: node.port, timeout: config.connectTimeout,
                                                 location: "sentinel \(node)", hint: "is redis-sentinel running?")
                s.setTimeout(config.connectTimeout)
                if let sentinelPassword {
                    let r = try s.command(["AUTH", sentinelPassword].argBytes, timeout: config.connectTimeout)
                    if case .error(let e) = r {
                        failures.append("\(node): AUTH refused (\(e))")
                        continue
                    }
                }
                let r = try s.command(["SENTINEL", "get-master-addr-by-name", master].argBytes, timeout: config.connectTimeout)
                if let pair = r.array, pair.count == 2, let host = pair[0].string, let port = pair[1].int {
                    logger.debug("sentinel resolved master",
                                 metadata: [RedisLogKey.master: "\(master)", RedisLogKey.endpoint: "\(host):\(port)"])
                    return RedisConfiguration.HostPort(host: host, port: Int(port))
                }
                if case .error(let e) = r {
                    failures.append("\(node): \(e)")
                } else {
                    failures.append("\(node): does not know master '\(master)'")
                }
            } catch {
                failures.append("\(node): \(error.underlying ?? error.message)")
            }
        }
        throw RedisError(
            code: .sentinel,
            message: "no Redis Sentinel could name master '\(master)' (\(failures.joined(separator: "; "))) — check the sentinel:// URLs and [celery_broker_transport_options] master_name",
            underlying: failures.last
        )
    }
}
