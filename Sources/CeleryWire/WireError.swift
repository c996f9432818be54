/// The one error type of CeleryWire: a code to branch on and a message a person can act on.
public struct WireError: Error, Sendable, CustomStringConvertible, Equatable {
    /// What went wrong, coarsely.
    public enum Code: String, Sendable {
        /// The bytes are not JSON at all.
        case notJSON
        /// JSON, but not a kombu message envelope (object with body/headers/properties).
        case notAnEnvelope
        /// A field the format requires is missing or has the wrong type.
        case missingField
        /// `properties.body_encoding` is base64 but the body is not.
        case badBase64
        /// A `body_encoding` or content type we do not decode (e.g. pickle, msgpack).
        case unsupportedEncoding
        /// `headers.compression` names a codec we do not have (bz2, lzma, brotli, zstd), or it is corrupt.
        case unsupportedCompression
        /// The decoded body is not what the protocol says it should be.
        case badBody
        /// A task name Tandem does not run.
        case unknownTask
        /// Task args/kwargs have the wrong shape.
        case badArgs
        /// An Airflow 2 command argv that is not a plain `airflow tasks run …` list of strings.
        case badArgv
        /// An Airflow 3 workload that is not valid JSON or lacks what we need.
        case badWorkload
        /// A pidbox (remote control) message we cannot read.
        case badControl
        /// A pickle that is malformed or uses opcodes we refuse (anything that imports or calls).
        case badPickle
    }

    /// What went wrong, coarsely.
    public var code: Code
    /// One line a person can act on.
    public var message: String

    /// An error with a code and an actionable one-line message.
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }
}
