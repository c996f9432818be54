/// A thread that waits on sockets (epoll) and runs work queued on it. A client whose socket it drives writes its
/// requests and reads its replies on that thread, and resumes its callers there: no thread of the client's own
/// wakes for each call (a blocking client costs two thread switches per call, a third of a worker's switches).
/// `EventLoopThread` is the one (the worker's and the dispatcher's); clients given none keep a thread of their own.
public protocol IOLoop: AnyObject, Sendable {
    /// True on the loop's thread.
    var inLoop: Bool { get }
    /// Queues `body` to run on the loop's thread.
    func execute(_ body: @escaping @Sendable () -> Void)
    /// On the loop only. Calls `source.ready()` on the loop whenever `fd` is readable (or writable, while
    /// `wantsWrite` is set for it) and `source.expire(now:)` once `source.deadline` has passed.
    func register(_ fd: Int32, _ source: any IOSource)
    /// On the loop only; before the fd is closed.
    func unregister(_ fd: Int32)
    /// On the loop only: also wake for writability (a write that did not fit in the socket's buffer).
    func setWantsWrite(_ fd: Int32, _ on: Bool)
}

/// What an `IOLoop` calls for a registered fd; only ever on the loop's thread.
public protocol IOSource: AnyObject {
    func ready()
    /// The earliest moment something waiting on this source gives up (a command timeout); nil: nothing waits.
    var deadline: ContinuousClock.Instant? { get }
    func expire(now: ContinuousClock.Instant)
}
