import Foundation
import Testing

@testable import CeleryWire

@Suite("captured vectors")
struct VectorTests {
    @Test("the vector set is complete")
    func vectorSetIsComplete() {
        // Three celery versions x (21 task + 2 pidbox + 4 result) + 2 Airflow provider captures.
        #expect(Vector.all.count >= 86)
        for prefix in ["celery553", "celery563", "celery570"] {
            #expect(Vector.all.contains { $0.name == "\(prefix)-p2-basic" })
            #expect(Vector.all.contains { $0.name == "\(prefix)-p1-basic" })
        }
        #expect(Vector.all.contains { $0.name == "celery563-airflow-execute-workload" })
    }

    @Test("task vectors decode to what Python decoded", arguments: Vector.tasks)
    func taskDecodes(_ v: Vector) throws {
        let e = v.expect
        let env = try KombuEnvelope.decode(Array(v.raw.utf8))
        let t = try CeleryTask.decode(env)
        #expect(t.protocolVersion == Int(e["protocol"]!.int!))
        #expect(t.name == e["name"]!.string!)
        #expect(t.id == e["id"]!.string!)
        #expect(JSONValue.array(t.args) == e["args"]!)
        #expect(JSONValue.object(t.kwargs) == e["kwargs"]!)
        #expect(t.retries == Int(e["retries"]!.int!))
        #expect(t.rootId == e["root_id"]!.optString)
        #expect(t.parentId == e["parent_id"]!.optString)
        #expect(t.replyTo == e["reply_to"]!.optString)
        #expect(t.deliveryTag == e["delivery_tag"]!.optString)
        #expect(t.priority == e["priority"]!.int.map { Int($0) })
        #expect(t.redelivered == e["redelivered"]!.bool!)
        #expect(env.contentType == e["content_type"]!.string!)
        #expect(env.contentEncoding == e["content_encoding"]!.string!)
        #expect(env.compression == e["compression"]!.optString)
        #expect(String(decoding: env.body, as: UTF8.self) == e["body_json"]!.string!)
        #expect(t.hardTimeLimit == e["hard_time_limit"]!.double)
        #expect(t.softTimeLimit == e["soft_time_limit"]!.double)
        for (field, date) in [("eta", t.eta), ("expires", t.expires)] {
            if let want = e["\(field)_epoch"]!.double {
                let got = try #require(date, "\(field) missing")
                #expect(abs(got.timeIntervalSince1970 - want) < 1e-5, "\(field)")
            } else {
                #expect(date == nil, "\(field)")
            }
        }
        // The list it was found on is the one kombu's priority rounding names.
        let routingKey = env.deliveryInfo["routing_key"]!.string!
        #expect(CeleryPublisher.priorityList(queue: routingKey, priority: t.priority) == v.doc["list"]!.string!)
        // Bindings, where this publish created them.
        if case .object(let b)? = v.doc["bindings"], !b.isEmpty {
            #expect(
                b[CeleryPublisher.bindingKey(queue: routingKey)]
                    == .array([.string(CeleryPublisher.bindingMember(queue: routingKey))]))
        }
    }

    @Test("task vectors classify as Airflow payloads like Python did", arguments: Vector.tasks)
    func taskClassifies(_ v: Vector) throws {
        let p = v.expect["payload"]!
        let t = try CeleryTask.decode(raw: Array(v.raw.utf8))
        switch p["kind"]!.string! {
        case "command":
            guard case .command(let argv) = try AirflowPayload.classify(t) else {
                Issue.record("expected a command")
                return
            }
            #expect(JSONValue.array(argv.map { .string($0) }) == p["argv"]!)
        case "workload":
            guard case .workload(let w) = try AirflowPayload.classify(t) else {
                Issue.record("expected a workload")
                return
            }
            #expect(w.json == t.args[0].string!)
            #expect(w.kind == p["type"]!.string!)
            #expect(w.tiID == p["ti_id"]!.optString)
            #expect(w.dagID == p["dag_id"]!.optString)
            #expect(w.taskID == p["task_id"]!.optString)
            #expect(w.runID == p["run_id"]!.optString)
            #expect(w.tryNumber == p["try_number"]!.int.map { Int($0) })
            #expect(w.mapIndex == p["map_index"]!.int.map { Int($0) })
            #expect(w.queue == p["queue"]!.optString)
            #expect(w.logPath == p["log_path"]!.optString)
            #expect(w.token == p["token"]!.string!)
            #expect(!String(describing: w).contains(w.token))
        default:
            #expect(throws: WireError.self) { try AirflowPayload.classify(t) }
            do { _ = try AirflowPayload.classify(t) } catch { #expect(error.code == .unknownTask) }
        }
    }

    @Test(
        "re-serializing a vector in Python style reproduces it byte for byte",
        arguments: Vector.all.filter { $0.kind != "dbpickle" })
    func pythonStyleRoundTrip(_ v: Vector) throws {
        let parsed = try JSONValue.parse(v.raw)
        #expect(parsed.serialized(style: .python) == v.raw)
        #expect(try JSONValue.parse(parsed.serialized()) == parsed)
        if v.kind == "task" {
            let body = v.expect["body_json"]!.string!
            if v.name.hasSuffix("typed-args") {
                // 2**70 does not fit Int64: it round-trips as a double (documented), so compare values.
                #expect(try JSONValue.parse(JSONValue.parse(body).serialized(style: .python)) == JSONValue.parse(body))
            } else {
                #expect(try JSONValue.parse(body).serialized(style: .python) == body)
            }
        }
    }

    @Test("the Airflow task a message runs, for executorctl: from a command's argv and from a workload's ti")
    func airflowTarget() throws {
        let byName = Dictionary(uniqueKeysWithValues: Vector.tasks.map { ($0.name, $0) })
        for name in ["celery553-p2-execute-command", "celery553-p2-execute-workload-send-task"] {
            let v = try #require(byName[name], "vector \(name)")
            let t = try CeleryTask.decode(raw: Array(v.raw.utf8))
            #expect(t.airflowTarget == "example_dag.extract manual__2024-01-01T00:00:00+00:00", "\(name)")
        }
        let basic = try #require(byName["celery553-p2-basic"])
        #expect(try CeleryTask.decode(raw: Array(basic.raw.utf8)).airflowTarget == nil)
    }

    @Test("pidbox vectors decode", arguments: Vector.pidbox)
    func pidboxDecodes(_ v: Vector) throws {
        let m = try PidboxMessage.decode(Array(v.raw.utf8))
        #expect(v.doc["channel"]!.string! == PidboxMessage.channel(db: 0))
        #expect(m.method == v.expect["method"]!.string!)
        #expect(JSONValue.object(m.arguments) == v.expect["arguments"]!)
        #expect(m.destination == nil)
        #expect(v.expect["destination"]! == .null)
        #expect(m.revokedTaskIDs == [v.expect["arguments"]!["task_id"]!.string!])
        #expect(m.terminate == (v.expect["arguments"]!["terminate"]!.bool!))
        #expect(m.signal == "SIGTERM")
        #expect(m.isFor(node: "celery@anything"))
        #expect(m.expires != nil)
    }

    @Test(
        "SafePickle writes the exact bytes celery's database backend was shown to read",
        arguments: Vector.all.filter { $0.kind == "dbpickle" })
    func databasePickles(_ v: Vector) throws {
        let rows = try #require(v.expect.array)
        #expect(rows.count >= 3)
        for row in rows {
            let value = row["reads_back_as"]!
            let state = CeleryState(rawValue: row["state"]!.string!)!
            let record = ResultRecord(taskId: "t", state: state, result: value)
            if case .string(let hex)? = row["hex"] {
                let bytes = try #require(record.databaseResult())
                #expect(bytes.map { String(format: "%02x", $0) }.joined() == hex)
                #expect(try SafePickle.loads(bytes) == value)
            } else {
                #expect(record.databaseResult() == nil)  // SQL NULL
            }
        }
    }

    @Test("result vectors: decode, and redisValue() rebuilds them byte for byte", arguments: Vector.results)
    func resultsRoundTrip(_ v: Vector) throws {
        let r = try ResultRecord.decode(redisValue: Array(v.raw.utf8))
        #expect(r.state.rawValue == v.expect["status"]!.string!)
        #expect(r.taskId == v.expect["task_id"]!.string!)
        #expect(r.redisKey == v.doc["key"]!.string!)
        #expect(r.redisValue() == v.raw)
        #expect((r.dateDone == nil) == !r.state.isReady)
        // The convenience constructors produce the same shapes the real backend wrote.
        let built: ResultRecord
        switch r.state {
        case .success: built = .success(taskId: r.taskId, at: r.dateDone!)
        case .started:
            built = .started(taskId: r.taskId, pid: 4242, hostname: "celery@worker-1")
        case .failure:
            built = .failure(
                taskId: r.taskId, excType: "ValueError", excMessage: "task exited with 1",
                traceback: r.traceback, at: r.dateDone!)
        case .revoked: built = .revoked(taskId: r.taskId, at: r.dateDone!)
        default: return
        }
        #expect(built.redisValue() == v.raw)
    }
}
