#!/usr/bin/env python3
"""bench-failover-vs-etcd.py: failover time of a 3-node kv cluster and a
3-member etcd cluster, both on 127.0.0.1 with default election settings,
measured the same way in one run.

Each round: find the leader, SIGKILL it (`--signal term`: SIGTERM, a
graceful stop, as in a rolling restart), and time from the signal to the first
write that succeeds (a fresh client process per attempt: `kv put` or
`etcdctl put`, each with a short timeout, back to back). Then restart the
killed node, wait until every node answers and one leads, let it settle, and
go again. At the end every key a round wrote must still be readable
(`lost writes`). Prints one table (median, max, every round) and the ratio of
the medians.

Usage: scripts/bench-failover-vs-etcd.py [--rounds 20] [--dir DIR] [--kv PATH]
                                         [--signal kill|term] [--no-etcd] [--no-kv]

Needs python3, and etcd + etcdctl for the etcd side (Debian: apt-get install
-y etcd-server etcd-client). Data goes under DIR (default ./kv-bench-data),
created and removed by the script. Timings never make it fail; it exits 1 if
a round never got a write through within 30 s, 2 if it could not set up.

Bias to know: a polling attempt costs a process start (kv about 5 ms,
etcdctl about 20 ms here), so etcd's times carry a little more polling
granularity.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
KV_PORTS = [27101, 27102, 27103]
ETCD_CLIENT = [23891, 23892, 23893]
ETCD_PEER = [23901, 23902, 23903]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def die(msg, code=2):
    print(f"bench-failover-vs-etcd: {msg}", file=sys.stderr)
    sys.exit(code)


def ports_free(ports):
    busy = []
    for p in ports:
        s = socket.socket()
        # As the servers bind: connections of an earlier run in TIME_WAIT
        # do not make a port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, p))
            s.listen(1)
        except OSError:
            busy.append(p)
        finally:
            s.close()
    if busy:
        die(f"ports in use on {HOST}: {busy}; stop whatever listens there first")


def run(cmd, timeout=10):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


class Cluster:
    """Three server processes, restartable by index."""

    def __init__(self, work, name, commands):
        self.work, self.name, self.commands = work, name, commands
        self.procs = [None, None, None]

    def start(self, i):
        log = open(os.path.join(self.work, f"{self.name}{i + 1}.log"), "a")
        self.procs[i] = subprocess.Popen(self.commands[i], stdout=log, stderr=log)

    def kill(self, i):
        p = self.procs[i]
        p.send_signal(signal.SIGKILL)
        p.wait()

    def terminate(self, i):
        """SIGTERM: the process stops in its own time (see `reap`)."""
        self.procs[i].send_signal(signal.SIGTERM)

    def reap(self, i):
        p = self.procs[i]
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def stop(self):
        for p in self.procs:
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for p in self.procs:
            if p:
                try:
                    p.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


# --- kv ---------------------------------------------------------------------------------
def kv_setup(work, kv):
    endpoints = ",".join(f"{HOST}:{p}" for p in KV_PORTS)
    cmds = []
    for i in range(3):
        members = "".join(
            f'\n[[members]]\nid = {j + 1}\naddr = "{HOST}:{KV_PORTS[j]}"\n' for j in range(3)
        )
        path = os.path.join(work, f"kv{i + 1}.toml")
        with open(path, "w") as f:
            # Like configs/node*.toml: every election setting at its default.
            f.write(
                f'cluster_id = "failover"\nnode_id = {i + 1}\nlisten = "{HOST}:{KV_PORTS[i]}"\n'
                f'data_dir = "{work}/kv{i + 1}"\n{members}'
            )
        cmds.append([kv, "serve", "--config", path])

    def leader():
        r = run([kv, "status", "--endpoints", endpoints, "--timeout-ms", "500"])
        if r is None:
            return None, 0
        rows = [line.split() for line in r.stdout.splitlines()[1:]]
        answering = sum(1 for row in rows if row and row[0].isdigit())
        leaders = [row for row in rows if len(row) > 2 and row[0].isdigit() and row[1] == "leader"]
        if not leaders:
            return None, answering
        best = max(leaders, key=lambda row: int(row[2]))
        return int(best[0]) - 1, answering

    def write(key):
        r = run([kv, "put", key, "v", "--endpoints", endpoints, "--timeout-ms", "250"], timeout=5)
        return r is not None and r.returncode == 0

    def read(key):
        r = run([kv, "get", key, "--endpoints", endpoints, "--timeout-ms", "2000"])
        return r is not None and r.returncode == 0 and r.stdout.strip() == "v"

    return cmds, leader, write, read


# --- etcd -------------------------------------------------------------------------------
def etcd_setup(work):
    endpoints = ",".join(f"http://{HOST}:{p}" for p in ETCD_CLIENT)
    initial = ",".join(f"etcd{i + 1}=http://{HOST}:{ETCD_PEER[i]}" for i in range(3))
    cmds = []
    for i in range(3):
        cmds.append([
            "etcd", "--name", f"etcd{i + 1}", "--data-dir", f"{work}/etcd{i + 1}",
            "--listen-client-urls", f"http://{HOST}:{ETCD_CLIENT[i]}",
            "--advertise-client-urls", f"http://{HOST}:{ETCD_CLIENT[i]}",
            "--listen-peer-urls", f"http://{HOST}:{ETCD_PEER[i]}",
            "--initial-advertise-peer-urls", f"http://{HOST}:{ETCD_PEER[i]}",
            "--initial-cluster", initial, "--initial-cluster-token", "failover",
            "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr",
        ])

    def leader():
        r = run(["etcdctl", "--endpoints", endpoints, "--dial-timeout", "500ms",
                 "--command-timeout", "1s", "endpoint", "status", "-w", "json"])
        if r is None or not r.stdout.strip():
            return None, 0
        try:
            statuses = json.loads(r.stdout)
        except json.JSONDecodeError:
            return None, 0
        found = None
        for s in statuses:
            st = s.get("Status", {})
            if st.get("header", {}).get("member_id") == st.get("leader") and st.get("leader"):
                port = int(s["Endpoint"].rsplit(":", 1)[1])
                found = ETCD_CLIENT.index(port)
        return found, len(statuses)

    def write(key):
        r = run(["etcdctl", "--endpoints", endpoints, "--dial-timeout", "250ms",
                 "--command-timeout", "250ms", "put", key, "v"], timeout=5)
        return r is not None and r.returncode == 0

    def read(key):
        r = run(["etcdctl", "--endpoints", endpoints, "--command-timeout", "2s",
                 "get", key, "--print-value-only"])
        return r is not None and r.returncode == 0 and r.stdout.strip() == "v"

    return cmds, leader, write, read


def wait_steady(leader, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        lead, answering = leader()
        if lead is not None and answering == 3:
            return lead
        time.sleep(0.1)
    die(f"{what}: no leader with all 3 nodes answering within {timeout} s")


def measure(name, cluster, leader, write, read, rounds, sig):
    for i in range(3):
        cluster.start(i)
    wait_steady(leader, f"{name} start")
    times, written = [], []
    for r in range(rounds):
        time.sleep(1.0)  # steady state: heartbeats flowing, leases fresh
        lead = wait_steady(leader, f"{name} round {r}")
        key = f"failover-{r}"
        start = time.monotonic()
        if sig == "kill":
            cluster.kill(lead)
        else:
            cluster.terminate(lead)
        while not write(key):
            if time.monotonic() - start > 30:
                cluster.stop()
                die(f"{name} round {r}: no write succeeded within 30 s of killing the leader", 1)
        elapsed = (time.monotonic() - start) * 1000
        times.append(elapsed)
        written.append(key)
        print(f"  {name} round {r + 1:>2}: SIG{sig.upper()} to node {lead + 1}, first write after {elapsed:7.0f} ms",
              flush=True)
        cluster.reap(lead)
        cluster.start(lead)
    wait_steady(leader, f"{name} end")
    lost = [k for k in written if not read(k)]
    cluster.stop()
    return times, lost


def main():
    # SIGTERM (and SIGHUP) unwind like Ctrl-C does, so the `finally` below
    # stops every server this script started.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--dir", default=os.path.join(ROOT, "kv-bench-data"))
    ap.add_argument("--kv", default=os.path.join(ROOT, "target", "release", "kv"))
    ap.add_argument("--signal", choices=["kill", "term"], default="kill",
                    help="how the leader is stopped: SIGKILL (a crash) or SIGTERM (a graceful stop)")
    ap.add_argument("--no-etcd", action="store_true")
    ap.add_argument("--no-kv", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1:
        die("--rounds must be at least 1")
    if not args.no_kv and not os.access(args.kv, os.X_OK):
        print("+ cargo build --release --bin kv", flush=True)
        subprocess.run(["cargo", "build", "--release", "--bin", "kv"], cwd=ROOT, check=True)
    if not args.no_etcd and not (shutil.which("etcd") and shutil.which("etcdctl")):
        die("etcd and etcdctl are needed (apt-get install -y etcd-server etcd-client), or --no-etcd")
    ports_free(([] if args.no_kv else KV_PORTS) + ([] if args.no_etcd else ETCD_CLIENT + ETCD_PEER))
    created = not os.path.isdir(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="failover.", dir=args.dir)
    results = {}
    clusters = []
    try:
        systems = []
        if not args.no_kv:
            cmds, leader, write, read = kv_setup(work, os.path.abspath(args.kv))
            systems.append(("kv", Cluster(work, "kv", cmds), leader, write, read))
        if not args.no_etcd:
            cmds, leader, write, read = etcd_setup(work)
            systems.append(("etcd", Cluster(work, "etcd", cmds), leader, write, read))
        for name, cluster, leader, write, read in systems:
            clusters.append(cluster)
            print(f"== {name}: {args.rounds} rounds", flush=True)
            results[name] = measure(name, cluster, leader, write, read, args.rounds, args.signal)
    finally:
        for c in clusters:
            c.stop()
        shutil.rmtree(work, ignore_errors=True)
        if created:
            try:
                os.rmdir(args.dir)
            except OSError:
                pass
    print()
    print(f"failover: SIG{args.signal.upper()} of the leader -> first successful write, {args.rounds} rounds, 3 nodes on {HOST}")
    print(f"{'system':<6} {'median ms':>10} {'max ms':>8} {'min ms':>8} {'lost writes':>12}")
    for name, (times, lost) in results.items():
        print(f"{name:<6} {statistics.median(times):>10.0f} {max(times):>8.0f} {min(times):>8.0f} {len(lost):>12}")
    if "kv" in results and "etcd" in results:
        ratio = statistics.median(results["kv"][0]) / statistics.median(results["etcd"][0])
        print(f"median kv/etcd: {ratio:.2f}x")


if __name__ == "__main__":
    main()
