"""Airflow 2.11 end-to-end driver (run with the Airflow 2 venv, Airflow's env set by scripts/e2e-airflow).

Triggers tandem_v2, waits, checks task states from Airflow's own DB, and fetches a worker's log the way
Airflow 2's webserver does (FileTaskHandler's _fetch_logs_from_service: JWT signed with [webserver] secret_key).
"""
import json
import os
import statistics
import sys
import time

from airflow.api.common.trigger_dag import trigger_dag
from airflow.models import DagModel, DagRun, TaskInstance
from airflow.utils.session import create_session

FAILS = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILS.append(what)


def main():
    dag_id = "tandem_v2"
    end = time.time() + 180
    while time.time() < end:
        with create_session() as s:
            if s.query(DagModel).filter(DagModel.dag_id == dag_id).first():
                break
        time.sleep(2)
    else:
        raise SystemExit("tandem_v2 not parsed within 180 s")
    with create_session() as s:
        s.query(DagModel).filter(DagModel.dag_id == dag_id).update({"is_paused": False})
    run = trigger_dag(dag_id)
    run_id = run.run_id
    print("triggered", run_id, flush=True)

    live = None
    end = time.time() + 300
    state = None
    while time.time() < end:
        with create_session() as s:
            dr = s.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one()
            state = dr.state
            running = s.query(TaskInstance).filter(TaskInstance.run_id == run_id, TaskInstance.state == "running").all()
            if live is None and running:
                live = fetch(running[0])
        if state in ("success", "failed"):
            break
        time.sleep(1)
    check(live is not None and live[0] == 200,
          f"log of a RUNNING task fetched from the worker's :8793/log/ with Airflow 2's own signer ({live and live[0]})")
    check(state == "failed", f"run ends failed (flaky fails after its retry): {state}")
    with create_session() as s:
        tis = {(t.task_id, t.map_index): t for t in s.query(TaskInstance).filter(TaskInstance.run_id == run_id)}
        check(all(tis[(f"work_{i}", -1)].state == "success" for i in range(4)), "4 parallel tasks success")
        f = tis[("flaky", -1)]
        check(f.state == "failed" and f.try_number == 2, f"flaky failed after 2 tries ({f.state}, try {f.try_number})")
        sq = [t for (tid, _), t in tis.items() if tid == "square"]
        check(len(sq) == 3 and all(t.state == "success" for t in sq), "mapped task: 3 instances success")
        lat = sorted((t.start_date - t.queued_dttm).total_seconds() for t in tis.values() if t.start_date and t.queued_dttm)
        done = fetch(tis[("work_0", -1)])
    check(done[0] == 200 and "airflow2 task 0" in done[1], f"log of a FINISHED task from the worker's endpoint ({done[0]})")
    st = {"n": len(lat), "median_s": round(statistics.median(lat), 3), "max_s": round(max(lat), 3)} if lat else {}
    print("RESULT " + json.dumps({"check": "ok" if not FAILS else "failed", "failures": FAILS, "run_state": state,
                                  "latency": st}), flush=True)
    return 0 if not FAILS else 1


def fetch(ti):
    from airflow.configuration import conf
    from airflow.utils.log.file_task_handler import FileTaskHandler, _fetch_logs_from_service

    h = FileTaskHandler(base_log_folder=conf.get("logging", "base_log_folder"))
    rel = h._render_filename(ti, ti.try_number)
    url = f"http://{ti.hostname}:{conf.get('logging', 'worker_log_server_port')}/log/{rel}"
    r = _fetch_logs_from_service(url, rel)
    return r.status_code, r.text


if __name__ == "__main__":
    sys.exit(main())
