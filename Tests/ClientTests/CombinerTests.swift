import ClientSupport
import Foundation
import Synchronization
import Testing

/// The batching behind group commit and acks: every request gets its own answer, batches form under load, no
/// more batches are in flight than lanes, and one bad item does not fail its neighbours.
@Suite("Combiner")
struct CombinerTests {
    struct Refused: Error { var item: Int }

    final class Probe: Sendable {
        let state = Mutex<(inFlight: Int, maxInFlight: Int, batches: [[Int]], lanesInUse: Set<Int>, laneReuse: Bool)>(
            (0, 0, [], [], false))

        func send(lane: Int, items: [Int]) async -> [Result<Int, any Error>] {
            state.withLock { s in
                s.inFlight += 1
                s.maxInFlight = max(s.maxInFlight, s.inFlight)
                if s.lanesInUse.contains(lane) { s.laneReuse = true }  // a lane must carry one batch at a time
                s.lanesInUse.insert(lane)
                s.batches.append(items)
            }
            try? await Task.sleep(for: .milliseconds(5))
            state.withLock { s in
                s.inFlight -= 1
                s.lanesInUse.remove(lane)
            }
            return items.map { $0 % 7 == 3 ? .failure(Refused(item: $0)) : .success($0 * 2) }
        }
    }

    @Test("200 concurrent requests on 2 lanes: each gets its own answer, batches form, at most 2 in flight")
    func batchesUnderLoad() async throws {
        let combiner = Combiner<Int, Int>(lanes: 2, maxBatch: 16)
        let probe = Probe()
        let answers = await withTaskGroup(of: (Int, Result<Int, any Error>).self) { group in
            for i in 0..<200 {
                group.addTask {
                    do {
                        return (i, .success(try await combiner.submit(i) { lane, items in await probe.send(lane: lane, items: items) }))
                    } catch {
                        return (i, .failure(error))
                    }
                }
            }
            var out: [Int: Result<Int, any Error>] = [:]
            for await (i, r) in group { out[i] = r }
            return out
        }
        #expect(answers.count == 200)
        for i in 0..<200 {
            switch answers[i]! {
            case .success(let v): #expect(i % 7 != 3 && v == i * 2, "item \(i) got \(v)")
            case .failure(let e): #expect(i % 7 == 3, "item \(i) failed: \(e)")
            }
        }
        let s = probe.state.withLock { $0 }
        #expect(s.maxInFlight <= 2 && !s.laneReuse, "lanes bound the batches in flight")
        #expect(s.batches.flatMap { $0 }.sorted() == Array(0..<200), "every item sent exactly once")
        #expect(s.batches.count < 200, "requests that waited rode together (\(s.batches.count) batches)")
        #expect(s.batches.allSatisfy { $0.count <= 16 }, "no batch above maxBatch")
    }

    @Test("spillAfter: requests ride the next batch of a lane whose batch is young; a batch held past it lets them open another lane")
    func spillOnlyPastSlowBatches() async throws {
        // a sender whose first batch is held until released (a slow commit)
        final class Held: Sendable {
            let released = Mutex(false)
            let batches = Mutex<[(lane: Int, items: [Int])]>([])
            func send(lane: Int, items: [Int]) async -> [Result<Int, any Error>] {
                let first = batches.withLock { b in b.append((lane, items)); return b.count == 1 }
                while first, !released.withLock({ $0 }) { try? await Task.sleep(for: .milliseconds(5)) }
                return items.map { .success($0) }
            }
        }
        func run(spillAfter: Duration) async throws -> (secondWhileFirstHeld: Bool, batches: [(lane: Int, items: [Int])]) {
            let combiner = Combiner<Int, Int>(lanes: 2, maxBatch: 16, spillAfter: spillAfter)
            let held = Held()
            let first = Task { try await combiner.submit(1) { await held.send(lane: $0, items: $1) } }
            while held.batches.withLock({ $0.isEmpty }) { try await Task.sleep(for: .milliseconds(5)) }
            try await Task.sleep(for: .milliseconds(100))  // the first batch is now 100 ms old
            let second = Task { try await combiner.submit(2) { await held.send(lane: $0, items: $1) } }
            // the second is answered on its own lane, or it waits for the first's lane: give it time to show which
            var answered = false
            for _ in 0..<40 where !answered {
                try await Task.sleep(for: .milliseconds(10))
                answered = held.batches.withLock { $0.count } >= 2
            }
            held.released.withLock { $0 = true }
            _ = try await (first.value, second.value)
            return (answered, held.batches.withLock { $0 })
        }
        let young = try await run(spillAfter: .seconds(60))
        #expect(!young.secondWhileFirstHeld, "the first batch was young: the second waits for its lane")
        #expect(young.batches.map(\.lane) == [young.batches[0].lane, young.batches[0].lane], "one lane carried both")
        let slow = try await run(spillAfter: .milliseconds(20))
        #expect(slow.secondWhileFirstHeld, "the first batch was past spillAfter: the second went on another lane")
        #expect(Set(slow.batches.map(\.lane)).count == 2)
    }

    @Test("a lone request goes at once, alone; a batch that answers short fails the unanswered with a reason")
    func loneAndShort() async throws {
        let combiner = Combiner<Int, Int>(lanes: 1, maxBatch: 8)
        let sent = Mutex<[[Int]]>([])
        let v = try await combiner.submit(5) { _, items in
            sent.withLock { $0.append(items) }
            return items.map { .success($0 + 1) }
        }
        #expect(v == 6 && sent.withLock { $0 } == [[5]])

        // a sender that answers only the first item of its batch
        final class Gate: Sendable { let held = Mutex(false) }
        let gate = Gate()
        let results = await withTaskGroup(of: Result<Int, any Error>.self) { group in
            for i in 0..<4 {
                group.addTask {
                    do {
                        return .success(try await combiner.submit(i) { _, items in
                            // hold the first batch briefly so the others queue up behind it
                            if !gate.held.withLock({ $0 }) {
                                gate.held.withLock { $0 = true }
                                try? await Task.sleep(for: .milliseconds(20))
                            }
                            return [.success(items[0])]
                        })
                    } catch {
                        return .failure(error)
                    }
                }
            }
            var out: [Result<Int, any Error>] = []
            for await r in group { out.append(r) }
            return out
        }
        let failures = results.compactMap { r -> String? in
            if case .failure(let e) = r { return "\(e)" }
            return nil
        }
        #expect(results.count == 4)
        #expect(!failures.isEmpty, "the unanswered requests must fail, not hang or get another's answer")
        #expect(failures.allSatisfy { $0.contains("fewer results") })
    }
}
