"""Parallel tasks: eight independent tasks, each sleeping a little (start latency is measured on this DAG)."""
import time
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="tandem_parallel", schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["tandem"])
def tandem_parallel():
    @task
    def work(i: int):
        print(f"parallel task {i} starting")
        time.sleep(3)
        print(f"parallel task {i} done")
        return i

    for i in range(8):
        work.override(task_id=f"work_{i}")(i)


tandem_parallel()
