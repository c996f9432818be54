import Foundation
import AirflowConfig
import Logging
import Redis
import Setup
import Testing

@Suite("airflow.cfg")
struct AirflowConfigTests {
    static let cfg = """
        [core]
        execution_api_server_url = http://api:8080/execution/
        # a comment
        [celery]
        broker_url = redis://file:6379/0
        result_backend = db+postgresql://u:p@db/airflow
        worker_concurrency = 8
        [celery_broker_transport_options]
        master_name = mymaster
        visibility_timeout = 21600
        [logging]
        base_log_folder = /var/log/airflow
        [api]
        secret_key = s3cret
        [webserver]
        secret_key = old
        """

    @Test func fileValues() {
        let c = AirflowConfig.parse(Self.cfg)
        #expect(c.brokerURL == "redis://file:6379/0")
        #expect(c.resultBackend == "db+postgresql://u:p@db/airflow")
        #expect(c.workerConcurrency == 8)
        #expect(c.masterName == "mymaster")
        #expect(c.visibilityTimeout == 21600)
        #expect(c.baseLogFolder == "/var/log/airflow")
        #expect(c.secretKey == "s3cret")
        #expect(c.executionAPIServerURL == "http://api:8080/execution/")
    }

    @Test func environmentWins() {
        var c = AirflowConfig.parse(Self.cfg)
        c.environment = ["AIRFLOW__CELERY__BROKER_URL": "redis://env:6379/1", "AIRFLOW__CELERY__WORKER_CONCURRENCY": "3"]
        #expect(c.brokerURL == "redis://env:6379/1")
        #expect(c.workerConcurrency == 3)
        #expect(c.masterName == "mymaster")
    }

    @Test func fallbacks() {
        let c = AirflowConfig.parse("""
            [database]
            sql_alchemy_conn = postgresql+psycopg2://a@b/c
            [webserver]
            secret_key = airflow2
            [api]
            base_url = http://host:9090
            """)
        #expect(c.resultBackend == "db+postgresql+psycopg2://a@b/c")
        #expect(c.secretKey == "airflow2")
        #expect(c.executionAPIServerURL == "http://host:9090/execution/")
    }

    /// `[celery] ssl_*` as Airflow's CeleryExecutor turns them into `broker_use_ssl` (celery provider,
    /// default_celery.py): certificate required, the CA file, the client pair unless `ssl_mutual_tls` is off.
    @Test func brokerSSLSettings() {
        var c = AirflowConfig.parse("""
            [celery]
            ssl_active = True
            ssl_cacert = /etc/ca.pem
            ssl_cert = /etc/client.pem
            ssl_key = /etc/client.key
            """)
        #expect(c.brokerSSL == .init(caFile: "/etc/ca.pem", certFile: "/etc/client.pem", keyFile: "/etc/client.key"))
        c.environment = ["AIRFLOW__CELERY__SSL_MUTUAL_TLS": "False"]
        #expect(c.brokerSSL == .init(caFile: "/etc/ca.pem", certFile: nil, keyFile: nil))
        c.environment = ["AIRFLOW__CELERY__SSL_ACTIVE": "false"]
        #expect(c.brokerSSL == nil)
        #expect(AirflowConfig.parse("[celery]\nssl_active = true\nssl_cacert =\n").brokerSSL == .init(caFile: nil, certFile: nil, keyFile: nil))
    }

    /// Which TLS settings the broker connection gets, in kombu's order: the URL's `ssl_*` parameters replace
    /// Airflow's `broker_use_ssl` entirely; without them `ssl_active` applies (even to redis://); a bare
    /// rediss:// alone checks nothing.
    @Test func brokerTLSPrecedence() throws {
        let logger = Logger(label: "t", factory: { _ in SwiftLogNoOpLogHandler() })
        let airflow = AirflowConfig.parse("[celery]\nssl_active = True\nssl_cacert = /etc/ca.pem\n")
        let none = AirflowConfig.parse("")

        let fromURL = try brokerConfiguration(url: "rediss://h/0?ssl_ca_certs=/url-ca.pem", masterName: nil, airflow: airflow, logger: logger)
        #expect(fromURL.tls?.caFile == "/url-ca.pem" && fromURL.tls?.verifyPeer == true)

        let fromAirflow = try brokerConfiguration(url: "redis://h/0", masterName: nil, airflow: airflow, logger: logger)
        #expect(fromAirflow.tls?.caFile == "/etc/ca.pem" && fromAirflow.tls?.verifyPeer == true)
        let bareWithAirflow = try brokerConfiguration(url: "rediss://h/0", masterName: nil, airflow: airflow, logger: logger)
        #expect(bareWithAirflow.tls?.caFile == "/etc/ca.pem" && bareWithAirflow.tls?.schemeOnly == false)

        let warnings = CollectedLog()
        let collecting = Logger(label: "t", factory: { _ in warnings })
        let bare = try brokerConfiguration(url: "rediss://h/0", masterName: nil, airflow: none, logger: collecting)
        #expect(bare.tls?.verifyPeer == false)
        // unchecked TLS is said once, with what to set
        #expect(warnings.messages.count == 1 && warnings.messages[0].contains("ssl_cert_reqs=required&ssl_ca_certs="), "\(warnings.messages)")
        _ = try brokerConfiguration(url: "rediss://h/0?ssl_cert_reqs=none", masterName: nil, airflow: none, logger: collecting)
        #expect(warnings.messages.count == 1, "explicitly unchecked: no warning")
        #expect(try brokerConfiguration(url: "redis://h/0", masterName: nil, airflow: none, logger: logger).tls == nil)

        let sentinel = try brokerConfiguration(url: "sentinel://s:26379", masterName: "m", airflow: airflow, logger: logger)
        #expect(sentinel.tls?.caFile == "/etc/ca.pem")
        #expect(throws: SetupError.self) {
            try brokerConfiguration(url: "unix:///run/redis.sock", masterName: nil, airflow: airflow, logger: logger)
        }
    }
}

/// A log handler that keeps the messages of warnings and worse, for tests that check what an operator is told.
final class CollectedLog: LogHandler, @unchecked Sendable {
    private let lock = NSLock()
    private var kept: [String] = []
    var messages: [String] { lock.withLock { kept } }
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .warning
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
             file: String, function: String, line: UInt) {
        lock.withLock { kept.append(message.description) }
    }
}
