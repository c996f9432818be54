#!/usr/bin/env python3
"""Tandem's throughput with its servers behind the userspace delay proxy (delayproxy.py) against loopback, in
alternation, without Celery: for A/B runs of one change's effect far from Redis and Postgres.

    .venv/celery56/bin/python Benchmarks/diag_distance.py --bin .build-static/release [--conc 16] [--tasks 3000]
        [--delay-ms 1.0] [--rounds 2] [--env-a "TANDEM_BROKER_ON_LOOP=1"] [--env-b "TANDEM_BROKER_ON_LOOP=0"]
        [--bin-b OTHER_BUILD]

With --env-a/--env-b (or --bin-b), each round runs the worker once with each set of variables (both through the proxy), so
two builds of behaviour can be compared on the same host minute. bench.py's `distance` is the comparison with
Celery.
"""
import os, sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

ap = bench.diag_parser(tasks=3000)
ap.add_argument("--delay-ms", type=float, default=1.0)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--env-a", default="")
ap.add_argument("--env-b", default="")
ap.add_argument("--bin-b", default="", help="variant B runs this build instead (e.g. an older commit's)")
a = ap.parse_args()
args = bench.diag_args(a, "diag-distance")

srv = bench.Servers(6493, 5493)
srv.start()
proxy = bench.start_delay_proxy(srv, a.delay_ms)
try:
    pub = bench.Publisher(srv)
    ab = a.env_b or a.bin_b
    variants = [("A", a.env_a, args.bin), ("B", a.env_b, os.path.abspath(a.bin_b or a.bin))] if ab else \
        [("loopback", "", args.bin), ("far", "", args.bin)]
    for r in range(a.rounds):
        for name, env, binary in variants:
            saved = dict(os.environ)
            os.environ.update(dict(kv.split("=", 1) for kv in env.split()))
            args.bin = binary
            t = bench.Tandem(srv, args, args.logdir)
            far = {} if name == "loopback" else {"port_offset": bench.PROXY_PORT_OFFSET}
            out = bench.throughput(srv, pub, t, a.conc, a.tasks, **far)
            os.environ.clear()
            os.environ.update(saved)
            print(f"round {r + 1} {name:8s} {binary} {env or '(defaults)'}: {out['rate']:.0f} tasks/s, "
                  f"commits {out['pg_commits_per_task']:.2f}/task, worker CPU {out['cpu_ms_per_task_worker0']:.3f} ms/task",
                  flush=True)
finally:
    proxy.terminate()
    srv.stop()
