import AirflowConfig
import CeleryWire
import ClientSupport
import Dispatch
import Foundation
import Logging
import Postgres
import Redis
import TandemCore
import TandemPostgres
import TandemRedis

/// Resolves a setting the way every Tandem command does: the flag, else the environment, else the default.
public func setting(_ flag: String?, env: String..., default value: String? = nil) -> String? {
    if let flag { return flag }
    let environment = ProcessInfo.processInfo.environment
    for name in env { if let v = environment[name], !v.isEmpty { return v } }
    return value
}

/// A configuration problem or an unreachable server, said in one line.
public struct SetupError: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

public enum Defaults {
    public static let broker = "redis://127.0.0.1:6379/0"
}

/// Opens the broker from a Celery broker URL (`redis://`, `rediss://`, `redis+socket://`, `sentinel://`).
/// `loop`: the worker's loop, which then drives the claim and ack connection (RedisBroker).
public func openBroker(
    url: String, masterName: String?, logger: Logger, loop: (any IOLoop)? = nil, allCallsOnLoop: Bool = false
) async throws -> RedisBroker {
    try await openBroker(configuration: try brokerConfiguration(url: url, masterName: masterName, logger: logger),
                         logger: logger, loop: loop, allCallsOnLoop: allCallsOnLoop)
}

/// Opens the broker from a configuration made by `brokerConfiguration` (when the caller also needs it).
public func openBroker(
    configuration config: RedisConfiguration, logger: Logger, loop: (any IOLoop)? = nil, allCallsOnLoop: Bool = false
) async throws -> RedisBroker {
    // TANDEM_REPLICA_ACKS=1 with Sentinel: every move waits for a replica, so a failover cannot roll it back
    let acks = Int(ProcessInfo.processInfo.environment["TANDEM_REPLICA_ACKS"] ?? "") ?? 0
    let broker = RedisBroker(configuration: config, logger: logger, replicaAcks: max(0, acks), loop: loop, allCallsOnLoop: allCallsOnLoop)
    try await broker.connect()
    return broker
}

/// The broker's Redis configuration as the Airflow scheduler's Celery reaches the same Redis: the URL (its `ssl_*`
/// parameters win, as in kombu), else Airflow's `[celery] ssl_active` settings (TLS even for `redis://` and to a
/// Sentinel's master, as there), else a bare `rediss://` connects without checking the certificate (kombu's
/// default; warned about).
public func brokerConfiguration(
    url: String, masterName: String?, airflow: AirflowConfig = .load(), logger: Logger
) throws -> RedisConfiguration {
    let master = masterName ?? ProcessInfo.processInfo.environment["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__MASTER_NAME"]
    var config = try RedisConfiguration(url: url, masterName: master)
    if config.tls == nil || config.tls?.schemeOnly == true, let ssl = airflow.brokerSSL {
        if case .unix = config.endpoint {
            throw SetupError("[celery] ssl_active is on but the broker URL is a Unix socket — TLS needs a TCP broker URL (rediss://host:port) or ssl_active = False")
        }
        var tls = RedisConfiguration.TLS()
        tls.caFile = ssl.caFile
        tls.certFile = ssl.certFile
        tls.keyFile = ssl.keyFile
        config.tls = tls
    }
    if config.tls?.schemeOnly == true {
        logger.warning("rediss:// without ssl_cert_reqs: Redis's certificate is not checked (kombu's default too) — add ?ssl_cert_reqs=required&ssl_ca_certs=/path/to/ca.pem to the broker URL or set [celery] ssl_active and ssl_cacert")
    }
    return config
}

/// The result backend and the ledger for a Celery `result_backend` URL.
/// - `db+postgresql://…` (any driver spelling): results in `celery_taskmeta`, ledger in the same database.
/// - `redis://…`: results in `celery-task-meta-<id>` keys; the ledger needs a Postgres URL (`--ledger`).
public struct Stores: Sendable {
    public var results: any ResultBackend
    public var ledger: any TaskLedger
    public var postgres: PostgresStore
    public var close: @Sendable () -> Void
}

public func isPostgresURL(_ url: String) -> Bool {
    let u = url.lowercased()
    return u.hasPrefix("db+postgres") || u.hasPrefix("postgres") || u.hasPrefix("host=")
}

/// Where results wait on local disk while Postgres is unreachable: `--spool-dir`, else TANDEM_SPOOL_DIR, else
/// /var/lib/tandem/spool when it can be created, else ~/.local/state/tandem/spool.
public func defaultSpoolDirectory() -> String {
    if let d = ProcessInfo.processInfo.environment["TANDEM_SPOOL_DIR"], !d.isEmpty { return d }
    let system = "/var/lib/tandem/spool"
    if (try? FileManager.default.createDirectory(atPath: system, withIntermediateDirectories: true)) != nil,
        FileManager.default.isWritableFile(atPath: system)
    {
        return system
    }
    return NSHomeDirectory() + "/.local/state/tandem/spool"
}

public func openStores(
    resultBackend: String?, ledger: String?, brokerURL: String, spoolDirectory: String? = nil, logger: Logger
) async throws -> Stores {
    guard let resultBackend else {
        throw SetupError(
            "no result backend: set --result-backend or AIRFLOW__CELERY__RESULT_BACKEND (e.g. db+postgresql://user:pass@host/airflow) — the same value Airflow's [celery] result_backend has")
    }
    if isPostgresURL(resultBackend) {
        let pg = PostgresStore(configuration: try PostgresConfiguration(url: resultBackend), logger: logger)
        let spooling = try await prepareOrSpool(pg, spoolDirectory: spoolDirectory, logger: logger)
        return Stores(results: spooling, ledger: spooling, postgres: pg, close: { pg.close() })
    }
    if resultBackend.hasPrefix("redis") || resultBackend.hasPrefix("sentinel") {
        guard let ledger, isPostgresURL(ledger) else {
            throw SetupError(
                "result backend \(resultBackend.redactingPassword) is Redis, so Tandem's ledger needs a Postgres URL: set --ledger or TANDEM_LEDGER_URL (postgresql://…)")
        }
        let pg = PostgresStore(configuration: try PostgresConfiguration(url: ledger), logger: logger)
        let spooling = try await prepareOrSpool(pg, spoolDirectory: spoolDirectory, logger: logger)
        let rc = try RedisConfiguration(url: resultBackend)
        let sameServer = (try? RedisConfiguration(url: brokerURL)).map {
            $0.endpoint == rc.endpoint && $0.database == rc.database
        } ?? false
        let rb = RedisResultBackend(configuration: rc, sameServerAsBroker: sameServer, logger: logger)
        return Stores(results: rb, ledger: spooling, postgres: pg, close: { pg.close(); rb.close() })
    }
    throw SetupError(
        "result backend \(resultBackend.redactingPassword) is not supported: use db+postgresql://… or redis://…")
}

/// Connects to Postgres and migrates its schema; when Postgres cannot be reached (down, a partition, refusing
/// writes), starts anyway with every result going to the local spool until it answers. A configuration error
/// (wrong password, unknown database, a certificate that does not verify) still fails the start, with its message.
private func prepareOrSpool(_ pg: PostgresStore, spoolDirectory: String?, logger: Logger) async throws -> SpoolingStore {
    let directory = spoolDirectory ?? defaultSpoolDirectory()
    let spooling = try SpoolingStore(postgres: pg, directory: directory, logger: logger)
    do {
        try await pg.prepare()
    } catch let e as PostgresError where (e.isOutage || e.isPassingRefusal) && !e.isMisconfiguration {
        logger.warning("cannot reach Postgres at start (\(e.message)); starting anyway: results go to the local spool in \(directory) until it answers, then its schema is checked and they are flushed in order")
        spooling.startWithoutPostgres { try await pg.prepare() }
    }
    spooling.recoverLeftovers()
    return spooling
}

extension String {
    /// The URL with any password replaced by ***.
    public var redactingPassword: String {
        guard let scheme = range(of: "://"), let at = self[scheme.upperBound...].firstIndex(of: "@") else { return self }
        let userinfo = self[scheme.upperBound..<at]
        guard let colon = userinfo.firstIndex(of: ":") else { return self }
        return String(self[..<colon]) + ":***" + String(self[at...])
    }
}

/// SIGTERM/SIGINT handling without touching the task processes: the first SIGTERM calls `graceful`; a second
/// SIGTERM, or SIGINT, calls `immediate`.
public final class SignalHandlers: @unchecked Sendable {
    private var sources: [DispatchSourceSignal] = []
    private var terms = 0

    public init(graceful: @escaping @Sendable () -> Void, immediate: @escaping @Sendable () -> Void) {
        // hiredis sends without MSG_NOSIGNAL: a write to a connection Redis (or a proxy, or a dead peer) has reset
        // must fail with EPIPE so the client reconnects, not kill the process. Task processes get every signal
        // disposition back to the default before exec (cspawn.c), so they see SIGPIPE as usual.
        signal(SIGPIPE, SIG_IGN)
        let queue = DispatchQueue(label: "tandem.signals")
        for sig in [SIGTERM, SIGINT] {
            signal(sig, SIG_IGN)
            let src = DispatchSource.makeSignalSource(signal: sig, queue: queue)
            src.setEventHandler { [unowned self, src] in  // (src keeps itself alive: one per signal, for the process lifetime)
                // signals that arrive before the handler runs are coalesced into one call; `data` counts them, so
                // two quick SIGTERMs are still a second SIGTERM
                let count = max(1, Int(src.data))
                if sig == SIGTERM && self.terms == 0 {
                    self.terms += count
                    graceful()
                    if count > 1 { immediate() }
                } else {
                    immediate()
                }
            }
            src.resume()
            sources.append(src)
        }
    }
}
