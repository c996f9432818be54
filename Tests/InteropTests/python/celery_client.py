"""The stock Celery client, configured the way Airflow's CeleryExecutor configures it, driven by InteropTests.

Runs under any of the repo's venvs (.venv/celery56, .venv/celery57, .venv/airflow). One JSON object on stdin;
the answer on stdout as one line "TANDEM-RESULT <json>", which Swift asserts on.

    {"op": "publish", "broker": URL, "backend": URL, "tasks": [{"name": NAME, "args": [...]}, ...]}
        -> {"ids": [...], "versions": {...}}
       app.send_task(NAME, args=ARGS, queue='default') for each task, in order.

    {"op": "read", "broker": URL, "backend": URL, "ids": [...], "get_timeout": SECONDS}
        -> {"results": {ID: {"state", "status", "get": {"type", "repr", "error"}, "get_propagate"}}, "versions": {...}}
       AsyncResult(id, app=app).state / .status, then .get(timeout=..., propagate=False) (not for PENDING), and
       for a FAILURE what a plain .get() raises ("get_propagate": "module.Type: message").

    {"op": "publish-and-get", "broker": URL, "backend": URL, "tasks": [...], "get_timeout": SECONDS}
        -> {"ids": [...], "results": {ID: {"state_before_get", "state", "status", "get": {...}, "seconds"}}}
       Publishes each task and blocks in .get() right away, while that task is still running. With the Redis backend
       .get() learns the outcome only from the PUBLISH on celery-task-meta-<id> (it reads the key once at the
       start and then only listens), so a result written without PUBLISH makes it time out.

    {"op": "kombu-restore", "broker": URL, "backend": URL, "lists": [NAME, ...]}
        -> {"restored": N, "lists": {NAME: [element, ...]}}
       kombu's own restore (QoS.restore_by_tag, what a Celery worker does for a reservation past
       visibility_timeout) of every entry in the broker's `unacked` hash; then each named list, as stored.
"""
import json
import platform
import sys
import time

import celery
import kombu
from celery import Celery
from celery.result import AsyncResult


def airflow_like_app(broker, backend):
    # The keys and values of airflow.providers.celery.executors.default_celery.DEFAULT_CELERY_CONFIG
    # (provider 3.26) with Airflow's defaults: queue 'default', acks late, track started, 24 h visibility.
    config = {
        "accept_content": ["json"],
        "event_serializer": "json",
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_default_queue": "default",
        "task_default_exchange": "default",
        "task_track_started": True,
        "broker_url": broker,
        "broker_transport_options": {"visibility_timeout": 86400} if broker.startswith("redis") else {},
        "broker_connection_retry_on_startup": True,
        "result_backend": backend,
        "result_backend_transport_options": {},
        "database_engine_options": {},
        "worker_concurrency": 16,
        "worker_enable_remote_control": True,
    }
    return Celery("airflow.providers.celery.executors.celery_executor", config_source=config)


def describe_get(r, timeout):
    try:
        value = r.get(timeout=timeout, propagate=False)
        return {"type": type(value).__name__, "repr": repr(value), "error": None}
    except Exception as e:  # a timeout or a decoding error: the test shows it
        return {"type": None, "repr": None, "error": f"{type(e).__name__}: {e}"}


def read_one(app, task_id, timeout):
    r = AsyncResult(task_id, app=app)
    out = {}
    try:
        out["state"] = r.state
        out["status"] = r.status
    except Exception as e:
        out["state"] = out["status"] = None
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    if timeout is not None and out["state"] != "PENDING":  # an unknown id would only wait out the timeout
        out["get"] = describe_get(r, timeout)
    if out["state"] == "FAILURE":
        # what a plain `.get()` (propagate=True, the default) raises for this FAILURE
        try:
            AsyncResult(task_id, app=app).get(timeout=timeout or 5)
            out["get_propagate"] = None
        except Exception as e:
            out["get_propagate"] = f"{type(e).__module__}.{type(e).__name__}: {e}"
    return out


def main():
    req = json.load(sys.stdin)
    app = airflow_like_app(req["broker"], req["backend"])
    out = {"versions": {"celery": celery.__version__, "kombu": kombu.__version__,
                        "python": platform.python_version()}}
    op = req["op"]
    if op == "publish":
        out["ids"] = [app.send_task(t["name"], args=t["args"], queue="default").id for t in req["tasks"]]
    elif op == "publish-and-get":
        # one task at a time, so each .get() starts while its own task is still running
        out["ids"], out["results"] = [], {}
        for t in req["tasks"]:
            r = app.send_task(t["name"], args=t["args"], queue="default")
            before = AsyncResult(r.id, app=app).state
            started = time.monotonic()
            got = describe_get(AsyncResult(r.id, app=app), req["get_timeout"])
            seconds = round(time.monotonic() - started, 3)
            after = AsyncResult(r.id, app=app)
            out["ids"].append(r.id)
            out["results"][r.id] = {"state_before_get": before, "get": got, "seconds": seconds,
                                    "state": after.state, "status": after.status}
    elif op == "kombu-restore":
        with app.connection_for_write() as conn:
            ch = conn.default_channel
            client = ch.client
            tags = client.hkeys(ch.unacked_key)
            for tag in tags:
                ch.qos.restore_by_tag(tag, client)
            out["restored"] = len(tags)
            out["lists"] = {n: [v.decode() for v in client.lrange(n, 0, -1)] for n in req["lists"]}
    elif op == "read":
        out["results"] = {i: read_one(app, i, req.get("get_timeout")) for i in req["ids"]}
    else:
        raise SystemExit(f"unknown op {op!r}")
    # under the airflow venv log lines share stdout: the answer is the line that starts with the marker
    print("TANDEM-RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
