import ClientSupport
import Foundation
import Synchronization
import Testing
import TestSupport

@testable import Worker

/// The task process's end as the worker learns it: reaped as it happens (not when someone gets round to waiting),
/// told to whoever registered on the reaping thread, never signalled after it is gone.
@Suite("task processes")
struct ChildProcessTests {
    /// A zombie still has its /proc entry; a reaped process does not.
    static func exists(_ pid: Int32) -> Bool { FileManager.default.fileExists(atPath: "/proc/\(pid)") }

    @Test("a task process is reaped as it ends, before anyone waits; its end reaches onEnd and wait()")
    func reapedAtOnce() async throws {
        let p = try await ChildProcess.spawn(argv: ["/bin/sh", "-c", "exit 3"], environment: ["PATH": "/usr/bin:/bin"])
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(10)
        while Self.exists(p.pid) && clock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(!Self.exists(p.pid), "nobody waited yet, but the worker loop should have reaped pid \(p.pid)")
        let heard = Mutex<ChildProcess.Termination?>(nil)
        p.onEnd { t in heard.withLock { $0 = t } }  // registered after the end: runs at once
        #expect(heard.withLock { $0 } == .exited(3))
        #expect(await p.wait() == .exited(3))
        #expect(await p.wait() == .exited(3), "a second wait gets the same end")
    }

    @Test("a child its spawner reaps itself is left alone by the worker loop")
    func reapedBySpawner() async throws {
        let p = try await ChildProcess.spawn(
            argv: ["/bin/sh", "-c", "exit 4"], environment: ["PATH": "/usr/bin:/bin"], reapedBySpawner: true)
        try await Task.sleep(for: .milliseconds(200))
        var status: Int32 = 0
        #expect(waitpid(p.pid, &status, 0) == p.pid, "the worker loop must not have taken the spawner's child")
        #expect(ChildProcess.termination(status) == .exited(4))
    }

    @Test("a launcher's prepared environment reaches every task, with a key it left out set once per spawn")
    func preparedEnvironment() async throws {
        let dir = try TestEnvironment.freshDirectory("tandem-env")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // the worker's own environment carries a stale value for the key each spawn sets
        let env = SpawnEnvironment(
            ["PATH": "/usr/bin:/bin", "KEEP": "kept=with=equals", "external_executor_id": "stale"],
            leaving: ["external_executor_id"])
        for id in ["first", "second"] {
            let out = "\(dir)/\(id).env"
            let p = try await ChildProcess.spawn(argv: ["env"], environment: env, adding: ["external_executor_id": id], output: out)
            #expect(await p.wait() == .exited(0))
            let lines = try String(contentsOfFile: out, encoding: .utf8).split(separator: "\n").map(String.init)
            #expect(lines.filter { $0.hasPrefix("external_executor_id=") } == ["external_executor_id=\(id)"], "\(lines)")
            #expect(lines.contains("KEEP=kept=with=equals"))
            #expect(lines.contains("PATH=/usr/bin:/bin"))
            #expect(lines.count == 3, "exactly the environment given: \(lines)")
        }
    }

    @Test("an executable found on PATH is remembered; once it is gone the next spawn looks again")
    func executableLookupIsRemembered() async throws {
        let base = try TestEnvironment.freshDirectory("tandem-path")
        let (early, late) = ("\(base)/early", "\(base)/late")
        for d in [early, late] { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true) }
        defer { try? FileManager.default.removeItem(atPath: base) }
        func install(_ dir: String, exiting code: Int) throws {
            try "#!/bin/sh\nexit \(code)\n".write(toFile: "\(dir)/tool", atomically: true, encoding: .utf8)
            chmod("\(dir)/tool", 0o755)
        }
        let env = SpawnEnvironment(["PATH": "\(early):\(late):/usr/bin:/bin"])
        do {
            _ = try await ChildProcess.spawn(argv: ["tool"], environment: env)
            Issue.record("spawned a tool that is on no PATH directory")
        } catch {
            #expect("\(error)".contains("not found on PATH"), "\(error)")
        }
        try install(late, exiting: 7)
        #expect(try await ChildProcess.spawn(argv: ["tool"], environment: env).wait() == .exited(7))
        // an earlier directory gaining the tool changes nothing while the remembered one is still there
        try install(early, exiting: 8)
        #expect(try await ChildProcess.spawn(argv: ["tool"], environment: env).wait() == .exited(7))
        try FileManager.default.removeItem(atPath: "\(late)/tool")
        do {
            _ = try await ChildProcess.spawn(argv: ["tool"], environment: env)
            Issue.record("the remembered tool was removed, yet the spawn succeeded")
        } catch {
            #expect("\(error)".contains("\(late)/tool"), "the failure names the path it tried: \(error)")
        }
        #expect(try await ChildProcess.spawn(argv: ["tool"], environment: env).wait() == .exited(8), "looked up again")
    }

    @Test("a program the kernel cannot exec fails the spawn with the kernel's reason, not a task that exits 127")
    func execFailureIsReported() async throws {
        let dir = try TestEnvironment.freshDirectory("tandem-noexec")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "no shebang, not a binary\n".write(toFile: "\(dir)/junk", atomically: true, encoding: .utf8)
        chmod("\(dir)/junk", 0o755)
        for _ in 0..<2 {  // twice: the first failure must leave the spawner as it was
            // a process another test forks in the moment the file is written holds a copy of its write descriptor
            // until that process execs, and exec refuses a file open for writing (ETXTBSY): try again then
            for attempt in 1...50 {
                do {
                    let p = try await ChildProcess.spawn(argv: ["\(dir)/junk"], environment: ["PATH": "/usr/bin:/bin"])
                    Issue.record("spawned an unexecutable file; it ended \(await p.wait())")
                } catch {
                    if "\(error)".contains(String(cString: strerror(ETXTBSY))) && attempt < 50 {
                        try await Task.sleep(for: .milliseconds(20))
                        continue
                    }
                    #expect("\(error)".contains(String(cString: strerror(ENOEXEC))), "\(error)")
                }
                break
            }
        }
        #expect(try await ChildProcess.spawn(argv: ["/bin/sh", "-c", "exit 6"], environment: ["PATH": "/usr/bin:/bin"]).wait() == .exited(6))
    }

    @Test("a job's path preferring the worker loop forks, waits and resumes on the loop's thread; the end is heard there")
    func pathStaysOnTheLoop() async throws {
        try await withTaskExecutorPreference(WorkerLoop.shared) {
            #expect(WorkerLoop.isCurrent, "a task preferring the loop runs on its thread")
            let p = try await ChildProcess.spawn(argv: ["/bin/sh", "-c", "exit 5"], environment: ["PATH": "/usr/bin:/bin"])
            #expect(WorkerLoop.isCurrent, "the fork ran inline: the path resumed on the loop")
            let heardOnLoop = Mutex<Bool?>(nil)
            p.onEnd { _ in heardOnLoop.withLock { $0 = WorkerLoop.isCurrent } }
            #expect(await p.wait() == .exited(5))
            #expect(WorkerLoop.isCurrent, "the wait resumed on the loop")
            #expect(heardOnLoop.withLock { $0 } == true, "the end is delivered by the loop that reaped it")
        }
        #expect(await WorkerLoop.shared.run { WorkerLoop.isCurrent }, "run hands its body to the loop")
    }

    @Test("another event loop (the dispatcher's) is a thread of its own: each loop knows only its own thread")
    func loopsAreIndependent() async {
        let other = EventLoopThread(name: "test-other")
        #expect(!other.inLoop && !WorkerLoop.isCurrent)
        #expect(await other.run { other.inLoop && !WorkerLoop.isCurrent })
        #expect(await WorkerLoop.shared.run { WorkerLoop.isCurrent && !other.inLoop })
        await withTaskExecutorPreference(other) {
            #expect(other.inLoop, "a task preferring the other loop runs on its thread")
            _ = await WorkerLoop.shared.run { 0 }
            #expect(other.inLoop && !WorkerLoop.isCurrent, "and comes back to it after a call on the worker loop")
        }
    }

    @Test("work handed to the loop from many threads at once all runs (no lost wake-up), between reaping children")
    func noLostWakeUps() async throws {
        final class Count: Sendable { let value = Mutex(0) }
        let ran = Count()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for t in 0..<8 {
                group.addTask {
                    for i in 0..<500 {
                        _ = await WorkerLoop.shared.run { ran.value.withLock { $0 += 1 } }
                        if i % 100 == 0 {
                            // children end while work keeps arriving: both are served
                            let p = try await ChildProcess.spawn(
                                argv: ["/bin/sh", "-c", "exit \(t)"], environment: ["PATH": "/usr/bin:/bin"])
                            #expect(await p.wait() == .exited(Int32(t)))
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(ran.value.withLock { $0 } == 4000)
    }

    @Test("a held-up worker loop shows in `stalled` for as long as it is held, and goes back to zero once it runs")
    func stallWatch() async throws {
        let hold = try await LoopHold.start(WorkerLoop.shared)
        WorkerLoop.shared.probe()
        try await Task.sleep(for: .milliseconds(300))
        // the probe cannot have run: the loop is held
        #expect(WorkerLoop.shared.stalled >= .milliseconds(300))
        WorkerLoop.shared.probe()  // one probe at a time: this one does not restart the clock
        #expect(WorkerLoop.shared.stalled >= .milliseconds(300))
        await hold.release()
        var answered = false
        for _ in 0..<1000 where !answered {
            answered = WorkerLoop.shared.stalled == .zero
            if !answered { try await Task.sleep(for: .milliseconds(10)) }
        }
        #expect(answered, "the probe runs once the loop is free")
    }

    @Test("once a task has ended, nothing signals its pid (the kernel may have given it to another process)")
    func noSignalAfterEnd() {
        let end = ProcessEnd()
        var before = false
        end.ifRunning { before = true }
        #expect(before)
        end.deliver(.exited(0))
        end.deliver(.exited(9))  // the first delivery wins
        var after = false
        end.ifRunning { after = true }
        #expect(!after)
        #expect(end.ended == .exited(0))
    }

    @Test("a deferred write starts when due unless called off first; calling off a started one waits for it")
    func deferredWrites() async throws {
        let writes = DeferredWrites()
        let loop = Task { await writes.run() }
        defer { loop.cancel() }
        let done = Mutex<[String]>([])

        let clock = ContinuousClock()
        let scheduledAt = clock.now
        let due = writes.schedule(after: .milliseconds(50)) { done.withLock { $0.append("due") } }
        // due in 1 s, called off at once: a busy machine may pause this test for a while, not for a second
        let calledOff = writes.schedule(after: .seconds(1)) { done.withLock { $0.append("called off") } }
        #expect(await calledOff.cancelUnlessStarted(), "pending: the caller writes it instead")
        let deadline = clock.now + .seconds(10)
        while !done.withLock({ $0.contains("due") }) && clock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(await due.cancelUnlessStarted() == false, "already written: nothing left for the caller")
        try await Task.sleep(for: .milliseconds(150))
        #expect(done.withLock { $0 } == ["due"])

        // the schedule went empty; a new write must still wake the loop
        let later = writes.schedule(after: .milliseconds(10)) { done.withLock { $0.append("later") } }
        // a wait of its own: on a loaded machine the first one can use up most of its 10 s (a CI run saw 12 s in all)
        let laterDeadline = clock.now + .seconds(10)
        while !done.withLock({ $0.contains("later") }) && clock.now < laterDeadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(await later.cancelUnlessStarted() == false)
        // past the called-off write's time: it never ran
        try await Task.sleep(until: scheduledAt + .milliseconds(1300))
        #expect(done.withLock { $0 } == ["due", "later"])
    }
}
