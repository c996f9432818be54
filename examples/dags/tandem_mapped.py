"""Dynamic task mapping: one mapped task expanded over a list produced upstream, then a reduce."""
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="tandem_mapped", schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["tandem"])
def tandem_mapped():
    @task
    def numbers():
        return [1, 2, 3, 4]

    @task
    def square(x: int):
        return x * x

    @task
    def total(values):
        s = sum(values)
        print(f"sum of squares = {s}")
        assert s == 30

    total(square.expand(x=numbers()))


tandem_mapped()
