import AirflowConfig
import AirflowRunner
import ArgumentParser
import Foundation
import LogServer
import Logging
import Observability
import Pidbox
import Redis
import Setup
import TandemCore
import Worker

@main
struct SwiftWorker: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swift-worker",
        abstract: "Runs Airflow tasks claimed from one datacenter's Tandem queues.",
        discussion: """
            Settings come from flags, then the environment (Airflow's own names where they exist), then
            $AIRFLOW_HOME/airflow.cfg (or $AIRFLOW_CONFIG), then defaults.
            SIGTERM stops claiming and lets running tasks finish (--shutdown-grace); a second SIGTERM or SIGINT
            stops them, each recorded as failed (Airflow retries those with retries left); jobs claimed but not
            started go back on the queue.
            """,
        version: TandemVersion.current)

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
    @Option(
        name: .customLong("shutdown-grace"),
        help: "Seconds running tasks get after SIGTERM before they are stopped and recorded as failed (env TANDEM_SHUTDOWN_GRACE; default 60); 'forever' waits for them, as Celery's warm shutdown does.")
    var shutdownGrace: String?
    @Option(
        name: .customLong("kill-timeout"),
        help: "Seconds a task gets between the SIGTERM that stops it (second SIGTERM, or the grace ran out) and SIGKILL: Airflow runs the operator's on_kill meanwhile (cancelling a remote job, deleting a pod) and an Airflow 3 task does not end on SIGTERM (env TANDEM_KILL_TIMEOUT; default 10).")
    var killTimeout: Double?
    @Option(
        name: .customLong("start-record-delay"),
        help: "Seconds a task runs before its STARTED state is written on its own; a task that ends sooner has its start and end written in one commit (default 0.1).")
    var startRecordDelay: Double = 0.1
    @Option(
        name: .customLong("max-finishing"),
        help: "Ended tasks whose result and ack may be in flight at once; past this the worker stops claiming until Postgres catches up (default: the larger of 64 and 4 × --concurrency).")
    var maxFinishing: Int?
    @Option(
        name: .customLong("claim-ahead"),
        help: "Jobs to claim and hold while every slot is busy, so the next task starts without a round trip to Redis — only while recent tasks are short (--claim-ahead-max-run); 0 turns it off (env TANDEM_CLAIM_AHEAD; default 2).")
    var claimAhead: Int?
    @Option(
        name: .customLong("claim-ahead-max-run"),
        help: "Claim ahead only while this worker's recent tasks ran shorter than this many milliseconds (env TANDEM_CLAIM_AHEAD_MAX_RUN_MS; default 50).")
    var claimAheadMaxRun: Double?
    @Option(
        name: .customLong("claim-ahead-hold"),
        help: "Seconds a job claimed ahead may wait for a slot (its slot's task turned out long) before it goes back to the front of its queue for any worker (env TANDEM_CLAIM_AHEAD_HOLD; default 2).")
    var claimAheadHold: Double?
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
    @Option(help: "How Airflow tasks start: 'fork' (a long-lived Python runner that imported Airflow forks each task) or 'spawn' (a fresh interpreter per task). Env TANDEM_RUNNER; default fork when --python/TANDEM_PYTHON is set and the runner script is found, else spawn.")
    var runner: String?
    @Option(name: .customLong("runner-script"), help: "Path of tandem_runner.py (env TANDEM_RUNNER_SCRIPT; default: found next to the executable or in Workers/runner).")
    var runnerScript: String?
    @Option(name: .customLong("runner-pool-idle"), help: "Seconds a pooled runner child (Airflow 3 workloads) may sit idle before it exits, freeing its memory; the next task forks a new one (env TANDEM_RUNNER_POOL_IDLE; default 60; 0: never).")
    var runnerPoolIdle: Double?
    @Option(name: .customLong("log-port"), help: "Port serving task logs to Airflow's UI at /log/<path> (env TANDEM_LOG_PORT, airflow.cfg [logging] worker_log_server_port; default 8793; 0 disables).")
    var logPort: Int?
    @Option(name: .customLong("base-log-folder"), help: "Airflow's task log folder (env AIRFLOW__LOGGING__BASE_LOG_FOLDER; default $AIRFLOW_HOME/logs).")
    var baseLogFolder: String?
    @Option(name: .customLong("secret-key"), help: "Airflow's [api] secret_key (Airflow 2: [webserver] secret_key) verifying log requests (env AIRFLOW__API__SECRET_KEY).")
    var secretKey: String?
    @Option(name: .customLong("metrics-port"), help: "Port for /metrics, /healthz, /readyz (env TANDEM_METRICS_PORT; default 9464; 0 disables).")
    var metricsPort: Int?

    @Option(name: .customLong("pin-cpu"), help: "Run the worker's own threads on this CPU only; task processes still run on every CPU (env TANDEM_PIN_CPU; default: not pinned). Fewer cross-CPU wake-ups: less worker CPU per task on small VMs.")
    var pinCPU: Int?

    func run() async throws {
        bootstrapLogging(level: setting(logLevel, env: "TANDEM_LOG_LEVEL"), json: logJSON)
        let logger = Logger(label: "tandem.worker")
        let pinEnv = setting(nil, env: "TANDEM_PIN_CPU")
        if pinCPU == nil, let pinEnv, Int(pinEnv) == nil {
            throw ValidationError("TANDEM_PIN_CPU=\(pinEnv) is not a CPU number — set it to one of 0..<\(ProcessInfo.processInfo.activeProcessorCount), or unset it")
        }
        if let cpu = pinCPU ?? pinEnv.flatMap({ Int($0) }) {
            if let problem = ThreadPinning.pin(to: cpu) {
                throw ValidationError("--pin-cpu \(cpu): \(problem) — pass a CPU from `nproc`'s range, or leave the flag out")
            }
            logger.info("worker threads pinned to CPU \(cpu); task processes run on every CPU the worker was given")
        }
        guard let dc = setting(dc, env: "TANDEM_DC") else {
            throw ValidationError("which datacenter is this worker in? pass --dc NAME or set TANDEM_DC")
        }
        if let problem = Names.problem(datacenter: dc) { throw ValidationError(problem) }
        let queueList = (setting(queues, env: "TANDEM_QUEUES", default: "default") ?? "default")
            .split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        let airflowCfg = AirflowConfig.load()
        let slots = concurrency
            ?? setting(nil, env: "AIRFLOW__CELERY__WORKER_CONCURRENCY").flatMap { Int($0) } ?? airflowCfg.workerConcurrency ?? 16
        guard slots > 0 else { throw ValidationError("--concurrency must be at least 1") }
        let ahead = try Self.number(claimAhead, env: "TANDEM_CLAIM_AHEAD") ?? WorkerConfiguration.defaultClaimAhead
        guard ahead >= 0 else {
            throw ValidationError("--claim-ahead must be 0 or more (\(ahead) given); 0 claims only for free slots")
        }
        let aheadMaxRun = try Self.number(claimAheadMaxRun, env: "TANDEM_CLAIM_AHEAD_MAX_RUN_MS") ?? 50
        guard aheadMaxRun > 0 else {
            throw ValidationError("--claim-ahead-max-run must be more than 0 ms (\(aheadMaxRun) given); --claim-ahead 0 turns claiming ahead off")
        }
        let aheadHold = try Self.number(claimAheadHold, env: "TANDEM_CLAIM_AHEAD_HOLD")
            ?? WorkerConfiguration.defaultClaimAheadHold.inSeconds
        guard aheadHold > 0 else {
            throw ValidationError("--claim-ahead-hold must be more than 0 seconds (\(aheadHold) given); --claim-ahead 0 turns claiming ahead off")
        }
        let grace = try Self.parseShutdownGrace(setting(shutdownGrace, env: "TANDEM_SHUTDOWN_GRACE", default: "60")!)
        let kill = try Self.number(killTimeout, env: "TANDEM_KILL_TIMEOUT") ?? WorkerConfiguration.defaultKillTimeout.inSeconds
        guard kill.isFinite, kill >= 0 else {
            throw ValidationError("--kill-timeout takes seconds, 0 or more (\(kill) given): the time a stopped task gets for Airflow's on_kill before SIGKILL")
        }
        if let maxFinishing, maxFinishing < 1 {
            throw ValidationError("--max-finishing must be at least 1 (\(maxFinishing) would never claim); leave it out for the default")
        }
        guard leaseTTL > renewEvery * 2 else {
            throw ValidationError("--lease-ttl (\(leaseTTL)s) must exceed twice --renew-every (\(renewEvery)s) so one missed renewal does not lose the lease")
        }
        let brokerURL = setting(broker, env: "AIRFLOW__CELERY__BROKER_URL") ?? airflowCfg.brokerURL ?? Defaults.broker
        let master = masterName ?? airflowCfg.masterName
        let executionURL = setting(executionAPIURL, env: "AIRFLOW__CORE__EXECUTION_API_SERVER_URL") ?? airflowCfg.executionAPIServerURL
        let pythonPath = setting(python, env: "TANDEM_PYTHON")
        let script = setting(runnerScript, env: "TANDEM_RUNNER_SCRIPT") ?? Self.findRunnerScript()
        let mode = setting(runner, env: "TANDEM_RUNNER") ?? (pythonPath != nil && script != nil ? "fork" : "spawn")
        guard mode == "fork" || mode == "spawn" else { throw ValidationError("--runner must be 'fork' or 'spawn', not '\(mode)'") }
        let poolIdle = try Self.number(runnerPoolIdle, env: "TANDEM_RUNNER_POOL_IDLE")
        if let poolIdle, !(poolIdle >= 0) {
            throw ValidationError("--runner-pool-idle must be 0 (never retire) or a number of seconds, not \(poolIdle)")
        }
        if mode == "fork" && script == nil {
            throw ValidationError("--runner fork needs tandem_runner.py: pass --runner-script PATH or set TANDEM_RUNNER_SCRIPT")
        }

        do {
            // claims and acks on the worker loop's own epoll (TANDEM_BROKER_ON_LOOP=0: a connection thread, as
            // before; kept for comparing the two in Benchmarks/diag_switches.py)
            let onLoop = setting(nil, env: "TANDEM_BROKER_ON_LOOP") != "0"
            // one configuration for the broker and Celery's remote control, so a TLS warning is given once
            let brokerConfig = try brokerConfiguration(url: brokerURL, masterName: master, airflow: airflowCfg, logger: logger)
            let b = try await openBroker(configuration: brokerConfig, logger: logger, loop: onLoop ? WorkerLoop.shared : nil)
            let stores = try await openStores(
                resultBackend: setting(resultBackend, env: "AIRFLOW__CELERY__RESULT_BACKEND") ?? airflowCfg.resultBackend,
                ledger: setting(ledger, env: "TANDEM_LEDGER_URL"), brokerURL: brokerURL,
                spoolDirectory: setting(spoolDir, env: "TANDEM_SPOOL_DIR"), logger: logger)
            let dir = workDir ?? NSTemporaryDirectory() + "tandem-worker-\(getpid())"
            try FileManager.default.createDirectory(
                atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            let launcher: any TaskLauncher
            var forkRunner: RunnerLauncher?
            if mode == "fork" {
                let r = RunnerLauncher(
                    options: .init(
                        python: pythonPath ?? "python3", script: script!, workDirectory: dir, taskOutput: taskOutput,
                        executionAPIServerURL: executionURL, poolIdle: poolIdle),
                    logger: logger)
                try r.start()
                logger.info("tasks start by fork from the Airflow runner", metadata: ["airflow": .string(r.runner?.airflowVersion ?? "?")])
                forkRunner = r
                launcher = r
            } else {
                launcher = SpawnLauncher(
                    airflowExecutable: airflowExecutable, python: pythonPath ?? "python3",
                    executionAPIServerURL: executionURL, workDirectory: dir, taskOutput: taskOutput)
            }
            defer { forkRunner?.stop() }
            var config = WorkerConfiguration(datacenter: dc, queues: queueList, concurrency: slots, workerID: workerID)
            config.leaseTTL = .milliseconds(Int64(leaseTTL * 1000))
            config.renewInterval = .milliseconds(Int64(renewEvery * 1000))
            config.shutdownGrace = grace
            config.killTimeout = .milliseconds(Int64(kill * 1000))
            config.claimBatch = min(slots, 32)
            config.startRecordDelay = .milliseconds(Int64(max(0, startRecordDelay) * 1000))
            if let maxFinishing { config.maxFinishing = maxFinishing }
            config.claimAhead = ahead
            config.claimAheadMaxRun = .milliseconds(aheadMaxRun)
            config.claimAheadHoldLimit = .milliseconds(Int64(aheadHold * 1000))
            let pidbox = PidboxService(
                configuration: brokerConfig, nodeName: config.workerID,
                logger: logger)
            let metrics = PrometheusWorkerObserver(datacenter: dc, workerID: config.workerID, slots: slots)
            let runtime = WorkerRuntime(
                configuration: config, broker: b, results: stores.results, ledger: stores.ledger, launcher: launcher,
                logger: logger, observer: metrics, revocations: pidbox)
            pidbox.start { taskID, signal in runtime.revokeRunning(taskID: taskID, signal: signal) }
            defer { pidbox.stop() }
            let logServer = try startLogServer(config: airflowCfg, logger: logger)
            defer { logServer?.stop() }
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

    /// Airflow's log endpoint: `GET /log/<path>` on 8793 (airflow.cfg `[logging] worker_log_server_port`).
    func startLogServer(config: AirflowConfig, logger: Logger) throws -> LogServer? {
        let port = logPort ?? setting(nil, env: "TANDEM_LOG_PORT").flatMap { Int($0) } ?? config.workerLogServerPort ?? 8793
        if port == 0 { return nil }
        guard let key = setting(secretKey, env: "AIRFLOW__API__SECRET_KEY", "AIRFLOW__WEBSERVER__SECRET_KEY") ?? config.secretKey else {
            logger.warning("no Airflow secret key (--secret-key, AIRFLOW__API__SECRET_KEY or airflow.cfg [api] secret_key): task logs are not served to the UI")
            return nil
        }
        let home = ProcessInfo.processInfo.environment["AIRFLOW_HOME"] ?? (NSHomeDirectory() + "/airflow")
        let folder = setting(baseLogFolder, env: "AIRFLOW__LOGGING__BASE_LOG_FOLDER") ?? config.baseLogFolder ?? home + "/logs"
        let server = LogServer(
            port: port, baseLogFolder: folder, secretKey: key, leeway: config.logRequestClockGrace ?? 30, logger: logger)
        do {
            try server.start()
            logger.info("serving task logs", metadata: ["port": "\(server.port)", "folder": .string(folder)])
            return server
        } catch {
            // like metrics, logs are secondary to running work
            logger.error("cannot serve task logs on port \(port): \(error)")
            return nil
        }
    }

    /// A number from its flag, else from its environment variable; a variable set to something that is not a
    /// number is refused (it used to be ignored, leaving the default in force without a word).
    /// `--shutdown-grace`: seconds, or `forever` (nil: running tasks are waited for however long they take).
    static func parseShutdownGrace(_ text: String) throws -> Duration? {
        if ["forever", "inf", "infinity"].contains(text.lowercased()) { return nil }
        guard let seconds = Double(text), seconds.isFinite, seconds >= 0 else {
            throw ValidationError("--shutdown-grace takes seconds or 'forever' ('\(text)' given)")
        }
        return .milliseconds(Int64(seconds * 1000))
    }

    static func number<T: LosslessStringConvertible>(_ flag: T?, env: String) throws -> T? {
        if let flag { return flag }
        guard let raw = setting(nil, env: env) else { return nil }
        guard let value = T(raw) else { throw ValidationError("\(env)=\(raw) is not a number: set a number or unset it") }
        return value
    }

    /// tandem_runner.py next to the executable (packaged), or in the source tree the executable was built in.
    static func findRunnerScript() -> String? {
        let exe = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
        var candidates = [
            exe.appendingPathComponent("tandem_runner.py").path,
            exe.appendingPathComponent("../share/tandem/tandem_runner.py").standardized.path,
            "/usr/lib/tandem/tandem_runner.py",
        ]
        var dir = exe
        for _ in 0..<4 {
            dir = dir.deletingLastPathComponent()
            candidates.append(dir.appendingPathComponent("Workers/runner/tandem_runner.py").path)
        }
        return candidates.first { FileManager.default.fileExists(atPath: $0) }
    }

}
