#!/usr/bin/env python3
"""Tandem's Airflow runner: imports Airflow once, then runs each task in a child forked from it.

Airflow 3 workloads run in pooled children that stay up for many tasks, as a Celery pool child does (Airflow's
supervisor forks the task's own process for every task, so each task still starts fresh); a fresh fork per
workload costs every task the copy-on-write of the runner's heap. Airflow 2 commands (which run the task inside
the child, as the Celery provider's _execute_in_fork does) get a fresh fork each.

The Swift worker starts this process and talks to it over a Unix socket with one JSON object per line
(Protocol/RUNNER.md). The runner never writes a workload, its token or a task's environment to argv or to a log.

    tandem_runner.py --connect /path/to/socket     # the worker listens, the runner connects
    tandem_runner.py --once-json-path FILE         # run one Airflow 3 workload in this process (spawn mode)

Exit codes of a task child (what the worker maps to Celery states):
    0   the workload ran (Airflow 3: the task reported its own state through the Execution API) -> SUCCESS
    1   infrastructure failure (bad workload, supervisor crashed, API unreachable, ...)            -> FAILURE
    75  TaskAlreadyRunningError: the API answered 409, the TI runs elsewhere                       -> ack, no result
    77  the Execution API refused the token (401/403, e.g. expired): the task never started        -> FAILURE
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
import weakref

PROTOCOL_VERSION = 1
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_ALREADY_RUNNING = 75  # EX_TEMPFAIL
EXIT_TOKEN_REFUSED = 77  # EX_NOPERM

PR_SET_PDEATHSIG = 1
ALL_SIGNALS = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}


def _set_pdeathsig(sig: int) -> None:
    """The child dies with SIGKILL when the runner dies, so no task outlives its supervisor unseen."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except Exception:
        pass


def _stderr(msg: str) -> None:
    try:
        sys.stderr.write(f"tandem-runner[{os.getpid()}]: {msg}\n")
        sys.stderr.flush()
    except Exception:
        pass


# --------------------------------------------------------------------------------------------------------------
# What a child runs


def _airflow_version() -> str:
    try:
        from airflow import __version__

        return __version__
    except Exception:
        return ""


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def _classify_exception(e: BaseException) -> int:
    """Maps an exception from Airflow's supervisor to the runner's exit codes."""
    try:
        from airflow.sdk.exceptions import TaskAlreadyRunningError

        if isinstance(e, TaskAlreadyRunningError):
            return EXIT_ALREADY_RUNNING
    except Exception:
        pass
    # ServerResponseError (httpx-based) carries the response; 401/403 mean the token was refused.
    cur: BaseException | None = e
    seen = 0
    while cur is not None and seen < 8:
        resp = getattr(cur, "response", None)
        status = getattr(resp, "status_code", None)
        if status in (401, 403):
            return EXIT_TOKEN_REFUSED
        if status == 409:
            detail = getattr(cur, "detail", None)
            if isinstance(detail, dict) and detail.get("previous_state") == "running":
                return EXIT_ALREADY_RUNNING
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return EXIT_FAILURE


class _ExitWatch:
    """A pidfd in the supervisor's selector: readable the moment the task process exits."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_task_fork_parent = None  # this process's pid once it runs an Airflow 3 supervisor; its forks die with it


def _task_fork_child() -> None:
    """In a process the supervisor forked (Airflow's task process): die with the supervisor, then disarm, so the
    task's own forks (multiprocessing and the like) keep Python's usual behaviour."""
    global _task_fork_parent
    parent, _task_fork_parent = _task_fork_parent, None
    if parent is None:
        return
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before the death signal was set
        os.kill(os.getpid(), signal.SIGKILL)


def task_dies_with_supervisor() -> None:
    """Makes Airflow 3's task process die with its supervisor (this process).

    The supervisor forks the task's own process into a process group of its own, without a parent-death signal.
    Whatever stops the supervisor — the worker's SIGKILL to its process group (shutdown past the grace, revoke with
    terminate, a lost lease), the runner dying, the worker killed with -9 — left the task process running as an
    orphan: the user's code went on unsupervised, untracked, its result reported nowhere, and once the scheduler's
    heartbeat timeout retried the task, the retry ran beside it (scripts/e2e-airflow, E2E_ONLY_STOP=1, case L:
    58 s of the same task twice at once). With PR_SET_PDEATHSIG=SIGKILL set in the task process right after the
    fork, it dies with its supervisor, as the runner's own children die with the runner."""
    global _task_fork_parent
    if _task_fork_parent is None:
        _task_fork_parent = os.getpid()
        if not getattr(task_dies_with_supervisor, "_registered", False):
            os.register_at_fork(after_in_child=_task_fork_child)
            task_dies_with_supervisor._registered = True


def _test_supervise(req: dict) -> int:
    """Stands in for Airflow 3's supervisor (Swift tests only): with the hook run_workload_json arms, forks the
    "task process" into a process group of its own, as WatchedSubprocess.start does; it writes its pid to
    req["pidfile"] and sleeps, while this process waits for it."""
    task_dies_with_supervisor()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        with open(req["pidfile"] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(req["pidfile"] + ".tmp", req["pidfile"])
        time.sleep(float(req.get("seconds", 0)))
        os._exit(0)
    os.waitpid(pid, 0)
    return int(req.get("exit", 0))


def watch_task_exit() -> bool:
    """Makes Airflow 3's supervisor notice at once that its task process has exited.

    The supervisor learns of the exit only when a socket it watches has activity or its select() times out
    ([workers] min_heartbeat_interval, 5 s). The task process closes its sockets while exiting, a moment before
    its exit status exists; when the last EOF wins that race, the next select() has nothing left to watch and
    sleeps the whole 5 s with the task already done and its slot still taken (measured in the 200-task race:
    83 of 200 workloads took over 4.5 s this way here, 23 of 200 under a stock Celery worker). A pidfd of the
    task process in the same selector ends that wait when the process exits. Returns whether it is in place."""
    try:
        from airflow.sdk.execution_time import supervisor as sup
    except Exception:  # Airflow 2, or no Airflow: no supervisor to fix
        return False
    cls = getattr(sup, "WatchedSubprocess", None)
    original = getattr(cls, "_register_pipe_readers", None)
    if original is None or not hasattr(os, "pidfd_open"):
        return False
    if getattr(original, "_tandem_exit_watch", False):
        return True

    def register(self, *args, **kwargs):
        original(self, *args, **kwargs)
        try:
            watch = _ExitWatch(os.pidfd_open(self.pid))
        except (OSError, AttributeError):
            return  # as before: the select() timeout still catches the exit
        weakref.finalize(self, watch.close)  # if the supervisor stops before the exit, the fd goes with it
        # (handler, on_close) as the supervisor expects: not needed once readable; unwatch, then it is closed
        self.selector.register(watch, selectors.EVENT_READ, (lambda _w: False, self.selector.unregister))

    register._tandem_exit_watch = True
    cls._register_pipe_readers = register
    return True


def keep_process_titles() -> None:
    """Lets Airflow name its task processes in `ps` ("airflow worker -- <ti id>" in Airflow 3, "airflow task
    runner: ..." in Airflow 2). setproctitle finds the memory it may overwrite (argv and the environment strings laid
    out after it) on its first call; a pooled child rewrites its environment for every task, and a fresh child adds
    the task's variables, before Airflow's first call, so it found no room and every task process kept the runner's
    command line. Called once in the runner, while the environment is still as the kernel laid it out, the set-up
    is done and inherited by every child."""
    try:
        import setproctitle

        setproctitle.setproctitle(setproctitle.getproctitle())
    except Exception:  # not installed (Airflow depends on it): titles stay as they are, nothing else changes
        pass


def _test_title(req: dict) -> None:
    """The test kinds retitle their process as Airflow's task runner does, when asked to (Swift tests only)."""
    if req.get("title"):
        from setproctitle import setproctitle

        setproctitle(str(req["title"]))


def run_workload_json(data: str) -> int:
    """Runs one Airflow 3 workload in this process, exactly as the Celery provider's execute_workload does."""
    from pydantic import TypeAdapter

    watch_task_exit()
    task_dies_with_supervisor()

    version = _version_tuple(_airflow_version())
    try:
        if version >= (3, 3):
            from airflow.executors.base_executor import BaseExecutor
            from airflow.executors.workloads import ExecutorWorkload

            workload = TypeAdapter(ExecutorWorkload).validate_json(data)
            from airflow.configuration import conf

            to_stdout = conf.getboolean("logging", "task_logs_to_stdout", fallback=False)
            BaseExecutor.run_workload(workload, subprocess_logs_to_stdout=to_stdout)
        else:
            from airflow.configuration import conf
            from airflow.executors import workloads
            from airflow.sdk.execution_time.supervisor import supervise

            workload = TypeAdapter(workloads.All).validate_json(data)
            if not isinstance(workload, workloads.ExecuteTask):
                _stderr(f"this Airflow ({_airflow_version()}) cannot run a {type(workload).__name__} workload")
                return EXIT_FAILURE
            base_url = conf.get("api", "base_url", fallback="/")
            if base_url.startswith("/"):
                base_url = f"http://localhost:8080{base_url}"
            supervise(
                ti=workload.ti,
                dag_rel_path=workload.dag_rel_path,
                bundle_info=workload.bundle_info,
                token=workload.token,
                server=conf.get("core", "execution_api_server_url", fallback=f"{base_url.rstrip('/')}/execution/"),
                log_path=workload.log_path,
                subprocess_logs_to_stdout=conf.getboolean("logging", "task_logs_to_stdout", fallback=False),
            )
        # Like the Celery task: the supervisor's return value is the task's own exit, already reported to the
        # API; the message itself succeeded.
        return EXIT_OK
    except BaseException as e:  # noqa: BLE001 - the child must always exit with a mapped code
        code = _classify_exception(e)
        if code == EXIT_ALREADY_RUNNING:
            _stderr("task instance is already running elsewhere (409); this delivery is a duplicate")
        elif code == EXIT_TOKEN_REFUSED:
            _stderr("the Execution API refused the workload token (401/403: expired or invalid); task not started")
        else:
            _stderr(f"workload failed: {_safe_describe(e)}")
            if not _is_validation_error(e):
                # Raised after validation: frames and messages are Airflow's, which never render the token.
                traceback.print_exc(file=sys.stderr)
        return code


def _is_validation_error(e: BaseException) -> bool:
    return type(e).__name__ == "ValidationError" and hasattr(e, "errors")


def _safe_describe(e: BaseException) -> str:
    """pydantic's ValidationError prints the input (the workload, token included): describe it without it."""
    if _is_validation_error(e):
        try:
            errs = e.errors(include_input=False, include_url=False, include_context=False)
            parts = [f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in errs[:5]]
            return "workload JSON does not match this Airflow's schema: " + "; ".join(parts)
        except Exception:
            return "workload JSON does not match this Airflow's schema"
    return f"{type(e).__name__}: {e}"


def run_command(argv: list[str], celery_task_id: str | None) -> int:
    """Airflow 2: `airflow tasks run ...` in this process, as the provider's _execute_in_fork does."""
    if argv[:3] != ["airflow", "tasks", "run"]:
        _stderr("refusing a command that is not 'airflow tasks run'")
        return EXIT_FAILURE
    ret = EXIT_FAILURE
    try:
        from airflow.cli.cli_parser import get_parser

        parser = get_parser()
        args = parser.parse_args(argv[1:])
        args.shut_down_logging = False
        if celery_task_id:
            args.external_executor_id = celery_task_id
        try:
            from setproctitle import setproctitle

            setproctitle(f"airflow task supervisor: {argv}")
        except Exception:
            pass
        args.func(args)
        ret = EXIT_OK
    except SystemExit as e:
        ret = e.code if isinstance(e.code, int) else EXIT_FAILURE
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        ret = EXIT_FAILURE
    finally:
        try:
            from airflow.sentry import Sentry

            Sentry.flush()
        except Exception:
            pass
        try:
            import logging

            logging.shutdown()
        except Exception:
            pass
    return ret


# --------------------------------------------------------------------------------------------------------------
# The runner


def preload(modules: list[str]) -> list[str]:
    """Imports Airflow (and what a task needs) once, so forked children skip it. Returns what failed."""
    failed = []
    for name in modules:
        try:
            __import__(name)
        except Exception as e:  # a module missing in one Airflow version is fine
            failed.append(f"{name}: {type(e).__name__}")
    return failed


def warm() -> None:
    """Computes once, in the runner, what every task's supervisor would otherwise compute in its own child: the API
    client's SSL context (~50 ms: it loads the CA bundle), the host name and the user name (all cached by Airflow)."""
    try:
        from airflow.sdk.api import client

        client.Client._get_ssl_context_cached(client.API_SSL_CA_FILE_PATH, client.API_SSL_CERT_PATH)
        client.get_hostname()
        client.getuser()
    except Exception:  # another Airflow version: nothing to warm, nothing lost
        pass


DEFAULT_PRELOAD_3 = [
    "airflow",
    "airflow.configuration",
    "pydantic",
    "airflow.executors.base_executor",
    "airflow.executors.workloads",
    "airflow.sdk",
    "airflow.sdk.api.client",
    "airflow.sdk.execution_time.supervisor",
    "airflow.sdk.execution_time.task_runner",
    "airflow.sdk.execution_time.callback_supervisor",
    # what the task process imports to parse its DAG file: ~1 s of CPU per task when left to the task (py-spy
    # during the 200-task race: 72% of the task processes' samples), already imported in a Celery worker
    "airflow.dag_processing.dagbag",
    "airflow.providers.standard.operators.python",
    "airflow.providers.standard.operators.bash",
]
DEFAULT_PRELOAD_2 = [
    "airflow",
    "airflow.configuration",
    "airflow.cli.cli_parser",
    "airflow.cli.commands.task_command",
    "airflow.models",
    "airflow.models.dagbag",
    "airflow.operators.python",
    "airflow.operators.bash",
]


# A pooled child runs this many tasks, then is replaced (bounds whatever a task run leaves behind in it).
POOLED_TASKS_PER_CHILD = 100
# A pooled child idle this long exits (--pool-idle): each holds tens of MiB of copied heap, and a worker that
# waits (a standby datacenter, a quiet night) should not keep one per slot. The next task forks a fresh one.
DEFAULT_POOL_IDLE_SECONDS = 60.0


class Member:
    """A pooled child: takes one request at a time on `req_w`, answers the task's exit code on `res_r`."""

    def __init__(self, pid: int, req_w: int, res_r: int):
        self.pid, self.req_w, self.res_r = pid, req_w, res_r
        self.rid: str | None = None
        self.served = 0
        self.buf = b""
        self.idle_since = 0.0  # time.monotonic() when it last finished a task

    def dismiss(self) -> None:
        """EOF on its request pipe: it exits after its current task (none, when idle); reap() retires it."""
        os.close(self.req_w)
        self.req_w = -1


class Runner:
    def __init__(self, sock: socket.socket, output: str | None, allow_test: bool = False,
                 pool_idle: float = DEFAULT_POOL_IDLE_SECONDS):
        self.allow_test = allow_test
        self.pool_idle = pool_idle  # seconds; 0: pooled children never retire for being idle
        self.sock = sock
        self.output = output
        self.children: dict[int, str] = {}  # pid -> request id (fresh forks)
        self.members: dict[int, Member] = {}  # pid -> pooled child
        self.idle: list[Member] = []
        self.buf = b""
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def send(self, obj: dict) -> None:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except InterruptedError:
                continue
            view = view[n:]

    def serve(self) -> int:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # The worker owns shutdown: SIGTERM to the runner means "stop", children keep their own groups.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.sel.register(self.sock, selectors.EVENT_READ, "sock")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.send(
            {
                "event": "hello",
                "protocol": PROTOCOL_VERSION,
                "pid": os.getpid(),
                "airflow": _airflow_version(),
                "python": sys.version.split()[0],
            }
        )
        while True:
            for key, _ in self.sel.select(timeout=1.0):
                if isinstance(key.data, Member):
                    self.answered(key.data)
                elif key.data == "wake":
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                else:
                    try:
                        chunk = self.sock.recv(1 << 20)
                    except InterruptedError:
                        continue
                    if not chunk:
                        return 0  # the worker went away: stop (children die by PDEATHSIG)
                    self.buf += chunk
                    while b"\n" in self.buf:
                        line, self.buf = self.buf.split(b"\n", 1)
                        if line.strip():
                            self.handle(line)
            self.reap()
            self.retire_idle()

    def retire_idle(self) -> None:
        """Lets pooled children idle for longer than `pool_idle` exit (EOF on their request pipe); reap() retires
        them. `idle` is a stack (the last to finish serves next), so the longest idle sit at its bottom."""
        if self.pool_idle <= 0:
            return
        now = time.monotonic()
        while self.idle and now - self.idle[0].idle_since >= self.pool_idle:
            self.idle.pop(0).dismiss()

    def reap(self) -> None:
        while self.children or self.members:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            rid = self.children.pop(pid, None)
            member = self.members.pop(pid, None)
            if member is not None:
                self.retire(member)
                rid = member.rid  # None: it died idle (or was recycled); nothing to report
            if rid is None:
                continue
            if os.WIFSIGNALED(status):
                self.send({"event": "exit", "id": rid, "pid": pid, "signal": os.WTERMSIG(status)})
            else:
                self.send({"event": "exit", "id": rid, "pid": pid, "status": os.WEXITSTATUS(status)})

    def handle(self, line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError:
            self.send({"event": "error", "id": None, "message": "request is not JSON"})
            return
        op = req.get("op")
        rid = req.get("id")
        if op == "ping":
            self.send({"event": "pong", "id": rid, "running": len(self.children)})
            return
        if op != "run":
            self.send({"event": "error", "id": rid, "message": f"unknown op {op!r}"})
            return
        kind = req.get("kind")
        if kind not in ("workload", "command") and not (kind in ("test-sleep", "test-pooled-sleep") and self.allow_test):
            self.send({"event": "error", "id": rid, "message": f"unknown kind {kind!r}"})
            return
        if kind == "workload" or (kind == "test-pooled-sleep" and self.allow_test):
            self.run_pooled(rid, req)
            return
        # Signals stay blocked across fork until the child has default handlers: a SIGTERM sent to the new
        # process group at once must kill the task, not run the runner's Python handler inside the child.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, ALL_SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self.send({"event": "error", "id": rid, "message": f"fork failed: {e.strerror}"})
            return
        if pid == 0:
            self.child(req)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            os.setpgid(pid, pid)  # also done in the child; whichever runs first wins, both are fine
        except OSError:
            pass
        self.children[pid] = rid
        self.send({"event": "started", "id": rid, "pid": pid})

    # ---- pooled children

    def run_pooled(self, rid: str, req: dict) -> None:
        member = self.idle.pop() if self.idle else self.spawn_member()
        if member is None:
            self.send({"event": "error", "id": rid, "message": "fork failed: cannot start a pooled child"})
            return
        member.rid = rid
        member.served += 1
        try:
            os.write(member.req_w, (json.dumps(req, separators=(",", ":")) + "\n").encode())
        except OSError as e:  # it died between tasks: report, and let reap() retire it
            member.rid = None
            self.send({"event": "error", "id": rid, "message": f"pooled child {member.pid} is gone: {e.strerror}"})
            return
        self.send({"event": "started", "id": rid, "pid": member.pid})

    def spawn_member(self) -> Member | None:
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, ALL_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for fd in (req_r, req_w, res_r, res_w):
                os.close(fd)
            return None
        if pid == 0:
            os.close(req_w)
            os.close(res_r)
            for m in self.members.values():  # another child's pipes must not stay open in this one
                for fd in (m.req_w, m.res_r):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.member_loop(req_r, res_w)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(req_r)
        os.close(res_w)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        member = Member(pid, req_w, res_r)
        self.members[pid] = member
        self.sel.register(res_r, selectors.EVENT_READ, member)
        return member

    def answered(self, member: Member) -> None:
        try:
            chunk = os.read(member.res_r, 4096)
        except (BlockingIOError, InterruptedError):
            return
        if not chunk:  # it exited; reap() reports how
            self.sel.unregister(member.res_r)
            return
        member.buf += chunk
        while b"\n" in member.buf:
            line, member.buf = member.buf.split(b"\n", 1)
            rid, member.rid = member.rid, None
            if rid is not None:
                self.send({"event": "exit", "id": rid, "pid": member.pid, "status": int(line or b"1")})
            if member.served >= POOLED_TASKS_PER_CHILD:
                member.dismiss()
            else:
                member.idle_since = time.monotonic()
                self.idle.append(member)

    def retire(self, member: Member) -> None:
        if member in self.idle:
            self.idle.remove(member)
        try:
            self.sel.unregister(member.res_r)
        except (KeyError, ValueError):
            pass
        for fd in (member.req_w, member.res_r):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def member_loop(self, req_r: int, res_w: int) -> None:
        """A pooled child: set up once like a fresh child, then one task per request line until EOF."""
        code = EXIT_FAILURE
        try:
            self.become_task_process()
            base_env = dict(os.environ)
            import random

            with os.fdopen(req_r, "rb", buffering=0) as requests:
                for line in iter(requests.readline, b""):
                    req = json.loads(line)
                    os.environ.clear()  # nothing of the previous task's environment carries over
                    os.environ.update(base_env)
                    for k, v in (req.get("env") or {}).items():
                        os.environ[str(k)] = str(v)
                    random.seed()
                    if req["kind"] == "workload":
                        code = run_workload_json(req["workload"])
                    else:  # test-pooled-sleep (only with --allow-test-kinds)
                        print(f"test-pooled-sleep pid={os.getpid()} env={sorted(k for k in req.get('env') or {})} "
                              f"X={os.environ.get('X')}", flush=True)
                        _test_title(req)
                        if req.get("pidfile"):
                            code = _test_supervise(req)
                        else:
                            time.sleep(float(req.get("seconds", 0)))
                            code = int(req.get("exit", 0))
                    code = code if isinstance(code, int) and 0 <= code < 256 else EXIT_FAILURE
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    except Exception:
                        pass
                    os.write(res_w, f"{code}\n".encode())
            code = EXIT_OK
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            code = EXIT_FAILURE
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:
                pass
            os._exit(code)

    def become_task_process(self) -> None:
        """What every child does first: its own process group, dies with the runner, default signal handling,
        none of the runner's descriptors, stdin from /dev/null."""
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        _set_pdeathsig(signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)
        # a signal mask inherited from the worker would make SIGTERM (revoke, time limits) pend forever
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        self.sel.close()
        self.sock.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)

    def child(self, req: dict) -> None:
        code = EXIT_FAILURE
        try:
            self.become_task_process()
            for k, v in (req.get("env") or {}).items():
                os.environ[str(k)] = str(v)
            import random

            random.seed()
            if req["kind"] == "workload":
                code = run_workload_json(req["workload"])
            elif req["kind"] == "test-sleep":  # only with --allow-test-kinds (the Swift tests)
                print(f"test-sleep env={sorted(k for k in req.get('env') or {})}", flush=True)
                _test_title(req)
                time.sleep(float(req.get("seconds", 0)))
                code = int(req.get("exit", 0))
            else:
                code = run_command(list(req["argv"]), (req.get("env") or {}).get("external_executor_id"))
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            code = EXIT_FAILURE
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:
                pass
            os._exit(code if isinstance(code, int) and 0 <= code < 256 else EXIT_FAILURE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--connect", help="Unix socket the worker listens on")
    g.add_argument("--once-json-path", help="run one Airflow 3 workload from this file (spawn mode) and exit")
    p.add_argument("--preload", default=None, help="comma-separated modules to import before serving")
    p.add_argument("--no-preload", action="store_true", help="import nothing up front (tests)")
    p.add_argument("--pool-idle", type=float, default=DEFAULT_POOL_IDLE_SECONDS, metavar="SECONDS",
                   help="a pooled child idle this long exits; the next task forks a new one (0: never)")
    p.add_argument("--allow-test-kinds", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.once_json_path:
        with open(args.once_json_path) as f:
            data = f.read()
        return run_workload_json(data)

    _set_pdeathsig(signal.SIGKILL)  # the worker dies -> the runner dies -> its children die
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the worker may block signals it handles itself
    started = time.monotonic()
    if not args.no_preload:
        if args.preload is not None:
            mods = [m for m in args.preload.split(",") if m]
        else:
            v = _version_tuple(_airflow_version())
            mods = DEFAULT_PRELOAD_3 if v >= (3,) else DEFAULT_PRELOAD_2
        failed = preload(mods)
        if failed:
            _stderr("preload skipped: " + "; ".join(failed))
        try:
            # No database connection must be shared with forked children.
            from airflow import settings

            if getattr(settings, "engine", None) is not None:
                settings.engine.dispose()
        except Exception:
            pass
        warm()
    # Every child would otherwise pay for the runner's whole heap: the first garbage collection in a forked child
    # touches every object, so copy-on-write copies every page (measured: ~330 ms of CPU per task with Airflow 3
    # imported, 13 ms with the heap frozen). A Celery pool child pays that once; a fork per task must not.
    keep_process_titles()
    gc.collect()
    gc.freeze()
    _stderr(f"ready in {time.monotonic() - started:.2f}s (airflow {_airflow_version() or 'not importable'})")

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for attempt in range(50):
        try:
            sock.connect(args.connect)
            break
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED) or attempt == 49:
                _stderr(f"cannot connect to {args.connect}: {e.strerror}")
                return 2
            time.sleep(0.1)
    return Runner(sock, None, allow_test=args.allow_test_kinds, pool_idle=args.pool_idle).serve()


if __name__ == "__main__":
    sys.exit(main())
