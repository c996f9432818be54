#!/usr/bin/env python3
"""Tandem vs a real Celery 5.6 worker, in turn, on the same throwaway Redis and Postgres, with the same tasks.

Started by Benchmarks/run (which builds the no-op `airflow` and the release binaries); see BENCHMARKS.md.
Every number printed is a median over --reps repetitions. Nothing here asserts on wall-clock time.
"""
import argparse
import collections
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid

import psycopg2
import redis as redislib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = os.path.join(ROOT, "Sources", "TandemRedis", "Scripts")
ARGV = ["airflow", "tasks", "run", "bench_dag", "noop", "RUN", "--local"]


def diag_parser(tasks):
    """The options every diagnostic script takes; each adds its own."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--conc", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=tasks)
    ap.add_argument("--noop", default="glibc", choices=["glibc", "bare"])
    return ap


def diag_args(opts, prefix):
    """What bench's System classes take, for a diagnostic script (diag_*.py) run from this tree with --bin and
    --noop: logs go to results/raw/<prefix>-<time>/."""
    noop = os.path.join(HERE, "bin", opts.noop, "airflow")
    if not os.access(noop, os.X_OK):
        # without it every task fails with "airflow not found" and the script would wait for SUCCESS forever
        sys.exit(f"{noop} is missing: run `Benchmarks/run --help` once, which builds the no-ops (needs gcc)")
    logdir = os.path.join(HERE, "results", "raw", prefix + "-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(logdir, exist_ok=True)
    return types.SimpleNamespace(bin=os.path.abspath(opts.bin), noop_dir=os.path.join(HERE, "bin"), src=ROOT,
                                 logdir=logdir, noop=opts.noop)


PROXY_PORT_OFFSET = 2000
# the backlog scenario's concurrency; a backlog no larger than this runs all at once and has no steady rate
BACKLOG_SLOTS = 16


def start_delay_proxy(srv, delay_ms):
    """delayproxy.py in front of `srv`'s Redis and Postgres, on their ports + PROXY_PORT_OFFSET, `delay_ms` each
    way; returns once it listens (terminate() it when done)."""
    proxy = subprocess.Popen([sys.executable, os.path.join(HERE, "delayproxy.py"),
                              str(srv.rport + PROXY_PORT_OFFSET), str(srv.rport), str(delay_ms),
                              str(srv.pport + PROXY_PORT_OFFSET), str(srv.pport), str(delay_ms)],
                             stdout=subprocess.PIPE, start_new_session=True)
    proxy.stdout.readline()
    return proxy


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ distance
NETNS, HOST_IP, NS_IP = "tandem-bench", "10.77.0.1", "10.77.0.2"


def netns_up(delay_ms):
    """A network namespace joined to the host by a veth pair with `delay_ms` of netem delay each way
    (RTT = 2 x delay_ms) for the workers; Redis and Postgres also listen on the host end."""
    netns_down()
    sh = lambda *a: subprocess.run(list(a), check=True)
    sh("ip", "netns", "add", NETNS)
    sh("ip", "link", "add", "tb-host", "type", "veth", "peer", "name", "tb-ns")
    sh("ip", "link", "set", "tb-ns", "netns", NETNS)
    sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", "tb-host")
    sh("ip", "link", "set", "tb-host", "up")
    sh("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NS_IP}/24", "dev", "tb-ns")
    sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "tb-ns", "up")
    sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")
    sh("tc", "qdisc", "add", "dev", "tb-host", "root", "netem", "delay", f"{delay_ms}ms")
    sh("ip", "netns", "exec", NETNS, "tc", "qdisc", "add", "dev", "tb-ns", "root", "netem", "delay", f"{delay_ms}ms")


def netns_down():
    subprocess.run(["ip", "link", "del", "tb-host"], stderr=subprocess.DEVNULL)
    subprocess.run(["ip", "netns", "del", NETNS], stderr=subprocess.DEVNULL)


# ----------------------------------------------------------------------------------------------- servers
def make_test_certificates(d):
    """A throwaway CA and a server certificate for 127.0.0.1 it signs, in `d`; returns the CA file."""
    def run(*argv):
        subprocess.run(["openssl", *argv], check=True, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=tandem-bench-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=bench")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.crt", "-days", "2", "-extfile", "server.ext")
    return os.path.join(d, "ca.crt")


class Servers:
    """redis-server (AOF on, appendfsync everysec) and Postgres 15 (defaults: fsync on, synchronous_commit on)
    on loopback under a temp dir; removed on exit."""

    def __init__(self, redis_port, pg_port, extra_ip=None, tls=False):
        self.rport, self.pport, self.extra_ip = redis_port, pg_port, extra_ip
        # tls: Redis also listens with TLS on rport + 1 (certificates made with openssl), and Tandem's processes
        # connect there (rediss://); publishers and inspection keep the plain port
        self.tls_port = redis_port + 1 if tls else None
        self.dir = tempfile.mkdtemp(prefix="tandem-bench-")
        os.chmod(self.dir, 0o755)
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.pg_bin = self._pg_bin()

    def client_ports(self):
        """{local port: clients} of Redis's connected clients but the one asking (CLIENT LIST laddr)."""
        r = self.r()
        me = r.client_id()
        return collections.Counter(int(cl["laddr"].rsplit(":", 1)[1]) for cl in r.client_list() if int(cl["id"]) != me)

    def broker_url(self, host="127.0.0.1", port_offset=0, tls=False):
        """The Redis URL a worker uses: plain, or (tls) rediss:// on the TLS port trusting the throwaway CA, in
        kombu's URL form, which Celery and Tandem both read."""
        if not tls:
            return f"redis://{host}:{self.rport + port_offset}/0"
        if not self.tls_port:
            raise RuntimeError("a TLS run needs Servers(..., tls=True)")
        query = f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca_file}" + ("" if host == "127.0.0.1" else "&ssl_check_hostname=false")
        return f"rediss://{host}:{self.tls_port + port_offset}/0" + query

    @staticmethod
    def _pg_bin():
        for v in ("17", "16", "15", "14", "13"):
            d = f"/usr/lib/postgresql/{v}/bin"
            if os.path.exists(f"{d}/initdb"):
                return d
        return os.path.dirname(shutil.which("initdb"))

    def _as_pg(self, argv, **kw):
        if os.getuid() == 0:
            argv = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"] + argv
        return subprocess.run(argv, check=True, **kw)

    def start(self):
        rd = os.path.join(self.dir, "redis")
        os.makedirs(rd)
        tls_args = []
        if self.tls_port:
            self.ca_file = make_test_certificates(rd)
            tls_args = ["--tls-port", str(self.tls_port), "--tls-cert-file", f"{rd}/server.crt",
                        "--tls-key-file", f"{rd}/server.key", "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no"]
        subprocess.run(["redis-server", "--port", str(self.rport), "--dir", rd,
                        "--daemonize", "yes", "--bind", "127.0.0.1" + (f" {self.extra_ip}" if self.extra_ip else ""), "--pidfile", f"{rd}/redis.pid", "--logfile", f"{rd}/redis.log",
                        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "no"] + tls_args,
                       check=True)
        pd = os.path.join(self.dir, "pg")
        os.makedirs(pd)
        if os.getuid() == 0:
            shutil.chown(pd, "postgres", "postgres")
        self._as_pg([f"{self.pg_bin}/initdb", "-D", f"{pd}/data", "-U", "postgres", "-A", "trust", "-E", "UTF8",
                     "--locale=C"], stdout=subprocess.DEVNULL)
        if self.extra_ip:
            with open(f"{pd}/data/pg_hba.conf", "a") as f:
                f.write(f"host all all {self.extra_ip.rsplit('.', 1)[0]}.0/24 trust\n")
        # production defaults: fsync=on, synchronous_commit=on, full_page_writes=on
        self._as_pg([f"{self.pg_bin}/pg_ctl", "-D", f"{pd}/data", "-l", f"{pd}/postgres.log", "-w", "-t", "60",
                     "-o", f"-p {self.pport} -c listen_addresses=127.0.0.1{',' + self.extra_ip if self.extra_ip else ''} -c unix_socket_directories={pd} "
                           f"-c max_connections=300", "start"], stdout=subprocess.DEVNULL)
        self.pd = pd
        for _ in range(100):
            try:
                self.r().ping()
                break
            except Exception:
                time.sleep(0.05)
        c = psycopg2.connect(host="127.0.0.1", port=self.pport, user="postgres", dbname="postgres")
        c.autocommit = True
        for db in ("bench_celery", "bench_tandem", "bench_floor"):
            c.cursor().execute(f"CREATE DATABASE {db}")
        c.close()
        # the safe floor's results (Benchmarks/floor.c writes them; the latency floor's poller reads the table)
        c = self.pg("bench_floor")
        c.cursor().execute("CREATE TABLE floor_results (id BIGSERIAL PRIMARY KEY, task_id TEXT UNIQUE, status TEXT, "
                           "date_done TIMESTAMP)")
        c.close()
        log(f"servers: redis 127.0.0.1:{self.rport}, postgres 127.0.0.1:{self.pport} (fsync on) in {self.dir}")

    def stop(self):
        try:
            self.r().shutdown(nosave=True)
        except Exception:
            pass
        try:
            self._as_pg([f"{self.pg_bin}/pg_ctl", "-D", f"{self.pd}/data", "-m", "immediate", "-w", "stop"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def r(self):
        return redislib.Redis(host="127.0.0.1", port=self.rport, db=0)

    def pids(self):
        """Redis's pid and the postmaster's (its backends are its children)."""
        out = {}
        for name, path in (("redis", f"{self.dir}/redis/redis.pid"), ("postgres", f"{self.pd}/data/postmaster.pid")):
            try:
                with open(path) as f:
                    out[name] = int(f.readline())
            except (OSError, ValueError):
                pass
        return out

    def pg_url(self, db):
        return f"postgresql://postgres@127.0.0.1:{self.pport}/{db}"

    def pg(self, db):
        c = psycopg2.connect(host="127.0.0.1", port=self.pport, user="postgres", dbname=db)
        c.autocommit = True
        return c

    def reset(self, db):
        """Empty Redis and the result tables of one database (tables are created by the systems themselves)."""
        self.r().flushall()
        c = self.pg(db)
        cur = c.cursor()
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname='public' AND tablename IN "
                    "('celery_taskmeta','celery_tasksetmeta','tandem_tasks','tandem_task_events')")
        tabs = [r[0] for r in cur.fetchall()]
        if tabs:
            cur.execute("TRUNCATE " + ",".join(tabs))
        cur.execute("CHECKPOINT")
        c.close()


# ------------------------------------------------------------------------------------------- publishing
class Publisher:
    """The stock Celery client (celery 5.6 send_task, what Airflow 2's CeleryExecutor sends)."""

    def __init__(self, srv):
        os.environ["BENCH_BROKER"] = srv.redis_url
        os.environ["BENCH_BACKEND"] = "db+" + srv.pg_url("bench_celery")
        sys.path.insert(0, HERE)
        import benchapp  # noqa: E402
        self.app = benchapp.app
        self.srv = srv
        self.template = None

    def send(self, i):
        argv = list(ARGV)
        argv[5] = f"run_{i}"
        return self.app.send_task("execute_command", args=[argv], queue="default").id

    def publish(self, k):
        t = time.time()
        ids = [self.send(i) for i in range(k)]
        log(f"published {k} with celery send_task in {time.time() - t:.2f}s")
        return ids

    def _capture_template(self):
        r = self.srv.r()
        tid = self.send(0)
        raw = r.rpop("default").decode()
        m = json.loads(raw)
        self.template = (raw, tid, m["properties"]["delivery_tag"])

    def preload(self, k, chunk=2000):
        """k copies of one real celery-published message, each with a fresh task id and delivery tag
        (the ids live in the JSON envelope, outside the base64 body): for backlogs too large to publish one by one."""
        if self.template is None:
            self._capture_template()
        raw, tid, tag = self.template
        r = self.srv.r()
        r.sadd("_kombu.binding.default", "default\x06\x16\x06\x16default")
        t = time.time()
        done = 0
        while done < k:
            n = min(chunk, k - done)
            p = r.pipeline(transaction=False)
            p.lpush("default", *[raw.replace(tid, str(uuid.uuid4())).replace(tag, str(uuid.uuid4())) for _ in range(n)])
            p.execute()
            done += n
        log(f"preloaded {k} cloned messages in {time.time() - t:.2f}s")


# --------------------------------------------------------------------------------------------- memory
def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def mem_of(pids, skip_comm=("airflow",)):
    """RSS and PSS of the processes `pids` (the tree's root first), the tasks themselves excluded. Tandem's worker
    starts tasks with vfork: a child still running swift-worker is a task between vfork and exec, sharing the
    worker's memory, and counting it would count the worker twice (the 51-56 MiB worker "spikes" seen before
    this was excluded). Celery's pool children are forks with memory of their own and are all counted."""
    rss = pss = 0
    try:
        root_exe = os.readlink(f"/proc/{pids[0]}/exe")
    except (OSError, IndexError):
        root_exe = None
    if root_exe is not None and not root_exe.endswith("/swift-worker"):
        root_exe = None
    for i, p in enumerate(pids):
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip() in skip_comm:
                    continue
            if i > 0 and root_exe is not None and os.readlink(f"/proc/{p}/exe") == root_exe:
                continue
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024  # MiB


def machine_cpu():
    """Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def switches_of(pid):
    """{tid: voluntary + involuntary context switches} of each thread of the process (a thread hop costs two)."""
    out = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            n = 0
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        n += int(line.split()[1])
            out[int(tid)] = n
    except OSError:
        pass
    return out


def cpu_of(pid):
    """utime+stime (s) of the process itself, its threads included, its reaped children (the tasks) excluded."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == "airflow":
                return 0.0
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


class MemSampler(threading.Thread):
    """Peak RSS and PSS (MiB) of each named process tree, sampled every second while running; and the CPU
    seconds each tree's own processes used (tasks excluded), read just before the processes are stopped."""

    def __init__(self, roots, servers=None):
        super().__init__(daemon=True)
        self.roots, self.peak, self.stop_ev = roots, {k: (0.0, 0.0) for k in roots}, threading.Event()
        self.cpu = {}
        self.switches = {}  # (root name, tid) -> context switches, for the roots' own processes
        # servers (Redis, Postgres) ran before this run: only their CPU from now on counts
        self.servers = servers or {}
        self.server_cpu0 = {(n, p): cpu_of(p) for n, pid in self.servers.items() for p in tree(pid)}
        self.machine0 = machine_cpu()

    def sample_cpu(self):
        for name, pid in list(self.roots.items()) + list(self.servers.items()):
            for p in tree(pid):
                self.cpu[(name, p)] = max(self.cpu.get((name, p), 0.0), cpu_of(p))
        for name, pid in self.roots.items():
            for tid, n in switches_of(pid).items():
                self.switches[(name, tid)] = max(self.switches.get((name, tid), 0), n)
        self.machine1 = machine_cpu()

    def run(self):
        while not self.stop_ev.wait(1.0):
            for name, pid in self.roots.items():
                rss, pss = mem_of(tree(pid))
                o = self.peak[name]
                self.peak[name] = (max(o[0], rss), max(o[1], pss))
            self.sample_cpu()

    def stop(self):
        self.stop_ev.set()
        self.join()
        self.sample_cpu()
        return self.peak

    def cpu_by_root(self):
        """CPU seconds by process tree (servers: since the sampler started), and "machine": every CPU second the
        machine spent during the run, task processes and everything else included."""
        out = {}
        for key, v in self.cpu.items():
            out[key[0]] = out.get(key[0], 0.0) + v - self.server_cpu0.get(key, 0.0)
        out["machine"] = self.machine1 - self.machine0
        return out

    def switches_by_root(self):
        out = {}
        for (name, _), n in self.switches.items():
            out[name] = out.get(name, 0) + n
        return out


# -------------------------------------------------------------------------------------------- systems
def kill_group(p, sig=signal.SIGKILL):
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def noop_path(args):
    """The directory holding the no-op `airflow` both executors run (--noop glibc | bare)."""
    return os.path.join(args.noop_dir, args.noop)


def spawn_limit(args, n=3000):
    """The machine's spawn limit with the no-op in use: posix_spawn + waitpid per second from 1 and 2 threads (the
    issue's "≈ 1,500 per core, ≈ 3,000 with both" was measured with some other no-op; this one is measured here,
    in the same run, with the binary the tasks run)."""
    probe = os.path.join(args.noop_dir, "floor")
    binary = os.path.join(noop_path(args), "airflow")
    out = {}
    for threads in (1, 2):
        runs = [float(subprocess.run([probe, binary, "spawn", str(n // threads), str(threads)], check=True,
                                     capture_output=True, text=True).stdout) for _ in range(3)]
        out[f"threads{threads}"] = med(runs)
        out[f"threads{threads}_runs"] = runs
    log(f"spawn limit of the {args.noop} no-op: {out['threads1']:.0f}/s on one thread, {out['threads2']:.0f}/s on two")
    return out


class System:
    db = None

    def __init__(self, srv, args, logdir):
        self.srv, self.args, self.logdir = srv, args, logdir
        self.procs = []
        self.env = dict(os.environ, PATH=f"{noop_path(args)}:{os.environ['PATH']}")

    def spawn(self, argv, name, env=None, netns=None):
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv
        f = open(os.path.join(self.logdir, name + ".log"), "ab")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env or self.env, start_new_session=True,
                             cwd=HERE)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            kill_group(p, signal.SIGKILL)
        for p in self.procs:
            p.wait()
        self.procs = []

    def success_count(self, c):
        cur = c.cursor()
        try:
            cur.execute("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
        except psycopg2.errors.UndefinedTable:  # the worker creates its tables at start-up
            return 0
        return cur.fetchone()[0]


class Celery(System):
    name, db = "celery", "bench_celery"

    def start(self, concurrency, workers=1, host=None, netns=None, port_offset=0, tls=False):
        h = host or "127.0.0.1"
        env = dict(self.env, BENCH_BROKER=self.srv.broker_url(h, port_offset, tls),
                   BENCH_BACKEND=f"db+postgresql://postgres@{h}:{self.srv.pport + port_offset}/{self.db}",
                   BENCH_CONCURRENCY=str(concurrency))
        celery = os.path.join(os.path.dirname(sys.executable), "celery")
        roots = {}
        for w in range(workers):
            p = self.spawn([celery, "-A", "benchapp", "worker", "-O", "fair", "--queues", "default", "--pool",
                            "prefork", "--concurrency", str(concurrency), "--loglevel", "INFO",
                            "--hostname", f"bench{w}@%h"], f"celery-c{concurrency}-w{w}", env=env, netns=netns)
            roots[f"worker{w}"] = p.pid
        return roots


def help_text(binary):
    try:
        return subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=20).stdout
    except Exception:
        return ""


class Tandem(System):
    name, db = "tandem", "bench_tandem"
    _flags = None

    def extra_flags(self, role, tag):
        """Flags newer builds have: no metrics/log HTTP ports (several workers share the host), a private spool
        dir, and `--runner spawn` (Airflow 2 commands exec'd directly, as Celery's subprocess does)."""
        if Tandem._flags is None:
            Tandem._flags = {"worker": help_text(f"{self.args.bin}/swift-worker"),
                             "dispatcher": help_text(f"{self.args.bin}/swift-dispatcher")}
        h, out = Tandem._flags[role], []
        if "--metrics-port" in h:
            out += ["--metrics-port", "0"]
        if role == "worker":
            if "--log-port" in h:
                out += ["--log-port", "0"]
            if "--runner" in h:
                out += ["--runner", "spawn"]
            if "--spool-dir" in h:
                d = os.path.join(self.srv.dir, f"spool-{tag}")
                os.makedirs(d, exist_ok=True)
                out += ["--spool-dir", d]
        return out

    def start(self, concurrency, workers=1, host=None, netns=None, dispatcher=True, port_offset=0, tls=False):
        h = host or "127.0.0.1"
        broker = self.srv.broker_url(h, port_offset, tls)
        dispatcher_broker = self.srv.broker_url(tls=tls)
        backend = f"db+postgresql://postgres@{h}:{self.srv.pport + port_offset}/{self.db}"
        roots = {}
        if dispatcher:
            d = self.spawn([f"{self.args.bin}/swift-dispatcher", "--broker", dispatcher_broker, "--queues", "default"]
                           + self.extra_flags("dispatcher", "d"), "dispatcher")
            roots["dispatcher"] = d.pid
        for w in range(workers):
            p = self.spawn([f"{self.args.bin}/swift-worker", "--broker", broker, "--result-backend", backend,
                            "--dc", "east", "--queues", "default", "--concurrency", str(concurrency),
                            "--worker-id", f"east-bench-{w}"] + self.extra_flags("worker", f"w{w}"),
                           f"tandem-c{concurrency}-w{w}", netns=netns)
            roots[f"worker{w}"] = p.pid
        return roots


def wait_success(sys_, c, k, timeout, sampler=None):
    """Polls celery_taskmeta until k SUCCESS rows. Returns wall seconds since call, or None on timeout."""
    t0 = time.time()
    while True:
        n = sys_.success_count(c)
        if n >= k:
            return time.time() - t0
        if time.time() - t0 > timeout:
            log(f"  TIMEOUT: {n}/{k} SUCCESS after {timeout}s")
            return None
        time.sleep(0.1)


def done_times(c, ids=None):
    cur = c.cursor()
    cur.execute("SELECT task_id, date_done FROM celery_taskmeta WHERE status = 'SUCCESS'")
    return {t: d for t, d in cur.fetchall()}


def pg_counters(c, db):
    """Commits of one database and WAL syncs/writes of the cluster (pg_stat_database, pg_stat_wal)."""
    cur = c.cursor()
    cur.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (db,))
    commits = cur.fetchone()[0]
    cur.execute("SELECT wal_sync, wal_write, wal_records FROM pg_stat_wal")
    sync, write, recs = cur.fetchone()
    return {"commits": commits, "wal_sync": sync, "wal_write": write, "wal_records": recs}


def first_last_rate(c, k):
    """Steady-state throughput from date_done: (k-1) / (last - first). Excludes worker start-up for both systems."""
    cur = c.cursor()
    cur.execute("SELECT min(date_done), max(date_done) FROM celery_taskmeta WHERE status = 'SUCCESS'")
    a, b = cur.fetchone()
    s = (b - a).total_seconds()
    return (k - 1) / s if s > 0 else float("nan")


# ------------------------------------------------------------------------------------------ scenarios
def throughput(srv, pub, system, conc, k, workers=1, netns=None, host=None, preload=False, port_offset=0, tls=False):
    srv.reset(system.db)
    if preload:
        pub.preload(k)
    else:
        pub.publish(k)
    c = srv.pg(system.db)
    time.sleep(0.6)  # pg stats are flushed at most every 500 ms
    pg0 = pg_counters(c, system.db)
    t0 = time.time()
    roots = system.start(conc, workers=workers, netns=netns, host=host, port_offset=port_offset, tls=tls)
    sampler = MemSampler(roots, servers=srv.pids())
    sampler.start()
    wall = wait_success(system, c, k, timeout=max(120, k / 20))
    peak = sampler.stop()
    wall = None if wall is None else time.time() - t0
    rate = first_last_rate(c, k) if wall else float("nan")
    ports = srv.client_ports() if tls else None
    system.stop()
    time.sleep(0.6)
    pg1 = pg_counters(c, system.db)
    c.close()
    out = {"rate": rate, "wall_rate": k / wall if wall else float("nan")}
    if ports is not None:
        # the worker's connections must all be on the TLS port (the plain ones are the benchmark's own)
        out["tls_connections"] = ports.get(srv.tls_port, 0)
        out["plain_connections"] = sum(n for p, n in ports.items() if p != srv.tls_port)
        log(f"  {system.name} over TLS: {out['tls_connections']} connections on the TLS port, {out['plain_connections']} plain (the benchmark's own)")
    for key in pg0:
        out[f"pg_{key}_per_task"] = (pg1[key] - pg0[key]) / k
    for name, (rss, pss) in peak.items():
        out[f"rss_{name}"], out[f"pss_{name}"] = rss, pss
    for name, cpu in sampler.cpu_by_root().items():
        out[f"cpu_ms_per_task_{name}"] = cpu * 1000 / k
    for name, n in sampler.switches_by_root().items():
        out[f"switches_per_task_{name}"] = n / k
    if workers > 1:
        out["rss_workers"] = sum(v for kk, v in out.items() if kk.startswith("rss_worker"))
        out["pss_workers"] = sum(v for kk, v in out.items() if kk.startswith("pss_worker"))
    log(f"  {system.name} c={conc} w={workers} k={k}: {rate:.1f} tasks/s steady, {out['wall_rate']:.1f} incl. "
        f"start-up; peak {', '.join(f'{n} RSS {r:.0f}/PSS {p:.0f} MiB' for n, (r, p) in peak.items())}")
    return out


class SuccessPoller(threading.Thread):
    """A reader polling `table` every 5 ms, as Airflow's result fetcher would (faster), in the publishing process:
    when each SUCCESS became visible. It also competes with the publisher for the GIL, as it does in every paced
    run, so the floor runs one too (on its own, empty table) to publish under the same conditions."""

    def __init__(self, srv, db, table):
        super().__init__(daemon=True)
        self.srv, self.db, self.table = srv, db, table
        self.seen, self.stopping = {}, threading.Event()
        self.start()

    def run(self):
        pc = self.srv.pg(self.db)
        cur = pc.cursor()
        while not self.stopping.is_set():
            cur.execute(f"SELECT task_id FROM {self.table} WHERE status = 'SUCCESS'")
            now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            for (t,) in cur.fetchall():
                self.seen.setdefault(t, now)
            time.sleep(0.005)
        pc.close()

    def stop(self):
        """Stops polling; returns {task id: when first seen}."""
        self.stopping.set()
        self.join()
        return self.seen


def paced_send(pub, rate, n, send_ms=None):
    """Publishes n tasks at `rate` per second with Celery's client; returns (task id, UTC time taken just before
    send_task) in publishing order. Latency is measured from that time, so the client's own cost counts for every
    system alike. `send_ms`, a list, receives how long each send_task call took."""
    sent = []
    t_start = time.time()
    for i in range(n):
        d = t_start + i / rate - time.time()
        if d > 0:
            time.sleep(d)
        ts = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        t0 = time.perf_counter()
        sent.append((pub.send(i), ts))
        if send_ms is not None:
            send_ms.append((time.perf_counter() - t0) * 1000)
    return sent


def quantiles(lat):
    """p50, p99 and max of a list of milliseconds."""
    lat = sorted(lat)
    q = lambda p: lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))]
    return {"p50": q(50), "p99": q(99), "max": lat[-1]}


def floor_latency(srv, pub, args, rate, n):
    """The floor under any executor (Benchmarks/floor.c): one consumer BRPOPs kombu's list, spawns and reaps the
    no-op, and stamps the time — no dispatcher, lease, result or ack. Paced and measured as paced_latency is."""
    srv.r().delete("default")
    probe = [os.path.join(args.noop_dir, "floor"), os.path.join(noop_path(args), "airflow"), "times", "127.0.0.1",
             str(srv.rport), "default", str(n + 1)]
    p = subprocess.Popen(probe, stdout=subprocess.PIPE, text=True)
    pub.send(-1)  # warm-up, as for the executors
    first = p.stdout.readline()
    if not first:
        p.kill()
        raise RuntimeError("floor: the consumer ended before the warm-up message — see its stderr above")
    time.sleep(0.5)
    poller = SuccessPoller(srv, "bench_floor", "floor_results")
    send_ms = []
    sent = paced_send(pub, rate, n, send_ms)
    poller.stop()
    done = [dt.datetime.fromtimestamp(float(line), dt.timezone.utc).replace(tzinfo=None) for line in p.stdout]
    if p.wait() != 0 or len(done) != n:
        raise RuntimeError(f"floor: {len(done)} of {n} paced messages consumed (exit {p.returncode})")
    out = quantiles([(d - ts).total_seconds() * 1000 for (_, ts), d in zip(sent, done)])
    out["send_task_p50"] = quantiles(send_ms)["p50"]
    log(f"  floor (BRPOP + spawn + wait) paced {rate}/s x{n}: p50 {out['p50']:.2f} ms, p99 {out['p99']:.2f} ms; "
        f"send_task alone p50 {out['send_task_p50']:.2f} ms")
    return out


def floor_throughput(srv, pub, args, threads, k, safe=False):
    """The floor's throughput: `threads` consumers drain k preloaded messages, each spawning and reaping the no-op.
    `safe`: also the least a crash-safe executor with durable results does (LMOVE into a processing list, one
    group-committed multi-row INSERT per commit, then LREM; Benchmarks/floor.c)."""
    srv.r().delete("default")
    pub.preload(k)
    probe = [os.path.join(args.noop_dir, "floor"), os.path.join(noop_path(args), "airflow"), "safe" if safe else "rate",
             "127.0.0.1", str(srv.rport), "default", str(threads)] + ([srv.pg_url("bench_floor")] if safe else [])
    rate, count = subprocess.run(probe, check=True, capture_output=True, text=True).stdout.split()
    if int(count) != k:
        raise RuntimeError(f"floor: consumed {count} of {k} preloaded messages")
    what = "LMOVE + spawn + wait + group-committed result + ack" if safe else "RPOP + spawn + wait"
    log(f"  floor ({what}) x{threads}: {float(rate):.0f} messages/s")
    return float(rate)


def paced_latency(srv, pub, system, conc, rate, n, workers=1):
    srv.reset(system.db)
    c = srv.pg(system.db)
    system.start(conc, workers=workers)
    # warm-up: the worker is up and has run one task
    w = pub.send(-1)
    if wait_success(system, c, 1, timeout=60) is None:
        system.stop()
        return {}
    time.sleep(0.5)
    # Independent of how each system stamps date_done (c9879a2 stamps whole seconds).
    poller = SuccessPoller(srv, system.db, "celery_taskmeta")
    sent = dict(paced_send(pub, rate, n))
    wait_success(system, c, n + 1, timeout=120)
    time.sleep(0.05)
    seen = poller.stop()
    done = done_times(c)
    system.stop()
    c.close()
    lat = [(done[t] - ts).total_seconds() * 1000 for t, ts in sent.items() if t in done]
    if len(lat) < n:
        log(f"  only {len(lat)}/{n} finished")
    out = quantiles(lat)
    vis = quantiles([(seen[t] - ts).total_seconds() * 1000 for t, ts in sent.items() if t in seen])
    out.update({f"vis_{k}": v for k, v in vis.items()})
    log(f"  {system.name} c={conc} paced {rate}/s x{n}: p50 {out['p50']:.1f} ms, p99 {out['p99']:.1f} ms, "
        f"max {out['max']:.1f} ms (date_done); seen by a 5 ms poller: p50 {out['vis_p50']:.1f}, p99 {out['vis_p99']:.1f}")
    return out


def fake_heartbeat(r, slots):
    with open(os.path.join(SCRIPTS, "heartbeat.lua")) as f:
        src = f.read()
    wid = "east@bench-fake:0"
    return lambda: r.eval(src, 2, "{tandem}:workers", f"{{tandem}}:worker:{wid}", wid, "east", slots, 0, "default",
                          "bench-fake", 0, "", "running", 600)


def dispatcher_alone(srv, pub, args, n):
    """Ingress -> datacenter queue with n messages pre-loaded, no worker running (a fake heartbeat gives headroom)."""
    r = srv.r()
    r.flushall()
    pub.preload(n)
    beat = fake_heartbeat(r, 10_000_000)
    beat()
    t = Tandem(srv, args, args.logdir)
    t0 = time.time()
    t.start(1, workers=0)
    q = "{tandem}:q:east:default"
    first = None
    while True:
        moved = r.llen(q)
        if moved and first is None:
            first = time.time()
        if moved >= n or time.time() - t0 > 300:
            break
        if int(time.time() - t0) % 2 == 0:
            beat()
        time.sleep(0.02)
    end = time.time()
    t.stop()
    ingress = sum(r.llen(k) for k in ("default", "default\x06\x163", "default\x06\x166", "default\x06\x169",
                                      "{tandem}:staging:default"))
    moved = r.llen(q)
    jobs = int(r.get("{tandem}:seq") or 0)
    ok = moved == n and ingress == 0 and jobs == n
    out = {"rate": n / (end - t0), "rate_after_first": n / (end - first) if first else float("nan"),
           "lost": n - moved - ingress, "ok": ok}
    log(f"  dispatcher: {n} moved in {end - t0:.2f}s = {out['rate']:.0f} msg/s (from first move "
        f"{out['rate_after_first']:.0f}); ingress left {ingress}, dc queue {moved}, job hashes {jobs}, ok={ok}")
    return out


def script_cost(srv, pub, args, backlog, calls=1000):
    """Server-side µs per claim.lua / dispatch.lua call (INFO commandstats) with `backlog` jobs queued."""
    r = srv.r()
    r.flushall()
    pub.preload(backlog + calls)
    with open(os.path.join(SCRIPTS, "dispatch.lua")) as f:
        dispatch = r.register_script(f.read())
    with open(os.path.join(SCRIPTS, "claim.lua")) as f:
        claim = r.register_script(f.read())
    ingress = ["default", "default\x06\x163", "default\x06\x166", "default\x06\x169"]
    q = "{tandem}:q:east:default"
    # move everything but `calls` in big batches, then time single-message dispatches
    while r.llen("default") > calls:
        dispatch(keys=[q] + ingress, args=["east", "default", min(5000, r.llen("default") - calls), ""])
    r.config_resetstat()
    for _ in range(calls):
        dispatch(keys=[q] + ingress, args=["east", "default", 1, ""])
    d_us = r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
    r.config_resetstat()
    claimed = 0
    for _ in range(calls):
        # every key claim.lua takes (leases, the queue, revoked, refill marks, the worker's hash): each call claims one
        got = claim(keys=["{tandem}:leases", q, "{tandem}:revoked", "{tandem}:refill", "{tandem}:worker:w"],
                    args=["w", 30000, 1, 0, "bench"])
        claimed += (len(got) - 1) // 9
    c_us = r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
    if claimed != calls:
        raise SystemExit(f"script_cost: {calls} claim.lua calls claimed {claimed} jobs; the measurement would be of empty claims")
    log(f"  backlog {backlog}: dispatch.lua {d_us:.1f} µs/call, claim.lua {c_us:.1f} µs/call (server side)")
    return {"dispatch_us": d_us, "claim_us": c_us}


def profile(srv, pub, args, conc, k, tool):
    """The swift-worker under `perf record` (cpu-clock, call graphs) or callgrind while it runs k no-op tasks
    end to end (dispatcher unprofiled). Output files land in the run's log dir."""
    t = Tandem(srv, args, args.logdir)
    srv.reset(t.db)
    pub.preload(k)
    c = srv.pg(t.db)
    time.sleep(0.6)
    pg0 = pg_counters(c, t.db)
    t.start(conc, workers=0)  # dispatcher only
    worker = [f"{args.bin}/swift-worker", "--broker", srv.redis_url, "--result-backend", "db+" + srv.pg_url(t.db),
              "--dc", "east", "--queues", "default", "--concurrency", str(conc), "--worker-id", "east-prof"
              ] + t.extra_flags("worker", "prof")
    out = os.path.join(args.logdir, f"worker-c{conc}.{tool}")
    if tool == "perf":
        argv = ["perf", "record", "-e", "cpu-clock", "-F", "2000", "--call-graph", "dwarf,16384", "-o", out, "--"] + worker
    else:
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--trace-children=no"] + worker
    f = open(os.path.join(args.logdir, f"profile-{tool}.log"), "ab")
    p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=t.env, start_new_session=True, cwd=HERE)
    t0 = time.time()
    wait_success(t, c, k, timeout=900)
    el = time.time() - t0
    time.sleep(0.6)
    pg1 = pg_counters(c, t.db)
    if tool == "perf":
        os.killpg(p.pid, signal.SIGINT)
    else:
        # valgrind runs the worker in its own process: SIGTERM drains it, it exits, callgrind writes its file
        os.kill(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        kill_group(p)
    t.stop()
    c.close()
    per = {key: (pg1[key] - pg0[key]) / k for key in pg0}
    log(f"  profile {tool} c={conc}: {k} tasks in {el:.1f}s ({k / el:.1f}/s under the profiler); per task {per}; "
        f"output {out}")
    return {"file": out, "pg_per_task": per}


# ---------------------------------------------------------------------------------------------- main
def interleaved(systems, reps, run):
    """{system name: [run(system) per repetition]}, the repetitions alternating Celery, Tandem, Celery, ... so a host
    that slows down mid-run slows both."""
    by = {s.name: [] for s in systems}
    for _ in range(reps):
        for s in systems:
            by[s.name].append(run(s))
    return by


def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--noop-dir", required=True)
    ap.add_argument("--noop", default="glibc", choices=["glibc", "bare"],
                    help="the no-op airflow both executors run: a static glibc binary, or one with no C library "
                         "(no start-up code; Benchmarks/noop_bare.c)")
    ap.add_argument("--src", default=ROOT, help="source tree the binaries were built from (for its Lua scripts)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--concurrency", default="2,16")
    ap.add_argument("--paced-rate", type=float, default=50)
    ap.add_argument("--paced-n", type=int, default=500)
    ap.add_argument("--dispatch-n", type=int, default=100_000)
    ap.add_argument("--backlogs", default="10,1000,10000,100000")
    ap.add_argument("--backlog-window", type=int, default=2000)
    ap.add_argument("--scale-workers", default="")
    ap.add_argument("--only", default="throughput,latency,dispatcher,backlog",
                    help="comma list of: throughput latency dispatcher backlog scaling")
    ap.add_argument("--sync-commit-off", action="store_true",
                    help="DIAGNOSTIC ONLY: Postgres synchronous_commit=off (commits do not wait for the WAL flush)")
    ap.add_argument("--profiler", default="perf", choices=["perf", "callgrind"])
    ap.add_argument("--profile-conc", type=int, default=16)
    ap.add_argument("--profile-tasks", type=int, default=2000)
    ap.add_argument("--delay-ms", type=float, default=1.0, help="netem delay each way for 'distance' (RTT = 2x)")
    ap.add_argument("--netns", action="store_true", help="distance via ip netns + veth + tc netem (needs sch_netem)")
    ap.add_argument("--distance-conc", type=int, default=16)
    ap.add_argument("--redis-port", type=int, default=6481)
    ap.add_argument("--pg-port", type=int, default=5481)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    args = ap.parse_args()
    global SCRIPTS
    SCRIPTS = os.path.join(args.src, "Sources", "TandemRedis", "Scripts")
    args.logdir = os.path.join(HERE, "results", "raw", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(args.logdir, exist_ok=True)
    only = set(args.only.split(","))
    concs = [int(x) for x in args.concurrency.split(",")]

    distance = "distance" in only
    if distance and args.netns:
        try:
            netns_up(args.delay_ms)
        except subprocess.CalledProcessError as e:
            netns_down()  # leave no half-made namespace or veth behind
            sys.exit(f"cannot set up the network namespace for 'distance' ({e}); if tc said the qdisc kind is "
                     "unknown, this kernel has no sch_netem: run without --netns (a userspace delay proxy)")
    srv = Servers(args.redis_port, args.pg_port, extra_ip=HOST_IP if distance and args.netns else None, tls="tls" in only)
    srv.start()
    if args.sync_commit_off:
        c = srv.pg("postgres")
        c.cursor().execute("ALTER SYSTEM SET synchronous_commit = off")
        c.cursor().execute("SELECT pg_reload_conf()")
        c.close()
        log("DIAGNOSTIC: synchronous_commit = off")
    res = {"meta": {"tandem_commit": os.environ.get("TANDEM_BENCH_COMMIT", "?"), "synchronous_commit": "off" if args.sync_commit_off else "on", "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_before": open("/proc/loadavg").read().split()[:3],
                    "args": {k: v for k, v in vars(args).items()}}}
    try:
        res["spawn_limit"] = spawn_limit(args)
        pub = Publisher(srv)
        systems = [Celery(srv, args, args.logdir), Tandem(srv, args, args.logdir)]
        if "throughput" in only:
            for conc in concs:
                # each repetition's pair also gives a ratio of its own (the median of those is printed too)
                by = interleaved(systems, args.reps, lambda s: throughput(srv, pub, s, conc, args.tasks))
                for s in systems:
                    runs = by[s.name]
                    res[f"throughput/{s.name}/c{conc}"] = {k: med([r[k] for r in runs]) for k in runs[0]} | {"runs": runs}
                res[f"throughput/paired/c{conc}"] = {"ratio": med([t["rate"] / c["rate"] for c, t in zip(by["celery"], by["tandem"])])}
                runs = [floor_throughput(srv, pub, args, conc, args.tasks) for _ in range(args.reps)]
                res[f"throughput/floor/c{conc}"] = {"rate": med(runs), "runs": runs}
                runs = [floor_throughput(srv, pub, args, conc, args.tasks, safe=True) for _ in range(args.reps)]
                res[f"throughput/safe-floor/c{conc}"] = {"rate": med(runs), "runs": runs}
        if "tls" in only:
            # both workers reach Redis over TLS (rediss://, kombu's URL form); publishing stays plain
            for conc in concs:
                by = interleaved(systems, args.reps, lambda s: throughput(srv, pub, s, conc, args.tasks, tls=True))
                for s in systems:
                    runs = by[s.name]
                    res[f"tls/{s.name}/c{conc}"] = {k: med([r[k] for r in runs]) for k in runs[0]} | {"runs": runs}
                res[f"tls/paired/c{conc}"] = {"ratio": med([t["rate"] / c["rate"] for c, t in zip(by["celery"], by["tandem"])])}
        if "latency" in only:
            for conc in concs:
                by = interleaved(systems, args.reps, lambda s: paced_latency(srv, pub, s, conc, args.paced_rate, args.paced_n))
                for s in systems:
                    runs = [r for r in by[s.name] if r]
                    res[f"latency/{s.name}/c{conc}"] = {k: med([r[k] for r in runs]) for k in runs[0]} | {"runs": runs}
            runs = [floor_latency(srv, pub, args, args.paced_rate, args.paced_n) for _ in range(args.reps)]
            res["latency/floor"] = {k: med([r[k] for r in runs]) for k in runs[0]} | {"runs": runs}
        if "dispatcher" in only:
            runs = [dispatcher_alone(srv, pub, args, args.dispatch_n) for _ in range(args.reps)]
            res["dispatcher"] = {"rate": med([r["rate"] for r in runs]),
                                 "rate_after_first": med([r["rate_after_first"] for r in runs]),
                                 "lost": sum(r["lost"] for r in runs), "ok": all(r["ok"] for r in runs), "runs": runs}
        if "backlog" in only:
            for b in [int(x) for x in args.backlogs.split(",")]:
                res[f"scripts/b{b}"] = script_cost(srv, pub, args, b)
                k = min(b, args.backlog_window)
                for s in systems:
                    runs = []
                    for _ in range(args.reps):
                        srv.reset(s.db)
                        pub.preload(b)
                        c = srv.pg(s.db)
                        s.start(BACKLOG_SLOTS)
                        wait_success(s, c, k, timeout=300)
                        # no more tasks than slots run side by side: first-to-last date_done is then their spread
                        # (a group commit lands them together), not a rate — reported as nan
                        rate = first_last_rate(c, k) if k > BACKLOG_SLOTS else float("nan")
                        s.stop()
                        c.close()
                        log(f"  {s.name} backlog {b}: first {k} done at {rate:.1f} tasks/s")
                        runs.append(rate)
                    res[f"backlog/{s.name}/b{b}"] = {"rate": med(runs), "runs": runs}
        if "profile" in only:
            res["profile"] = profile(srv, pub, args, args.profile_conc, args.profile_tasks, args.profiler)
        if distance:
            if args.netns:
                out = subprocess.run(["ip", "netns", "exec", NETNS, "ping", "-c", "5", "-q", HOST_IP],
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1]
                far = {"netns": NETNS, "host": HOST_IP}
            else:
                # userspace delay proxy in front of Redis and Postgres (no netem in this kernel)
                proxy = start_delay_proxy(srv, args.delay_ms)
                far = {"port_offset": PROXY_PORT_OFFSET}
                r2 = redislib.Redis(host="127.0.0.1", port=srv.rport + 2000)
                r2.ping()
                ts = []
                for _ in range(50):
                    t = time.perf_counter()
                    r2.ping()
                    ts.append((time.perf_counter() - t) * 1000)
                out = f"redis PING through the delay proxy: median {statistics.median(ts):.2f} ms, max {max(ts):.2f} ms"
            log(f"  distance RTT: {out}")
            res["meta"]["distance_rtt"] = out
            for s in systems:
                for where, kw in (("loopback", {}), ("rtt", far)):
                    runs = [throughput(srv, pub, s, args.distance_conc, args.tasks, **kw) for _ in range(args.reps)]
                    res[f"distance/{s.name}/{where}"] = {"rate": med([r["rate"] for r in runs]), "runs": runs}
        if "scaling" in only and args.scale_workers:
            for w in [int(x) for x in args.scale_workers.split(",")]:
                for s in systems:
                    runs = [throughput(srv, pub, s, 4, args.tasks, workers=w) for _ in range(args.reps)]
                    res[f"scaling/{s.name}/w{w}"] = {"rate": med([r["rate"] for r in runs]), "runs": runs}
                    lats = [r for r in (paced_latency(srv, pub, s, 4, args.paced_rate, args.paced_n, workers=w)
                                        for _ in range(args.reps)) if r]
                    if lats:
                        res[f"scaling/{s.name}/w{w}"].update({"p50": med([r["p50"] for r in lats]),
                                                              "p99": med([r["p99"] for r in lats]), "latency_runs": lats})
    finally:
        for s in (locals().get("systems") or []):
            s.stop()
        if locals().get("proxy") is not None:
            kill_group(locals()["proxy"])
        srv.stop()
        if distance:
            netns_down()
        res["meta"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
        res["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print_table(res)


def print_table(res):
    def g(key, field):
        return res.get(key, {}).get(field, float("nan"))

    rows = []
    for conc in (2, 16):
        for label, f in (("throughput steady (tasks/s)", "rate"), ("throughput incl. start-up (tasks/s)", "wall_rate")):
            rows.append((f"{label}, c={conc}", g(f"throughput/celery/c{conc}", f), g(f"throughput/tandem/c{conc}", f)))
    for conc in (2, 16):
        for f in ("p50", "p99"):
            rows.append((f"paced latency {f} (ms, date_done), c={conc}", g(f"latency/celery/c{conc}", f), g(f"latency/tandem/c{conc}", f)))
        for f in ("vis_p50", "vis_p99"):
            rows.append((f"paced latency {f[4:]} (ms, seen by poller), c={conc}", g(f"latency/celery/c{conc}", f), g(f"latency/tandem/c{conc}", f)))
    for conc in (2, 16):
        rows.append((f"worker RSS peak (MiB), c={conc}", g(f"throughput/celery/c{conc}", "rss_worker0"),
                     g(f"throughput/tandem/c{conc}", "rss_worker0")))
        rows.append((f"worker PSS peak (MiB), c={conc}", g(f"throughput/celery/c{conc}", "pss_worker0"),
                     g(f"throughput/tandem/c{conc}", "pss_worker0")))
        rows.append((f"  Tandem dispatcher RSS peak (MiB), c={conc}", float("nan"),
                     g(f"throughput/tandem/c{conc}", "rss_dispatcher")))
    for conc in (2, 16):
        rows.append((f"worker CPU ms per task (tasks excl.), c={conc}", g(f"throughput/celery/c{conc}", "cpu_ms_per_task_worker0"),
                     g(f"throughput/tandem/c{conc}", "cpu_ms_per_task_worker0")))
        rows.append((f"  Tandem dispatcher CPU ms per task, c={conc}", float("nan"),
                     g(f"throughput/tandem/c{conc}", "cpu_ms_per_task_dispatcher")))
        rows.append((f"  worker context switches per task, c={conc}", g(f"throughput/celery/c{conc}", "switches_per_task_worker0"),
                     g(f"throughput/tandem/c{conc}", "switches_per_task_worker0")))
        for role in ("redis", "postgres", "machine"):
            rows.append((f"  {role} CPU ms per task{' (all, tasks incl.)' if role == 'machine' else ''}, c={conc}",
                         g(f"throughput/celery/c{conc}", f"cpu_ms_per_task_{role}"),
                         g(f"throughput/tandem/c{conc}", f"cpu_ms_per_task_{role}")))
    for conc in (2, 16):
        for f, label in (("pg_commits_per_task", "Postgres commits per task"), ("pg_wal_sync_per_task", "Postgres WAL fsyncs per task")):
            rows.append((f"{label}, c={conc}", g(f"throughput/celery/c{conc}", f), g(f"throughput/tandem/c{conc}", f)))
    for k in sorted((k for k in res if k.startswith("backlog/celery/")), key=lambda s: int(s.split("/b")[-1])):
        b = k.split("/b")[-1]
        rows.append((f"backlog {b}: throughput c=16 (tasks/s)", g(k, "rate"), g(f"backlog/tandem/b{b}", "rate")))
    for k in sorted((k for k in res if k.startswith("scaling/celery/")), key=lambda s: int(s.split("/w")[-1])):
        w = k.split("/w")[-1]
        rows.append((f"workers {w} x c=4: throughput (tasks/s)", g(k, "rate"), g(f"scaling/tandem/w{w}", "rate")))
        if "p50" in res[k]:
            rows.append((f"workers {w} x c=4: paced latency p50 (ms)", g(k, "p50"), g(f"scaling/tandem/w{w}", "p50")))
            rows.append((f"workers {w} x c=4: paced latency p99 (ms)", g(k, "p99"), g(f"scaling/tandem/w{w}", "p99")))
    for conc in (2, 16):
        if f"tls/celery/c{conc}" in res:
            rows.append((f"over TLS: throughput c={conc} (tasks/s)", g(f"tls/celery/c{conc}", "rate"), g(f"tls/tandem/c{conc}", "rate")))
            rows.append((f"over TLS: machine CPU ms per task, c={conc}", g(f"tls/celery/c{conc}", "cpu_ms_per_task_machine"),
                         g(f"tls/tandem/c{conc}", "cpu_ms_per_task_machine")))
        if f"tls/celery/c{conc}" in res and f"throughput/celery/c{conc}" in res:
            rows.append((f"over TLS: kept of plain throughput (%), c={conc}",
                         100 * g(f"tls/celery/c{conc}", "rate") / g(f"throughput/celery/c{conc}", "rate"),
                         100 * g(f"tls/tandem/c{conc}", "rate") / g(f"throughput/tandem/c{conc}", "rate")))
    for where in ("loopback", "rtt"):
        if f"distance/celery/{where}" in res:
            rows.append((f"distance: {where} c=16 (tasks/s)", g(f"distance/celery/{where}", "rate"),
                         g(f"distance/tandem/{where}", "rate")))
    if "distance/celery/rtt" in res:
        rows.append(("distance: kept at 2 ms RTT (%)", 100 * g("distance/celery/rtt", "rate") / g("distance/celery/loopback", "rate"),
                     100 * g("distance/tandem/rtt", "rate") / g("distance/tandem/loopback", "rate")))
    print()
    print(f"| {'metric (median)':50} | {'Celery 5.6.3':>12} | {'Tandem':>10} | {'Tandem/Celery':>13} |")
    print(f"|{'-' * 52}|{'-' * 14}:|{'-' * 11}:|{'-' * 14}:|")
    for name, a, b in rows:
        if a != a and b != b:
            continue
        ratio = b / a if a == a and b == b and a else float("nan")
        print(f"| {name:50} | {a:12.1f} | {b:10.1f} | {ratio:13.2f} |")
    if "dispatcher" in res:
        d = res["dispatcher"]
        print(f"\ndispatcher alone: {d['rate']:.0f} msg/s ingress -> datacenter queue "
              f"({d['rate_after_first']:.0f} from first move), lost {d['lost']}, verified {d['ok']}")
    sc = sorted((k for k in res if k.startswith("scripts/")), key=lambda s: int(s.split("/b")[-1]))
    if sc:
        print("server-side script cost by backlog: " + ", ".join(
            f"{k.split('/b')[-1]}: dispatch {res[k]['dispatch_us']:.1f} µs, claim {res[k]['claim_us']:.1f} µs" for k in sc))
    for conc in (2, 16):
        if f"throughput/paired/c{conc}" in res:
            print(f"throughput c={conc}: median of the repetitions' own Tandem/Celery ratios (each pair run back to back): "
                  f"{g(f'throughput/paired/c{conc}', 'ratio'):.2f}")
    if "spawn_limit" in res:
        sl, noop = res["spawn_limit"], res["meta"]["args"].get("noop", "glibc")
        best = max((g(f"throughput/tandem/c{c}", "rate") for c in (2, 16)), default=float("nan"))
        print(f"spawn limit of the {noop} no-op (posix_spawn + wait): {sl['threads1']:.0f}/s on one thread, "
              f"{sl['threads2']:.0f}/s on two; half of it {sl['threads2'] / 2:.0f}/s; Tandem's best steady "
              f"throughput {best:.0f}/s = {best / sl['threads2']:.2f} of the limit")
    if "latency/floor" in res:
        # what no executor fed by Celery's client can beat here (Benchmarks/floor.c)
        fl = res["latency/floor"]
        print(f"floor (Celery's send_task, BRPOP, spawn + wait of the no-op; no executor): paced p50 {fl['p50']:.2f} ms, "
              f"p99 {fl['p99']:.2f} ms" + (f"; send_task alone p50 {fl['send_task_p50']:.2f} ms" if "send_task_p50" in fl else ""))
        for conc in (2, 16):
            cel = res.get(f"latency/celery/c{conc}")
            if cel:
                print(f"  c={conc}: 1/5 of Celery's p50 / p99 is {cel['p50'] / 5:.2f} / {cel['p99'] / 5:.2f} ms; "
                      f"the floor is {fl['p50'] / cel['p50']:.2f} / {fl['p99'] / cel['p99']:.2f} of Celery's, "
                      f"Tandem {g(f'latency/tandem/c{conc}', 'p50') / cel['p50']:.2f} / "
                      f"{g(f'latency/tandem/c{conc}', 'p99') / cel['p99']:.2f}")
                tan = g(f"latency/tandem/c{conc}", "p50")
                print(f"  c={conc}: added on top of the floor at p50 (p50 - floor p50): Celery {cel['p50'] - fl['p50']:.2f} ms, "
                      f"Tandem {tan - fl['p50']:.2f} ms = {(tan - fl['p50']) / (cel['p50'] - fl['p50']):.2f}x")
    for conc in (2, 16):
        if f"throughput/floor/c{conc}" in res:
            fr = g(f"throughput/floor/c{conc}", "rate")
            print(f"floor throughput with {conc} consumers (RPOP, spawn + wait; nothing durable): {fr:.0f}/s = "
                  f"{fr / g(f'throughput/celery/c{conc}', 'rate'):.2f}x Celery; Tandem reaches "
                  f"{g(f'throughput/tandem/c{conc}', 'rate') / fr:.2f} of it")
    for conc in (2, 16):
        if f"throughput/safe-floor/c{conc}" in res:
            fr, sl = g(f"throughput/safe-floor/c{conc}", "rate"), res.get("spawn_limit", {}).get("threads2", float("nan"))
            print(f"safe floor with {conc} consumers (LMOVE, spawn + wait, group-committed result, then ack): {fr:.0f}/s "
                  f"= {fr / g(f'throughput/celery/c{conc}', 'rate'):.2f}x Celery, {fr / sl:.2f} of the spawn limit; "
                  f"Tandem reaches {g(f'throughput/tandem/c{conc}', 'rate') / fr:.2f} of it")
    m = res["meta"]
    print(f"\nload average before {' '.join(m['loadavg_before'])}, after {' '.join(m.get('loadavg_after', []))}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        print_table(json.load(open(sys.argv[2])))
    else:
        main()
