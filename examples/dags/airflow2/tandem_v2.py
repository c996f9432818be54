"""Airflow 2.11 example (classic imports): parallel tasks, a failing task with a retry, a mapped task.
examples/dags/.airflowignore keeps Airflow 3 from parsing this folder."""
import os
import time
from datetime import datetime, timedelta

from airflow.decorators import dag, task


@dag(dag_id="tandem_v2", schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["tandem"])
def tandem_v2():
    @task
    def work(i: int):
        print(f"airflow2 task {i} in datacenter {os.environ.get('TANDEM_DC', '?')}")
        time.sleep(3)
        return i

    @task(retries=1, retry_delay=timedelta(seconds=2))
    def flaky():
        raise RuntimeError("this task fails on purpose")

    @task
    def square(x: int):
        return x * x

    for i in range(4):
        work.override(task_id=f"work_{i}")(i)
    flaky()
    square.expand(x=[1, 2, 3])


tandem_v2()
