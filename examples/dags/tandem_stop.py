"""Worker-stop DAGs for scripts/e2e-airflow's stop phase (E2E_ONLY_STOP=1): one long task on the `stop_east`
queue (pinned to east, falling back to west: examples/policies/e2e.yaml), stopped under its worker while it runs.

tandem_stop_r0 has no retry, tandem_stop_r1 one. The task writes a tick line per second to a file of its own in
$TANDEM_E2E_MARKERS/stop/ (pid, parent pid, datacenter, try) without going through Airflow's supervisor, so the
phase can tell whether the task's own process outlived its supervisor and whether two copies ever ran at once.
"""
import os
import time
from datetime import datetime, timedelta

from airflow.sdk import dag, task

SECONDS = int(os.environ.get("TANDEM_E2E_STOP_SECONDS", "30"))


def _ticks_path(ti):
    base = os.environ.get("TANDEM_E2E_MARKERS", "/tmp")
    d = os.path.join(base, "stop")
    os.makedirs(d, exist_ok=True)
    run = "".join(c if c.isalnum() else "_" for c in ti.run_id)
    return os.path.join(d, f"{ti.dag_id}.{run}.try{ti.try_number}.{os.getpid()}.ticks")


def _make(dag_id, retries):
    @dag(dag_id=dag_id, schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["tandem", "stop"])
    def stop_dag():
        @task(queue="stop_east", retries=retries, retry_delay=timedelta(seconds=5))
        def long(ti=None):
            dc = os.environ.get("TANDEM_DC", "?")
            path = _ticks_path(ti)
            print(f"stop task starting: try {ti.try_number} pid {os.getpid()} ppid {os.getppid()} dc {dc}", flush=True)
            with open(path, "a", buffering=1) as f:
                for i in range(SECONDS):
                    # a file of its own, not the supervisor's log socket: written even once the supervisor is gone
                    f.write(f"{time.time():.3f} {os.getpid()} {os.getppid()} {dc} {ti.try_number} {i}\n")
                    time.sleep(1)
                f.write(f"{time.time():.3f} {os.getpid()} {os.getppid()} {dc} {ti.try_number} done\n")
            print(f"stop task done: try {ti.try_number} pid {os.getpid()} dc {dc}", flush=True)

        long()

    return stop_dag()


_make("tandem_stop_r0", 0)
_make("tandem_stop_r1", 1)
