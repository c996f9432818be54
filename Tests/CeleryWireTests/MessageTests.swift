import Foundation
import Testing

@testable import CeleryWire

/// Builds an envelope around a JSON body (base64, like kombu).
func envelope(
    body: String, headers: JSONValue = .object([:]), compression: String? = nil,
    contentType: String = "application/json", bodyEncoding: String = "base64"
) -> [UInt8] {
    var h = headers.object ?? JSONObject()
    if let compression { h["compression"] = .string(compression) }
    let env: JSONValue = .object([
        "body": .string(bodyEncoding == "base64" ? Base64.encode(Array(body.utf8)) : body),
        "content-encoding": "utf-8", "content-type": .string(contentType), "headers": .object(h),
        "properties": .object([
            "body_encoding": .string(bodyEncoding), "delivery_tag": "tag-1", "priority": 0,
            "delivery_info": .object(["exchange": "", "routing_key": "default"]),
        ]),
    ])
    return Array(env.serialized(style: .python).utf8)
}

func code(_ body: () throws -> Void) -> WireError.Code? {
    do { try body() } catch let e as WireError { return e.code } catch { return nil }
    return nil
}

let argv: [JSONValue] = ["airflow", "tasks", "run", "dag", "task", "run", "--local"]

func p2(_ name: String, id: JSONValue = "id-1", args: JSONValue) -> [UInt8] {
    envelope(
        body: JSONValue.array([args, .object([:]), .null]).serialized(),
        headers: .object(["task": .string(name), "id": id]))
}

@Suite("envelopes and tasks")
struct MessageTests {
    @Test func malformedEnvelopesThrowTheRightCode() {
        #expect(code { _ = try KombuEnvelope.decode(Array("not json".utf8)) } == .notJSON)
        #expect(code { _ = try KombuEnvelope.decode(Array("[1,2]".utf8)) } == .notAnEnvelope)
        #expect(code { _ = try KombuEnvelope.decode(Array(#"{"properties":{}}"#.utf8)) } == .notAnEnvelope)
        #expect(code { _ = try KombuEnvelope.decode(Array(#"{"body":"eA=="}"#.utf8)) } == .notAnEnvelope)
        #expect(
            code {
                _ = try KombuEnvelope.decode(Array(#"{"body":"!!!","properties":{"body_encoding":"base64"}}"#.utf8))
            }
                == .badBase64)
        #expect(
            code { _ = try KombuEnvelope.decode(envelope(body: "[]", compression: "application/x-bz2")) }
                == .unsupportedCompression)
        #expect(
            code { _ = try KombuEnvelope.decode(envelope(body: "[]", compression: "application/x-gzip")) }
                == .unsupportedCompression)  // not actually compressed: corrupt
        #expect(
            code { _ = try KombuEnvelope.decode(envelope(body: "[]", bodyEncoding: "rot13")) } == .unsupportedEncoding)
        #expect(
            code { _ = try CeleryTask.decode(raw: envelope(body: "x", contentType: "application/x-python-serialize")) }
                == .unsupportedEncoding)
        #expect(code { _ = try CeleryTask.decode(raw: envelope(body: "{not json")) } == .badBody)
    }

    @Test func malformedTasksThrowTheRightCode() {
        // Protocol 2 headers without id.
        #expect(
            code { _ = try CeleryTask.decode(raw: envelope(body: "[[], {}, null]", headers: ["task": "t"])) }
                == .missingField)
        #expect(code { _ = try CeleryTask.decode(raw: p2("t", args: "not a list")) } == .badArgs)
        #expect(
            code {
                _ = try CeleryTask.decode(raw: envelope(body: "[[], [], null]", headers: ["task": "t", "id": "i"]))
            }
                == .badArgs)
        #expect(
            code { _ = try CeleryTask.decode(raw: envelope(body: "{}", headers: ["task": "t", "id": "i"])) } == .badBody
        )
        // Protocol 1 without task/id, with args not a list.
        #expect(code { _ = try CeleryTask.decode(raw: envelope(body: #"{"id": "i"}"#)) } == .missingField)
        #expect(code { _ = try CeleryTask.decode(raw: envelope(body: #"{"task": "t"}"#)) } == .missingField)
        #expect(
            code { _ = try CeleryTask.decode(raw: envelope(body: #"{"task": "t", "id": "i", "args": {}}"#)) }
                == .badArgs)
        #expect(code { _ = try CeleryTask.decode(raw: envelope(body: "[1]")) } == .badBody)
        #expect(
            code {
                _ = try CeleryTask.decode(
                    raw: envelope(body: "[[], {}, null]", headers: ["task": "t", "id": "i", "eta": "soon"]))
            } == .badBody)
    }

    @Test func airflowCommandValidation() throws {
        for name in AirflowTaskName.all.dropFirst() {
            #expect(AirflowTaskName.isCommand(name))
            let t = try CeleryTask.decode(raw: p2(name, args: [.array(argv)]))
            guard case .command(let got) = try AirflowPayload.classify(t) else {
                Issue.record("not a command")
                continue
            }
            #expect(got == argv.map { $0.string! })
        }
        #expect(!AirflowTaskName.isCommand(AirflowTaskName.workload))
        #expect(AirflowTaskName.all.count == 4)
        func classify(_ args: JSONValue, name: String = "execute_command") -> WireError.Code? {
            code { _ = try AirflowPayload.classify(try CeleryTask.decode(raw: p2(name, args: args))) }
        }
        #expect(classify([.array(["bash", "-c", "rm -rf /", "x"])]) == .badArgv)
        #expect(classify([.array(["airflow", "tasks", "test", "x"])]) == .badArgv)
        #expect(classify([.array(["airflow", "tasks", "run"])]) == .badArgv)
        #expect(classify([.array(["airflow", "tasks", "run", 5])]) == .badArgv)
        #expect(classify([.array(["airflow", "tasks", "run", "a\u{0}b"])]) == .badArgv)
        #expect(
            classify([.array(["airflow", "tasks", "run", .string(String(repeating: "x", count: 70_000))])])
                == .badArgv)
        #expect(classify([.array(Array(repeating: "x", count: 300))]) == .badArgv)
        #expect(classify(["airflow tasks run x"]) == .badArgs)
        #expect(classify([]) == .badArgs)
        #expect(classify([.array(argv)], name: "tandem.add") == .unknownTask)
    }

    @Test func airflowWorkloadValidation() throws {
        let good = Vector.named("celery563-airflow-execute-workload")
        let json = try CeleryTask.decode(raw: Array(good.raw.utf8)).args[0].string!
        var obj = try JSONValue.parse(json).object!
        func classify(_ arg: JSONValue) -> WireError.Code? {
            code { _ = try AirflowPayload.classify(try CeleryTask.decode(raw: p2("execute_workload", args: [arg]))) }
        }
        #expect(classify(.string(json)) == nil)
        #expect(classify(.string("{not json")) == .badWorkload)
        #expect(classify(.string("[1]")) == .badWorkload)
        #expect(classify(.object(obj)) == .badArgs)  // must be the JSON string, not an object
        var o = obj
        o["token"] = nil
        #expect(classify(.string(JSONValue.object(o).serialized())) == .badWorkload)
        o = obj
        o["token"] = ""
        #expect(classify(.string(JSONValue.object(o).serialized())) == .badWorkload)
        o = obj
        o["type"] = "RunTrigger"
        #expect(classify(.string(JSONValue.object(o).serialized())) == .badWorkload)
        o["type"] = nil
        #expect(classify(.string(JSONValue.object(o).serialized())) == .badWorkload)
        o = obj
        o["ti"] = nil
        #expect(classify(.string(JSONValue.object(o).serialized())) == .badWorkload)
        // Unknown keys are ignored; the JSON is forwarded verbatim.
        obj["future_field"] = .object(["x": 1])
        let s = JSONValue.object(obj).serialized()
        guard
            case .workload(let w) = try AirflowPayload.classify(
                try CeleryTask.decode(raw: p2("execute_workload", args: [.string(s)])))
        else {
            Issue.record("not a workload")
            return
        }
        #expect(w.json == s)
        // TestConnection (Airflow 3.3).
        let tc: JSONValue = .object([
            "token": "jwt.x.y", "connection_test_id": "c-1", "connection_id": "pg", "timeout": 30,
            "queue": "q", "type": "TestConnection",
        ])
        guard
            case .workload(let w2) = try AirflowPayload.classify(
                try CeleryTask.decode(raw: p2("execute_workload", args: [.string(tc.serialized())])))
        else {
            Issue.record("not a workload")
            return
        }
        #expect(w2.kind == "TestConnection" && w2.tiID == "c-1" && w2.queue == "q")
    }

    @Test func tokenNeverPrinted() throws {
        for name in [
            "celery563-airflow-execute-workload", "celery563-airflow-execute-callback",
            "celery570-p2-execute-workload-send-task",
        ] {
            let t = try CeleryTask.decode(raw: Array(Vector.named(name).raw.utf8))
            guard case .workload(let w) = try AirflowPayload.classify(t) else {
                Issue.record("not a workload")
                continue
            }
            #expect(w.token.count > 20)
            var dumped = ""
            dump(w, to: &dumped)
            for text in [
                String(describing: w), String(reflecting: w), "\(w)", dumped,
                String(describing: AirflowPayload.workload(w)),
            ] {
                #expect(!text.contains(w.token))
                #expect(!text.contains(String(w.token.prefix(20))))
            }
            #expect(String(describing: w).contains("redacted"))
        }
    }

    @Test func kombuTypeTags() throws {
        let t = try CeleryTask.decode(raw: Array(Vector.named("celery570-p2-typed-args").raw.utf8))
        let tags = t.args.map(\.kombuTag)
        guard case .datetime(let d)? = tags[0] else {
            Issue.record("tag 0")
            return
        }
        #expect(CeleryDate.isoformat(d) == "2024-05-06T07:08:09.123456+00:00")
        guard case .datetime(let naive)? = tags[1] else {
            Issue.record("tag 1")
            return
        }
        #expect(CeleryDate.isoformat(naive) == "2024-05-06T07:08:09+00:00")
        #expect(tags[2] == .date("2024-05-06"))
        #expect(tags[3] == .time("07:08:09"))
        #expect(tags[4] == .decimal("1.10"))
        #expect(tags[5] == .uuid("12345678-1234-5678-1234-567812345678"))
        #expect(tags[6] == .bytes(Array("plain bytes".utf8)))
        #expect(tags[7] == .bytes([0xFF, 0x00, 0x01]))
        #expect(t.kwargs["when"]?.kombuTag == tags[0])
        #expect(t.kwargs["big"] == .double(1180591620717411303424.0))
        #expect(JSONValue.int(5).kombuTag == nil)
        #expect(JSONValue.object(["__type__": "mine", "__value__": 1]).kombuTag == .other(type: "mine", value: 1))
    }

    @Test func compressionBothWrappers() throws {
        for name in ["celery553-p2-gzip", "celery563-p2-zlib", "celery570-p2-gzip"] {
            let env = try KombuEnvelope.decode(Array(Vector.named(name).raw.utf8))
            #expect(env.compression == "application/x-gzip")
            let t = try CeleryTask.decode(env)
            #expect(t.args[0].array?.count == 50)
        }
        // A real gzip member (RFC 1952) and a stored-block zlib stream also inflate.
        let gz: [UInt8] = [
            0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0x03, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00,
            0x86, 0xa6, 0x10, 0x36, 0x05, 0, 0, 0,
        ]
        #expect(try Inflate.decompress(gz) == Array("hello".utf8))
        let stored: [UInt8] = [0x78, 0x01, 0x01, 0x02, 0x00, 0xfd, 0xff, 0x5b, 0x5d, 0, 0, 0, 0]
        #expect(try Inflate.decompress(stored) == Array("[]".utf8))
    }

    @Test func expiry() throws {
        let t = try CeleryTask.decode(raw: Array(Vector.named("celery563-p2-eta-expires").raw.utf8))
        #expect(!t.isExpired(at: Date(timeIntervalSince1970: 1_893_621_599)))
        #expect(t.isExpired(at: Date(timeIntervalSince1970: 1_893_621_600)))
    }

    @Test func pidboxErrors() {
        #expect(code { _ = try PidboxMessage.decode(Array("nope".utf8)) } == .badControl)
        #expect(code { _ = try PidboxMessage.decode(envelope(body: #"{"arguments": {}}"#)) } == .badControl)
        #expect(
            code { _ = try PidboxMessage.decode(envelope(body: #"{"method": "ping", "destination": 5}"#)) }
                == .badControl)
        let m = try? PidboxMessage.decode(
            envelope(body: #"{"method": "revoke", "arguments": {"task_id": ["a", "b"]}, "destination": ["celery@x"]}"#))
        #expect(m?.revokedTaskIDs == ["a", "b"])
        #expect(m?.isFor(node: "celery@x") == true)
        #expect(m?.isFor(node: "celery@y") == false)
        #expect(m?.terminate == false)
    }

    @Test func resultRecordShapes() {
        let started = ResultRecord.started(taskId: "t", pid: 7, hostname: "h")
        #expect(
            started.redisValue()
                == #"{"status": "STARTED", "result": {"pid": 7, "hostname": "h"}, "traceback": null, "children": null, "date_done": null, "task_id": "t"}"#
        )
        #expect(ResultRecord.failure(taskId: "t", excMessage: "x").databaseResult() == nil)
        #expect(ResultRecord.revoked(taskId: "t").databaseResult() == nil)
        #expect(ResultRecord.success(taskId: "t").databaseResult() == [0x80, 2, UInt8(ascii: "N"), UInt8(ascii: ".")])
        #expect((try? SafePickle.loads(started.databaseResult()!)) == started.result)
        #expect(
            code { _ = try ResultRecord.decode(redisValue: Array(#"{"status": "WEIRD", "task_id": "t"}"#.utf8)) }
                == .badBody)
        #expect(code { _ = try ResultRecord.decode(redisValue: Array(#"{"task_id": "t"}"#.utf8)) } == .missingField)
    }
}
