/// Every failure of the Redis module: a code to branch on, a one-line message a person can act on, and the cause.
public struct RedisError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is.
    public enum Code: String, Sendable {
        /// The broker URL could not be understood.
        case invalidURL
        /// No connection could be made (refused, unreachable, DNS, connect timeout).
        case connectionFailed
        /// The server refused AUTH.
        case authFailed
        /// The connection broke while a command was in flight; the next call reconnects.
        case io
        /// The server did not answer within the command timeout; the connection was reset.
        case timeout
        /// The server sent something hiredis could not parse.
        case protocolError
        /// The server answered a command with an error reply.
        case server
        /// EVALSHA named a script the server does not have.
        case noScript
        /// The client was closed.
        case closed
        /// Sentinel could not name a usable master.
        case sentinel
    }

    /// What kind of failure this is.
    public var code: Code
    /// One line saying what failed, where (URL without password) and what to do.
    public var message: String
    /// The underlying cause (hiredis error string, server error reply), if any.
    public var underlying: String?

    /// Makes an error.
    public init(code: Code, message: String, underlying: String? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    /// The message; the cause is already part of it when it helps a reader.
    public var description: String { message }
}
