import Foundation

/// One kombu message as the Redis transport stores it: the JSON object LPUSHed on the queue's list.
///
/// `{"body": <base64>, "content-encoding": "utf-8", "content-type": "application/json",
///   "headers": {...}, "properties": {"body_encoding": "base64", "delivery_tag": <uuid>,
///   "delivery_info": {"exchange", "routing_key"}, "priority": n, ...}}`
public struct KombuEnvelope: Sendable {
    /// The body after base64 decoding and decompression (`headers.compression`).
    public var body: [UInt8]
    /// `content-type`, e.g. `application/json`.
    public var contentType: String
    /// `content-encoding`, e.g. `utf-8`.
    public var contentEncoding: String
    /// `headers` (`{}` for task protocol 1).
    public var headers: JSONObject
    /// `properties`.
    public var properties: JSONObject
    /// `properties.delivery_tag`: the uuid the publisher chose; the ack key.
    public var deliveryTag: String?
    /// `properties.priority` (0–9; on Redis, 0 is consumed first).
    public var priority: Int?
    /// True when kombu restored the message after an unacked delivery (`headers.redelivered` or
    /// `properties.delivery_info.redelivered`).
    public var redelivered: Bool
    /// `headers.compression` as published (`application/x-gzip` for kombu's gzip and zlib), if any.
    public var compression: String?

    /// `properties.delivery_info` (`exchange`, `routing_key`), empty if absent.
    public var deliveryInfo: JSONObject { properties["delivery_info"]?.object ?? JSONObject() }

    /// Decodes one list element.
    public static func decode(_ raw: [UInt8]) throws(WireError) -> KombuEnvelope {
        let v: JSONValue
        do {
            v = try JSONValue.parse(raw)
        } catch {
            throw WireError(.notJSON, "message is not JSON (\(error.message)); was it published by a kombu client?")
        }
        guard case .object(let env) = v else {
            throw WireError(.notAnEnvelope, "message is JSON but not an object; kombu messages are JSON objects")
        }
        return try decode(envelope: env)
    }

    /// Decodes an already-parsed envelope object.
    public static func decode(envelope env: JSONObject) throws(WireError) -> KombuEnvelope {
        guard let bodyValue = env["body"] else {
            throw WireError(.notAnEnvelope, "message has no 'body': not a kombu envelope (keys: \(env.keys))")
        }
        guard case .object(let properties) = env["properties"] ?? .null else {
            throw WireError(.notAnEnvelope, "message has no 'properties' object: not a kombu envelope")
        }
        let headers = env["headers"]?.object ?? JSONObject()
        let bodyEncoding = properties["body_encoding"]?.string
        var body: [UInt8]
        switch bodyValue {
        case .string(let s):
            switch bodyEncoding {
            case "base64":
                guard let d = Base64.decode(s.utf8) else {
                    throw WireError(
                        .badBase64,
                        "message body is not valid base64 (properties.body_encoding=base64): "
                            + "was it published by a non-kombu client?")
                }
                body = d
            case nil, "utf-8", "utf8":
                body = Array(s.utf8)
            case .some(let other):
                throw WireError(
                    .unsupportedEncoding,
                    "properties.body_encoding '\(other)' is not supported (kombu's Redis transport uses base64)")
            }
        default:
            throw WireError(.notAnEnvelope, "message 'body' is not a string; kombu stores it as a base64 string")
        }
        let compression = headers["compression"]?.string
        if let compression {
            switch compression {
            case "application/x-gzip", "application/x-zlib", "gzip", "zlib":
                body = try Inflate.decompress(body)
            default:
                throw WireError(
                    .unsupportedCompression,
                    "body compressed with '\(compression)', which Tandem does not decode; publish with "
                        + "compression='gzip' or none")
            }
        }
        let info = properties["delivery_info"]?.object
        let redelivered = headers["redelivered"]?.bool == true || info?["redelivered"]?.bool == true
        return KombuEnvelope(
            body: body,
            contentType: env["content-type"]?.string ?? "application/json",
            contentEncoding: env["content-encoding"]?.string ?? "utf-8",
            headers: headers,
            properties: properties,
            deliveryTag: properties["delivery_tag"]?.string,
            priority: properties["priority"]?.int.map { Int($0) },
            redelivered: redelivered,
            compression: compression)
    }

    /// The body parsed as JSON; refuses pickle/msgpack/yaml with a message saying what to change.
    public func bodyJSON() throws(WireError) -> JSONValue {
        guard contentType == "application/json" || contentType.hasSuffix("+json") else {
            let hint = contentType == "application/x-python-serialize" ? " (pickle)" : ""
            throw WireError(
                .unsupportedEncoding,
                "message content-type is '\(contentType)'\(hint); Tandem reads JSON only: set Celery's "
                    + "task_serializer='json' (Airflow's default)")
        }
        do {
            return try JSONValue.parse(body)
        } catch {
            throw WireError(.badBody, "message body is not JSON although content-type says so: \(error.message)")
        }
    }
}

/// A value kombu's JSON encoder wrapped as `{"__type__": T, "__value__": V}`.
public enum KombuTag: Sendable, Hashable {
    /// `datetime` (naive values are taken as UTC).
    case datetime(Date)
    /// `date`, as written (`YYYY-MM-DD`).
    case date(String)
    /// `time`, as written (`HH:MM:SS[.ffffff]`).
    case time(String)
    /// `Decimal`, as its exact decimal string.
    case decimal(String)
    /// `UUID`, canonical lowercase 8-4-4-4-12 (kombu ≥ 5.3 writes `{"hex": …}`; older writes the string).
    case uuid(String)
    /// `bytes`: `"bytes"` tags carry UTF-8 text, `"base64"` tags binary data.
    case bytes([UInt8])
    /// A tag this library does not know (custom `register_type`); kept as is.
    case other(type: String, value: JSONValue)
}

extension JSONValue {
    /// The kombu type tag this value is, if it is exactly `{"__type__": …, "__value__": …}`.
    public var kombuTag: KombuTag? {
        guard case .object(let o) = self, o.count == 2, case .string(let type)? = o["__type__"],
            let value = o["__value__"]
        else { return nil }
        switch (type, value) {
        case ("datetime", .string(let s)):
            if let d = CeleryDate.parse(s) { return .datetime(d) }
        case ("date", .string(let s)): return .date(s)
        case ("time", .string(let s)): return .time(s)
        case ("decimal", .string(let s)): return .decimal(s)
        case ("uuid", .string(let s)): return .uuid(s.lowercased())
        case ("uuid", .object(let o)):
            if let hex = o["hex"]?.string, hex.utf8.count == 32 {
                let h = Array(hex.lowercased())
                return .uuid(
                    String(h[0..<8]) + "-" + String(h[8..<12]) + "-" + String(h[12..<16]) + "-"
                        + String(h[16..<20]) + "-" + String(h[20..<32]))
            }
        case ("bytes", .string(let s)): return .bytes(Array(s.utf8))
        case ("base64", .string(let s)):
            if let b = Base64.decode(s.utf8) { return .bytes(b) }
        default: break
        }
        return .other(type: type, value: value)
    }
}
