import Foundation
import Logging
import Postgres
import Redis
import CeleryWire
import TandemRedis
import Testing
import TestSupport

/// Tandem against the REAL Python side: the stock Celery client (celery 5.6 and 5.7) and Airflow 3.3's own
/// CeleryExecutor code (apache-airflow-providers-celery) publish into a throwaway cluster (real swift-dispatcher and
/// swift-worker processes, real Redis and Postgres); the same libraries read the results back.
///
/// The Python side lives in Tests/InteropTests/python/ (one JSON request on stdin, one `TANDEM-RESULT <json>` line on
/// stdout). Airflow 2 argv run the fake `airflow` from Tests/Fixtures/bin; Airflow 3 workloads run
/// Tests/Fixtures/bin/python-workload-check as the worker's --python (no Airflow API server runs here), which checks
/// the call shape, the 0600 workload file and that the token is not in argv.
/// The venvs come from `scripts/pyenv`; a missing one fails the test (never skips it).
/// TANDEM_INTEROP_TRACE=1 prints every Python answer.
@Suite("Interop with the real Python Celery and Airflow", .serialized)
struct InteropTests {
    // MARK: - Test cases

    @Test(
        "a stock Celery client publishes execute_command and execute_workload; Tandem routes, runs and records them",
        arguments: [Venv.celery56, .celery57])
    func stockClientPublishesBothShapes(venv: Venv) async throws {
        let env = try await InteropCluster(backend: .database)
        let token = fakeJWT("stock-\(venv.rawValue)")
        let tasks: [[String: Any]] = [
            command(task: "ok", run: "cmd-ok"),
            command(task: "fail", run: "cmd-fail"),
            workload(task: "ok", run: "wl-ok", token: token),
            workload(task: "fail", run: "wl-fail", token: token),
        ]
        let out = try await venv.run("celery_client.py", ["op": "publish", "broker": env.brokerURL,
            "backend": env.backendURL, "tasks": tasks], dir: env.cluster.dir)
        let ids = out["ids"].strings
        try #require(ids.count == 4, "\(out)")
        #expect(out["versions"]["celery"].string?.hasPrefix(venv.celeryPrefix) == true, "\(out["versions"])")

        let states = try await env.waitForFinal(ids)
        #expect(states[ids[0]] == "SUCCESS", "\(states)\n\(env.cluster.logs())")
        #expect(states[ids[1]] == "FAILURE")
        #expect(states[ids[2]] == "SUCCESS", "\(states)\n\(env.fakeLog())\n\(env.cluster.logs())")
        #expect(states[ids[3]] == "FAILURE")
        try await env.expectRecorded(ids: ids, states: states)

        // Airflow 2: the fake airflow ran each argv once, with the Celery task id as external_executor_id.
        let events = env.cluster.taskEvents()
        let starts = events.filter { $0.event == "start" }
        #expect(starts.map(\.key).sorted() == ["interop.fail.cmd-fail", "interop.ok.cmd-ok"], "\(events)")
        #expect(Set(starts.map(\.executorID)) == [ids[0], ids[1]])
        // Airflow 3: the stand-in ran each workload once, called exactly as execute_workload must be.
        try await env.expectWorkloadsRan(["interop.ok.wl-ok", "interop.fail.wl-fail"], token: token)
    }

    @Test(
        "Celery's AsyncResult reads SUCCESS and FAILURE written by Tandem: .state, .status and .get() (PUBLISH on Redis)",
        arguments: [Venv.celery56, .celery57], [Backend.database, .redis])
    func celeryReadersReadTandemResults(venv: Venv, backend: Backend) async throws {
        let env = try await InteropCluster(backend: backend)
        let token = fakeJWT("reader-\(venv.rawValue)-\(backend)")
        // Each task runs ~2 s, so .get() is already blocked when Tandem writes the result: on Redis it can only
        // learn the outcome from the PUBLISH on celery-task-meta-<id>.
        let tasks: [[String: Any]] = [
            command(task: "sleep-2", run: "read-ok"),
            workload(task: "fail-after-2", run: "read-fail", token: token),
        ]
        let live = try await venv.run("celery_client.py", ["op": "publish-and-get", "broker": env.brokerURL,
            "backend": env.backendURL, "tasks": tasks, "get_timeout": 20], dir: env.cluster.dir)
        let ids = live["ids"].strings
        try #require(ids.count == 2, "\(live)")
        for (id, want) in zip(ids, ["SUCCESS", "FAILURE"]) {
            let r = live["results"][id]
            #expect(["PENDING", "STARTED"].contains(r["state_before_get"].string ?? ""),
                "the task should still be running when .get() starts: \(r)")
            #expect(r["get"]["error"].isNull, ".get(timeout=20, propagate=False) did not return: \(r)\n\(env.cluster.logs())")
            #expect(r["state"].string == want, "\(r)")
            #expect(r["status"].string == want, "\(r)")
        }
        let states = try await env.waitForFinal(ids)
        #expect(states == [ids[0]: "SUCCESS", ids[1]: "FAILURE"], "\(states)")
        try await env.expectRecorded(ids: ids, states: states)

        // A fresh reader process (no cached meta): AsyncResult(id).state / .status and .get() read the stored value.
        let read = try await venv.run("celery_client.py", ["op": "read", "broker": env.brokerURL,
            "backend": env.backendURL, "ids": ids + [unknownID], "get_timeout": 5], dir: env.cluster.dir)
        for (id, want) in zip(ids, ["SUCCESS", "FAILURE"]) {
            let r = read["results"][id]
            #expect(r["error"].isNull, "\(venv.rawValue) reader failed on \(backend) \(want): \(r)")
            #expect(r["state"].string == want, "\(r)")
            #expect(r["status"].string == want, "\(r)")
            #expect(r["get"]["error"].isNull, "\(r)")
        }
        // the FAILURE result decodes to an exception or None, never a bare string (Airflow's fetch breaks on that)
        let failed = read["results"][ids[1]]
        #expect(failed["get"]["type"].string != "str", "\(failed)")
        // and a plain .get() (propagate=True) raises rather than returning as if it succeeded. On Redis the FAILURE
        // carries {"exc_type": "RuntimeError", "exc_message": [detail], "exc_module": "builtins"}, so the reader
        // raises the task's own error; the database row must stay NULL (celery 5.7's reader), so there it raises
        // "No active exception to reraise".
        #expect(failed["get_propagate"].string != nil, "\(failed)")
        if backend == .redis {
            #expect(failed["get_propagate"].string?.contains("exit status") == true, "\(failed)")
        }
        #expect(read["results"][unknownID]["state"].string == "PENDING", "\(read)")
    }

    @Test(
        "Airflow 3.3's CeleryExecutor publishes ExecuteTask workloads; its BulkStateFetcher maps Tandem's results",
        arguments: [Backend.database, .redis])
    func airflowProviderRoundTrip(backend: Backend) async throws {
        let env = try await InteropCluster(backend: backend)
        let token = fakeJWT("airflow-\(backend)")
        let pub = try await Venv.airflow.run("airflow_executor.py", ["op": "publish", "token": token, "tasks": [
            ["dag_id": "interop", "task_id": "ok", "run_id": "prov-ok", "via": "provider"],
            ["dag_id": "interop", "task_id": "fail", "run_id": "prov-fail", "via": "provider"],
            ["dag_id": "interop", "task_id": "ok", "run_id": "send-ok", "via": "send_task"],
        ]], dir: env.cluster.dir, environment: env.airflowEnvironment)
        let published = pub["published"].array
        try #require(published.count == 3, "\(pub)")
        #expect(pub["versions"]["airflow"].string?.hasPrefix("3.") == true, "\(pub["versions"])")
        let ids = published.compactMap { $0["celery_id"].string }
        let states = try await env.waitForFinal(ids)
        #expect(states == [ids[0]: "SUCCESS", ids[1]: "FAILURE", ids[2]: "SUCCESS"],
            "\(states)\n\(env.fakeLog())\n\(env.cluster.logs())")
        try await env.expectRecorded(ids: ids, states: states)
        try await env.expectWorkloadsRan(["interop.ok.prov-ok", "interop.fail.prov-fail", "interop.ok.send-ok"], token: token)

        // The scheduler's read-back: CeleryExecutor().bulk_state_fetcher.get_many, then update_task_state.
        var asked = published.map { p -> [String: Any] in
            ["celery_id": p["celery_id"].string ?? "", "dag_id": "interop", "task_id": p["task_id"].string ?? "",
             "run_id": p["run_id"].string ?? ""]
        }
        asked.append(["celery_id": unknownID, "dag_id": "interop", "task_id": "never", "run_id": "never"])
        let fetch = try await Venv.airflow.run("airflow_executor.py", ["op": "fetch", "tasks": asked],
            dir: env.cluster.dir, environment: env.airflowEnvironment)
        #expect(fetch["fetch_method"].string == backend.airflowFetchMethod, "\(fetch)")
        #expect(fetch["states"][ids[0]][0].string == "SUCCESS", "\(fetch)")
        #expect(fetch["states"][ids[1]][0].string == "FAILURE", "\(fetch)")
        #expect(fetch["states"][ids[2]][0].string == "SUCCESS", "\(fetch)")
        #expect(fetch["events"][ids[0]][0].string == "success", "\(fetch)")
        #expect(fetch["events"][ids[1]][0].string == "failed", "\(fetch)")
        #expect(fetch["events"][ids[2]][0].string == "success", "\(fetch)")
        // a task with no record is PENDING: no event, still running — the same fetch, so the fetcher is really asked
        #expect(fetch["states"][unknownID][0].string == "PENDING", "\(fetch)")
        #expect(fetch["events"][unknownID][0].isNull, "\(fetch)")
        #expect(fetch["running_left"].strings == [unknownID], "\(fetch)")
    }

    /// TLS end to end, configured the two ways Airflow deployments configure it: the Airflow 3.3 scheduler's own
    /// CeleryExecutor with `[celery] ssl_active` (+ CA, client certificate and key, Redis requiring client
    /// certificates) and a bare rediss:// URL; the stock Celery client with kombu's URL form. Tandem's processes get
    /// the same settings; every connection they hold is on the TLS port.
    @Test("Airflow's ssl_active settings and kombu's rediss:// URL reach a TLS-only broker; Tandem runs the tasks over TLS",
          arguments: [InteropCluster.BrokerTLS.airflowSettings, .url])
    func brokerOverTLS(tls: InteropCluster.BrokerTLS) async throws {
        let certificates = try await offPool { try TLSCertificates.make() }
        let env = try await InteropCluster(backend: .database, tls: tls, certificates: certificates)
        let token = fakeJWT("tls-\(tls)")
        let ids: [String]
        if tls == .airflowSettings {
            let pub = try await Venv.airflow.run("airflow_executor.py", ["op": "publish", "token": token, "tasks": [
                ["dag_id": "interop", "task_id": "ok", "run_id": "tls-ok", "via": "provider"],
                ["dag_id": "interop", "task_id": "fail", "run_id": "tls-fail", "via": "provider"],
            ]], dir: env.cluster.dir, environment: env.airflowEnvironment)
            ids = pub["published"].array.compactMap { $0["celery_id"].string }
            try #require(ids.count == 2, "\(pub)")
        } else {
            let out = try await Venv.celery56.run("celery_client.py", ["op": "publish", "broker": env.brokerURL,
                "backend": env.backendURL, "tasks": [workload(task: "ok", run: "tls-ok", token: token),
                                                     workload(task: "fail", run: "tls-fail", token: token)]],
                dir: env.cluster.dir)
            ids = out["ids"].strings
            try #require(ids.count == 2, "\(out)")
        }
        let states = try await env.waitForFinal(ids)
        #expect(states == [ids[0]: "SUCCESS", ids[1]: "FAILURE"], "\(states)\n\(env.cluster.logs())")
        try await env.expectRecorded(ids: ids, states: states)
        try await env.expectWorkloadsRan(["interop.ok.tls-ok", "interop.fail.tls-fail"], token: token)

        let ports = try await env.clientPorts()
        #expect(!ports.isEmpty && ports.allSatisfy { $0 == env.cluster.redis.tlsPort }, "client ports \(ports), TLS port \(env.cluster.redis.tlsPort ?? 0)")
    }

    @Test(
        "another task name or a non-Airflow argv from the real Celery client is dead-lettered and never executed",
        arguments: [Venv.celery56, .celery57])
    func foreignMessagesAreDeadLettered(venv: Venv) async throws {
        let env = try await InteropCluster(backend: .database)
        let marker = env.cluster.dir + "/executed"
        let tasks: [[String: Any]] = [
            ["name": "myapp.tasks.email", "args": ["ops@example.com", "touch \(marker)"]],
            // a foreign task name carrying a perfectly valid Airflow argv: the name alone decides
            ["name": "myapp.tasks.run", "args": [["airflow", "tasks", "run", "interop", "ok", "foreign-name", "--local"]]],
            ["name": "execute_command", "args": [["bash", "-c", "touch \(marker)"]]],
            ["name": "execute_command", "args": [["/bin/sh", "-c", "touch \(marker)"]]],
            // the control: a real Airflow 2 command published after the junk
            command(task: "ok", run: "after-foreign"),
        ]
        let out = try await venv.run("celery_client.py", ["op": "publish", "broker": env.brokerURL,
            "backend": env.backendURL, "tasks": tasks], dir: env.cluster.dir)
        let ids = out["ids"].strings
        try #require(ids.count == tasks.count, "\(out)")
        let foreign = Array(ids.dropLast())
        let good = ids.last!

        let s = try await env.waitForFinal([good])
        #expect(s[good] == "SUCCESS", "\(env.cluster.logs())")
        let inspector = BrokerInspector(client: env.redis)
        let allDead = try await eventually(timeout: .seconds(30)) {
            try await inspector.deadLetters().count == foreign.count
        }
        let dead = try await inspector.deadLetters()
        #expect(allDead, "dead letters: \(dead.count) of \(foreign.count)\n\(env.cluster.logs())")
        var deadIDs = Set<String>()
        for jobID in dead {
            let job = try await inspector.job(jobID)
            #expect(job["state"] == "dead", "\(job)")
            #expect((job["reason"] ?? "").count > 10, "a reason a person can act on: \(job)")
            if let raw = job["raw"], let id = foreign.first(where: { raw.contains($0) }) { deadIDs.insert(id) }
        }
        #expect(deadIDs == Set(foreign), "every foreign message, verbatim, in the dead-letter queue")

        #expect(!FileManager.default.fileExists(atPath: marker), "a non-Airflow message was executed")
        let events = env.cluster.taskEvents()
        #expect(events.map(\.key).allSatisfy { $0 == "interop.ok.after-foreign" }, "only the control ran: \(events)")
        #expect(events.filter { $0.event == "start" }.count == 1, "\(events)")
        // the publisher still learns the outcome: a FAILURE it can read, never a SUCCESS
        let f = try await env.finalStates(foreign)
        #expect(f.count == foreign.count && f.values.allSatisfy { $0 == "FAILURE" }, "\(f)")
    }

    @Test("spawn mode: an Airflow 3 task process (forked by its supervisor into a group of its own) dies with its worker, killed with -9 — no orphan runs on")
    func spawnedTaskProcessDiesWithWorker() async throws {
        let env = try await InteropCluster(backend: .database)
        let out = try await Venv.celery56.run("celery_client.py", ["op": "publish", "broker": env.brokerURL,
            "backend": env.backendURL, "tasks": [workload(task: "supervised-sleep", run: "orphan", token: fakeJWT("orphan"))]],
            dir: env.cluster.dir)
        try #require(out["ids"].strings.count == 1, "\(out)")
        var taskProcess: Int32?
        _ = try await eventually(timeout: .seconds(30)) {
            taskProcess = env.cluster.taskEvents().first { $0.event == "taskproc" }.flatMap { Int32($0.executorID) }
            return taskProcess != nil
        }
        let pid = try #require(taskProcess, "\(env.fakeLog())\n\(env.cluster.logs())")
        #expect(kill(pid, 0) == 0 && getpgid(pid) == pid, "the task process runs, in a group of its own")
        let worker = try #require(env.cluster.processes.first { $0.name == "east-1" })
        worker.signal(SIGKILL)
        #expect(await worker.waitForExit(timeout: .seconds(10)) != nil)
        let gone = try await eventually(timeout: .seconds(10)) { kill(pid, 0) != 0 }
        #expect(gone, "the task process outlived its worker and supervisor (pid \(pid)): it would run on unsupervised, and beside the retry")
        if !gone { kill(pid, SIGKILL) }
        #expect(!env.cluster.taskEvents().contains { $0.event == "BADCALL" }, "\(env.fakeLog())")
    }

    @Test("rollback to stock Celery: executorctl handback refuses while Tandem runs, then gives its work back to Airflow's list; a real Celery worker runs every task, none twice at once (the one a killed worker held: again, once its lease ran out)")
    func rollbackToStockCelery() async throws {
        let cluster = try Cluster()
        let redis = RedisClient(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "rollback"))
        let pg = PostgresClient(configuration: try PostgresConfiguration(url: cluster.postgresURL), logger: Logger(label: "rollback"))
        defer { redis.close(); pg.close() }
        let ctlEnv = ["AIRFLOW__CELERY__BROKER_URL": cluster.brokerURL]
        // a wide prefetch window: the dispatcher moves everything into east's queue, so there is queued work to give
        let dispatcher = try cluster.startDispatcher(extra: ["--leader-lease", "2", "--prefetch-window", "100"])
        let worker = try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "1", "--lease-ttl", "3", "--renew-every", "1"])
        var ids = [try await publishAirflowCommand(redis, dag: "rollback", task: "hold", run: "r0")]
        for i in 1...5 { ids.append(try await publishAirflowCommand(redis, dag: "rollback", task: "ok", run: "r\(i)")) }
        let holding = try await eventually(timeout: .seconds(30)) {
            let queued = try await redis.send(["LLEN", Keys.queue(datacenter: "east", queue: "default")]).int ?? 0
            return queued == 5 && cluster.taskEvents().contains { $0.event == "start" && $0.key == "rollback.hold.r0" }
        }
        try #require(holding, "east-1 runs r0 with the other five queued behind it: \(cluster.logs())")

        let whileLeading = try await executorctl(["handback", "--yes"], env: ctlEnv)
        #expect(whileLeading.code == 1 && whileLeading.err.contains("leads") && whileLeading.err.contains("Stop every swift-dispatcher"), "\(whileLeading)")
        // the rollback: the worker dies (its task with it), the dispatcher is stopped
        worker.signal(SIGKILL)
        dispatcher.signal(SIGTERM)
        #expect(await dispatcher.waitForExit(timeout: .seconds(20)) == 0, "\(dispatcher.log())")
        #expect(await worker.waitForExit(timeout: .seconds(10)) != nil)
        let whileHeard = try await executorctl(["handback", "--yes"], env: ctlEnv)
        #expect(whileHeard.code == 1 && whileHeard.err.contains("workers still run: east-1"), "\(whileHeard)")
        #expect(try await redis.send(["LLEN", "default"]).int == 0, "a refusal changes nothing")
        // once east-1 is silent past --dc-loss-after and its lease has run out
        try await Task.sleep(for: .seconds(4))
        let done = try await executorctl(["handback", "--yes", "--json", "--dc-loss-after", "3"], env: ctlEnv)
        #expect(done.code == 0, "\(done)")
        let report = try #require(try done.json() as? [String: Any], "\(done)")
        let counts = (report["handed_back"] as? [String: [String: Int]])?["default"]
        #expect(counts == ["queued": 5, "staged": 0, "expired_leases": 1], "\(done)")
        #expect((report["still_leased"] as? [Any])?.isEmpty == true)
        let waiting = (try await redis.send(["LRANGE", "default", "0", "-1"]).array ?? []).compactMap(\.string)
        #expect(try waiting.reversed().map { try CeleryTask.decode(raw: Array($0.utf8)).id } == ids, "next in line: r0, then r1…r5")
        #expect(try await redis.send(["ZCARD", Keys.leases]).int == 0)

        // stock Celery takes over: a Celery 5.6 prefork worker configured as Airflow configures it
        try cluster.release(dag: "rollback", run: "r0")
        let celery = try StockCeleryWorker(cluster: cluster, name: "rollback")
        let states = try await waitForCeleryFinal(pg, ids)
        #expect(ids.allSatisfy { states[$0] == "SUCCESS" }, "\(states)\n\(celery.log().suffix(3000))")
        let events = cluster.taskEvents()
        let starts = Dictionary(grouping: events.filter { $0.event == "start" }, by: \.key).mapValues(\.count)
        #expect(starts["rollback.hold.r0"] == 2, "r0: killed under Tandem, run again by Celery: \(events)")
        #expect((1...5).allSatisfy { starts["rollback.ok.r\($0)"] == 1 }, "\(events)")
        #expect(!events.contains { $0.event == "DUPLICATE" }, "\(events)")
        // Celery ran them under their own Celery ids (Airflow's external_executor_id), as it always would
        #expect(Set(events.filter { $0.event == "start" && $0.key != "rollback.hold.r0" }.map(\.executorID)) == Set(ids.dropFirst()))
        // a warm shutdown, as an operator stops it
        #expect(await celery.stop() == 0, "\(celery.log().suffix(2000))")
    }

    @Test("moving from stock Celery: what a killed Celery worker reserved (kombu's unacked hash) is shown, left while it may still be running, and restored by executorctl adopt as kombu would; Tandem then runs every task, none twice at once")
    func adoptFromStockCelery() async throws {
        let cluster = try Cluster()
        let redis = RedisClient(configuration: try RedisConfiguration(url: cluster.redis.url), logger: Logger(label: "adopt"))
        let pg = PostgresClient(configuration: try PostgresConfiguration(url: cluster.postgresURL), logger: Logger(label: "adopt"))
        defer { redis.close(); pg.close() }
        let ctlEnv = ["AIRFLOW__CELERY__BROKER_URL": cluster.brokerURL]
        // a Celery worker (2 slots) takes two tasks that hold, and is killed with everything it started
        let celery = try StockCeleryWorker(cluster: cluster, name: "adopt")
        var ids: [String] = []
        for i in 0..<2 { ids.append(try await publishAirflowCommand(redis, dag: "adopt", task: "hold", run: "r\(i)")) }
        for i in 2..<4 { ids.append(try await publishAirflowCommand(redis, dag: "adopt", task: "ok", run: "r\(i)")) }
        let holding = try await eventually(timeout: .seconds(60)) {
            cluster.taskEvents().filter { $0.event == "start" && $0.key.hasPrefix("adopt.hold.") }.count == 2
        }
        try #require(holding, "\(celery.log().suffix(3000))")
        celery.kill()
        let reserved = try await redis.send(["HLEN", "unacked"]).int ?? 0
        let waiting = try await redis.send(["LLEN", "default"]).int ?? 0
        #expect(reserved >= 2 && reserved + waiting == 4, "unacked \(reserved), in the list \(waiting)")
        for i in 0..<2 { try cluster.release(dag: "adopt", run: "r\(i)") }
        // what kombu's own restore writes for the same reservations, in a copy on database 1
        let copyURL = String(cluster.redis.url.dropLast(2)) + "/1"
        let copy = RedisClient(configuration: try RedisConfiguration(url: copyURL), logger: Logger(label: "adopt"))
        defer { copy.close() }
        for (key, kind) in [("unacked", "hash"), ("unacked_index", "zset"), ("_kombu.binding.default", "set")] {
            #expect(try await redis.send(["COPY", key, key, "DB", "1"]).int == 1, "the \(kind) \(key) is copied")
        }
        let kombu = try await Venv.celery56.run("celery_client.py", ["op": "kombu-restore", "broker": copyURL,
            "backend": cluster.resultBackend, "lists": ["default"]], dir: cluster.dir)
        let kombuElements = kombu["lists"]["default"].strings
        let kombuRestored = (kombu["restored"].value as? Int) ?? -1
        #expect(kombuRestored == Int(reserved) && kombuElements.count == Int(reserved), "\(kombu)")

        // what an operator sees: the reservations named by queues and task, and by the dispatcher's log
        let queues = try await executorctl(["queues"], env: ctlEnv)
        #expect(queues.out.contains("\(reserved) message(s) reserved by stock Celery workers and never acked"), "\(queues)")
        let task = try await executorctl(["task", ids[0]], env: ["AIRFLOW__CELERY__RESULT_BACKEND": cluster.resultBackend].merging(ctlEnv) { $1 })
        #expect(task.out.contains("reserved by a stock Celery worker") && task.out.contains("executorctl adopt --all"), "\(task)")
        // (a dispatcher with no worker yet: it routes nothing, so what adopt restores can be read in the list)
        let dispatcher = try cluster.startDispatcher()
        let warned = try await eventually(timeout: .seconds(30)) {
            dispatcher.log().contains("\(reserved) message(s) are reserved by stock Celery workers and never acked")
        }
        #expect(warned, "\(dispatcher.log())")

        // recent reservations are left (a live Celery worker may be running them); --dry-run shows what --all does
        let cautious = try await executorctl(["adopt", "--yes"], env: ctlEnv)
        #expect(cautious.code == 0 && cautious.out.contains("0 of \(reserved) restored") && cautious.out.contains("under --visibility-timeout"), "\(cautious)")
        let dry = try await executorctl(["adopt", "--all", "--dry-run"], env: ctlEnv)
        #expect(dry.code == 0 && dry.out.contains("would restore to default") && dry.out.contains("adopt.hold r0"), "\(dry)")
        #expect(try await redis.send(["HLEN", "unacked"]).int == reserved, "neither changed anything")
        let adopted = try await executorctl(["adopt", "--all", "--yes", "--json"], env: ctlEnv)
        let rows = try #require(try adopted.json() as? [[String: Any]], "\(adopted)")
        #expect(rows.count == reserved && rows.allSatisfy { $0["restored"] as? Bool == true }, "\(adopted)")
        #expect(try await redis.send(["HLEN", "unacked"]).int == 0)
        #expect(try await redis.send(["ZCARD", "unacked_index"]).int == 0)
        // as kombu restores: marked redelivered, the rest of the envelope as published
        let elements = (try await redis.send(["LRANGE", "default", "0", "-1"]).array ?? []).compactMap(\.string)
        let decoded = try elements.map { try KombuEnvelope.decode(Array($0.utf8)) }
        #expect(decoded.count == 4 && decoded.filter(\.redelivered).count == reserved, "\(elements)")
        let ours = zip(elements, decoded).filter { $0.1.redelivered }.map(\.0)
        #expect(ours.sorted() == kombuElements.sorted(), "byte for byte what kombu's own restore writes:\nours  \(ours)\nkombu \(kombuElements)")
        #expect(try Set(elements.map { try CeleryTask.decode(raw: Array($0.utf8)).id }) == Set(ids))

        // Tandem takes it from here
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "2"])
        let states = try await waitForCeleryFinal(pg, ids)
        #expect(ids.allSatisfy { states[$0] == "SUCCESS" }, "\(states)\n\(cluster.logs())")
        let events = cluster.taskEvents()
        let starts = Dictionary(grouping: events.filter { $0.event == "start" }, by: \.key).mapValues(\.count)
        #expect(starts["adopt.hold.r0"] == 2 && starts["adopt.hold.r1"] == 2, "killed under Celery, run again by Tandem: \(events)")
        #expect(starts["adopt.ok.r2"] == 1 && starts["adopt.ok.r3"] == 1, "\(events)")
        #expect(!events.contains { $0.event == "DUPLICATE" }, "\(events)")
        let none = try await executorctl(["adopt"], env: ctlEnv)
        #expect(none.code == 0 && none.out.contains("nothing to adopt"), "\(none)")
    }

    // MARK: - Message builders

    let unknownID = "00000000-0000-4000-8000-00000000dead"

    /// `execute_command` as Airflow 2.11 / provider ≥ 3.17.2 sends it.
    func command(task: String, run: String) -> [String: Any] {
        ["name": "execute_command", "args": [["airflow", "tasks", "run", "interop", task, run, "--local"]]]
    }

    /// `execute_workload` with an ExecuteTask JSON string shaped like Airflow 3.3's `model_dump_json()`.
    func workload(task: String, run: String, token: String) -> [String: Any] {
        let w: [String: Any] = [
            "token": token, "dag_rel_path": "interop.py", "bundle_info": ["name": "dags-folder", "version": NSNull()],
            "log_path": "dag_id=interop/run_id=\(run)/task_id=\(task)/attempt=1.log",
            "ti": [
                "id": UUID().uuidString.lowercased(), "task_id": task, "dag_id": "interop", "run_id": run,
                "try_number": 1, "dag_version_id": UUID().uuidString.lowercased(), "map_index": -1,
                "hostname": NSNull(), "context_carrier": NSNull(), "queue": "default", "pool_slots": 1,
                "priority_weight": 1,
            ],
            "sentry_integration": "", "type": "ExecuteTask",
        ]
        let data = try! JSONSerialization.data(withJSONObject: w, options: [.sortedKeys])
        return ["name": "execute_workload", "args": [String(decoding: data, as: UTF8.self)]]
    }

    /// A JWT-shaped token, unique per test, so a leak into argv or a log is unambiguous.
    func fakeJWT(_ subject: String) -> String {
        func b64(_ s: String) -> String {
            Data(s.utf8).base64EncodedString().replacingOccurrences(of: "=", with: "")
                .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
        }
        return b64(#"{"alg":"HS512","typ":"JWT"}"#) + "." + b64(#"{"sub":"\#(subject)","nonce":"\#(UUID())"}"#)
            + "." + b64("interop-signature-\(UUID())")
    }
}

// MARK: - Result backends

enum Backend: String, CustomStringConvertible, Sendable {
    case database, redis
    var description: String { rawValue }
    /// The BulkStateFetcher method Airflow's provider picks for this backend.
    var airflowFetchMethod: String {
        self == .database ? "_get_many_from_db_backend" : "_get_many_from_kv_backend"
    }
}

// MARK: - Python venvs

enum Venv: String, CustomStringConvertible, Sendable {
    case celery56, celery57, airflow
    var description: String { rawValue }
    var python: String { Repo.root + "/.venv/\(rawValue)/bin/python" }
    var celeryPrefix: String { self == .celery57 ? "5.7." : "5.6." }

    /// Runs Tests/InteropTests/python/`script` with `request` on stdin; returns the `TANDEM-RESULT` JSON.
    func run(_ script: String, _ request: [String: Any], dir: String, environment: [String: String] = [:],
        timeout: Duration = .seconds(120)) async throws -> J
    {
        guard FileManager.default.isExecutableFile(atPath: python) else {
            throw InteropError(
                "the Python venv .venv/\(rawValue) is missing (\(python)): run scripts/pyenv (it builds celery56, celery57 and airflow) before the interop tests")
        }
        let path = Repo.root + "/Tests/InteropTests/python/" + script
        let tag = "\(rawValue)-\(script)-\(UUID().uuidString.prefix(8))"
        let input = "\(dir)/\(tag).in.json", output = "\(dir)/\(tag).out", errors = "\(dir)/\(tag).err"
        try JSONSerialization.data(withJSONObject: request).write(to: URL(fileURLWithPath: input))
        _ = FileManager.default.createFile(atPath: output, contents: nil)
        _ = FileManager.default.createFile(atPath: errors, contents: nil)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = [path]
        var env = ProcessInfo.processInfo.environment
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        for (k, v) in environment { env[k] = v }
        p.environment = env
        p.currentDirectoryURL = URL(fileURLWithPath: dir)
        p.standardInput = FileHandle(forReadingAtPath: input)
        p.standardOutput = FileHandle(forWritingAtPath: output)
        p.standardError = FileHandle(forWritingAtPath: errors)
        try p.run()
        let exited = await eventually(timeout: timeout, every: .milliseconds(50)) { !p.isRunning }
        if !exited {
            p.terminate()
            p.waitUntilExit()
        }
        let out = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
        let err = (try? String(contentsOfFile: errors, encoding: .utf8)) ?? ""
        let line = out.split(separator: "\n").last { $0.hasPrefix("TANDEM-RESULT ") }
        guard exited, p.terminationStatus == 0, let line,
            let value = try? JSONSerialization.jsonObject(with: Data(line.dropFirst("TANDEM-RESULT ".count).utf8))
        else {
            throw InteropError(
                "\(rawValue)/bin/python \(script) \(exited ? "exited \(p.terminationStatus)" : "timed out") without a result\n"
                    + "stdout: \(out.suffix(2000))\nstderr: \(err.suffix(4000))")
        }
        if ProcessInfo.processInfo.environment["TANDEM_INTEROP_TRACE"] != nil {
            print("interop trace: \(rawValue) \(script) \(request["op"] ?? "")\n  -> \(line)")
        }
        return J(value)
    }
}

struct InteropError: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

/// Read-only access to decoded JSON.
struct J: CustomStringConvertible {
    let value: Any?
    init(_ v: Any?) { value = v }
    subscript(key: String) -> J { J((value as? [String: Any])?[key]) }
    subscript(index: Int) -> J {
        guard let a = value as? [Any], a.indices.contains(index) else { return J(nil) }
        return J(a[index])
    }
    var string: String? { value as? String }
    var isNull: Bool { value == nil || value is NSNull }
    var array: [J] { (value as? [Any])?.map(J.init) ?? [] }
    var strings: [String] { array.compactMap(\.string) }
    var description: String {
        guard let value, JSONSerialization.isValidJSONObject(value),
            let d = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys])
        else { return String(describing: value) }
        return String(decoding: d, as: UTF8.self)
    }
}

// MARK: - The cluster under test

/// A Cluster with one dispatcher and one `east` worker, the Airflow 3 stand-in as its --python, and the result
/// backend chosen: `db+postgresql+psycopg2://…` (results and ledger in one database) or `redis://…/1` (results in
/// Redis db 1 of the broker's server, ledger in Postgres via TANDEM_LEDGER_URL).
final class InteropCluster: @unchecked Sendable {
    let cluster: Cluster
    let backend: Backend
    let redis: RedisClient
    let results: RedisClient
    let pg: PostgresClient
    let workDir: String

    /// How the broker connection is secured; the inspection clients below always use Redis's plain port.
    enum BrokerTLS {
        case none
        /// `rediss://…?ssl_cert_reqs=required&ssl_ca_certs=…` in the broker URL (kombu's URL form).
        case url
        /// A bare `rediss://` plus Airflow's `[celery] ssl_active`, `ssl_cacert`, `ssl_cert`, `ssl_key`, against a
        /// Redis that requires client certificates (the celery provider's `broker_use_ssl`).
        case airflowSettings
    }

    init(backend: Backend, tls: BrokerTLS = .none, certificates: TLSCertificates? = nil) async throws {
        cluster = try Cluster(tls: tls == .none ? nil : certificates, requireClientCertificates: tls == .airflowSettings)
        self.backend = backend
        if let certificates, let tlsPort = cluster.redis.tlsPort {
            switch tls {
            case .none: break
            case .url: cluster.brokerURLOverride = cluster.redis.tlsURL(certificates)
            case .airflowSettings:
                cluster.brokerURLOverride = "rediss://127.0.0.1:\(tlsPort)/0"
                cluster.extraEnvironment["AIRFLOW__CELERY__SSL_ACTIVE"] = "True"
                cluster.extraEnvironment["AIRFLOW__CELERY__SSL_CACERT"] = certificates.caFile
                cluster.extraEnvironment["AIRFLOW__CELERY__SSL_CERT"] = certificates.clientCert
                cluster.extraEnvironment["AIRFLOW__CELERY__SSL_KEY"] = certificates.clientKey
            }
        }
        workDir = cluster.dir + "/work"
        let redisResults = String(cluster.redis.url.dropLast(2)) + "/1"
        cluster.extraEnvironment.merge([
            "TANDEM_PYTHON": Repo.root + "/Tests/Fixtures/bin/python-workload-check",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://127.0.0.1:9/execution/",
        ]) { $1 }
        if backend == .redis {
            cluster.extraEnvironment["AIRFLOW__CELERY__RESULT_BACKEND"] = redisResults
            cluster.extraEnvironment["TANDEM_LEDGER_URL"] = cluster.postgresURL
        }
        let logger = Logger(label: "interop")
        redis = RedisClient(configuration: try RedisConfiguration(url: cluster.redis.url), logger: logger)
        results = RedisClient(configuration: try RedisConfiguration(url: redisResults), logger: logger)
        pg = PostgresClient(configuration: try PostgresConfiguration(url: cluster.postgresURL), logger: logger)
        try cluster.startDispatcher()
        try cluster.startWorker(dc: "east", name: "east-1", extra: ["--concurrency", "4", "--work-dir", workDir, "--runner", "spawn"])
    }

    deinit {
        redis.close()
        results.close()
        pg.close()
    }

    var brokerURL: String { cluster.brokerURL }
    /// The result backend URL as Airflow's `[celery] result_backend` would hold it.
    var backendURL: String { cluster.environment["AIRFLOW__CELERY__RESULT_BACKEND"]! }

    /// What an Airflow 3 deployment sets for its scheduler (the provider builds its Celery app from these).
    var airflowEnvironment: [String: String] {
        cluster.extraEnvironment.filter { $0.key.hasPrefix("AIRFLOW__CELERY__SSL") }.merging([
            "AIRFLOW_HOME": cluster.dir + "/airflow-home",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CELERY__BROKER_URL": brokerURL,
            "AIRFLOW__CELERY__RESULT_BACKEND": backendURL,
            "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
            "AIRFLOW__API_AUTH__JWT_SECRET": "interop-tests-only",
        ]) { $1 }
    }

    /// The local port of every client connected to Redis but this one (`CLIENT LIST`'s laddr), e.g. to see that
    /// Tandem's connections all came in on the TLS port.
    func clientPorts() async throws -> [Int] {
        let me = try await redis.send(["CLIENT", "ID"]).int ?? -1
        let list = try await redis.send(["CLIENT", "LIST"]).string ?? ""
        return list.split(separator: "\n").compactMap { line -> Int? in
            let fields = Dictionary(line.split(separator: " ").compactMap { f -> (String, String)? in
                let kv = f.split(separator: "=", maxSplits: 1)
                return kv.count == 2 ? (String(kv[0]), String(kv[1])) : nil
            }, uniquingKeysWith: { a, _ in a })
            guard fields["id"] != String(me), let laddr = fields["laddr"] else { return nil }
            return laddr.split(separator: ":").last.flatMap { Int($0) }
        }
    }

    func fakeLog() -> String { (try? String(contentsOfFile: cluster.fakeLog, encoding: .utf8)) ?? "" }

    /// Final-or-not Celery status by task id, from whichever backend Tandem writes to.
    func finalStates(_ ids: [String]) async throws -> [String: String] {
        var out: [String: String] = [:]
        switch backend {
        case .database:
            let exists = try await pg.query("SELECT to_regclass('celery_taskmeta') IS NOT NULL AS ok")
            guard exists.rows.first?.string("ok") == "t" else { return [:] }
            for row in try await pg.query("SELECT task_id, status FROM celery_taskmeta").rows {
                if let id = row.string("task_id"), ids.contains(id) { out[id] = row.string("status") }
            }
        case .redis:
            for id in ids {
                guard let raw = try await results.send(["GET", "celery-task-meta-\(id)"]).string,
                    let meta = try? JSONSerialization.jsonObject(with: Data(raw.utf8)) as? [String: Any]
                else { continue }
                out[id] = meta["status"] as? String
            }
        }
        return out.filter { ["SUCCESS", "FAILURE"].contains($0.value) }
    }

    func waitForFinal(_ ids: [String], timeout: Duration = .seconds(60)) async throws -> [String: String] {
        _ = try await eventually(timeout: timeout) { try await finalStates(ids).count == ids.count }
        return try await finalStates(ids)
    }

    /// Tandem's own records for finished tasks: the result in Celery's shape and the ledger row.
    func expectRecorded(ids: [String], states: [String: String], sourceLocation: SourceLocation = #_sourceLocation)
        async throws
    {
        for id in ids {
            let want = states[id]
            switch backend {
            case .database:
                let r = try await pg.query(
                    "SELECT status, result IS NULL AS null_result, date_done IS NOT NULL AS done FROM celery_taskmeta WHERE task_id = $1",
                    [.text(id)])
                let row = try #require(r.rows.first, "no celery_taskmeta row for \(id)", sourceLocation: sourceLocation)
                #expect(row.string("status") == want, sourceLocation: sourceLocation)
                #expect(row.string("done") == "t", "date_done set for a final state", sourceLocation: sourceLocation)
                if want == "FAILURE" {
                    #expect(row.string("null_result") == "t", "FAILURE rows carry a NULL result", sourceLocation: sourceLocation)
                }
            case .redis:
                let key = "celery-task-meta-\(id)"
                let raw = try #require(try await results.send(["GET", key]).string, "no \(key)", sourceLocation: sourceLocation)
                let meta = J(try JSONSerialization.jsonObject(with: Data(raw.utf8)))
                #expect(meta["status"].string == want, "\(meta)", sourceLocation: sourceLocation)
                #expect(meta["task_id"].string == id, "\(meta)", sourceLocation: sourceLocation)
                #expect(meta["date_done"].string != nil, "\(meta)", sourceLocation: sourceLocation)
                let ttl = try await results.send(["TTL", key]).int ?? -2
                #expect(ttl > 0, "results expire like Celery's (SETEX): TTL \(ttl)", sourceLocation: sourceLocation)
            }
            // with the Redis backend the result is stored first and the ledger's end follows in Postgres
            let ledgerSQL = "SELECT datacenter, attempts, outcome FROM tandem_tasks WHERE task_id = $1"
            _ = try await eventually(timeout: .seconds(20)) {
                try await pg.query(ledgerSQL, [.text(id)]).rows.first?.string("outcome") != nil
            }
            let l = try await pg.query(ledgerSQL, [.text(id)])
            let row = try #require(l.rows.first, "no ledger row for \(id)", sourceLocation: sourceLocation)
            #expect(row.string("datacenter") == "east", sourceLocation: sourceLocation)
            #expect(row.int("attempts") == 1, sourceLocation: sourceLocation)
            #expect(row.string("outcome") == want, sourceLocation: sourceLocation)
        }
    }

    /// The Airflow 3 stand-in ran exactly these workloads (dag.task.run), each once, with no failed check; the
    /// JWT never reached the worker's log; no workload file (it holds the JWT) is left behind.
    func expectWorkloadsRan(_ keys: [String], token: String, sourceLocation: SourceLocation = #_sourceLocation)
        async throws
    {
        let events = cluster.taskEvents()
        #expect(!events.contains { $0.event == "BADCALL" }, "the worker called python wrongly:\n\(fakeLog())",
            sourceLocation: sourceLocation)
        #expect(events.filter { $0.event == "workload" }.map(\.key).sorted() == keys.sorted(), "\(fakeLog())",
            sourceLocation: sourceLocation)
        #expect(!cluster.logs().contains(token), "the workload token leaked into a Tandem log",
            sourceLocation: sourceLocation)
        // a spawned task's workload file is removed after its result and ack, so it may outlive the result briefly
        let workloadFiles = {
            ((try? FileManager.default.contentsOfDirectory(atPath: self.workDir)) ?? []).filter { $0.hasPrefix("workload-") }
        }
        _ = try await eventually(timeout: .seconds(20)) { workloadFiles().isEmpty }
        let left = workloadFiles()
        #expect(left.isEmpty, "workload files left behind: \(left)",
            sourceLocation: sourceLocation)
    }
}

/// A stock Celery 5.6 prefork worker configured as Airflow's CeleryExecutor configures it (Benchmarks/benchapp.py:
/// `execute_command` runs the argv as the provider does), on the cluster's Redis and Postgres; the fake `airflow`
/// records what it runs. In a session of its own, so `kill()` takes its pool and their tasks with it.
final class StockCeleryWorker: @unchecked Sendable {
    let process = Process()
    let logPath: String

    init(cluster: Cluster, name: String, concurrency: Int = 2) throws {
        let bin = Repo.root + "/.venv/celery56/bin/"
        guard FileManager.default.isExecutableFile(atPath: bin + "celery") else {
            throw InteropError("the Python venv .venv/celery56 is missing: run scripts/pyenv before the interop tests")
        }
        // a process started from a test's thread inherits its blocked signals (a Dispatch worker blocks them):
        // unblock them first, or Celery never sees the SIGTERM that ends it
        process.executableURL = URL(fileURLWithPath: bin + "python")
        process.arguments = [
            "-c", """
            import os, signal, sys
            if os.getpgrp() != os.getpid():
                os.setsid()
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execv(sys.argv[1], sys.argv[1:])
            """,
            bin + "celery", "-A", "benchapp", "worker", "--queues", "default", "--pool", "prefork",
            "--concurrency", String(concurrency), "--loglevel", "INFO", "--hostname", "\(name)@%h",
        ]
        process.environment = ProcessInfo.processInfo.environment.merging(cluster.environment) { $1 }.merging([
            "BENCH_BROKER": cluster.brokerURL, "BENCH_BACKEND": cluster.resultBackend,
            "PYTHONPATH": Repo.root + "/Benchmarks", "PYTHONDONTWRITEBYTECODE": "1",
        ]) { $1 }
        logPath = cluster.dir + "/celery-\(name).log"
        FileManager.default.createFile(atPath: logPath, contents: nil)
        process.standardOutput = FileHandle(forWritingAtPath: logPath)
        process.standardError = FileHandle(forWritingAtPath: logPath)
        try process.run()
    }

    func log() -> String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// SIGKILL to the whole session: the worker, its pool and the tasks they started.
    func kill() {
        Foundation.kill(-process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// A warm shutdown (SIGTERM), as an operator stops it; its exit status, or nil if it did not stop in 30 s.
    func stop() async -> Int32? {
        Foundation.kill(process.processIdentifier, SIGTERM)
        let stopped = await eventually(timeout: .seconds(30)) { !self.process.isRunning }
        return stopped ? process.terminationStatus : nil
    }

    deinit { if process.isRunning { kill() } }
}
