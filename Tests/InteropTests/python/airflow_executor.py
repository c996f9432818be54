"""Airflow 3's own CeleryExecutor code (apache-airflow-providers-celery), driven by InteropTests in .venv/airflow.

The caller sets AIRFLOW_HOME (a scratch dir), AIRFLOW__CELERY__BROKER_URL and AIRFLOW__CELERY__RESULT_BACKEND,
exactly as an Airflow deployment would. One JSON object on stdin; the answer on stdout as one line
"TANDEM-RESULT <json>" (Airflow logs to stdout too).

    {"op": "publish", "token": JWT, "tasks": [{"dag_id", "task_id", "run_id", "via": "provider" | "send_task"}]}
        -> {"published": [{"celery_id", "via", "dag_id", "task_id", "run_id", "workload": JSON}], "versions": {...}}
       via "provider": celery_executor_utils.send_workload_to_executor((key, ExecuteTask, 'default', None)) — the
       function CeleryExecutor._send_workloads_to_celery calls — with a real workloads.ExecuteTask whose
       ti.external_executor_id is pre-assigned (the provider then uses it as the Celery task id).
       via "send_task": the provider's Celery app, send_task('execute_workload', args=[ExecuteTask JSON]).

    {"op": "fetch", "tasks": [{"celery_id", "dag_id", "task_id", "run_id"}]}
        -> {"backend_class", "fetch_method", "states": {celery_id: [state, info_repr]},
            "events": {celery_id: [TaskInstanceState or null, info_repr]}, "running_left": [...]}
       A real CeleryExecutor(): its BulkStateFetcher.get_many over AsyncResults (the method Airflow picks for
       the backend: _get_many_from_kv_backend for Redis, _get_many_from_db_backend for the database), then the
       executor's own update_task_state for each, and what that put in its event_buffer (success / failed).
"""
import json
import os
import platform
import sys
import uuid


def versions():
    import airflow
    import celery
    import kombu
    from airflow.providers.celery import __version__ as provider

    return {"airflow": airflow.__version__, "providers-celery": provider, "celery": celery.__version__,
            "kombu": kombu.__version__, "python": platform.python_version()}


def make_workload(t, token):
    from airflow.executors import workloads

    ti = workloads.TaskInstanceDTO(
        id=str(uuid.uuid4()), task_id=t["task_id"], dag_id=t["dag_id"], run_id=t["run_id"], try_number=1,
        dag_version_id=str(uuid.uuid4()), map_index=-1, hostname=None, context_carrier=None, queue="default",
        pool_slots=1, priority_weight=1, external_executor_id=str(uuid.uuid4()))
    return workloads.ExecuteTask(
        token=token, dag_rel_path=f"{t['dag_id']}.py", bundle_info=workloads.BundleInfo(name="dags-folder"),
        log_path=f"dag_id={t['dag_id']}/run_id={t['run_id']}/task_id={t['task_id']}/attempt=1.log", ti=ti)


def publish(req):
    from airflow.providers.celery.executors import celery_executor_utils as ceu

    out = []
    for t in req["tasks"]:
        wl = make_workload(t, req["token"])
        if t["via"] == "provider":
            key, _, result = ceu.send_workload_to_executor((wl.ti.key, wl, "default", None))
            if isinstance(result, ceu.ExceptionWithTraceback):
                raise SystemExit(f"send_workload_to_executor failed:\n{result.traceback}")
            if result.id != wl.ti.external_executor_id:
                raise SystemExit(f"provider did not use the pre-assigned id: {result.id}")
        else:
            app = ceu._get_celery_app_for_workload(None)
            result = app.send_task("execute_workload", args=[wl.model_dump_json()], queue="default")
        out.append({"celery_id": result.id, "via": t["via"], "dag_id": t["dag_id"], "task_id": t["task_id"],
                    "run_id": t["run_id"], "workload": wl.model_dump_json()})
    return {"published": out}


def fetch(req):
    from celery.result import AsyncResult

    from airflow.models.taskinstancekey import TaskInstanceKey
    from airflow.providers.celery.executors.celery_executor import CeleryExecutor

    executor = CeleryExecutor()
    fetcher = executor.bulk_state_fetcher
    backend = executor.celery_app.backend
    keys = {}
    for t in req["tasks"]:
        key = TaskInstanceKey(dag_id=t["dag_id"], task_id=t["task_id"], run_id=t["run_id"], try_number=1,
                              map_index=-1)
        keys[t["celery_id"]] = key
        # what _send_workloads does after a publish: remember the AsyncResult, mark the key running
        executor.workloads[key] = AsyncResult(t["celery_id"], app=executor.celery_app)
        executor.running.add(key)

    from celery.backends.base import BaseKeyValueStoreBackend
    from celery.backends.database import DatabaseBackend

    if isinstance(backend, BaseKeyValueStoreBackend):
        method = "_get_many_from_kv_backend"
    elif isinstance(backend, DatabaseBackend):
        method = "_get_many_from_db_backend"
    else:
        method = "_get_many_using_multiprocessing"

    states = fetcher.get_many(list(executor.workloads.values()))
    for celery_id, key in keys.items():
        state, info = states.get(celery_id, (None, None))
        if state:
            executor.update_task_state(key, state, info)
    events = {}
    for celery_id, key in keys.items():
        if key in executor.event_buffer:
            state, info = executor.event_buffer[key]
            events[celery_id] = [None if state is None else str(state.value if hasattr(state, "value") else state),
                                 repr(info)]
        else:
            events[celery_id] = [None, None]
    return {
        "backend_class": f"{type(backend).__module__}.{type(backend).__name__}",
        "fetch_method": method,
        "states": {k: [v[0], repr(v[1])] for k, v in states.items()},
        "events": events,
        "running_left": sorted(cid for cid, key in keys.items() if key in executor.running),
    }


def main():
    req = json.load(sys.stdin)
    for name in ("AIRFLOW_HOME", "AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND"):
        if not os.environ.get(name):
            raise SystemExit(f"{name} must be set")
    out = publish(req) if req["op"] == "publish" else fetch(req)
    out["versions"] = versions()
    # Airflow logs to stdout too: the result is the one line that starts with the marker.
    print("TANDEM-RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
