"""The Celery peer: a Celery 5.6 app configured exactly as Airflow's CeleryExecutor configures it
(airflow/providers/celery/executors/default_celery.py), with one task, `execute_command`, that runs the argv
the way the provider's `_execute_in_subprocess` does (subprocess with env external_executor_id, non-zero
exit raises). The `airflow` it runs is Benchmarks' no-op executable, found on PATH.

Run: BENCH_BROKER=redis://... BENCH_BACKEND=db+postgresql://... celery -A benchapp worker -O fair \
       --queues default --pool prefork --concurrency N --loglevel WARNING
"""
import os
import subprocess
import sys

from celery import Celery

broker = os.environ["BENCH_BROKER"]
backend = os.environ["BENCH_BACKEND"]

app = Celery("airflow.providers.celery.executors.celery_executor")
app.config_from_object({
    "accept_content": ["json"],
    "event_serializer": "json",
    "worker_prefetch_multiplier": 1,
    "task_acks_late": True,
    "task_default_queue": "default",
    "task_default_exchange": "default",
    "task_track_started": True,
    "broker_url": broker,
    "broker_transport_options": {"visibility_timeout": 86400},
    "broker_connection_retry_on_startup": True,
    "result_backend": backend,
    "result_backend_transport_options": {},
    "database_engine_options": {},
    "worker_concurrency": int(os.environ.get("BENCH_CONCURRENCY", "16")),
    "worker_enable_remote_control": True,
})


class CommandFailed(Exception):
    pass


@app.task(name="execute_command")
def execute_command(command_to_exec):
    """What the provider's execute_command does for Airflow 2 commands run in a new interpreter."""
    if command_to_exec[:3] != ["airflow", "tasks", "run"]:
        raise ValueError(f"not an airflow tasks run command: {command_to_exec}")
    celery_task_id = execute_command.request.id
    env = os.environ.copy()
    if celery_task_id:
        env["external_executor_id"] = celery_task_id
    rc = subprocess.run(command_to_exec, check=False, stderr=sys.__stderr__, stdout=sys.__stdout__,
                        close_fds=True, env=env).returncode
    if rc != 0:
        raise CommandFailed(f"Celery command failed with celery_task_id {celery_task_id} (return code {rc})")
