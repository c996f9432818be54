import Foundation
import Testing

@testable import CeleryWire

/// One captured vector (see scripts/capture-vectors.py for the format).
struct Vector: CustomTestStringConvertible, Sendable {
    let name: String
    let doc: JSONValue

    var kind: String { doc["kind"]?.string ?? "" }
    var raw: String { doc["raw"]?.string ?? "" }
    var expect: JSONValue { doc["expect"] ?? .null }
    var testDescription: String { name }

    static let directory: URL = {
        if let url = Bundle.module.url(forResource: "vectors", withExtension: nil) { return url }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("vectors")
    }()

    static let all: [Vector] = {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        return files.filter { $0.hasSuffix(".json") }.sorted().map { f in
            let data = FileManager.default.contents(atPath: directory.appendingPathComponent(f).path) ?? Data()
            let doc = (try? JSONValue.parse([UInt8](data))) ?? .null
            return Vector(name: String(f.dropLast(5)), doc: doc)
        }
    }()

    static func named(_ name: String) -> Vector {
        guard let v = all.first(where: { $0.name == name }) else { fatalError("no vector \(name)") }
        return v
    }

    static var tasks: [Vector] { all.filter { $0.kind == "task" } }
    static var pidbox: [Vector] { all.filter { $0.kind == "pidbox" } }
    static var results: [Vector] { all.filter { $0.kind == "result" } }
}

extension JSONValue {
    /// nil for JSON null, else the string (for comparing optional fields against `expect`).
    var optString: String? { if case .null = self { return nil } else { return string } }
}
