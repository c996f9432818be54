"""Memory of the Airflow runner: alone, and with 16 pooled children each holding a task (what a worker at
concurrency 16 keeps up). Run with the Airflow venv: .venv/airflow/bin/python Benchmarks/runner_memory.py"""
import socket, os, subprocess, json, time, sys
path = "/tmp/tandem-runner-memory.sock"
try: os.unlink(path)
except FileNotFoundError: pass
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); srv.bind(path); srv.listen(1)
p = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Workers", "runner", "tandem_runner.py"), "--connect", path, "--allow-test-kinds"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
c, _ = srv.accept()
f = c.makefile("rb")
print("hello:", f.readline()[:80])
def mem(pids):
    rss = pss = 0
    for pid in pids:
        for l in open(f"/proc/{pid}/smaps_rollup"):
            if l.startswith("Rss:"): rss += int(l.split()[1])
            if l.startswith("Pss:"): pss += int(l.split()[1])
    return rss/1024, pss/1024
print("runner idle RSS/PSS MiB: %.0f / %.0f" % mem([p.pid]))
for i in range(16):
    c.sendall((json.dumps({"op": "run", "id": f"r{i}", "kind": "test-pooled-sleep", "seconds": 4, "env": {}}) + "\n").encode())
time.sleep(2)
kids = [int(x) for x in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]
print("pooled children:", len(kids))
print("runner + 16 pooled children RSS/PSS MiB: %.0f / %.0f" % mem([p.pid] + kids))
p.kill()
