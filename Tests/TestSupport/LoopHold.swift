import ClientSupport
import Foundation
import Synchronization

/// Holds an event loop the way a blocked log write would: a call on the loop that does not return until
/// `release()`. For tests of what a held-up loop does (stall watches, calls the loop answers).
public final class LoopHold: Sendable {
    private let holding = Mutex(false)
    private let released = Mutex(false)
    private let call = Mutex<Task<Void, Never>?>(nil)

    private init() {}

    /// Returns once the loop is held.
    public static func start(_ loop: EventLoopThread) async throws -> LoopHold {
        let hold = LoopHold()
        let task = Task.detached {
            await loop.run {
                hold.holding.withLock { $0 = true }
                while !hold.released.withLock({ $0 }) { usleep(1000) }
            }
        }
        hold.call.withLock { $0 = task }
        while !hold.holding.withLock({ $0 }) { try await Task.sleep(for: .milliseconds(5)) }
        return hold
    }

    /// Whether `release()` has let the loop go.
    public var isReleased: Bool { released.withLock { $0 } }

    /// Lets the loop go; returns once the holding call has returned.
    public func release() async {
        released.withLock { $0 = true }
        await call.withLock { $0 }?.value
    }
}
