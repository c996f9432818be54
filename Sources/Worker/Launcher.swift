import CeleryWire
import Foundation
import TandemCore

/// How a worker starts an Airflow task. `SpawnLauncher` starts a fresh process per task; a long-lived Airflow
/// runner (fork per task) plugs in here too.
public protocol TaskLauncher: Sendable {
    func launch(_ payload: AirflowPayload, taskID: String) async throws -> LaunchedTask
}

/// A started task as the worker sees it, whoever forked it (the worker itself, or a long-lived Airflow runner).
public protocol RunningTask: Sendable {
    /// The task's process id (and process group id).
    var pid: Int32 { get }
    /// Waits for the task to end.
    func wait() async -> ChildProcess.Termination
    /// Signals the task's whole process group (not once it has ended: its pid may be reused).
    func signalGroup(_ signal: Int32)
    /// Runs `body` as the task ends, on the thread that learns of it (at once if it has ended).
    func onEnd(_ body: @escaping @Sendable (ChildProcess.Termination) -> Void)
}

extension ChildProcess: RunningTask {}

/// A launch that failed before the task had a process, for a reason outside the task (the Airflow runner died or
/// was restarting, or the worker is stopping): the worker puts the job back instead of recording FAILURE.
public struct TaskNotStarted: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// A started task and what to clean up after it.
public struct LaunchedTask: Sendable {
    public var process: any RunningTask
    /// Files to remove once the process has ended (the workload file holding the JWT).
    public var cleanup: [String]
    public init(process: any RunningTask, cleanup: [String]) {
        self.process = process
        self.cleanup = cleanup
    }
}

/// Starts each task as its own process.
/// - Airflow 2 (`execute_command`): the validated argv, exec'd directly, with `external_executor_id` set.
/// - Airflow 3 (`execute_workload`): the workload JSON written to a 0600 file and run as
///   `python -m airflow.sdk.execution_time.execute_workload --json-path FILE` is (`workloadBootstrap`), so the JWT
///   never shows in `ps`.
public struct SpawnLauncher: TaskLauncher {
    public let airflowExecutable: String
    public let python: String
    public let executionAPIServerURL: String?
    public let workDirectory: String
    public let taskOutput: String?
    /// The worker's environment (with the Execution API's URL for workloads), prepared once for every spawn.
    private let commandEnvironment: SpawnEnvironment
    private let workloadEnvironment: SpawnEnvironment
    private static let executorIDKey = "external_executor_id"

    public init(
        airflowExecutable: String = "airflow", python: String = "python3", executionAPIServerURL: String?,
        workDirectory: String, environment: [String: String] = ProcessInfo.processInfo.environment,
        taskOutput: String? = nil
    ) {
        self.airflowExecutable = airflowExecutable
        self.python = python
        self.executionAPIServerURL = executionAPIServerURL
        self.workDirectory = workDirectory
        self.taskOutput = taskOutput
        commandEnvironment = SpawnEnvironment(environment, leaving: [Self.executorIDKey])
        var workloadEnv = environment
        if let url = executionAPIServerURL { workloadEnv["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = url }
        workloadEnvironment = SpawnEnvironment(workloadEnv)
    }

    public func launch(_ payload: AirflowPayload, taskID: String) async throws -> LaunchedTask {
        switch payload {
        case .command(let argv):
            var args = argv
            args[0] = airflowExecutable
            let p = try await ChildProcess.spawn(
                argv: args, environment: commandEnvironment, adding: [Self.executorIDKey: taskID], output: taskOutput)
            return LaunchedTask(process: p, cleanup: [])
        case .workload(let workload):
            let path = try writeWorkload(workload.json, taskID: taskID)
            do {
                let p = try await ChildProcess.spawn(
                    argv: [python, "-c", Self.workloadBootstrap, "--json-path", path],
                    environment: workloadEnvironment, output: taskOutput)
                return LaunchedTask(process: p, cleanup: [path])
            } catch {
                unlink(path)
                throw error
            }
        }
    }

    /// `python -m airflow.sdk.execution_time.execute_workload`, with one thing added first: the process it forks
    /// (Airflow's supervisor forks the task's own process into a process group of its own, with no parent-death
    /// signal) dies with it. Without this, a supervisor stopped by the worker (shutdown, revoke, a lost lease) or
    /// killed with it left the task process running the user's code unsupervised, and beside the retry once the
    /// scheduler's heartbeat timeout failed the try (Protocol/SPEC.md, decision 29; the fork runner does the same).
    /// The hook is disarmed in the forked process, so the task's own forks keep Python's usual behaviour. A
    /// duplicate delivery (the Execution API answers 409: the try runs elsewhere) exits 75 as the fork runner's
    /// does, so it is acked with no result instead of failing the healthy try (Protocol/RUNNER.md's exit codes).
    static let workloadBootstrap = """
        import ctypes, os, runpy, signal, sys
        supervisor = os.getpid()
        def task_process_dies_with_supervisor():
            global supervisor
            parent, supervisor = supervisor, None
            if parent is None:
                return
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)
        os.register_at_fork(after_in_child=task_process_dies_with_supervisor)
        try:
            runpy.run_module("airflow.sdk.execution_time.execute_workload", run_name="__main__", alter_sys=True)
        except Exception as e:
            cur = e
            for _ in range(8):
                detail = getattr(cur, "detail", None)
                if type(cur).__name__ == "TaskAlreadyRunningError" or (
                    getattr(getattr(cur, "response", None), "status_code", None) == 409
                    and isinstance(detail, dict) and detail.get("previous_state") == "running"):
                    print("task instance is already running elsewhere (409); this delivery is a duplicate", file=sys.stderr)
                    sys.exit(75)
                cur = cur.__cause__ or cur.__context__
                if cur is None:
                    break
            raise
        """

    /// Writes the workload to a file only the worker's user can read (it carries the task's JWT).
    private func writeWorkload(_ json: String, taskID: String) throws -> String {
        let safe = String(taskID.unicodeScalars.map { CharacterSet.alphanumerics.contains($0) || $0 == "-" ? Character($0) : "_" })
        let path = "\(workDirectory)/workload-\(safe).json"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw ChildProcess.SpawnError(
                description: "cannot write workload file \(path): \(String(cString: strerror(errno))) — check --work-dir")
        }
        defer { close(fd) }
        fchmod(fd, 0o600)
        let bytes = Array(json.utf8)
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw ChildProcess.SpawnError(
                    description: "cannot write workload file \(path): \(String(cString: strerror(errno))) — is the disk full?")
            }
            off += n
        }
        return path
    }
}
