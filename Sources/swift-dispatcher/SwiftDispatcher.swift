import ArgumentParser
import ClientSupport
import Dispatcher
import Foundation
import Logging
import Observability
import Setup
import TandemCore

@main
struct SwiftDispatcher: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swift-dispatcher",
        abstract: "Moves Celery messages from Airflow's queues into datacenter queues, by routing policy and health.",
        version: TandemVersion.current)

    @Option(help: "Celery broker URL (env AIRFLOW__CELERY__BROKER_URL; default \(Defaults.broker)).")
    var broker: String?
    @Option(name: .customLong("master-name"), help: "Sentinel master name (env AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__MASTER_NAME).")
    var masterName: String?
    @Option(help: "Routing policy YAML file (default: every queue spread across live datacenters).")
    var policy: String?
    @Option(help: "Comma-separated Airflow queues to watch besides those workers serve (default 'default').")
    var queues: String = "default"
    @Option(name: .customLong("dc-loss-after"), help: "Seconds of silence after which a datacenter is lost (default 15).")
    var dcLossAfter: Double = 15
    @Option(name: .customLong("max-attempts"), help: "Claims before a job whose lease keeps expiring is dead-lettered (default 3).")
    var maxAttempts: Int = 3
    @Option(name: .customLong("leader-lease"), help: "Leader lease in seconds; a standby takes over this long after the leader dies (default 5).")
    var leaderLease: Double = 5
    @Option(
        name: .customLong("prefetch-window"),
        help: "Seconds of claims a datacenter queue may hold beyond its idle slots, at the datacenter's claim rate (default 0.02; 0: none).")
    var prefetchWindow: Double = 0.02
    @Option(
        name: .customLong("prefetch-limit"),
        help: "Most a datacenter queue may hold beyond its idle slots, as a multiple of its slots (default 16; the window is what normally sizes it).")
    var prefetchLimit: Int = 16
    @Option(name: .customLong("id"), help: "Dispatcher id in the leader lease (default dispatcher@<host>:<pid>).")
    var dispatcherID: String?
    @Option(help: "Datacenter this dispatcher runs in (env TANDEM_DC; informational: every datacenter runs a standby).")
    var dc: String?
    @Option(name: .customLong("log-level")) var logLevel: String?
    @Flag(name: .customLong("log-json")) var logJSON = false
    @Option(name: .customLong("metrics-port"), help: "Port for /metrics, /healthz, /readyz (env TANDEM_METRICS_PORT; default 9465; 0 disables).")
    var metricsPort: Int?

    func run() async throws {
        bootstrapLogging(level: setting(logLevel, env: "TANDEM_LOG_LEVEL"), json: logJSON)
        let logger = Logger(label: "tandem.dispatcher")
        var routing = RoutingPolicy()
        if let policy {
            guard let text = try? String(contentsOfFile: policy, encoding: .utf8) else {
                throw ValidationError("cannot read routing policy file \(policy): does it exist and is it readable?")
            }
            do { routing = try RoutingPolicy.parse(yaml: text) } catch { throw ValidationError("\(policy): \(error)") }
        }
        guard dcLossAfter.isFinite, leaderLease.isFinite, prefetchWindow.isFinite else {
            throw ValidationError("--dc-loss-after, --leader-lease and --prefetch-window take a number of seconds")
        }
        if let problem = DatacenterHealth.lossAfterProblem(dcLossAfter) {
            throw ValidationError(problem)
        }
        let lossAfter = Duration.milliseconds(Int64(dcLossAfter * 1000))
        guard maxAttempts >= 1 else { throw ValidationError("--max-attempts must be at least 1") }
        guard prefetchWindow >= 0, prefetchLimit >= 0 else {
            throw ValidationError("--prefetch-window and --prefetch-limit cannot be negative (0 turns prefetch off)")
        }
        var config = DispatcherConfiguration(
            policy: routing, queues: queues.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
        config.dcLossAfter = lossAfter
        config.maxAttempts = maxAttempts
        config.prefetchWindow = .milliseconds(Int64(prefetchWindow * 1000))
        config.prefetchFactor = prefetchLimit
        config.leaderLease = .milliseconds(Int64(leaderLease * 1000))
        config.leaderCheck = .milliseconds(Int64(max(0.2, leaderLease / 5) * 1000))
        let site = setting(dc, env: "TANDEM_DC")
        config.dispatcherID = dispatcherID
            ?? "dispatcher\(site.map { "-" + $0 } ?? "")@\(ProcessInfo.processInfo.hostName):\(getpid())"
        let url = setting(broker, env: "AIRFLOW__CELERY__BROKER_URL", default: Defaults.broker)!
        do {
            // the whole cycle on one thread that also drives the Redis connections: a message's wake-up, the
            // capacity read and the move cross no other thread (see EventLoopThread)
            let loop = EventLoopThread(name: "tandem-dispatch")
            let b = try await openBroker(url: url, masterName: masterName, logger: logger, loop: loop, allCallsOnLoop: true)
            let metrics = PrometheusDispatcherObserver()
            metrics.loopStallLimit = config.loopStallWarning.inSeconds
            let runtime = DispatcherRuntime(configuration: config, broker: b, logger: logger, observer: metrics)
            let port = metricsPort ?? setting(nil, env: "TANDEM_METRICS_PORT").flatMap { Int($0) } ?? 9465
            // metrics are secondary to running work: a port in use is logged, not fatal
            let server = ObservabilityEndpoints.serveOrLog(
                port: port, registry: metrics.registry, ready: { metrics.readiness() }, logger: logger)
            defer { server?.stop() }
            let handlers = SignalHandlers(graceful: { runtime.shutdown() }, immediate: { runtime.shutdown() })
            await runtime.run(on: loop)
            withExtendedLifetime(handlers) {}
            b.close()
        } catch {
            logger.critical("\(error)")
            throw ExitCode(2)
        }
    }
}
