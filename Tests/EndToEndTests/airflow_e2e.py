"""Drives the end-to-end run against a live Airflow 3 api-server (started by scripts/e2e-airflow).

    python airflow_e2e.py check   --api URL --markers DIR    # runs every example DAG, checks states and logs
    python airflow_e2e.py latency --api URL --label NAME     # one tandem_parallel run; queued -> running stats
    python airflow_e2e.py stop --api URL --case A --worker-pid PID --signals TERM,TERM --run-dir DIR
                                                             # stops east's worker under a running task (stop phase)

Prints one JSON line prefixed with RESULT for the script to collect; exits non-zero when a check fails.
"""
import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from datetime import datetime

import requests

S = requests.Session()
FAILS = []


def api(method, path, **kw):
    r = S.request(method, f"{ARGS.api}/api/v2{path}", timeout=30, **kw)
    if r.status_code >= 400:
        raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
    return r.json() if r.content else None


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILS.append(what)


def wait_dags(ids, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        try:
            have = {d["dag_id"] for d in api("GET", "/dags", params={"limit": 100})["dags"]}
            if set(ids) <= have:
                return
        except Exception as e:  # api-server still starting
            print("waiting for the API server:", e, flush=True)
        time.sleep(2)
    raise SystemExit(f"DAGs not parsed within {timeout}s: {ids}")


def trigger(dag_id):
    api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    run = api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": {}})
    return run["dag_run_id"]


def run_state(dag_id, run_id):
    return api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]


def wait_runs(runs, timeout=420):
    end = time.time() + timeout
    states = {}
    while time.time() < end:
        states = {k: run_state(*k) for k in runs}
        if all(s in ("success", "failed") for s in states.values()):
            return states
        time.sleep(2)
    return states


def tis(dag_id, run_id):
    out = []
    while True:
        page = api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100, "offset": len(out)})
        out += page["task_instances"]
        if not page["task_instances"] or len(out) >= page.get("total_entries", 0):
            return out


def log_of(dag_id, run_id, task_id, try_number, map_index=-1):
    r = S.get(
        f"{ARGS.api}/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
        params={"full_content": "true", "map_index": map_index}, headers={"Accept": "application/json"}, timeout=30)
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    return json.dumps(r.json())


def duplicate_delivery():
    """Re-publishes the Celery message of a task that is running right now (what a broker redelivery does):
    Airflow's Execution API answers 409, the runner exits 75, and the worker must ack without writing FAILURE."""
    import redis

    r = redis.Redis.from_url(ARGS.broker)
    end = time.time() + 60
    while time.time() < end:
        for key in r.scan_iter("{tandem}:job:*", count=1000):
            job = r.hgetall(key)
            if job.get(b"state") != b"leased":
                continue
            raw = job[b"raw"]
            env = json.loads(raw)
            import base64

            body = json.loads(base64.b64decode(env["body"]))
            workload = json.loads(body[0][0])
            ti = workload.get("ti") or {}
            if workload.get("type") != "ExecuteTask" or ti.get("dag_id") != "tandem_parallel":
                continue
            states = {t["task_id"]: t["state"] for t in tis("tandem_parallel", ti["run_id"])}
            if states.get(ti["task_id"]) != "running":
                continue
            r.lpush(job.get(b"ingress", b"default"), raw)
            print(f"re-published the message of running task {ti['task_id']}", flush=True)
            return ti["task_id"]
        time.sleep(0.3)
    check(False, "found a running task to deliver twice")
    return None


def revoked_queued_check():
    """app.control.revoke(id) before the message arrives: the worker records REVOKED and never starts it."""
    import uuid

    from celery import Celery

    app = Celery(broker=ARGS.broker, backend=os.environ["AIRFLOW__CELERY__RESULT_BACKEND"])
    tid = str(uuid.uuid4())
    app.control.revoke(tid)
    time.sleep(0.5)
    workload = {"type": "ExecuteTask", "token": "never.used.token", "dag_rel_path": "none.py", "bundle_info": {},
                "log_path": "none.log", "ti": {"id": str(uuid.uuid4()), "dag_id": "nope", "task_id": "nope",
                                               "run_id": "nope", "try_number": 1, "map_index": -1, "queue": "default"}}
    app.send_task("execute_workload", args=[json.dumps(workload)], task_id=tid, queue="default")
    state = None
    for _ in range(60):
        state = app.AsyncResult(tid).state
        if state not in ("PENDING",):
            break
        time.sleep(0.5)
    check(state == "REVOKED", f"a task revoked before delivery is recorded REVOKED and never started ({state})")


def parse(ts):
    return datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


def latencies(dag_id, run_id):
    out = []
    for ti in tis(dag_id, run_id):
        q, s = parse(ti.get("queued_when")), parse(ti.get("start_date"))
        if q and s:
            out.append((s - q).total_seconds())
    return sorted(out)


def stats(xs):
    if not xs:
        return {}
    return {
        "n": len(xs), "median_s": round(statistics.median(xs), 3),
        "p90_s": round(xs[min(len(xs) - 1, int(len(xs) * 0.9))], 3), "max_s": round(max(xs), 3),
        "min_s": round(min(xs), 3),
    }


def cmd_check():
    dags = ["tandem_parallel", "tandem_retries", "tandem_mapped", "tandem_pinned", "tandem_callback"]
    wait_dags(dags)
    runs = {d: trigger(d) for d in dags}
    print("triggered", runs, flush=True)

    # a running task's log, read through the API server (served by the worker's log endpoint)
    live_ok = False
    end = time.time() + 120
    while time.time() < end and not live_ok:
        for ti in tis("tandem_parallel", runs["tandem_parallel"]):
            if ti["state"] == "running":
                text = log_of("tandem_parallel", runs["tandem_parallel"], ti["task_id"], ti["try_number"])
                if "starting" in text and ":8793/log/" in text:
                    live_ok = True
                    print("live log source:", [l for l in json.loads(text).get("content", []) if isinstance(l, dict) and l.get("sources")][:1], flush=True)
                    break
        time.sleep(0.5)
    check(live_ok, "log of a RUNNING task read through the API server from the worker's :8793/log/ endpoint")
    dup = duplicate_delivery() if ARGS.broker else None
    if ARGS.broker:
        from celery import Celery

        replies = Celery(broker=ARGS.broker).control.ping(timeout=2.0)
        nodes = sorted(n for r in replies for n in r)
        print("celery ping replies:", replies, flush=True)
        revoked_queued_check()
        check(any(n.startswith("east@") for n in nodes) and any(n.startswith("west@") for n in nodes)
              and all(list(r.values())[0] == {"ok": "pong"} for r in replies),
              "app.control.ping() answered by both Tandem workers (east, west)")

    states = wait_runs({(d, r) for d, r in runs.items()})
    st = {d: states.get((d, r)) for d, r in runs.items()}
    print("run states", st, flush=True)
    check(st["tandem_parallel"] == "success", "tandem_parallel run success")
    check(st["tandem_retries"] == "failed", "tandem_retries run failed")
    check(st["tandem_mapped"] == "success", "tandem_mapped run success")
    check(st["tandem_pinned"] == "success", "tandem_pinned run success")
    check(st["tandem_callback"] == "success", "tandem_callback run success (leaf cleanup succeeded)")

    def by_task(d):
        return {(t["task_id"], t["map_index"]): t for t in tis(d, runs[d])}

    p = by_task("tandem_parallel")
    check(len(p) == 8 and all(t["state"] == "success" for t in p.values()), "8 parallel tasks success")
    r = by_task("tandem_retries")
    check(r[("flaky", -1)]["state"] == "failed" and r[("flaky", -1)]["try_number"] == 2, "flaky failed after 2 tries")
    check(r[("after", -1)]["state"] == "upstream_failed", "downstream of the failure is upstream_failed")
    m = by_task("tandem_mapped")
    sq = [t for (tid, mi), t in m.items() if tid == "square"]
    check(len(sq) == 4 and all(t["state"] == "success" for t in sq) and {t["map_index"] for t in sq} == {0, 1, 2, 3},
          "mapped task expanded to 4 instances, all success")
    check(m[("total", -1)]["state"] == "success", "reduce over the mapped results success")
    pn = by_task("tandem_pinned")
    check(pn[("pinned", -1)]["state"] == "success", "pinned task ran (it fails unless TANDEM_DC=west)")
    c = by_task("tandem_callback")
    check(c[("fails", -1)]["state"] == "failed" and c[("cleanup", -1)]["state"] == "success", "callback DAG task states")
    for _ in range(30):
        if os.path.exists(os.path.join(ARGS.markers, "dag_success_callback")):
            break
        time.sleep(1)
    check(os.path.exists(os.path.join(ARGS.markers, "task_failure_callback.fails")), "task on_failure_callback ran on the worker")
    check(os.path.exists(os.path.join(ARGS.markers, "dag_success_callback")), "DAG on_success_callback ran")

    # a finished task's log, through the API server (worker log folder differs from the API server's)
    t = p[("work_0", -1)]
    text = log_of("tandem_parallel", runs["tandem_parallel"], "work_0", t["try_number"])
    check("parallel task 0 done" in text, "log of a FINISHED task read through the API server")
    text = log_of("tandem_retries", runs["tandem_retries"], "flaky", 2)
    check("this task fails on purpose" in text, "log of the failed retry (try 2) readable")

    if dup:
        dup_task = p.get((dup, -1))
        check(dup_task is not None and dup_task["state"] == "success",
              f"duplicate delivery of running task {dup} (API 409): the running try still ends success")
    lat = latencies("tandem_parallel", runs["tandem_parallel"])
    print("RESULT " + json.dumps({"check": "ok" if not FAILS else "failed", "failures": FAILS,
                                  "runs": st, "parallel_latency": stats(lat)}), flush=True)
    return 0 if not FAILS else 1


def cmd_latency():
    """Runs tandem_parallel --runs times, one after another, and pools queued -> running of every task."""
    wait_dags(["tandem_parallel"])
    lat, states = [], []
    for _ in range(ARGS.runs):
        rid = trigger("tandem_parallel")
        st = wait_runs({("tandem_parallel", rid)}).get(("tandem_parallel", rid))
        states.append(st)
        lat += latencies("tandem_parallel", rid)
    lat.sort()
    print("RESULT " + json.dumps({"label": ARGS.label, "run_states": states, "latency": stats(lat), "raw": lat}), flush=True)
    return 0 if all(s == "success" for s in states) else 1


ROLES = {"swift-worker": "tandem worker", "swift-dispatcher": "tandem dispatcher", "tandem_runner": "tandem runner+tasks",
         "celery worker": "celery worker+tasks", "api-server": "airflow api-server", "scheduler": "airflow scheduler",
         "dag-processor": "airflow dag-processor", "postgres": "postgres", "redis-server": "redis"}


def processes_by_role():
    """{pid: (role, cpu seconds incl. reaped children)} for every process with a role: its own, or that of the nearest
    ancestor whose command line names one, so pool children and task processes that retitle themselves count for
    the worker that started them."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        procs[int(pid)] = (int(f[1]), cmd, sum(int(x) for x in f[11:15]) / tick)

    def role_of(pid):
        for _ in range(64):
            if pid not in procs:
                return None
            ppid, cmd, _ = procs[pid]
            role = next((r for k, r in ROLES.items() if k in cmd), None)
            if role:
                return role
            pid = ppid
        return None

    out = {}
    for pid, (_, _, cpu) in procs.items():
        role = role_of(pid)
        if role:
            out[pid] = (role, cpu)
    return out


def cpu_by_role():
    """CPU seconds used so far by every process on the machine, by role, and by the whole machine."""
    out = {}
    for role, cpu in processes_by_role().values():
        out[role] = out.get(role, 0.0) + cpu
    fields = open("/proc/stat").readline().split()[1:]
    out["machine total"] = (sum(int(x) for x in fields) - int(fields[3]) - int(fields[4])) / os.sysconf("SC_CLK_TCK")
    return out


class PeakMemory(threading.Thread):
    """Samples the PSS of every role's processes every 0.5 s (smaps_rollup) and keeps each role's peak sum: shared
    pages count once, split among the processes that map them, so a pool's sum is what the pool really costs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stopping = {}, threading.Event()

    @staticmethod
    def sample():
        """PSS (MiB) of every role's processes now; also, under "<role>: airflow task processes", the part of it
        that is Airflow's own task processes (retitled "airflow worker -- <ti id>" by Airflow's task runner): the
        same code under either executor, so what no executor can save."""
        now = {}
        for pid, (role, _) in processes_by_role().items():
            try:
                task = open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"airflow worker -- ")
                for line in open(f"/proc/{pid}/smaps_rollup"):
                    if line.startswith("Pss:"):
                        mib = int(line.split()[1]) / 1024
                        now[role] = now.get(role, 0) + mib
                        if task:
                            now[f"{role}: airflow task processes"] = now.get(f"{role}: airflow task processes", 0) + mib
                        break
            except OSError:
                pass
        return now

    def run(self):
        while not self.stopping.is_set():
            for role, mib in self.sample().items():
                self.peak[role] = max(self.peak.get(role, 0), mib)
            self.stopping.wait(0.5)

    def stop(self):
        self.stopping.set()
        self.join()
        return {k: round(v, 1) for k, v in sorted(self.peak.items())}


def tandem_path(dag_id, run_id):
    """Where each task's queued -> running went, from Airflow's task_instance joined with Tandem's ledger by the
    Celery task id: scheduler + dispatcher (queued -> dispatched), the datacenter queue + claim + launch
    (dispatched -> started record, which is written --start-record-delay = 0.1 s after the launch), and the
    runner + supervisor (launch -> Airflow's start_date). Empty when Tandem did not run the tasks."""
    import psycopg2
    url = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("postgresql+psycopg2://", "postgresql://")
    with psycopg2.connect(url) as c, c.cursor() as cur:
        cur.execute("SELECT to_regclass('tandem_tasks') IS NOT NULL")
        if not cur.fetchone()[0]:
            return {}
        cur.execute("""
            SELECT t.datacenter, t.claimed_by,
                   extract(epoch FROM t.dispatched_at - ti.queued_dttm),
                   extract(epoch FROM t.started_at - t.dispatched_at) - 0.1,
                   extract(epoch FROM ti.start_date - t.started_at) + 0.1
              FROM task_instance ti JOIN tandem_tasks t ON t.task_id = ti.external_executor_id
             WHERE ti.dag_id = %s AND ti.run_id = %s AND t.started_at IS NOT NULL""", (dag_id, run_id))
        rows = cur.fetchall()
    if not rows:
        return {}
    by_dc = {}
    for r in rows:
        by_dc[r[0]] = by_dc.get(r[0], 0) + 1
    return {"tasks_by_datacenter": by_dc,
            "queued_to_dispatched": stats(sorted(float(r[2]) for r in rows)),
            "dispatched_to_launch": stats(sorted(float(r[3]) for r in rows)),
            "launch_to_running": stats(sorted(float(r[4]) for r in rows))}


def cmd_race():
    """One run of tandem_wide (200 mapped no-op tasks): wall time from the run's start to its end, and every
    task's queued -> running."""
    wait_dags(["tandem_wide"])
    cpu0 = cpu_by_role()
    memory = PeakMemory()
    memory.start()
    rid = trigger("tandem_wide")
    st = wait_runs({("tandem_wide", rid)}, timeout=900).get(("tandem_wide", rid))
    pss = memory.stop()
    cpu1 = cpu_by_role()
    # The executor itself, at rest after serving the race: every task process has ended, the pools that ran them
    # are still up (Celery's 16 pool children; Tandem's runner and its pooled children). Task processes are the
    # same Airflow code under both executors and dominate the peak; this is what each executor keeps.
    time.sleep(3)
    settled = []
    for _ in range(4):
        time.sleep(0.5)
        settled.append(PeakMemory.sample())
    at_rest = {role: round(min(s.get(role, 0) for s in settled), 1) for role in settled[-1]}
    # And once the executor has been idle for a while: Tandem's runner retires pooled children idle for
    # --runner-pool-idle (60 s by default); Celery's prefork pool keeps its children. E2E_IDLE_SECONDS=0 skips it.
    idle_wait = float(os.environ.get("E2E_IDLE_SECONDS", "65"))
    idle = None
    if idle_wait > 0:
        time.sleep(idle_wait)
        samples = []
        for _ in range(4):
            time.sleep(0.5)
            samples.append(PeakMemory.sample())
        idle = {role: round(min(s.get(role, 0) for s in samples), 1) for role in samples[-1]}
    cpu = {k: round(cpu1[k] - cpu0.get(k, 0.0), 1) for k in cpu1 if cpu1[k] - cpu0.get(k, 0.0) > 0.05}
    run = api("GET", f"/dags/tandem_wide/dagRuns/{rid}")
    began, ended = parse(run.get("start_date")), parse(run.get("end_date"))
    wall = (ended - began).total_seconds() if began and ended else None
    done = [t for t in tis("tandem_wide", rid) if t["state"] == "success"]
    lat = sorted(latencies("tandem_wide", rid))
    print("RESULT " + json.dumps({"label": ARGS.label, "run_state": st, "tasks_success": len(done),
                                  "wall_seconds": wall, "latency": stats(lat), "cpu_seconds": cpu, "peak_pss_mib": pss,
                                  "pss_at_rest_mib": at_rest, "pss_idle_mib": idle, "idle_seconds": idle_wait,
                                  "tandem_path": tandem_path("tandem_wide", rid)}), flush=True)
    return 0 if st == "success" and len(done) == 200 else 1


# ------------------------------------------------------------------------------------------------------------------
# The stop phase: what Airflow records when the worker running a task is stopped under it


def safe_run(run_id):
    return "".join(c if c.isalnum() else "_" for c in run_id)  # as tandem_stop.py names its tick files


def read_ticks(markers, runs):
    """The tick lines the tandem_stop tasks of these runs ({dag: run id}) wrote:
    {pid: {"dag", "try", "dc", "ppids", "first", "last", "n", "done"}}."""
    wanted = {f"{d}.{safe_run(r)}." for d, r in runs.items()}
    out = {}
    d = os.path.join(markers, "stop")
    if not os.path.isdir(d):
        return out
    for name in os.listdir(d):
        if not name.endswith(".ticks") or not any(name.startswith(w) for w in wanted):
            continue
        dag_id = name.split(".", 1)[0]
        for line in open(os.path.join(d, name)):
            f = line.split()
            if len(f) < 6:
                continue
            t, pid, ppid, dc, tr, what = float(f[0]), int(f[1]), int(f[2]), f[3], int(f[4]), f[5]
            e = out.setdefault(pid, {"dag": dag_id, "try": tr, "dc": dc, "ppids": [], "first": t, "last": t, "n": 0,
                                     "done": False})
            e["first"], e["last"] = min(e["first"], t), max(e["last"], t)
            if ppid not in e["ppids"]:
                e["ppids"].append(ppid)
            if what == "done":
                e["done"] = True
            else:
                e["n"] += 1
    return out


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ppid_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def cmdline_of(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def ti_now(dag_id, run_id):
    t = api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/long")
    return {k: t.get(k) for k in ("state", "try_number", "hostname", "pid", "start_date", "end_date")}


def stop_db_facts(runs):
    """What Airflow's own tables hold for the stopped runs: every try (task_instance_history + task_instance), the
    audit log, and for each try's Celery task id its celery_taskmeta status and Tandem's ledger events."""
    import psycopg2

    url = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("postgresql+psycopg2://", "postgresql://")
    facts = {}
    with psycopg2.connect(url) as c, c.cursor() as cur:
        for dag_id, run_id in runs.items():
            tries = []
            for table in ("task_instance_history", "task_instance"):
                cur.execute(f"""SELECT try_number, state, hostname, pid, queued_dttm, start_date, end_date,
                                       external_executor_id, max_tries
                                  FROM {table} WHERE dag_id = %s AND run_id = %s AND task_id = 'long'
                                 ORDER BY try_number""", (dag_id, run_id))
                for r in cur.fetchall():
                    tries.append({"table": table, "try_number": r[0], "state": r[1], "hostname": r[2], "pid": r[3],
                                  "queued": r[4].isoformat() if r[4] else None,
                                  "start": r[5].isoformat() if r[5] else None,
                                  "end": r[6].isoformat() if r[6] else None, "celery_task_id": r[7],
                                  "max_tries": r[8]})
            cur.execute("""SELECT dttm, event, try_number, extra FROM log
                            WHERE dag_id = %s AND run_id = %s AND task_id = 'long' ORDER BY dttm""", (dag_id, run_id))
            audit = [{"at": r[0].isoformat(), "event": r[1], "try": r[2], "extra": (r[3] or "")[:300]}
                     for r in cur.fetchall()]
            celery = {}
            for t in tries:
                tid = t["celery_task_id"]
                if not tid or tid in celery:
                    continue
                entry = {}
                cur.execute("SELECT status, date_done FROM celery_taskmeta WHERE task_id = %s", (tid,))
                row = cur.fetchone()
                entry["celery_taskmeta"] = {"status": row[0], "date_done": row[1].isoformat() if row[1] else None} if row else None
                cur.execute("SELECT to_regclass('tandem_task_events') IS NOT NULL")
                if cur.fetchone()[0]:
                    cur.execute("""SELECT at, event, worker, datacenter, detail FROM tandem_task_events
                                    WHERE task_id = %s ORDER BY id""", (tid,))
                    entry["tandem_events"] = [{"at": r[0].isoformat(), "event": r[1], "worker": r[2], "dc": r[3],
                                               "detail": (r[4] or "")[:200]} for r in cur.fetchall()]
                    cur.execute("""SELECT outcome, attempts, datacenter, claimed_by FROM tandem_tasks
                                    WHERE task_id = %s""", (tid,))
                    row = cur.fetchone()
                    entry["tandem_task"] = ({"outcome": row[0], "attempts": row[1], "dc": row[2], "claimed_by": row[3]}
                                            if row else None)
                celery[tid] = entry
            facts[dag_id] = {"tries": tries, "audit_log": audit, "by_celery_task_id": celery}
    return facts


def grep_lines(path, needles, limit=40):
    if not path or not os.path.exists(path):
        return []
    out = []
    for line in open(path, errors="replace"):
        if any(n in line for n in needles):
            out.append(line.rstrip()[:400])
    return out[-limit:]


def task_log_excerpts(log_root, dag_id, run_id):
    """The last lines of each attempt's Airflow task log (what the task runner and supervisor wrote)."""
    out = {}
    base = os.path.join(log_root, f"dag_id={dag_id}", f"run_id={run_id}", "task_id=long")
    if not os.path.isdir(base):
        return out
    for name in sorted(os.listdir(base)):
        lines = []
        for line in open(os.path.join(base, name), errors="replace"):
            try:
                e = json.loads(line)
                lines.append(f"{e.get('timestamp', '')} {e.get('level', '')} {e.get('event', '')}"[:300])
            except ValueError:
                lines.append(line.rstrip()[:300])
        out[name] = lines[:4] + (["..."] if len(lines) > 12 else []) + lines[max(4, len(lines) - 8):]
    return out


def cmd_stop():
    """Triggers tandem_stop_r0 and tandem_stop_r1 (one task each, pinned to east), waits until both tasks' user
    code runs under east's worker, sends that worker --signals, then follows what Airflow records until both runs
    are final: every TI change with its time from the first signal, every try, the audit log, the Celery results,
    Tandem's ledger, and the task processes themselves (their tick files and /proc)."""
    dags = ["tandem_stop_r0", "tandem_stop_r1"]
    wait_dags(dags)
    runs = {d: trigger(d) for d in dags}
    print(f"case {ARGS.case}: triggered {runs}; east worker pid {ARGS.worker_pid}, signals {ARGS.signals}", flush=True)
    # both tasks' user code running (a few ticks written) under east's worker
    deadline = time.time() + 180
    first = {}
    while time.time() < deadline:
        ticks = read_ticks(ARGS.markers, runs)
        first = {}
        for pid, e in ticks.items():
            if e["dag"] in dags and e["try"] == 1 and e["n"] >= ARGS.ticks_before:
                first[e["dag"]] = pid
        if len(first) == len(dags):
            break
        time.sleep(0.3)
    if len(first) != len(dags):
        check(False, f"both stop tasks running (ticks seen for {sorted(first)})")
        print("RESULT " + json.dumps({"case": ARGS.case, "check": "failed", "failures": FAILS}), flush=True)
        return 1
    ticks = read_ticks(ARGS.markers, runs)
    for d, pid in first.items():
        check(ticks[pid]["dc"] == "east", f"{d} try 1 runs in east (pid {pid}, dc {ticks[pid]['dc']})")
    procs_before = {pid: {"ppid": ppid_of(pid), "cmd": cmdline_of(pid)} for pid in first.values()}
    supervisors = {pid: {"pid": p["ppid"], "cmd": cmdline_of(p["ppid"]) if p["ppid"] else None}
                   for pid, p in procs_before.items()}
    print("task processes before the stop:", procs_before, "their parents:", supervisors, flush=True)
    states_before = {d: ti_now(d, r) for d, r in runs.items()}
    if ARGS.add_consumer:
        # the stock Celery case: the other worker starts consuming the queue only now, so that both tasks ran on
        # east's and only a message given back can reach it
        from celery import Celery

        replies = Celery(broker=ARGS.broker).control.add_consumer(
            ARGS.add_consumer, destination=[ARGS.add_consumer_node], reply=True, timeout=5)
        print(f"add_consumer({ARGS.add_consumer}) on {ARGS.add_consumer_node}: {replies}", flush=True)
        check(bool(replies), f"{ARGS.add_consumer_node} now consumes {ARGS.add_consumer}")

    # the signals, to the worker process alone (what systemd's KillMode=mixed does); KILLTASK is SIGKILL to the
    # Airflow task processes themselves (the supervisors' children), their supervisors left alive
    t0 = time.time()
    sent = []
    for i, name in enumerate(ARGS.signals.split(",")):
        if i:
            time.sleep(ARGS.signal_gap)
        if name == "KILLTASK":
            for pid in first.values():
                os.kill(pid, signal.SIGKILL)
            sent.append({"signal": "SIGKILL to the Airflow task processes", "pids": sorted(first.values()),
                         "at_s": round(time.time() - t0, 2)})
        else:
            try:
                os.kill(ARGS.worker_pid, getattr(signal, "SIG" + name))
            except ProcessLookupError:
                check(False, f"the east worker (pid {ARGS.worker_pid}) is there for SIG{name}")
            sent.append({"signal": "SIG" + name, "at_s": round(time.time() - t0, 2)})
        print(f"sent {sent[-1]} (east worker pid {ARGS.worker_pid}) at +{time.time() - t0:.1f}s", flush=True)

    timeline = {d: [] for d in dags}
    last = {d: None for d in dags}
    final_at = {}
    worker_exit = None
    task_gone = {}
    end = t0 + ARGS.timeout
    while time.time() < end:
        now = time.time()
        for d, r in runs.items():
            try:
                cur = ti_now(d, r)
                rs = run_state(d, r)
            except Exception as e:  # the API server busy for a moment
                print("poll:", e, flush=True)
                continue
            key = (cur["state"], cur["try_number"], cur["hostname"], cur["pid"], rs)
            if key != last[d]:
                last[d] = key
                ev = {"t_s": round(now - t0, 1), "ti_state": cur["state"], "try_number": cur["try_number"],
                      "hostname": cur["hostname"], "pid": cur["pid"], "run_state": rs}
                timeline[d].append(ev)
                print(f"+{now - t0:6.1f}s {d}: {ev}", flush=True)
            if rs in ("success", "failed") and d not in final_at:
                final_at[d] = round(now - t0, 1)
        if worker_exit is None and not pid_alive(ARGS.worker_pid):
            worker_exit = round(time.time() - t0, 1)
            print(f"+{worker_exit:6.1f}s the east worker has exited", flush=True)
        for d, pid in first.items():
            if d not in task_gone and not pid_alive(pid):
                task_gone[d] = round(time.time() - t0, 1)
                print(f"+{task_gone[d]:6.1f}s {d} try 1's task process (pid {pid}) is gone", flush=True)
        if len(final_at) == len(dags) and worker_exit is not None and len(task_gone) == len(dags):
            break
        time.sleep(0.5)

    ticks = read_ticks(ARGS.markers, runs)
    mine = ticks
    # two copies of the same task's user code at once: tick intervals of two processes of the same DAG overlapping
    overlaps = []
    items = sorted(mine.items(), key=lambda kv: kv[1]["first"])
    for i, (p1, a) in enumerate(items):
        for p2, b in items[i + 1:]:
            if a["dag"] == b["dag"] and b["first"] < a["last"]:
                overlaps.append({"dag": a["dag"], "pids": [p1, p2], "tries": [a["try"], b["try"]],
                                 "overlap_s": round(a["last"] - b["first"], 1)})
    processes = {str(pid): {"dag": e["dag"], "try": e["try"], "dc": e["dc"], "ppids": e["ppids"], "ticks": e["n"],
                            "ran_to_the_end": e["done"], "first_tick_s": round(e["first"] - t0, 1),
                            "last_tick_s": round(e["last"] - t0, 1)} for pid, e in mine.items()}
    # try 1's own process after the worker exited: an orphan still running the user's code?
    orphans = {}
    for d, pid in first.items():
        e = ticks.get(pid, {})
        orphans[d] = {"pid": pid, "ticks_after_worker_exit": (worker_exit is not None and e.get("last", 0) - t0 > worker_exit + 1),
                      "ran_to_the_end": e.get("done", False), "gone_at_s": task_gone.get(d),
                      "parents_seen": e.get("ppids")}
    facts = stop_db_facts(runs)
    final = {d: ti_now(d, r) | {"run_state": run_state(d, r)} for d, r in runs.items()}
    logs = {d: task_log_excerpts(ARGS.task_logs, d, r) for d, r in runs.items()} if ARGS.task_logs else {}
    pre = ARGS.log_prefix
    ids = [t["celery_task_id"] for f in facts.values() for t in f["tries"] if t["celery_task_id"]]
    worker_needles = ["shutting down", "stopping", "put back", "grace", "stopped", "409", "hutdown", "estor",
                      "already running", "Terminat", "WorkerLost", "signal", "Ignore"]
    worker_lines = {
        "east": grep_lines(os.path.join(ARGS.run_dir, f"{pre}{ARGS.east_log}"), worker_needles + ids),
        "west": grep_lines(os.path.join(ARGS.run_dir, f"{pre}{ARGS.west_log}"), worker_needles + ids),
        "tasks-east": grep_lines(os.path.join(ARGS.run_dir, f"{pre}tasks-east.log"),
                                 ["409", "already running", "Workload finished", "Traceback", "Error", "Killed"]),
        "tasks-west": grep_lines(os.path.join(ARGS.run_dir, f"{pre}tasks-west.log"),
                                 ["409", "already running", "Workload finished", "Traceback", "Error"]),
        "scheduler": grep_lines(os.path.join(ARGS.run_dir, "scheduler.log"),
                                ["heartbeat", "tandem_stop"], limit=20),
    }
    for d in dags:
        print(f"{d}: final {final[d]} after {final_at.get(d)} s", flush=True)
    check(len(final_at) == len(dags), f"both runs final within {ARGS.timeout} s of the stop ({final_at})")
    # the task's own process must not outlive the worker that ran it (Airflow's supervisor forks it into a process
    # group of its own: without a parent-death signal it ran on as an orphan, unsupervised, and beside the retry)
    for d, o in orphans.items():
        check(not o["ticks_after_worker_exit"],
              f"{d} try 1's task process (pid {o['pid']}) did not run on after east's worker exited")
    check(not overlaps, f"no two copies of a task's code ran at once ({overlaps})")
    result = {"case": ARGS.case, "label": ARGS.label, "signals": sent, "signal_gap_s": ARGS.signal_gap,
              "ti_before_stop": states_before, "timeline": timeline, "final": final, "final_after_s": final_at,
              "worker_exit_after_s": worker_exit, "try1_task_process": orphans, "task_processes": processes,
              "supervisors_before_stop": {str(k): v for k, v in supervisors.items()},
              "ran_twice_at_once": overlaps, "airflow_db": facts, "task_logs": logs, "log_lines": worker_lines,
              "check": "ok" if not FAILS else "failed", "failures": FAILS}
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return 0 if not FAILS else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["check", "latency", "race", "stop"])
    ap.add_argument("--api", required=True)
    ap.add_argument("--markers", default="/tmp")
    ap.add_argument("--label", default="")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--broker", default=os.environ.get("AIRFLOW__CELERY__BROKER_URL"))
    # stop
    ap.add_argument("--case", default="A")
    ap.add_argument("--worker-pid", type=int, default=0)
    ap.add_argument("--signals", default="TERM,TERM", help="comma-separated signals for east's worker, e.g. TERM,TERM")
    ap.add_argument("--signal-gap", type=float, default=2.0)
    ap.add_argument("--ticks-before", type=int, default=5, help="the tasks' ticks seen before the first signal")
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--run-dir", default=".")
    ap.add_argument("--log-prefix", default="")
    ap.add_argument("--task-logs", default=None)
    ap.add_argument("--east-log", default="worker-east.log")
    ap.add_argument("--west-log", default="worker-west.log")
    ap.add_argument("--add-consumer", default=None, help="a queue for --add-consumer-node to start consuming "
                    "(Celery remote control) once the tasks run, before the signals")
    ap.add_argument("--add-consumer-node", default=None)
    ARGS = ap.parse_args()
    sys.exit({"check": cmd_check, "latency": cmd_latency, "race": cmd_race, "stop": cmd_stop}[ARGS.cmd]())
