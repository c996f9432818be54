#!/usr/bin/env python3
"""Capture real Celery / kombu / Airflow wire data as test vectors for CeleryWire.

Run it under one of the venvs scripts/pyenv makes (or use scripts/capture-vectors, which runs all):

    .venv/celery56/bin/python scripts/capture-vectors.py            # plain celery cases
    .venv/airflow/bin/python  scripts/capture-vectors.py --airflow  # Airflow provider's own publish path

It starts a throwaway redis-server on a free loopback port (no persistence), publishes REAL messages with
the stock Python clients, reads the exact list elements back with LRANGE, and writes one JSON file per
case to Protocol/vectors/<celery-version>-<case>.json:

    {"kind": "task" | "pidbox" | "result",
     "source": "what produced it",
     "raw": "<exact bytes on Redis, as a string>",
     "list": "<redis list it was on>"            (task)
     "channel": "<pubsub channel>"               (pidbox)
     "key": "celery-task-meta-<id>", "ttl": n    (result)
     "bindings": {"_kombu.binding.": [...]}      (task)
     "expect": {...}}

`expect` is computed here by decoding the raw element with plain json/base64/kombu (not with anything
Swift-side), so it is an independent statement of what the element means.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import decimal
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import celery
import kombu
import redis
from celery import Celery
from kombu import compression as kombu_compression

ROOT = Path(__file__).resolve().parent.parent
UTC = dt.timezone.utc

AIRFLOW_ARGV = ["airflow", "tasks", "run", "example_dag", "extract", "manual__2024-01-01T00:00:00+00:00",
                "--local", "--subdir", "DAGS_FOLDER/example_dag.py"]
AIRFLOW_COMMAND_NAMES = [
    "execute_command",
    "airflow.providers.celery.executors.celery_executor_utils.execute_command",
    "airflow.executors.celery_executor.execute_command",
]
# A dummy JWT: three base64url segments, never a real key.
DUMMY_JWT = ("eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9."
             "eyJzdWIiOiIwMTkzMmUxYS0wMDAwLTc4OWEtYmNkZS0wMDAwMDAwMDAwMDEiLCJzY29wZSI6Indvcmtsb2FkIn0."
             "ZHVtbXktc2lnbmF0dXJlLW5vdC1hLXJlYWwta2V5")
TI_ID = "01932e1a-0000-789a-bcde-000000000001"


def fixed_id(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayRedis:
    def __init__(self):
        exe = shutil.which("redis-server")
        if not exe:
            sys.exit("capture-vectors: redis-server not found on PATH (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="tandem-capture-")
        print(f"capture-vectors: starting redis-server on 127.0.0.1:{self.port}")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, db=0)
        for _ in range(100):
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        sys.exit("capture-vectors: redis-server did not answer PING within 5 s")

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def epoch(iso: str | None) -> float | None:
    if iso is None:
        return None
    d = dt.datetime.fromisoformat(iso)
    if d.tzinfo is None:  # naive means UTC (celery's convention)
        d = d.replace(tzinfo=UTC)
    return d.timestamp()


def airflow_expect(name: str, args: list) -> dict:
    """What Tandem must classify the task as (independently of the Swift code)."""
    if name == "execute_workload":
        w = json.loads(args[0])
        ti = w.get("ti") or {}
        # The id Tandem reports: ti.id, callback.id (ExecuteCallback) or connection_test_id (TestConnection).
        wid = ti.get("id") or (w.get("callback") or {}).get("id") or w.get("connection_test_id")
        return {"kind": "workload", "type": w.get("type"), "ti_id": wid, "dag_id": ti.get("dag_id"),
                "task_id": ti.get("task_id"), "run_id": ti.get("run_id"), "try_number": ti.get("try_number"),
                "map_index": ti.get("map_index"), "queue": ti.get("queue"), "log_path": w.get("log_path"),
                "token": w.get("token")}
    if name in AIRFLOW_COMMAND_NAMES:
        return {"kind": "command", "argv": args[0]}
    return {"kind": "error", "code": "unknownTask"}


def decode_task(raw: str) -> dict:
    env = json.loads(raw)
    props = env["properties"]
    headers = env["headers"]
    assert props["body_encoding"] == "base64", props
    body = base64.b64decode(env["body"])
    if headers.get("compression"):
        body = kombu_compression.decompress(body, headers["compression"])
    # Plain json (no kombu object_hook): args are kept verbatim, type tags included.
    payload = json.loads(body)
    if "task" in headers:
        args, kwargs, embed = payload
        name, tid = headers["task"], headers["id"]
        eta, expires = headers.get("eta"), headers.get("expires")
        hard, soft = headers.get("timelimit") or [None, None]
        retries = headers.get("retries", 0)
        root_id, parent_id = headers.get("root_id"), headers.get("parent_id")
        proto = 2
    else:
        name, tid = payload["task"], payload["id"]
        args, kwargs = payload.get("args", []), payload.get("kwargs", {})
        eta, expires = payload.get("eta"), payload.get("expires")
        hard, soft = payload.get("timelimit") or [None, None]
        retries = payload.get("retries", 0)
        root_id = parent_id = None
        proto = 1
    return {
        "protocol": proto, "name": name, "id": tid, "args": args, "kwargs": kwargs,
        "eta": eta, "eta_epoch": epoch(eta), "expires": expires, "expires_epoch": epoch(expires),
        "hard_time_limit": hard, "soft_time_limit": soft, "retries": retries,
        "root_id": root_id, "parent_id": parent_id, "reply_to": props.get("reply_to"),
        "delivery_tag": props.get("delivery_tag"), "priority": props.get("priority"),
        "redelivered": bool(headers.get("redelivered") or props.get("delivery_info", {}).get("redelivered")),
        "content_type": env.get("content-type"), "content_encoding": env.get("content-encoding"),
        "compression": headers.get("compression"), "body_json": body.decode("utf-8"),
        "payload": airflow_expect(name, args),
    }


class Capturer:
    def __init__(self, out: Path, r: ThrowawayRedis, prefix: str):
        self.out, self.r, self.prefix = out, r, prefix
        self.written: list[str] = []

    def write(self, case: str, doc: dict):
        path = self.out / f"{self.prefix}-{case}.json"
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=True, sort_keys=False) + "\n")
        self.written.append(path.name)
        print(f"capture-vectors:   wrote {path.relative_to(ROOT)}")

    def task(self, case: str, source: str, publish):
        c = self.r.client
        c.flushdb()
        publish()
        lists = [k for k in c.keys("*") if c.type(k) == b"list"]
        assert len(lists) == 1, f"{case}: expected one list, found {lists}"
        elements = c.lrange(lists[0], 0, -1)
        assert len(elements) == 1, f"{case}: expected one element, found {len(elements)}"
        raw = elements[0].decode("utf-8")
        bindings = {k.decode(): sorted(m.decode() for m in c.smembers(k))
                    for k in c.keys("_kombu.binding*")}
        self.write(case, {"kind": "task", "source": source, "raw": raw, "list": lists[0].decode("utf-8"),
                          "bindings": bindings, "expect": decode_task(raw)})
        return raw


def capture_celery(cap: Capturer, r: ThrowawayRedis):
    ver = celery.__version__
    app = Celery("capture", broker=r.url(0), backend=r.url(1))
    app.conf.task_serializer = "json"

    @app.task(name="tandem.add")
    def add(*args, **kwargs):  # never run: only published
        return None

    src = f"celery {ver} / kombu {kombu.__version__}"
    n = 0

    def tid():
        nonlocal n
        n += 1
        return fixed_id(n)

    cap.task("p2-basic", f"{src} apply_async(args=[1, 2], kwargs={{'z': 'héllo ☃ 𝄞'}}, queue='default')",
             lambda: add.apply_async(args=[1, 2], kwargs={"z": "héllo ☃ 𝄞"}, queue="default", task_id=tid()))
    for pri in (0, 3, 6, 9):
        cap.task(f"p2-priority{pri}", f"{src} apply_async(priority={pri}, queue='default')",
                 lambda: add.apply_async(args=[1, 2], queue="default", priority=pri, task_id=tid()))
    eta = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    expires = dt.datetime(2030, 1, 3, 0, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    cap.task("p2-eta-expires", f"{src} apply_async(eta=2030-01-02T03:04:05.678901Z, expires=2030-01-03T00:00+02:00)",
             lambda: add.apply_async(args=[1, 2], queue="default", eta=eta, expires=expires, task_id=tid()))
    cap.task("p2-countdown-expires-seconds", f"{src} apply_async(countdown=60, expires=3600)",
             lambda: add.apply_async(args=[1, 2], queue="default", countdown=60, expires=3600, task_id=tid()))
    cap.task("p2-timelimit", f"{src} apply_async(time_limit=300, soft_time_limit=240.5)",
             lambda: add.apply_async(args=[1, 2], queue="default", time_limit=300, soft_time_limit=240.5,
                                     task_id=tid()))
    cap.task("p2-softonly", f"{src} apply_async(soft_time_limit=60)",
             lambda: add.apply_async(args=[1, 2], queue="default", soft_time_limit=60, task_id=tid()))
    for comp in ("gzip", "zlib"):
        cap.task(f"p2-{comp}", f"{src} apply_async(compression='{comp}')",
                 lambda: add.apply_async(args=[list(range(50)), "x" * 200], queue="default",
                                         compression=comp, task_id=tid()))
    typed = [dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC), dt.datetime(2024, 5, 6, 7, 8, 9),
             dt.date(2024, 5, 6), dt.time(7, 8, 9), decimal.Decimal("1.10"),
             uuid.UUID("12345678-1234-5678-1234-567812345678"), b"plain bytes", b"\xff\x00\x01"]
    cap.task("p2-typed-args", f"{src} apply_async(args=[datetime aware, datetime naive, date, time, Decimal, UUID, "
             "bytes utf-8, bytes binary])",
             lambda: add.apply_async(args=typed, kwargs={"when": typed[0], "big": 2**70, "neg": -5, "f": 1.5e-7},
                                     queue="default", task_id=tid()))
    cap.task("p2-other-queue", f"{src} apply_async(queue='gpu', routing_key='gpu')",
             lambda: add.apply_async(args=[1, 2], queue="gpu", routing_key="gpu", task_id=tid()))
    for i, name in enumerate(AIRFLOW_COMMAND_NAMES):
        short = ["execute-command", "provider-313-execute-command", "airflow26-execute-command"][i]
        cap.task(f"p2-{short}", f"{src} send_task('{name}', args=[argv], queue='default')",
                 lambda: app.send_task(name, args=[AIRFLOW_ARGV], queue="default", task_id=tid()))
    workload = json.dumps(sample_workload_dict())
    cap.task("p2-execute-workload-send-task", f"{src} send_task('execute_workload', args=[ExecuteTask JSON])",
             lambda: app.send_task("execute_workload", args=[workload], queue="default", task_id=tid()))

    # Redelivery: take the message without acking and let kombu restore it (as a dying consumer would).
    def redeliver():
        add.apply_async(args=[1, 2], queue="default", task_id=tid())
        with app.connection_for_write() as conn:
            ch = conn.default_channel
            msg = ch.basic_get("default", no_ack=False)
            assert msg is not None
            ch.qos.restore_unacked_once()
        # Restore re-pushes on the list the message came from (unacked hash entry removed).
    cap.task("p2-redelivered", f"{src} basic_get without ack, then qos.restore_unacked_once()", redeliver)

    # Protocol 1.
    app1 = Celery("capture1", broker=r.url(0), backend=r.url(1))
    app1.conf.task_protocol = 1
    cap.task("p1-basic", f"{src} task_protocol=1 send_task('tandem.add', args=[1, 2], kwargs={{'k': 'v'}})",
             lambda: app1.send_task("tandem.add", args=[1, 2], kwargs={"k": "v"}, queue="default", task_id=tid()))
    cap.task("p1-eta-expires-timelimit",
             f"{src} task_protocol=1 send_task(eta, expires, time_limit=30, soft_time_limit=20, priority=6)",
             lambda: app1.send_task("tandem.add", args=[1, 2], queue="default", eta=eta, expires=expires,
                                    time_limit=30, soft_time_limit=20, priority=6, task_id=tid()))
    cap.task("p1-execute-command", f"{src} task_protocol=1 send_task('execute_command', args=[argv])",
             lambda: app1.send_task("execute_command", args=[AIRFLOW_ARGV], queue="default", task_id=tid()))

    capture_pidbox(cap, app, r, src)
    capture_results(cap, app, r, src)
    capture_db_pickles(cap, src)


# The bytes SafePickle.dumps writes for these values (protocol 2, data opcodes only). The Swift tests
# check that SafePickle produces exactly these; here we check that celery's own database backend reads them.
DB_PICKLES = [
    ("SUCCESS", None, "80024e2e"),
    ("STARTED", {"pid": 4242, "hostname": "h"},
     "80027d2858030000007069644d92105808000000686f73746e616d65580100000068752e"),
    ("SUCCESS", [1, -1, 2**40, 1.5, "\u2603", True, {}],
     "80025d284b014affffffff8a08000000000001000047" "3ff80000000000005803000000e29883887d652e"),
]


def capture_db_pickles(cap: Capturer, src: str):
    """Store SafePickle bytes in celery_taskmeta.result (sqlite) and read them back through the backend."""
    db = tempfile.mktemp(suffix=".db", prefix="tandem-capture-")
    app = Celery("capturedb", backend=f"db+sqlite:///{db}")
    be = app.backend
    import sqlite3
    rows = []
    try:
        for n, (state, value, hexbytes) in enumerate(DB_PICKLES + [("FAILURE", None, None)]):
            tid = fixed_id(3000 + n)
            be.store_result(tid, None, state)
            con = sqlite3.connect(db)
            con.execute("update celery_taskmeta set result=? where task_id=?",
                        (bytes.fromhex(hexbytes) if hexbytes else None, tid))
            con.commit()
            con.close()
            meta = be.get_task_meta(tid)
            assert meta["status"] == state and meta["result"] == value, (meta, value)
            rows.append({"state": state, "hex": hexbytes, "reads_back_as": value})
    finally:
        if os.path.exists(db):
            os.unlink(db)
    cap.write("db-result-pickles", {"kind": "dbpickle",
                                    "source": f"{src} DatabaseBackend(db+sqlite).get_task_meta on rows whose "
                                              "result column holds these bytes (NULL for FAILURE)",
                                    "expect": rows})


def capture_pidbox(cap: Capturer, app: Celery, r: ThrowawayRedis, src: str):
    channel = "/0.celery.pidbox"
    for case, kwargs in (("pidbox-revoke-terminate", {"terminate": True}), ("pidbox-revoke", {})):
        ps = r.client.pubsub()
        ps.psubscribe("*")
        ps.get_message(timeout=1)  # subscription confirmation
        app.control.revoke(fixed_id(900), **kwargs)
        got = None
        deadline = time.time() + 5
        while time.time() < deadline:
            m = ps.get_message(timeout=1)
            if m and m["type"] == "pmessage":
                got = m
                break
        ps.close()
        assert got is not None, "no pidbox publish seen"
        raw = got["data"].decode("utf-8")
        env = json.loads(raw)
        body = json.loads(base64.b64decode(env["body"]))
        cap.write(case, {"kind": "pidbox", "source": f"{src} app.control.revoke({fixed_id(900)!r}, {kwargs})",
                         "raw": raw, "channel": got["channel"].decode(),
                         "expect": {"channel": channel, "method": body["method"], "arguments": body["arguments"],
                                    "destination": body.get("destination"), "body": body}})


def capture_results(cap: Capturer, app: Celery, r: ThrowawayRedis, src: str):
    be = app.backend
    rc = redis.Redis(host="127.0.0.1", port=r.port, db=1)
    rc.flushdb()

    def grab(case, tid, what):
        key = f"celery-task-meta-{tid}"
        raw = rc.get(key).decode("utf-8")
        cap.write(case, {"kind": "result", "source": f"{src} redis backend {what}", "raw": raw, "key": key,
                         "ttl": rc.ttl(key), "expect": json.loads(raw)})

    t = fixed_id(1001)
    be.store_result(t, None, "SUCCESS")
    grab("result-success", t, "store_result(id, None, 'SUCCESS')")
    t = fixed_id(1002)
    be.store_result(t, {"pid": 4242, "hostname": "celery@worker-1"}, "STARTED")
    grab("result-started", t, "store_result(id, {'pid': 4242, 'hostname': 'celery@worker-1'}, 'STARTED')")
    t = fixed_id(1003)
    try:
        raise ValueError("task exited with 1")
    except ValueError as e:
        be.mark_as_failure(t, e, traceback="Traceback (most recent call last):\nValueError: task exited with 1\n")
    grab("result-failure", t, "mark_as_failure(id, ValueError('task exited with 1'), traceback=...)")
    t = fixed_id(1004)
    be.mark_as_revoked(t, "revoked")
    grab("result-revoked", t, "mark_as_revoked(id, 'revoked')")


def sample_workload_dict() -> dict:
    """Same shape Airflow 3.3's ExecuteTask.model_dump_json() produces (checked against a real capture)."""
    return {
        "token": DUMMY_JWT,
        "dag_rel_path": "example_dag.py",
        "bundle_info": {"name": "dags-folder", "version": None},
        "log_path": "dag_id=example_dag/run_id=manual__2024-01-01T00:00:00+00:00/task_id=extract/attempt=1.log",
        "ti": {"id": TI_ID, "task_id": "extract", "dag_id": "example_dag",
               "run_id": "manual__2024-01-01T00:00:00+00:00", "try_number": 1,
               "dag_version_id": "01932e1a-0000-789a-bcde-0000000000ff", "map_index": -1, "hostname": None,
               "context_carrier": None, "queue": "default", "pool_slots": 1, "priority_weight": 1},
        "sentry_integration": "",
        "type": "ExecuteTask",
    }


def capture_airflow(cap: Capturer, r: ThrowawayRedis):
    home = tempfile.mkdtemp(prefix="tandem-airflow-home-")
    os.environ.update({
        "AIRFLOW_HOME": home,
        "AIRFLOW__CELERY__BROKER_URL": r.url(0),
        "AIRFLOW__CELERY__RESULT_BACKEND": r.url(1),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    })
    import airflow
    from airflow.executors import workloads
    from airflow.providers.celery import __version__ as provider_version
    from airflow.providers.celery.executors import celery_executor_utils as ceu

    src = (f"airflow {airflow.__version__} / providers-celery {provider_version} / celery {celery.__version__} "
           f"send_workload_to_executor")
    d = sample_workload_dict()
    ti = workloads.TaskInstanceDTO(**d["ti"], external_executor_id=fixed_id(2001))
    wl = workloads.ExecuteTask(token=d["token"], dag_rel_path=d["dag_rel_path"],
                               bundle_info=workloads.BundleInfo(**d["bundle_info"]), log_path=d["log_path"], ti=ti)
    key = ti.key
    results = []

    def publish():
        results.append(ceu.send_workload_to_executor((key, wl, "default", None)))
        res = results[-1][2]
        if isinstance(res, ceu.ExceptionWithTraceback):
            raise RuntimeError(res.traceback)
    raw = cap.task("airflow-execute-workload", f"{src}((key, ExecuteTask(...), 'default', None))", publish)
    # The provider must have used the pre-assigned external_executor_id as the Celery task id.
    assert json.loads(raw)["headers"]["id"] == fixed_id(2001)

    cb = workloads.ExecuteCallback(
        token=d["token"], dag_rel_path=d["dag_rel_path"], bundle_info=workloads.BundleInfo(**d["bundle_info"]),
        log_path="callbacks/example_dag/cb.log",
        callback=workloads.callback.CallbackDTO(id="01932e1a-0000-789a-bcde-0000000000cb",
                                                fetch_method="import_path",
                                                data={"path": "mymod.on_failure", "kwargs": {}}))

    def publish_cb():
        res = ceu.send_workload_to_executor((("cb",), cb, "default", None))[2]
        if isinstance(res, ceu.ExceptionWithTraceback):
            raise RuntimeError(res.traceback)
    try:
        cap.task("airflow-execute-callback", f"{src}((key, ExecuteCallback(...), 'default', None))", publish_cb)
    except Exception as e:  # the callback DTO shape differs across 3.x; the task vector is the one that matters
        print(f"capture-vectors:   skipped ExecuteCallback capture: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--airflow", action="store_true", help="capture via the Airflow celery provider")
    ap.add_argument("--out", default=str(ROOT / "Protocol" / "vectors"))
    opts = ap.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    r = ThrowawayRedis()
    try:
        prefix = "celery" + celery.__version__.replace(".", "")
        cap = Capturer(out, r, prefix)
        if opts.airflow:
            capture_airflow(cap, r)
        else:
            capture_celery(cap, r)
        print(f"capture-vectors: {len(cap.written)} vectors from celery {celery.__version__}")
    finally:
        r.stop()


if __name__ == "__main__":
    main()
