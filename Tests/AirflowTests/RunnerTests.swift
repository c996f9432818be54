import AirflowRunner
import CeleryWire
import Foundation
import Logging
import Postgres
import Redis
import Testing
import TestSupport
import Worker

@Suite("fork runner", .serialized)
struct RunnerTests {
    static func launcher(
        output: String, preload: [String]? = [], poolIdle: Double? = nil, launchTimeout: Duration? = nil
    ) throws -> RunnerLauncher {
        var o = RunnerLauncher.Options(
            python: try AF.requirePython(), script: AF.runner, workDirectory: AF.tempDir("tandem-runner"),
            taskOutput: output, preload: preload, poolIdle: poolIdle)
        o.extraArguments = ["--allow-test-kinds"]
        o.startTimeout = .seconds(60)
        if let launchTimeout { o.launchTimeout = launchTimeout }
        return RunnerLauncher(options: o, logger: AF.logger)
    }

    /// The fields of /proc/PID/stat after the command name: state, ppid, … (nil once the process is gone).
    static func statFields(_ pid: Int32) -> [Substring]? {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")")
        else { return nil }
        return stat[stat.index(close, offsetBy: 2)...].split(separator: " ")
    }

    /// Running, not a zombie left for init to reap.
    static func alive(_ pid: Int32) -> Bool {
        guard let state = statFields(pid)?.first else { return false }
        return state != "Z" && state != "X"
    }

    static func sleepTask(_ l: RunnerLauncher, seconds: Double, exit: Int = 0) async throws -> RunnerTask {
        try await l.launch(request: ["kind": "test-sleep", "seconds": .double(seconds), "exit": .int(Int64(exit)), "env": ["X": "1"]])
    }

    @Test("children report pid and exit status; signals reach the child's own process group")
    func exitAndSignal() async throws {
        let out = AF.tempDir("tandem-runner-out") + "/out.log"
        let l = try Self.launcher(output: out)
        try await offPool { try l.start() }
        defer { l.stop() }
        let a = try await Self.sleepTask(l, seconds: 0, exit: 0)
        let b = try await Self.sleepTask(l, seconds: 0, exit: 3)
        #expect(await a.wait() == .exited(0))
        #expect(await b.wait() == .exited(3))
        let c = try await Self.sleepTask(l, seconds: 30)
        #expect(getpgid(c.pid) == c.pid, "the child leads its own process group")
        #expect(c.pid != l.runner?.pid)
        c.signalGroup(SIGTERM)
        #expect(await c.wait() == .signalled(SIGTERM))
    }

    @Test("pooled children (Airflow 3 workloads) run task after task with a clean environment; a signalled one is replaced")
    func pooledChildren() async throws {
        let out = AF.tempDir("tandem-runner-out") + "/out.log"
        let l = try Self.launcher(output: out)
        try await offPool { try l.start() }
        defer { l.stop() }
        func pooled(_ seconds: Double, exit: Int = 0, env: JSONObject) async throws -> RunnerTask {
            try await l.launch(request: [
                "kind": "test-pooled-sleep", "seconds": .double(seconds), "exit": .int(Int64(exit)), "env": .object(env),
            ])
        }
        let a = try await pooled(0, env: ["X": "1"])
        #expect(await a.wait() == .exited(0))
        let b = try await pooled(0, exit: 3, env: ["Y": "2"])
        #expect(await b.wait() == .exited(3))
        #expect(b.pid == a.pid, "one pooled child runs one task after the other")
        #expect(Self.alive(a.pid), "and stays up between tasks")
        let log = try String(contentsOfFile: out, encoding: .utf8)
        #expect(log.contains("pid=\(a.pid) env=['X'] X=1"), "\(log)")
        #expect(log.contains("pid=\(a.pid) env=['Y'] X=None"), "the first task's environment must not leak into the second: \(log)")
        let c = try await pooled(30, env: [:])
        #expect(getpgid(c.pid) == c.pid, "a pooled child leads its own process group")
        c.signalGroup(SIGTERM)
        #expect(await c.wait() == .signalled(SIGTERM))
        let d = try await pooled(0, env: [:])
        #expect(await d.wait() == .exited(0))
        #expect(d.pid != c.pid, "the signalled child was replaced")
    }

    @Test("an idle pooled child exits after --pool-idle (freeing its memory); a busy one is left alone, and the next task gets a new child")
    func idlePooledChildrenRetire() async throws {
        let out = AF.tempDir("tandem-runner-out") + "/out.log"
        // 3 s: the next launch must reach the child before it counts as idle, even on a busy machine
        let l = try Self.launcher(output: out, poolIdle: 3)
        try await offPool { try l.start() }
        defer { l.stop() }
        func pooled(_ seconds: Double) async throws -> RunnerTask {
            try await l.launch(request: ["kind": "test-pooled-sleep", "seconds": .double(seconds), "exit": 0, "env": [:]])
        }
        // a task running three times the idle limit is not cut short, and its child serves the next task
        let busy = try await pooled(9)
        #expect(await busy.wait() == .exited(0))
        let next = try await pooled(0)
        #expect(await next.wait() == .exited(0))
        #expect(next.pid == busy.pid, "a child that was busy, not idle, is kept")
        // idle now: it exits on its own (the runner reaps it, so it does not linger as a zombie)
        var gone = false
        for _ in 0..<300 where !gone {  // up to 30 s; the limit is 3 s, the runner looks every second
            try await Task.sleep(for: .milliseconds(100))
            gone = kill(next.pid, 0) != 0
        }
        #expect(gone, "the idle pooled child \(next.pid) should have exited after 3 s idle")
        let after = try await pooled(0)
        #expect(await after.wait() == .exited(0))
        #expect(after.pid != next.pid, "a new child serves the task after the idle one retired")
        #expect(l.runner?.pid != nil && Self.alive(l.runner!.pid), "the runner itself stays")
    }

    /// The process's command line as `ps` shows it (its first argument).
    static func title(of pid: Int32) -> String {
        let bytes = (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline"))) ?? Data()
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    @Test("task processes can rename themselves in ps as Airflow's do (setproctitle), after the runner rewrote their environment")
    func processTitles() async throws {
        // setproctitle sets itself up on its first call; a pooled child rewrites its environment for every task and
        // a fresh child adds the task's variables before that, which left it no room: every task process kept the
        // runner's command line instead of "airflow worker -- <ti id>"
        let out = AF.tempDir("tandem-runner-out") + "/out.log"
        let l = try Self.launcher(output: out)
        try await offPool { try l.start() }
        defer { l.stop() }
        let pooled = try await l.launch(request: [
            "kind": "test-pooled-sleep", "seconds": 30, "exit": 0, "env": ["X": "1"], "title": "airflow worker -- pooled-1",
        ])
        let fresh = try await l.launch(request: [
            "kind": "test-sleep", "seconds": 30, "exit": 0, "env": ["X": "1"], "title": "airflow worker -- fresh-1",
        ])
        var titles: [String] = []
        for _ in 0..<300 {  // up to 30 s for both children to start and rename themselves
            titles = [Self.title(of: pooled.pid), Self.title(of: fresh.pid)]
            if titles == ["airflow worker -- pooled-1", "airflow worker -- fresh-1"] { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(titles == ["airflow worker -- pooled-1", "airflow worker -- fresh-1"], "ps shows: \(titles)")
        pooled.signalGroup(SIGKILL)
        fresh.signalGroup(SIGKILL)
        #expect(await pooled.wait() == .signalled(SIGKILL))
        #expect(await fresh.wait() == .signalled(SIGKILL))
    }

    @Test("Airflow 3's task process (forked by its supervisor into a group of its own) dies with the supervisor: no orphan runs on unsupervised")
    func taskProcessDiesWithSupervisor() async throws {
        let out = AF.tempDir("tandem-runner-out") + "/out.log"
        let pidfile = AF.tempDir("tandem-runner-pid") + "/task.pid"
        let l = try Self.launcher(output: out)
        try await offPool { try l.start() }
        defer { l.stop() }
        let supervisor = try await l.launch(request: [
            "kind": "test-pooled-sleep", "seconds": 3600, "exit": 0, "env": [:], "pidfile": .string(pidfile),
        ])
        let forked = try await eventually(timeout: .seconds(30)) { FileManager.default.fileExists(atPath: pidfile) }
        try #require(forked, "\((try? String(contentsOfFile: out, encoding: .utf8)) ?? "")")
        let task = try #require(Int32((try String(contentsOfFile: pidfile, encoding: .utf8)).trimmingCharacters(in: .whitespaces)))
        #expect(getpgid(task) == task && task != supervisor.pid, "the task process leads a group of its own, as Airflow's does")
        #expect(Self.alive(task))
        // what the worker does to a task it stops (shutdown past the grace, revoke, a lost lease): SIGKILL to the
        // supervisor's group, which the task process is not in
        supervisor.signalGroup(SIGKILL)
        #expect(await supervisor.wait() == .signalled(SIGKILL))
        let gone = try await eventually(timeout: .seconds(10)) { !Self.alive(task) }
        #expect(gone, "the task process outlived its supervisor (pid \(task) still runs): it would run the user's code unsupervised, and beside the retry")
        if !gone { kill(task, SIGKILL) }
    }

    @Test("a runner killed mid-task: the task dies with it, is reported failed, and the runner comes back")
    func runnerDeath() async throws {
        let out = AF.tempDir("tandem-runner-out") + "/out.log"
        let l = try Self.launcher(output: out)
        try await offPool { try l.start() }
        defer { l.stop() }
        let firstRunner = l.runner!.pid
        let t = try await Self.sleepTask(l, seconds: 60)
        l.killRunner()
        #expect(await t.wait() == .exited(RunnerExit.runnerLost))
        let orphanGone = try await eventually(timeout: .seconds(10)) { !Self.alive(t.pid) }
        #expect(orphanGone, "the orphaned task must not keep running")
        let again = try await Self.sleepTask(l, seconds: 0, exit: 0)
        #expect(await again.wait() == .exited(0))
        #expect(l.runner!.pid != firstRunner)
        #expect(l.startCount == 2)
    }

    /// The processes whose parent is `pid`.
    static func children(of pid: Int32) -> [Int32] {
        let all = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return all.compactMap(Int32.init).filter { child in
            guard let fields = statFields(child), fields.count > 1 else { return false }
            return Int32(fields[1]) == pid
        }
    }

    /// Waits until a launch has been sent to the runner and waits for its answer (a fixed sleep was too short
    /// on a loaded CI machine).
    static func untilWaiting(_ l: RunnerLauncher) async throws {
        try #require(try await eventually(timeout: .seconds(30), every: .milliseconds(10)) { l.launchesWaiting > 0 },
            "no launch reached the runner within 30 s")
    }

    @Test("a launch waiting for the runner's answer ends when the runner dies, when the launch times out, and when the launcher stops")
    func waitingLaunchEnds() async throws {
        let out = AF.tempDir("tandem-runner-out") + "/out.log"
        // a runner that is alive but does not answer: stopped with SIGSTOP while the launch waits
        func frozen(_ l: RunnerLauncher) -> Int32 {
            let pid = l.runner!.pid
            kill(pid, SIGSTOP)
            return pid
        }
        func message(_ body: () async throws -> RunnerTask) async -> String {
            do {
                _ = try await body()
                return "started"
            } catch {
                return "\(error)"
            }
        }

        // 1. the runner dies while the launch waits: the launch fails at once, not after its timeout
        let l = try Self.launcher(output: out)
        try await offPool { try l.start() }
        let pid = frozen(l)
        async let died = message { try await Self.sleepTask(l, seconds: 0) }
        try await Self.untilWaiting(l)
        kill(pid, SIGKILL)
        let diedMessage = await died
        #expect(diedMessage.contains("died"), "\(diedMessage)")
        l.stop()

        // 2. a runner that never answers: the launch gives up after launchTimeout
        let slow = try Self.launcher(output: out, launchTimeout: .milliseconds(300))
        try await offPool { try slow.start() }
        let slowPID = frozen(slow)
        #expect(await message { try await Self.sleepTask(slow, seconds: 30) }.contains("did not start the task within"))
        // … and when the runner wakes up and starts it after all, the task is killed, not left running unseen
        kill(slowPID, SIGCONT)
        #expect(try await eventually(timeout: .seconds(30)) { slow.lateStarts == 1 }, "the late start was not seen")
        let gone = try await eventually(timeout: .seconds(10)) { Self.children(of: slowPID).allSatisfy { !Self.alive($0) } }
        #expect(gone, "the task started after its launch gave up must be killed (it sleeps 30 s)")
        slow.stop()

        // 3. the launcher is stopped while a launch waits
        let stopping = try Self.launcher(output: out)
        try await offPool { try stopping.start() }
        let stoppingPID = frozen(stopping)
        async let stopped = message { try await Self.sleepTask(stopping, seconds: 0) }
        try await Self.untilWaiting(stopping)
        stopping.stop()
        kill(stoppingPID, SIGCONT)
        let stoppedMessage = await stopped
        // stop() also closes the runner's socket, so its reader sees the runner gone: the launch must still say
        // the worker is stopping (seen once on CI as "the runner died")
        #expect(stoppedMessage.contains("shutting down") && stoppedMessage.contains("task not started"), "\(stoppedMessage)")
    }

    /// Bytes waiting unread in the sockets of process `pid` (`ss`: the Recv-Q of its unix sockets).
    static func unreadSocketBytes(of pid: Int32) -> Int {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/ss")
        p.arguments = ["-xnp"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return 0 }
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return text.split(separator: "\n").filter { $0.contains("pid=\(pid),") }
            .compactMap { line in line.split(separator: " ", omittingEmptySubsequences: true).dropFirst(2).first.flatMap { Int($0) } }
            .reduce(0, +)
    }

    /// Real Redis and Postgres, a dispatcher and one c=1 east worker whose fork runner is `script` (no Execution API
    /// answers: these tests are about starting tasks, not running them).
    static func forkRunnerCluster(script: String, environment: [String: String] = [:]) throws
        -> (Cluster, RedisClient, PostgresClient, TandemProcess)
    {
        let python = try AF.requirePython()
        let cluster = try Cluster()
        let redis = RedisClient(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "t"))
        let pg = PostgresClient(configuration: try PostgresConfiguration(url: cluster.postgresURL), logger: Logger(label: "t"))
        cluster.extraEnvironment = environment.merging(["AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://127.0.0.1:9/execution/"]) { $1 }
        try cluster.startDispatcher()
        let worker = try cluster.startWorker(
            dc: "east", name: "east-1",
            extra: ["--runner", "fork", "--python", python, "--runner-script", script, "--concurrency", "1"])
        return (cluster, redis, pg, worker)
    }

    @Test("a real worker whose runner dies before starting a claimed task puts the job back: it runs on its next attempt, not FAILURE")
    func runnerDeathBeforeStartGivesBack() async throws {
        let (cluster, redis, pg, worker) = try Self.forkRunnerCluster(script: AF.runner)
        let ready = try await eventually(timeout: .seconds(60)) { worker.log().contains("Airflow runner ready") }
        #expect(ready, "\(cluster.logs())")
        guard let runner = Self.children(of: worker.pid).first(where: {
            ((try? String(contentsOfFile: "/proc/\($0)/cmdline", encoding: .utf8)) ?? "").contains("tandem_runner")
        }) else {
            Issue.record("no runner process under the worker: \(cluster.logs())")
            return
        }
        // the runner freezes; the worker claims a task and sends it to the runner, which never reads it
        kill(runner, SIGSTOP)
        let id = UUID().uuidString.lowercased()
        let m = CeleryPublisher.message(taskName: "execute_workload", id: id, args: [.string(Self.workload(task: "t"))])
        _ = try await redis.send(["LPUSH", m.list, m.element])
        let sent = try await eventually(timeout: .seconds(30)) { Self.unreadSocketBytes(of: runner) > 0 }
        #expect(sent, "the launch never reached the frozen runner's socket: \(cluster.logs())")
        // … and dies before it ever answers
        kill(runner, SIGKILL)
        let retried = try await eventually(timeout: .seconds(60)) {
            let attempts = try? await pg.query("SELECT attempts FROM tandem_tasks WHERE task_id = $1", [.text(id)])
            return (attempts?.rows.first?.int("attempts") ?? 0) >= 2
        }
        #expect(retried, "the task never got its second attempt: \(cluster.logs())")
        let events = try await pg.query(
            "SELECT event, detail FROM tandem_task_events WHERE task_id = $1 ORDER BY id", [.text(id)])
        let requeued = events.rows.filter { $0.string("event") == "requeued" }
        #expect(requeued.count == 1, "\(events.rows.map { ($0.string("event") ?? "", $0.string("detail") ?? "") })")
        #expect(requeued.first?.string("detail")?.contains("died before starting the task") == true)
        #expect(worker.log().contains("putting it back for another try (attempt 1 of 3)"), "\(worker.log())")
        #expect(!worker.log().contains("task could not start"), "the first attempt must not be recorded as failed")
    }

    @Test("a runner that dies on every task it is sent: the job is put back twice, then FAILURE at its third attempt (it must end)")
    func runnerDeathEveryTimeEndsInFailure() async throws {
        let runs = AF.tempDir("tandem-fake-runner") + "/runs.log"
        let (cluster, redis, pg, worker) = try Self.forkRunnerCluster(
            script: Repo.root + "/Tests/Fixtures/bin/runner-dies-on-run", environment: ["TANDEM_FAKE_RUNNER_LOG": runs])
        let id = UUID().uuidString.lowercased()
        let m = CeleryPublisher.message(taskName: "execute_workload", id: id, args: [.string(Self.workload(task: "t"))])
        _ = try await redis.send(["LPUSH", m.list, m.element])
        let failed = try await eventually(timeout: .seconds(90)) {
            let r = try? await pg.query("SELECT status FROM celery_taskmeta WHERE task_id = $1", [.text(id)])
            return r?.rows.first?.string("status") == "FAILURE"
        }
        #expect(failed, "\(cluster.logs())")
        let sent = ((try? String(contentsOfFile: runs, encoding: .utf8)) ?? "").split(separator: "\n")
        #expect(sent.count == 3, "one launch per attempt: \(sent)")
        let events = try await pg.query(
            "SELECT event, detail FROM tandem_task_events WHERE task_id = $1 AND event = 'requeued'", [.text(id)])
        #expect(events.rows.count == 2)
        #expect(events.rows.allSatisfy { $0.string("detail")?.contains("died before starting the task") == true })
        let log = worker.log()
        #expect(log.contains("(attempt 1 of 3)") && log.contains("(attempt 2 of 3)") && !log.contains("(attempt 3 of 3)"), "\(log)")
        #expect(log.contains("task could not start"), "the third attempt is recorded as failed: \(log)")
        // the ack follows the durable FAILURE (result first, then the lease goes), so it may land a moment later
        let acked = try await eventually(timeout: .seconds(20)) { try await redis.send(["ZCARD", "{tandem}:leases"]).int == 0 }
        #expect(acked, "the failed job was never acked: \(worker.log())")
    }

    static func workload(task: String) -> String {
        """
        {"type": "ExecuteTask", "token": "header.payload.sig", "dag_rel_path": "d.py", "bundle_info": {"name": "dags-folder"}, \
        "log_path": "d/t.log", "ti": {"id": "\(UUID().uuidString.lowercased())", "dag_id": "d", "task_id": "\(task)", \
        "run_id": "r", "try_number": 1, "map_index": -1, "queue": "default", "pool_slots": 1, "priority_weight": 1}}
        """
    }

    @Test("Airflow imported once: a real Airflow 3.3 runner refuses bad workloads without leaking the token")
    func realAirflow() async throws {
        let out = AF.tempDir("tandem-runner-out") + "/out.log"
        let l = try Self.launcher(output: out, preload: nil)  // the runner's own Airflow preload
        let began = ContinuousClock.now
        try await offPool { try l.start() }
        defer { l.stop() }
        let startup = ContinuousClock.now - began
        #expect(l.runner?.airflowVersion.hasPrefix("3.") == true)
        let secret = "eyJhbGciOiJIUzUxMiJ9.eyJleHAiOjQxMDI0NDQ4MDB9.SUPERSECRETSIGNATURE"
        let json = #"{"type":"ExecuteTask","token":"\#(secret)","ti":{"id":"0199"},"dag_rel_path":"x.py"}"#
        let w = try AirflowWorkload.parse(json)
        let clock = ContinuousClock()
        let t0 = clock.now
        let launched = try await l.launch(.workload(w), taskID: "celery-id-1")
        let forkLatency = clock.now - t0
        #expect(await launched.process.wait() == .exited(RunnerExit.failure))
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        #expect(text.contains("does not match this Airflow's schema"))
        #expect(!text.contains("SUPERSECRET"), "the token must never reach a log")
        print("runner startup (imports Airflow): \(startup); fork of one task: \(forkLatency)")

        // Airflow 2 argv path: anything but 'airflow tasks run' is refused
        let cmd = try await l.launch(.command(argv: ["airflow", "dags", "list"]), taskID: "celery-id-2")
        #expect(await cmd.process.wait() == .exited(RunnerExit.failure))
    }

    @Test("Airflow 3's supervisor notices its task process's exit even when every socket closed before it (the runner watches a pidfd)")
    func supervisorSeesTheExit() throws {
        // Airflow's supervisor learns of the exit from socket activity or its select() timeout (5 s by default): a
        // task whose sockets all close before its exit status exists kept its slot 5 s longer. Here the timeout is
        // an hour and the child closes every socket a second before it exits: only the pidfd can end the wait
        // (without it, the alarm kills the script after 60 s and the test fails).
        let out = try AF.run(
            """
            import os, signal, sys, time, uuid
            sys.path.insert(0, os.path.dirname(sys.argv[1]))
            import tandem_runner
            from airflow.sdk.execution_time import supervisor as sup
            sup.MIN_HEARTBEAT_INTERVAL = 3600
            sup.HEARTBEAT_TIMEOUT = 7200
            print("installed", tandem_runner.watch_task_exit(), tandem_runner.watch_task_exit(), flush=True)

            class Heartbeats:  # the API client's only call while the process runs
                def heartbeat(self, *a, **k): pass
            class Client:
                task_instances = Heartbeats()

            def target():
                os.closerange(0, 4096)
                time.sleep(1)
                os._exit(7)

            signal.alarm(60)
            # the fork and socket set-up of every supervised process (WatchedSubprocess.start), without a workload
            proc = super(sup.ActivitySubprocess, sup.ActivitySubprocess).start(target=target, id=uuid.uuid4(), client=Client())
            proc._monitor_subprocess()
            print("exit", proc._exit_code, "open fds", len(os.listdir("/proc/self/fd")), flush=True)
            del proc
            import gc; gc.collect()
            print("after", len(os.listdir("/proc/self/fd")), flush=True)
            """, args: [AF.runner])
        #expect(out.status == 0, "\(out.stderr)")
        #expect(out.stdout.contains("installed True True"), "\(out.stdout)")
        #expect(out.stdout.contains("exit 7 "), "\(out.stdout)\n\(out.stderr)")
    }

    @Test("an expired workload token is not started (the runtime records FAILURE)")
    func expiredToken() async throws {
        let out = AF.tempDir("tandem-runner-out") + "/out.log"
        let l = try Self.launcher(output: out)
        try await offPool { try l.start() }
        defer { l.stop() }
        func b64(_ s: String) -> String {
            Data(s.utf8).base64EncodedString().replacingOccurrences(of: "=", with: "").replacingOccurrences(of: "+", with: "-")
                .replacingOccurrences(of: "/", with: "_")
        }
        let exp = Int(Date().timeIntervalSince1970) - 60
        let token = "\(b64(#"{"alg":"HS512"}"#)).\(b64("{\"exp\":\(exp)}")).sig"
        let w = try AirflowWorkload.parse(#"{"type":"ExecuteTask","token":"\#(token)","ti":{"id":"1"}}"#)
        await #expect(throws: RunnerError.self) { _ = try await l.launch(.workload(w), taskID: "t") }
        #expect(l.runningCount == 0)
    }
}
