"""A task on queue `west_only`, which the routing policy pins to the west datacenter (examples/policies/e2e.yaml).
It records where it ran so the end-to-end test can check the datacenter."""
import os
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="tandem_pinned", schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["tandem"])
def tandem_pinned():
    @task(queue="west_only")
    def pinned():
        dc = os.environ.get("TANDEM_DC", "?")
        print(f"ran in datacenter {dc}")
        if dc != "west":
            raise RuntimeError(f"pinned to west but ran in {dc}")

    @task
    def anywhere():
        print(f"ran in datacenter {os.environ.get('TANDEM_DC', '?')}")

    pinned() >> anywhere()


tandem_pinned()
