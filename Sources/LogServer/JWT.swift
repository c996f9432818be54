import Foundation

/// Verifies the HS512 tokens Airflow's API server sends to a worker's log server
/// (`airflow.api_fastapi.auth.tokens.JWTGenerator` with `[api] secret_key`, audience `task-instance-logs`).
/// Checks what Airflow's own log server (`JWTValidator`) checks: the signature, `alg` = HS512, the required
/// `exp`, `iat` and `nbf` claims with a clock grace, and the audience.
public struct JWTVerifier: Sendable {
    public enum Failure: Error, Equatable, CustomStringConvertible {
        case malformed(String)
        case algorithm(String)
        case signature
        case missingClaim(String)
        case expired
        case notYetValid
        case issuedInFuture
        case audience
        public var description: String {
            switch self {
            case .malformed(let s): return "malformed token: \(s)"
            case .algorithm(let a): return "algorithm \(a) is not HS512"
            case .signature: return "bad signature"
            case .missingClaim(let c): return "token lacks the '\(c)' claim"
            case .expired: return "token expired"
            case .notYetValid: return "token not valid yet (nbf)"
            case .issuedInFuture: return "token issued in the future (iat)"
            case .audience: return "wrong audience"
            }
        }
    }

    public var key: [UInt8]
    public var audience: String
    /// Clock grace in seconds (Airflow: `[webserver] log_request_clock_grace`, 30).
    public var leeway: Double

    public init(secretKey: String, audience: String = "task-instance-logs", leeway: Double = 30) {
        self.key = Array(secretKey.utf8)
        self.audience = audience
        self.leeway = leeway
    }

    /// The verified claims, or why the token is refused.
    public func verify(_ token: String, now: Date = Date()) -> Result<[String: Any], Failure> {
        var t = token.trimmingCharacters(in: .whitespaces)
        if t.lowercased().hasPrefix("bearer ") { t = String(t.dropFirst(7)).trimmingCharacters(in: .whitespaces) }
        let parts = t.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3 else { return .failure(.malformed("expected three dot-separated parts")) }
        guard let headerBytes = Self.base64URL(parts[0]),
            let header = (try? JSONSerialization.jsonObject(with: Data(headerBytes))) as? [String: Any]
        else { return .failure(.malformed("header is not base64url JSON")) }
        let alg = header["alg"] as? String ?? "none"
        guard alg == "HS512" else { return .failure(.algorithm(alg)) }
        guard let sig = Self.base64URL(parts[2]) else { return .failure(.malformed("signature is not base64url")) }
        let signed = Array(parts[0].utf8) + [0x2E] + Array(parts[1].utf8)
        guard SHA512.constantTimeEqual(SHA512.hmac(key: key, message: signed), sig) else { return .failure(.signature) }
        guard let payloadBytes = Self.base64URL(parts[1]),
            let claims = (try? JSONSerialization.jsonObject(with: Data(payloadBytes))) as? [String: Any]
        else { return .failure(.malformed("payload is not base64url JSON")) }
        let clock = now.timeIntervalSince1970
        for name in ["exp", "iat", "nbf"] where !(claims[name] is NSNumber) {
            return .failure(.missingClaim(name))
        }
        let exp = (claims["exp"] as! NSNumber).doubleValue
        let iat = (claims["iat"] as! NSNumber).doubleValue
        let nbf = (claims["nbf"] as! NSNumber).doubleValue
        if exp <= clock - leeway { return .failure(.expired) }
        if nbf > clock + leeway { return .failure(.notYetValid) }
        if iat > clock + leeway { return .failure(.issuedInFuture) }
        switch claims["aud"] {
        case let s as String where s == audience: break
        case let a as [Any] where a.contains(where: { ($0 as? String) == audience }): break
        default: return .failure(.audience)
        }
        return .success(claims)
    }

    static func base64URL(_ s: Substring) -> [UInt8]? {
        var t = s.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while t.utf8.count % 4 != 0 { t += "=" }
        guard let d = Data(base64Encoded: t) else { return nil }
        return Array(d)
    }

    /// Signs claims as Airflow's JWTGenerator does (tests, and tools that fetch logs).
    public func sign(_ claims: [String: Any]) -> String {
        func enc(_ b: [UInt8]) -> String {
            Data(b).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
                .replacingOccurrences(of: "=", with: "")
        }
        let header = enc(Array(#"{"alg":"HS512","typ":"JWT"}"#.utf8))
        let payload = enc(Array((try? JSONSerialization.data(withJSONObject: claims, options: [.sortedKeys])) ?? Data()))
        let sig = SHA512.hmac(key: key, message: Array("\(header).\(payload)".utf8))
        return "\(header).\(payload).\(enc(sig))"
    }
}
