#!/usr/bin/env python3
"""The cost of a feature on KV writes: the same `berth bench kv` against a 3-master `berth dev`
cluster (no agents) of two builds, BEFORE and AFTER, taking turns round by round so that both see
the same machine. Made for authorization and audit (AFTER writes as a user with a role binding,
not the bootstrap admin, so every put goes through the role check and carries its audit record;
--after-as-admin skips that), and used for metrics with --scrape: a scraper reads every master's
/metrics (the addresses `berth dev` records in cluster.json; a build without metrics has none)
every SECONDS while the writes run, as Prometheus would.

    python3 deploy/bench-authz.py --before /tmp/berth-before --after target/release/berth --rounds 3
    python3 deploy/bench-authz.py --before /tmp/berth-nometrics --after target/release/berth \
        --after-as-admin --scrape 1

Prints one JSON line per measurement and a summary: per round the AFTER/BEFORE ratio of ops/s, of
p50 and of the masters' CPU time per write (utime+stime of the cluster's processes over the run;
ratios taken in one round are what to compare on a shared machine), and their medians.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request


def free_base_port():
    # Three consecutive free ports (TCP and UDP alike are checked by the master at start).
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
        s.close()
        if base + 3 < 65000:
            return base


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


class DevCluster:
    def __init__(self, berth, work):
        self.berth = berth
        self.dir = os.path.join(work, "dev")
        self.base = free_base_port()
        self.log = open(os.path.join(work, "dev.log"), "w")
        self.proc = subprocess.Popen(
            [berth, "dev", "--data-dir", self.dir, "--base-port", str(self.base), "--agents", "0", "--no-hosts"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.config = os.path.join(self.dir, "berth.toml")
        self.endpoints = [f"127.0.0.1:{self.base + i}" for i in range(3)]
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"berth dev exited: see {self.log.name}")
            if os.path.exists(self.config):
                st = subprocess.run(
                    [berth, "cluster", "status", "--config", self.config, "-o", "json"],
                    capture_output=True,
                    text=True,
                )
                if st.returncode == 0 and json.loads(st.stdout).get("leader"):
                    self.leader = self.endpoints[json.loads(st.stdout)["leader"] - 1]
                    return
            time.sleep(0.2)
        raise SystemExit("the dev cluster did not elect a leader within 120 s")

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def cluster_cpu_seconds(pgid):
    """utime+stime of every process of the dev cluster (its process group: the masters)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state ppid pgrp ... utime (14th field) stime (15th).
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


class Scraper:
    """GETs every master's /metrics every `every` seconds until stopped."""

    def __init__(self, cluster_dir, every):
        with open(os.path.join(cluster_dir, "cluster.json")) as f:
            self.urls = [f"http://{m['metrics']}/metrics" for m in json.load(f)["masters"] if m.get("metrics")]
        self.every = every
        self.scrapes = 0
        self.failures = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.urls and not self.done.wait(self.every):
            for u in self.urls:
                try:
                    with urllib.request.urlopen(u, timeout=5) as r:
                        r.read()
                    self.scrapes += 1
                except OSError:
                    self.failures += 1

    def stop(self):
        self.done.set()
        self.thread.join()


def bench(berth, config, endpoints, clients, ops):
    out = run(
        [berth, "bench", "kv", "--config", config, "--endpoints", ",".join(endpoints), "--clients", str(clients),
         "--ops", str(ops), "--value-size", "256", "-o", "json"]
    )
    return json.loads(out.stdout)


def measure(label, berth, as_user, single_ops, many_ops, scrape=0):
    work = tempfile.mkdtemp(prefix=f"berth-bench-authz-{label}-")
    c = DevCluster(berth, work)
    try:
        config = c.config
        if as_user:
            # A user bound to cluster-admin: every call goes through the bindings.
            user_dir = os.path.join(work, "bench-user")
            run([berth, "user", "add", "bench", "--role", "cluster-admin", "--out", user_dir, "--config", c.config])
            config = os.path.join(user_dir, "berth.toml")
        results = []
        for clients, ops, eps, via in [(1, single_ops, [c.leader], "leader"), (64, many_ops, c.endpoints, "all")]:
            scraper = Scraper(c.dir, scrape) if scrape else None
            cpu0 = cluster_cpu_seconds(c.proc.pid)
            r = bench(berth, config, eps, clients, ops)
            cpu = cluster_cpu_seconds(c.proc.pid) - cpu0
            r.update({"build": label, "via": via, "masters_cpu_ms_per_op": round(cpu * 1000 / ops, 4)})
            if scraper:
                scraper.stop()
                r.update({"scrapes": scraper.scrapes, "scrape_failures": scraper.failures})
            print(json.dumps(r), flush=True)
            results.append(r)
        return results
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="berth built without authorization and audit")
    ap.add_argument("--after", required=True, help="berth with them")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single-ops", type=int, default=2000)
    ap.add_argument("--many-ops", type=int, default=20000)
    ap.add_argument(
        "--after-as-admin",
        action="store_true",
        help="AFTER writes as the bootstrap admin (no role lookup): the audit record's cost alone",
    )
    ap.add_argument(
        "--scrape",
        type=float,
        default=0,
        metavar="SECONDS",
        help="scrape every master's /metrics this often during the writes (builds that serve them)",
    )
    a = ap.parse_args()
    print(f"# machine: {os.cpu_count()} cores, {os.uname().release}", flush=True)
    ratios = {"leader": {"ops": [], "p50": [], "cpu": []}, "all": {"ops": [], "p50": [], "cpu": []}}
    for rnd in range(a.rounds):
        order = [("before", a.before, False), ("after", a.after, not a.after_as_admin)]
        if rnd % 2:
            order.reverse()
        got = {}
        for label, berth, as_user in order:
            got[label] = measure(label, berth, as_user, a.single_ops, a.many_ops, a.scrape)
        for b, x in zip(got["before"], got["after"]):
            ratios[b["via"]]["ops"].append(x["ops_per_sec"] / b["ops_per_sec"])
            ratios[b["via"]]["p50"].append(x["p50_ms"] / b["p50_ms"])
            ratios[b["via"]]["cpu"].append(x["masters_cpu_ms_per_op"] / max(b["masters_cpu_ms_per_op"], 1e-9))
    summary = {
        via: {
            "ops_per_sec_ratio_per_round": [round(v, 3) for v in r["ops"]],
            "p50_ratio_per_round": [round(v, 3) for v in r["p50"]],
            "ops_per_sec_ratio_median": round(statistics.median(r["ops"]), 3),
            "p50_ratio_median": round(statistics.median(r["p50"]), 3),
            "masters_cpu_per_op_ratio_per_round": [round(v, 3) for v in r["cpu"]],
            "masters_cpu_per_op_ratio_median": round(statistics.median(r["cpu"]), 3),
        }
        for via, r in ratios.items()
    }
    print(json.dumps({"summary": summary}), flush=True)
    for via, s in summary.items():
        print(
            f"# {via}: after/before ops/s median {s['ops_per_sec_ratio_median']}x "
            f"(rounds {s['ops_per_sec_ratio_per_round']}), p50 {s['p50_ratio_median']}x, "
            f"masters' CPU per write {s['masters_cpu_per_op_ratio_median']}x"
        )


if __name__ == "__main__":
    main()
