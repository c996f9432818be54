"""Callbacks: a task-level on_failure_callback (runs in the task process on the worker) and DAG-level
on_success_callback / on_failure_callback (run by Airflow's dag-processor). Each writes a marker file into
$TANDEM_E2E_MARKERS (default /tmp) so the end-to-end test can see it ran."""
import os
from datetime import datetime

from airflow.sdk import dag, task


def _mark(name):
    d = os.environ.get("TANDEM_E2E_MARKERS", "/tmp")
    with open(os.path.join(d, name), "w") as f:
        f.write(datetime.now().isoformat())


def task_failed(context):
    _mark(f"task_failure_callback.{context['ti'].task_id}")


def dag_succeeded(context):
    _mark("dag_success_callback")


def dag_failed(context):
    _mark("dag_failure_callback")


@dag(
    dag_id="tandem_callback", schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["tandem"],
    on_success_callback=dag_succeeded, on_failure_callback=dag_failed,
)
def tandem_callback():
    @task(on_failure_callback=task_failed)
    def fails():
        raise ValueError("failing to trigger the task callback")

    @task(trigger_rule="all_done")
    def cleanup():
        print("cleanup runs after the failure")

    fails() >> cleanup()


tandem_callback()
