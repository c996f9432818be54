#!/usr/bin/env python3
"""Where a Tandem worker's context switches go, per thread kind, over the middle 60% of a run of no-op tasks.

    .venv/celery56/bin/python Benchmarks/diag_switches.py --bin .build-static/release [--conc 2] [--tasks 5000]
        [--noop glibc|bare] [--dispatcher-flags "--prefetch-limit 16"] [--worker-flags "--max-finishing 2"] [--tls]

Starts its own Redis and Postgres (bench.py's Servers, ports 6491/5491), publishes with Celery, starts the
dispatcher and one worker, and prints tasks/s, context switches per task by thread name, the worker's and the
machine's CPU per task, and Redis commands per task. A diagnostic for one change at a time (bench.py is the
comparison with Celery); Benchmarks/run builds the no-ops it needs first.
"""
import collections, os, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

ap = bench.diag_parser(tasks=5000)
ap.add_argument("--dispatcher-flags", default="")
ap.add_argument("--worker-flags", default="")
ap.add_argument("--far-ms", type=float, default=0,
                help="put Redis and Postgres behind delayproxy.py, this many ms each way (RTT = 2x)")
ap.add_argument("--tls", action="store_true", help="Tandem's dispatcher and worker reach Redis over TLS (rediss://)")
ap.add_argument("--perf", default="", help="perf record the worker over the window into this file (perf report -i FILE)")
a = ap.parse_args()
args = bench.diag_args(a, "diag")
logdir = args.logdir


def tree_cpu(pid):
    return sum(bench.cpu_of(p) for p in bench.tree(pid)) if pid else 0.0


srv = bench.Servers(6491, 5491, tls=a.tls)
srv.start()
proxy = None
if a.far_ms:
    proxy = bench.start_delay_proxy(srv, a.far_ms)
try:
    pub = bench.Publisher(srv)
    t = bench.Tandem(srv, args, logdir)
    if a.dispatcher_flags or a.worker_flags:
        dflags, wflags, orig = a.dispatcher_flags.split(), a.worker_flags.split(), t.extra_flags
        t.extra_flags = lambda role, tag: orig(role, tag) + (dflags if role == "dispatcher" else wflags)
    srv.reset(t.db)
    pub.publish(a.tasks)
    c = srv.pg(t.db)
    roots = t.start(a.conc, port_offset=bench.PROXY_PORT_OFFSET if proxy else 0, tls=a.tls)
    wpid, dpid = roots["worker0"], roots["dispatcher"]

    def switches():
        """(thread name, tid) -> (context switches, CPU seconds) so far."""
        out = {}
        tick = os.sysconf("SC_CLK_TCK")
        for tid in os.listdir(f"/proc/{wpid}/task"):
            try:
                name = open(f"/proc/{wpid}/task/{tid}/comm").read().strip()
                status = open(f"/proc/{wpid}/task/{tid}/status").read().splitlines()
                stat = open(f"/proc/{wpid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                out[(name, tid)] = (sum(int(l.split()[1]) for l in status if "ctxt_switches" in l),
                                    (int(stat[11]) + int(stat[12])) / tick)
            except OSError:
                pass
        return out

    while t.success_count(c) < a.tasks * 0.2:
        time.sleep(0.01)
    r = srv.r()
    # which port each client came in on (CLIENT LIST laddr): with --tls, Tandem's must all be on the TLS port
    ports = srv.client_ports()
    connections = ", ".join(f"{n} on {'TLS ' if p == srv.tls_port else ''}port {p}" for p, n in sorted(ports.items()))
    stats0, cpu0, mach0, sw0 = r.info("commandstats"), bench.cpu_of(wpid), bench.machine_cpu(), switches()
    pg0, pgcpu0 = bench.pg_counters(c, t.db), tree_cpu(srv.pids().get("postgres"))
    other0 = (bench.cpu_of(dpid), bench.cpu_of(srv.pids().get("redis", 0)))
    n0, t0 = t.success_count(c), time.time()
    prof = None
    if a.perf:
        import subprocess
        prof = subprocess.Popen(["perf", "record", "-q", "-F", "4000", "-g", "-o", a.perf, "-p", str(wpid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while t.success_count(c) < a.tasks * 0.8:
        time.sleep(0.01)
    stats1, cpu1, mach1, sw1 = r.info("commandstats"), bench.cpu_of(wpid), bench.machine_cpu(), switches()
    pg1, pgcpu1 = bench.pg_counters(c, t.db), tree_cpu(srv.pids().get("postgres"))
    other1 = (bench.cpu_of(dpid), bench.cpu_of(srv.pids().get("redis", 0)))
    n = t.success_count(c) - n0
    el = time.time() - t0
    if prof:
        import signal
        prof.send_signal(signal.SIGINT)
        prof.wait()
    t.stop()
    print(f"c={a.conc} {a.noop} no-op{' over TLS' if a.tls else ''}: {n} tasks in {el:.2f}s = {n / el:.0f}/s")
    print(f"  Redis connections: {connections}")
    by, busy = collections.Counter(), collections.Counter()
    for key, (v, cpu) in sw1.items():
        v0, c0 = sw0.get(key, (0, 0.0))
        by[key[0]] += v - v0
        busy[key[0]] += cpu - c0
    for name, v in by.most_common():
        # busy: the share of the window those threads were on a CPU (a single thread near 100% is a bottleneck)
        print(f"  {name:20s} {v / n:6.2f} context switches/task, busy {100 * busy[name] / el:5.1f}%")
    print(f"  total {sum(by.values()) / n:.2f}; worker CPU {(cpu1 - cpu0) * 1000 / n:.3f} ms/task; "
          f"machine {(mach1 - mach0) * 1000 / n:.3f} ms/task")
    print(f"  dispatcher CPU {(other1[0] - other0[0]) * 1000 / n:.3f} ms/task; redis-server CPU "
          f"{(other1[1] - other0[1]) * 1000 / n:.3f} ms/task")
    print(f"  postgres: CPU {(pgcpu1 - pgcpu0) * 1000 / n:.3f} ms/task, "
          + ", ".join(f"{k} {(pg1[k] - pg0[k]) / n:.2f}/task" for k in ("commits", "wal_sync", "wal_records")))
    for name in sorted(stats1):
        calls = stats1[name]["calls"] - stats0.get(name, {}).get("calls", 0)
        us = stats1[name]["usec"] - stats0.get(name, {}).get("usec", 0)
        if calls:
            print(f"  redis {name[8:]:18s} {calls / n:6.2f}/task {us / n:7.1f} µs/task")
finally:
    if proxy:
        proxy.terminate()
    srv.stop()
