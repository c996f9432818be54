import ArgumentParser
import Foundation
import Logging
import Observability
import Setup
import TandemCore
import Worker

@main
struct SwiftWorker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swift-worker",
        abstract: "Runs Airflow tasks claimed from one datacenter's Tandem queues.",
        discussion: """
            Settings come from flags, then the environment (Airflow's own names where they exist), then defaults.
            SIGTERM stops claiming and lets running tasks finish (--shutdown-grace); a second SIGTERM or SIGINT
            stops them and puts them back on the queue.
            """)

    @Option(help: "Celery broker URL (env AIRFLOW__CELERY__BROKER_URL; default \(Defaults.broker)).")
    var broker: String?
    @Option(name: .customLong("master-name"), help: "Sentinel master name (env AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__MASTER_NAME).")
    var masterName: String?
    @Option(name: .customLong("result-backend"), help: "Celery result backend URL (env AIRFLOW__CELERY__RESULT_BACKEND).")
    var resultBackend: String?
    @Option(help: "Postgres URL of Tandem's ledger when the result backend is Redis (env TANDEM_LEDGER_URL).")
    var ledger: String?
    @Option(help: "This worker's datacenter (env TANDEM_DC).")
    var dc: String?
    @Option(help: "Comma-separated Airflow queues to serve (env TANDEM_QUEUES; default 'default').")
    var queues: String?
    @Option(help: "Task slots (env AIRFLOW__CELERY__WORKER_CONCURRENCY; default 16).")
    var concurrency: Int?
    @Option(name: .customLong("lease-ttl"), help: "Lease length in seconds (default 30).")
    var leaseTTL: Double = 30
    @Option(name: .customLong("renew-every"), help: "Lease renewal interval in seconds (default 10).")
    var renewEvery: Double = 10
    @Option(name: .customLong("shutdown-grace"), help: "Seconds running tasks get after SIGTERM (default 60).")
    var shutdownGrace: Double = 60
    @Option(name: .customLong("airflow"), help: "The airflow executable for Airflow 2 commands (default: 'airflow' on PATH).")
    var airflowExecutable: String = "airflow"
    @Option(help: "Python interpreter with Airflow installed, for Airflow 3 workloads (env TANDEM_PYTHON; default python3).")
    var python: String?
    @Option(name: .customLong("execution-api-url"), help: "Airflow 3 Execution API URL (env AIRFLOW__CORE__EXECUTION_API_SERVER_URL).")
    var executionAPIURL: String?
    @Option(name: .customLong("work-dir"), help: "Directory for workload files (default: a private temp dir).")
    var workDir: String?
    @Option(name: .customLong("task-output"), help: "Append task stdout/stderr to this file instead of the worker's own.")
    var taskOutput: String?
    @Option(name: .customLong("spool-dir"), help: "Local directory where results wait while Postgres is unreachable (env TANDEM_SPOOL_DIR; default /var/lib/tandem/spool).")
    var spoolDir: String?
    @Option(name: .customLong("worker-id"), help: "Worker id (default <dc>@<hostname>:<pid>).")
    var workerID: String?
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error (env TANDEM_LOG_LEVEL).")
    var logLevel: String?
    @Flag(name: .customLong("log-json"), help: "Log one JSON object per line.")
    var logJSON = false
    @Option(name: .customLong("metrics-port"), help: "Port for /metrics, /healthz, /readyz (env TANDEM_METRICS_PORT; default 9464; 0 disables).")
    var metricsPort: Int?

    func run() async throws {
        bootstrapLogging(level: setting(logLevel, env: "TANDEM_LOG_LEVEL"), json: logJSON)
        let logger = Logger(label: "tandem.worker")
        guard let dc = setting(dc, env: "TANDEM_DC") else {
            throw ValidationError("which datacenter is this worker in? pass --dc NAME or set TANDEM_DC")
        }
        if let problem = Names.problem(datacenter: dc) { throw ValidationError(problem) }
        let queueList = (setting(queues, env: "TANDEM_QUEUES", default: "default") ?? "default")
            .split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        let slots = concurrency
            ?? setting(nil, env: "AIRFLOW__CELERY__WORKER_CONCURRENCY").flatMap { Int($0) } ?? 16
        guard slots > 0 else { throw ValidationError("--concurrency must be at least 1") }
        guard leaseTTL > renewEvery * 2 else {
            throw ValidationError("--lease-ttl (\(leaseTTL)s) must exceed twice --renew-every (\(renewEvery)s) so one missed renewal does not lose the lease")
        }
        let brokerURL = setting(broker, env: "AIRFLOW__CELERY__BROKER_URL", default: Defaults.broker)!

        do {
            let b = try await openBroker(url: brokerURL, masterName: masterName, logger: logger)
            let stores = try await openStores(
                resultBackend: setting(resultBackend, env: "AIRFLOW__CELERY__RESULT_BACKEND"),
                ledger: setting(ledger, env: "TANDEM_LEDGER_URL"), brokerURL: brokerURL,
                spoolDirectory: setting(spoolDir, env: "TANDEM_SPOOL_DIR"), logger: logger)
            let dir = workDir ?? NSTemporaryDirectory() + "tandem-worker-\(getpid())"
            try FileManager.default.createDirectory(
                atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            let launcher = SpawnLauncher(
                airflowExecutable: airflowExecutable, python: setting(python, env: "TANDEM_PYTHON", default: "python3")!,
                executionAPIServerURL: setting(executionAPIURL, env: "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"),
                workDirectory: dir, taskOutput: taskOutput)
            var config = WorkerConfiguration(datacenter: dc, queues: queueList, concurrency: slots, workerID: workerID)
            config.leaseTTL = .milliseconds(Int64(leaseTTL * 1000))
            config.renewInterval = .milliseconds(Int64(renewEvery * 1000))
            config.shutdownGrace = .milliseconds(Int64(shutdownGrace * 1000))
            config.claimBatch = min(slots, 32)
            let metrics = PrometheusWorkerObserver(datacenter: dc, workerID: config.workerID, slots: slots)
            let runtime = WorkerRuntime(
                configuration: config, broker: b, results: stores.results, ledger: stores.ledger, launcher: launcher,
                logger: logger, observer: metrics)
            metrics.collect(from: runtime)
            let port = metricsPort ?? setting(nil, env: "TANDEM_METRICS_PORT").flatMap { Int($0) } ?? 9464
            // metrics are secondary to running work: a port in use is logged, not fatal
            let server = ObservabilityEndpoints.serveOrLog(
                port: port, registry: metrics.registry, ready: { metrics.readiness(runtime) }, logger: logger)
            defer { server?.stop() }
            let handlers = SignalHandlers(graceful: { runtime.shutdown() }, immediate: { runtime.shutdownNow() })
            try await runtime.run()
            withExtendedLifetime(handlers) {}
            stores.close()
            b.close()
            try? FileManager.default.removeItem(atPath: dir)
        } catch let e as ValidationError {
            throw e
        } catch {
            logger.critical("\(error)")
            throw ExitCode(2)
        }
    }
}
