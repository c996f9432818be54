#!/usr/bin/env python3
"""Where one paced task's publish-to-result time goes in Tandem, step by step, from Redis MONITOR timestamps.

    .venv/celery56/bin/python Benchmarks/diag_latency.py --bin .build-static/release [--conc 2] [--tasks 200]
        [--rate 50] [--noop glibc|bare]

Starts its own Redis and Postgres (bench.py's Servers, ports 6492/5492), the dispatcher and one worker, sends
tasks one at a time with Celery's send_task at a paced rate (as bench.py's latency run), and records Redis
MONITOR. Every command carries the server's microsecond clock (the same machine clock the publisher and the
worker's date_done use), so each task's path splits into: send_task until its LPUSH reaches Redis; LPUSH until
the dispatcher's move; move until the worker's claim that returned the job; claim until date_done (the process
ran); date_done until the ack. Prints the median and p90 of each step. A diagnostic, not the comparison with
Celery (that is bench.py).

DIAG_DUMP=1 also prints every command of the sixth task's window; DIAG_PERF_TRACE=FILE records the worker's
system calls with `perf trace` meanwhile (perf slows the worker: read orders, not durations).
"""
import datetime as dt, hashlib, os, shlex, subprocess, sys, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

ap = bench.diag_parser(tasks=200)
ap.add_argument("--rate", type=float, default=50)
a = ap.parse_args()
args = bench.diag_args(a, "diaglat")
logdir = args.logdir
EPOCH = dt.datetime(1970, 1, 1)


def epoch(d):
    return (d - EPOCH).total_seconds()


srv = bench.Servers(6492, 5492)
srv.start()
try:
    pub = bench.Publisher(srv)
    t = bench.Tandem(srv, args, logdir)
    srv.reset(t.db)
    c = srv.pg(t.db)
    roots = t.start(a.conc)
    pub.send(-1)
    if bench.wait_success(t, c, 1, timeout=60) is None:
        sys.exit("the worker did not run the warm-up task; see " + logdir)
    time.sleep(0.5)

    # MONITOR on its own connection, read by a thread: (server time, command words)
    lines, stop = [], threading.Event()
    mon = srv.r().connection_pool.get_connection("MONITOR")
    mon.send_command("MONITOR")
    mon.read_response()

    def reader():
        while not stop.is_set():
            try:
                raw = mon.read_response()
            except Exception:
                return
            if isinstance(raw, bytes):
                raw = raw.decode(errors="replace")
            ts, _, rest = raw.partition(" ")
            try:
                lines.append((float(ts), shlex.split(rest.partition("] ")[2])))
            except ValueError:
                pass

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    tracer = None
    if os.environ.get("DIAG_PERF_TRACE"):  # syscalls of the worker's threads, to a file
        tracer = subprocess.Popen(["perf", "trace", "-T", "-p", str(roots["worker0"]), "-o",
                                   os.environ["DIAG_PERF_TRACE"]], stderr=subprocess.DEVNULL)
        time.sleep(1)
    sent = []
    t0 = time.time()
    for i in range(a.tasks):
        d = t0 + i / a.rate - time.time()
        if d > 0:
            time.sleep(d)
        ts = time.time()
        sent.append((pub.send(i), ts))
    bench.wait_success(t, c, a.tasks + 1, timeout=120)
    time.sleep(0.3)
    if tracer:
        tracer.send_signal(2)
        tracer.wait()
        print("sent at (epoch):", " ".join(f"{ts:.6f}" for _, ts in sent[:8]))
    stop.set()
    cur = c.cursor()
    cur.execute("SELECT task_id, date_done FROM celery_taskmeta WHERE status = 'SUCCESS'")
    done = {tid: epoch(d) for tid, d in cur.fetchall()}
    t.stop()

    # At a paced rate a task's commands all fall between its own LPUSH and the next task's send: take each step
    # as the first matching command in that window.
    def first(after, before, pred):
        for ts, words in lines:
            if after <= ts < before and pred(words):
                return ts
        return None

    shas = {}
    for name in ("dispatch", "claim", "ack"):
        p = os.path.join(bench.SCRIPTS, name + ".lua")
        if os.path.exists(p):
            shas[hashlib.sha1(open(p, "rb").read()).hexdigest()] = name
    def script(words):
        if not words:
            return None
        w = words[0].upper()
        if w == "EVALSHA" and len(words) > 1:
            return shas.get(words[1], words[1][:8])
        return w

    steps = {k: [] for k in ("send→LPUSH", "LPUSH→dispatch", "dispatch→claim", "claim→date_done", "date_done→ack",
                             "send→date_done")}
    for i, (tid, ts) in enumerate(sent):
        nxt = sent[i + 1][1] if i + 1 < len(sent) else ts + 1
        push = first(ts, nxt, lambda w: w and w[0].upper() == "LPUSH" and w[1] == "default")
        if push is None or tid not in done:
            continue
        disp = first(push, nxt, lambda w: script(w) == "dispatch")
        claim = first(disp or push, nxt, lambda w: script(w) == "claim")
        ack = first(done[tid], nxt + 1, lambda w: script(w) == "ack")
        steps["send→LPUSH"].append(push - ts)
        steps["send→date_done"].append(done[tid] - ts)
        if disp:
            steps["LPUSH→dispatch"].append(disp - push)
        if disp and claim:
            steps["dispatch→claim"].append(claim - disp)
        if claim:
            steps["claim→date_done"].append(done[tid] - claim)
        if ack:
            steps["date_done→ack"].append(ack - done[tid])

    def q(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000 if xs else float("nan")

    print(f"c={a.conc} {a.noop} no-op, {a.tasks} tasks at {a.rate}/s; MONITOR saw {len(lines)} commands")
    for k, xs in steps.items():
        print(f"  {k:18s} n={len(xs):4d}  p50 {q(xs, 50):6.2f} ms  p90 {q(xs, 90):6.2f} ms")
    if os.environ.get("DIAG_DUMP"):
        push = first(sent[5][1], sent[6][1], lambda w: w and w[0].upper() == "LPUSH")
        for ts, words in lines:
            if sent[5][1] <= ts < sent[6][1]:
                print(f"    {(ts - sent[5][1]) * 1000:7.3f} {script(words)} {' '.join(words[2:12])[:150]}")
    per = {}
    for ts, words in lines:
        per[script(words)] = per.get(script(words), 0) + 1
    print("  commands per task: " + ", ".join(f"{k} {v / a.tasks:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])))
finally:
    srv.stop()
