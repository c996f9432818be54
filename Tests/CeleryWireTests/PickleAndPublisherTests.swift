import Foundation
import Testing

@testable import CeleryWire

@Suite("safe pickle")
struct SafePickleTests {
    static let samples: [JSONValue] = [
        nil, true, false, 0, 255, 256, 65535, 65536, -1, .int(Int64(Int32.max)), .int(Int64(Int32.min)),
        .int(Int64.max), .int(Int64.min),
        1.5, -0.25, "", "héllo ☃ 𝄞", [], [1, "a", nil], .object([:]),
        .object(["pid": 4242, "hostname": "celery@worker-1"]),
        .object([
            "exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins",
            "nested": [[1], .object(["a": []])],
        ]),
    ]

    @Test(arguments: samples)
    func roundTrip(_ v: JSONValue) throws {
        let b = SafePickle.dumps(v)
        #expect(b.prefix(2) == [0x80, 2])
        #expect(b.last == UInt8(ascii: "."))
        #expect(try SafePickle.loads(b) == v)
    }

    @Test func readsWhatPythonWrites() throws {
        // pickle.dumps({'pid': 1, 'hostname': 'h', 't': (1, 2), 'l': [True, None, 1.5]}, protocol=4)
        let p4: [UInt8] = [
            0x80, 0x04, 0x95, 0x3a, 0, 0, 0, 0, 0, 0, 0, 0x7d, 0x94, 0x28, 0x8c, 0x03, 0x70, 0x69,
            0x64, 0x94, 0x4b, 0x01, 0x8c, 0x08, 0x68, 0x6f, 0x73, 0x74, 0x6e, 0x61, 0x6d, 0x65, 0x94,
            0x8c, 0x01, 0x68, 0x94, 0x8c, 0x01, 0x74, 0x94, 0x4b, 0x01, 0x4b, 0x02, 0x86, 0x94, 0x8c,
            0x01, 0x6c, 0x94, 0x5d, 0x94, 0x28, 0x88, 0x4e, 0x47, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0, 0x65,
            0x75, 0x2e,
        ]
        #expect(try SafePickle.loads(p4) == .object(["pid": 1, "hostname": "h", "t": [1, 2], "l": [true, nil, 1.5]]))
        // pickle.dumps(None) with protocol 0: b'N.'
        #expect(try SafePickle.loads(Array("N.".utf8)) == .null)
        // protocol 0 ints and memo (PUT/GET): pickle.dumps([1, 1], 0) == b'(lp0\nI1\naI1\na.'
        #expect(try SafePickle.loads(Array("(lp0\nI1\naI1\na.".utf8)) == [1, 1])
        // LONG1 of 2**70 (beyond Int64) approximates.
        #expect(
            try SafePickle.loads([0x80, 2, 0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0x2e])
                == .double(1180591620717411303424.0))
    }

    @Test(
        arguments: [
            ("GLOBAL", Array("cos\nsystem\n(S'id'\ntR.".utf8)),
            ("STACK_GLOBAL", [0x80, 4, 0x8c, 2, 0x6f, 0x73, 0x8c, 6, 0x73, 0x79, 0x73, 0x74, 0x65, 0x6d, 0x93, 0x2e]),
            ("REDUCE", [0x80, 2, 0x4e, 0x29, 0x52, 0x2e]),
            ("BUILD", [0x80, 2, 0x7d, 0x7d, 0x62, 0x2e]),
            ("INST", Array("(ios\nsystem\n.".utf8)),
            ("OBJ", [0x80, 2, 0x28, 0x4e, 0x6f, 0x2e]),
            ("NEWOBJ", [0x80, 2, 0x4e, 0x29, 0x81, 0x2e]),
            ("NEWOBJ_EX", [0x80, 4, 0x4e, 0x29, 0x7d, 0x92, 0x2e]),
            ("EXT1", [0x80, 2, 0x82, 0x01, 0x2e]),
            ("PERSID", Array("P1\n.".utf8)),
        ] as [(String, [UInt8])])
    func refusesCodeExecution(_ name: String, _ bytes: [UInt8]) {
        #expect(code { _ = try SafePickle.loads(bytes) } == .badPickle, "\(name)")
    }

    @Test func refusesMalformed() {
        for b: [UInt8] in [
            [], [0x80, 2], [0x80, 2, 0x58, 9, 0, 0, 0], [0x80, 2, 0x4e, 0x4e, 0x2e], [0x80, 2, 0x61, 0x2e],
        ] {
            #expect(code { _ = try SafePickle.loads(b) } == .badPickle)
        }
    }

    static let venvPython = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent(".venv/celery56/bin/python").path

    @Test(
        "real Python unpickles SafePickle output",
        .enabled(if: FileManager.default.isExecutableFile(atPath: venvPython), "run scripts/pyenv celery56 first"))
    func pythonAgrees() throws {
        let values = Self.samples
        let hex = values.map { SafePickle.dumps($0).map { String(format: "%02x", $0) }.joined() }
        let script = """
            import json, pickle, sys
            for h in sys.stdin.read().split():
                print(json.dumps(pickle.loads(bytes.fromhex(h)), ensure_ascii=False))
            """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.venvPython)
        p.arguments = ["-c", script]
        let input = Pipe()
        let output = Pipe()
        p.standardInput = input
        p.standardOutput = output
        try p.run()
        input.fileHandleForWriting.write(hex.joined(separator: "\n").data(using: .utf8)!)
        try input.fileHandleForWriting.close()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n")
        #expect(lines.count == values.count)
        for (line, v) in zip(lines, values) {
            #expect(try JSONValue.parse(String(line)) == v)
        }
    }
}

@Suite("publisher")
struct PublisherTests {
    @Test func priorityLists() {
        #expect(CeleryPublisher.priorityList(queue: "default", priority: nil) == "default")
        let expected = [
            "default", "default", "default", "default\u{06}\u{16}3", "default\u{06}\u{16}3",
            "default\u{06}\u{16}3", "default\u{06}\u{16}6", "default\u{06}\u{16}6", "default\u{06}\u{16}6",
            "default\u{06}\u{16}9",
        ]
        for p in 0...9 { #expect(CeleryPublisher.priorityList(queue: "default", priority: p) == expected[p]) }
        #expect(CeleryPublisher.priorityList(queue: "q", priority: 42) == "q\u{06}\u{16}9")
        #expect(CeleryPublisher.priorityList(queue: "q", priority: -1) == "q")
        #expect(CeleryPublisher.lists(queue: "q") == ["q", "q\u{06}\u{16}3", "q\u{06}\u{16}6", "q\u{06}\u{16}9"])
        #expect(CeleryPublisher.bindingMember(queue: "default") == "default\u{06}\u{16}\u{06}\u{16}default")
    }

    /// Compares our element to a real capture: identical except the fields the publisher picks per call.
    func compare(_ name: String, _ ours: (list: String, element: String)) throws {
        let v = Vector.named(name)
        #expect(ours.list == v.doc["list"]!.string!)
        let real = try JSONValue.parse(v.raw).object!
        let mine = try JSONValue.parse(ours.element).object!
        #expect(mine.keys == real.keys)
        #expect(mine["body"] == real["body"], "body bytes must be identical")
        for k in ["content-encoding", "content-type"] { #expect(mine[k] == real[k]) }
        var rh = real["headers"]!.object!
        var mh = mine["headers"]!.object!
        #expect(mh.keys == rh.keys)
        rh["origin"] = nil
        mh["origin"] = nil
        if v.doc["source"]!.string!.contains("send_task") {
            // celery 5.6's send_task leaves ignore_result null; apply_async (which Airflow uses) writes false.
            #expect(rh["ignore_result"] == .null || rh["ignore_result"] == false)
            rh["ignore_result"] = mh["ignore_result"]
        }
        #expect(mh == rh)
        var rp = real["properties"]!.object!
        var mp = mine["properties"]!.object!
        #expect(mp.keys == rp.keys)
        for k in ["reply_to", "delivery_tag", "expiration"] {
            #expect((rp[k] == nil) == (mp[k] == nil))
            rp[k] = nil
            mp[k] = nil
        }
        #expect(mp == rp)
        // And it decodes to the same task.
        let a = try CeleryTask.decode(raw: Array(ours.element.utf8))
        let b = try CeleryTask.decode(raw: Array(v.raw.utf8))
        #expect(a.id == b.id && a.name == b.name && JSONValue.array(a.args) == JSONValue.array(b.args))
        #expect(a.eta == b.eta && a.expires == b.expires && a.priority == b.priority)
        #expect(a.hardTimeLimit == b.hardTimeLimit && a.softTimeLimit == b.softTimeLimit)
    }

    @Test func matchesCelery56Captures() throws {
        for v in ["celery563", "celery553", "celery570"] {
            try compare(
                "\(v)-p2-basic",
                CeleryPublisher.message(
                    taskName: "tandem.add", id: "00000000-0000-4000-8000-000000000001", args: [1, 2],
                    kwargs: ["z": "héllo ☃ 𝄞"]))
            try compare(
                "\(v)-p2-priority6",
                CeleryPublisher.message(
                    taskName: "tandem.add", id: "00000000-0000-4000-8000-000000000004", args: [1, 2], priority: 6))
            try compare(
                "\(v)-p2-timelimit",
                CeleryPublisher.message(
                    taskName: "tandem.add", id: "00000000-0000-4000-8000-000000000008", args: [1, 2],
                    timeLimit: (300, 240.5)))
            try compare(
                "\(v)-p2-execute-command",
                CeleryPublisher.message(
                    taskName: "execute_command", id: "00000000-0000-4000-8000-000000000014",
                    args: [
                        .array([
                            "airflow", "tasks", "run", "example_dag", "extract", "manual__2024-01-01T00:00:00+00:00",
                            "--local", "--subdir", "DAGS_FOLDER/example_dag.py",
                        ])
                    ]))
        }
    }

    @Test func etaAndExpiresUseIsoformat() throws {
        let eta = CeleryDate.parse("2030-01-02T03:04:05.678901+00:00")!
        let exp = CeleryDate.parse("2030-01-03T00:00:00+02:00")!
        let m = CeleryPublisher.message(taskName: "t", id: "i", args: [], eta: eta, expires: exp, deliveryTag: "dt")
        let t = try CeleryTask.decode(raw: Array(m.element.utf8))
        #expect(t.eta == eta && t.expires == exp && t.deliveryTag == "dt")
        let h = try KombuEnvelope.decode(Array(m.element.utf8)).headers
        #expect(h["eta"] == "2030-01-02T03:04:05.678901+00:00")
        #expect(h["expires"] == "2030-01-02T22:00:00+00:00")
        let props = try KombuEnvelope.decode(Array(m.element.utf8)).properties
        #expect(Int(props["expiration"]!.string!)! > 0)
    }

    @Test func pythonRepr() {
        #expect(
            CeleryPublisher.pythonRepr([1, "a", nil, true, 1.5, .object(["k": "it's"])])
                == #"[1, 'a', None, True, 1.5, {'k': "it's"}]"#)
    }

    @Test("decode speed (printed, not asserted)")
    func decodeSpeed() throws {
        let raw = Array(Vector.named("celery563-airflow-execute-workload").raw.utf8)
        let n = 2000
        let start = ContinuousClock.now
        for _ in 0..<n {
            let t = try CeleryTask.decode(raw: raw)
            _ = try AirflowPayload.classify(t)
        }
        let per = (ContinuousClock.now - start) / n
        print("CeleryWire: decode+classify of a \(raw.count)-byte execute_workload message: \(per) per message")
    }
}
