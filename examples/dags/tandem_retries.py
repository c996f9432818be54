"""A task that always fails, with one retry: ends `failed` after two tries; its downstream is `upstream_failed`."""
from datetime import datetime, timedelta

from airflow.sdk import dag, task


@dag(dag_id="tandem_retries", schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["tandem"])
def tandem_retries():
    @task(retries=1, retry_delay=timedelta(seconds=2))
    def flaky():
        raise RuntimeError("this task fails on purpose")

    @task
    def after():
        print("never runs")

    flaky() >> after()


tandem_retries()
