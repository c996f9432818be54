#!/usr/bin/env python3
"""PNG plots from results/latest.json (run with Benchmarks/.venv/bin/python after `pip install matplotlib`)."""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
res = json.load(open(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "latest.json")))
out = os.path.join(HERE, "results")


def runs(key, field):
    return [r[field] for r in res.get(key, {}).get("runs", []) if isinstance(r, dict)]


# 1. throughput and CPU per task, every repetition shown (the machine was shared; the spread is the noise)
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, field, title in ((axes[0], "rate", "throughput, no-op tasks (tasks/s)"),
                         (axes[1], "cpu_ms_per_task_worker0", "worker CPU per task (ms, tasks excl.)"),
                         (axes[2], "pss_worker0", "worker PSS peak under load (MiB)")):
    for i, (sysname, color) in enumerate((("celery", "tab:green"), ("tandem", "tab:blue"))):
        for j, conc in enumerate((2, 16)):
            vals = runs(f"throughput/{sysname}/c{conc}", field)
            x = j * 3 + i
            if vals:
                ax.bar(x, sorted(vals)[len(vals) // 2], color=color, alpha=0.6,
                       label=sysname if j == 0 else None)
                ax.plot([x] * len(vals), vals, "k.", ms=4)
    ax.set_xticks([0.5, 3.5], ["c=2", "c=16"])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(out, "throughput.png"), dpi=90)

# 2. backlog: end-to-end throughput and server-side script cost vs queued tasks
bs = sorted(int(k.split("/b")[-1]) for k in res if k.startswith("scripts/b"))
if bs:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    rated = [b for b in bs if b > 16]  # no more tasks than bench.py's BACKLOG_SLOTS (16): no steady rate (it reports nan)
    for sysname, color in (("celery", "tab:green"), ("tandem", "tab:blue")):
        a1.plot(rated, [res.get(f"backlog/{sysname}/b{b}", {}).get("rate") for b in rated], "o-", color=color, label=sysname)
    a1.set_xscale("log")
    a1.set_xlabel("tasks queued before the worker starts")
    a1.set_ylabel("tasks/s (c=16)")
    a1.set_title("throughput vs backlog", fontsize=10)
    a1.legend(fontsize=8)
    a2.plot(bs, [res[f"scripts/b{b}"]["claim_us"] for b in bs], "o-", label="claim.lua (1 job)")
    a2.plot(bs, [res[f"scripts/b{b}"]["dispatch_us"] for b in bs], "s-", label="dispatch.lua (1 msg)")
    a2.set_xscale("log")
    a2.set_ylim(bottom=0)
    a2.set_xlabel("jobs queued")
    a2.set_ylabel("µs per call, Redis server side")
    a2.set_title("script cost vs backlog", fontsize=10)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "backlog.png"), dpi=90)
# 3. scaling: throughput and paced latency for 1 -> 4 workers (c=4 each)
ws = sorted(int(k.split("/w")[-1]) for k in res if k.startswith("scaling/tandem/w"))
if ws:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for sysname, color in (("celery", "tab:green"), ("tandem", "tab:blue")):
        a1.plot(ws, [res.get(f"scaling/{sysname}/w{w}", {}).get("rate") for w in ws], "o-", color=color, label=sysname)
        for q, style in (("p50", "o-"), ("p99", "x--")):
            a2.plot(ws, [res.get(f"scaling/{sysname}/w{w}", {}).get(q) for w in ws], style, color=color,
                    label=f"{sysname} {q}")
    a1.set_xticks(ws)
    a1.set_xlabel("workers (c=4 each), one 2-core machine")
    a1.set_ylabel("tasks/s")
    a1.set_ylim(bottom=0)
    a1.set_title("throughput vs workers", fontsize=10)
    a1.legend(fontsize=8)
    a2.set_xticks(ws)
    a2.set_xlabel("workers (c=4 each)")
    a2.set_ylabel("ms, publish -> date_done, paced 50/s")
    a2.set_ylim(bottom=0)
    a2.set_title("latency vs workers", fontsize=10)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scaling.png"), dpi=90)
print("plots in", out)
