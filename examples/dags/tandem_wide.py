"""Wide: 200 independent no-op tasks in one run (the executor race in scripts/e2e-airflow: how fast a whole run of
short tasks drains through Tandem vs a stock `airflow celery worker`)."""
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="tandem_wide", schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["tandem"],
     max_active_tasks=200)
def tandem_wide():
    @task
    def noop(i: int):
        return i

    noop.expand(i=list(range(200)))


tandem_wide()
