#!/usr/bin/env python3
"""Storage benchmarks on a real local cluster: `berth dev --no-hosts` as root (3 masters, one
agent) and a GlusterFS server of its own (`glusterd`, one brick, in a network namespace reached
over a veth pair with addresses from 198.18.0.0/15).

    deploy/bench-storage.py [--berth target/debug/berth] [--rounds 20]

1. Task start time, interleaved round by round, one task per service, each created and deleted
   again per round: no volume; a local volume (a directory); a sized local volume (a
   loop-mounted ext4 image, made on first use: the first start is reported apart); a GlusterFS
   volume (mounted through FUSE when the task starts, unmounted when it ends). A start is the
   task's creation by the masters to its first `running` report committed (both on the leader's
   clock: scheduling, the assignment, the agent's mount, the process start, the status batch).
   Next to it: a plain `mount -t glusterfs` (and umount) of the same volume, timed here.
2. Secret delivery: `berth secret create` of a new secret, then `berth apply` of a service that
   mounts it, to the moment its task has read the file (the task prints the time it did).

Prints one line per result and a JSON summary last. Root only.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, capture_output=True, text=True, **kw).stdout


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


class Gluster:
    """glusterd in a network namespace and a private mount namespace of its own."""

    def __init__(self, work, volume):
        self.work, self.volume = work, volume
        pid = os.getpid()
        self.ns = f"berth-bench-gl-{pid}"
        self.host_if, self.peer_if = f"bbg{pid % 100000}h", f"bbg{pid % 100000}n"
        self.host_addr, self.addr = "198.18.254.1", "198.18.254.2"
        self.proc = None

    def start(self):
        for d in ("lib", "log", "brick"):
            os.makedirs(os.path.join(self.work, d), exist_ok=True)
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        sh("ip", "link", "set", self.peer_if, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        sh("ip", "netns", "exec", self.ns, "sh", "-c",
           f"ip addr add {self.addr}/30 dev {self.peer_if} && ip link set {self.peer_if} up && ip link set lo up")
        w = self.work
        script = (f"mount --make-rprivate / && mount -t tmpfs tmpfs /run && mkdir -p /run/gluster && "
                  f"mount --bind {w}/lib /var/lib/glusterd && mount --bind {w}/log /var/log/glusterfs && "
                  f"exec glusterd -N --log-file={w}/glusterd.log")
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "unshare", "--mount", "sh", "-c", script],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while self.gluster("volume", "list").returncode != 0:
            if time.time() > deadline:
                raise SystemExit(f"bench-storage: glusterd did not start; see {w}/glusterd.log")
            time.sleep(0.1)
        for args in (("volume", "create", self.volume, f"{self.addr}:{w}/brick", "force"),
                     ("volume", "start", self.volume)):
            r = self.gluster(*args)
            if r.returncode != 0:
                raise SystemExit(f"bench-storage: gluster {' '.join(args)}: {r.stdout}{r.stderr}")

    def gluster(self, *args):
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "-n", "gluster", "--mode=script", *args],
                              capture_output=True, text=True)

    def stop(self):
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout
        for p in out.split():
            try:
                os.kill(int(p), signal.SIGKILL)
            except OSError:
                pass
        if self.proc:
            self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)


class Cluster:
    def __init__(self, berth, tmp):
        self.berth, self.dir, self.dev = berth, tmp, None

    def cli(self, *args, **kw):
        return sh(self.berth, "--config", os.path.join(self.dir, "berth.toml"), *args, **kw)

    def wait(self, what, fn, timeout=120, step=0.02):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                v = fn()
            except (subprocess.CalledProcessError, json.JSONDecodeError, KeyError, IndexError):
                v = None
            if v:
                return v
            time.sleep(step)
        raise SystemExit(f"bench-storage: timed out waiting for {what}")

    def start(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1] % 20000 + 30000
        s.close()
        os.makedirs(self.dir, exist_ok=True)
        log = open(os.path.join(self.dir, "dev.log"), "w")
        self.dev = subprocess.Popen([self.berth, "dev", "--data-dir", self.dir, "--base-port", str(base),
                                     "--agents", "1", "--no-hosts"], stdout=log, stderr=subprocess.STDOUT)
        self.wait("berth.toml", lambda: os.path.exists(os.path.join(self.dir, "berth.toml")))
        self.wait("a ready agent", lambda: any(n["status"] == "ready"
                                               for n in json.loads(self.cli("get", "nodes", "-o", "json"))))

    def apply(self, yaml):
        path = os.path.join(self.dir, "bench.yaml")
        with open(path, "w") as f:
            f.write(yaml)
        self.cli("apply", "-f", path)

    def tasks(self, service):
        return json.loads(self.cli("get", "tasks", "--service", service, "-o", "json"))

    def stop(self):
        if self.dev:
            self.dev.send_signal(signal.SIGINT)
            self.dev.wait(60)


def service(name, volume_mount=""):
    return (f"kind: Service\nmetadata: {{name: {name}}}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n"
            f"    command: [/bin/sleep, \"100000\"]\n    stop_grace_period: 1s\n{volume_mount}")


def start_once(c, name, yaml):
    c.apply(yaml)
    t = c.wait(f"{name} running", lambda: next((t for t in c.tasks(name)
                                                if t["state"] == "running" and t["running_at_ms"] > 0), None))
    c.cli("delete", "service", name, "--wait")
    return t["running_at_ms"] - t["created_at_ms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug", "berth"))
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench-storage: run as root (loop devices, FUSE, network namespaces)")
    tmp = tempfile.mkdtemp(prefix="berth-bench-storage-")
    c = Cluster(os.path.abspath(args.berth), os.path.join(tmp, "cluster"))
    g = Gluster(os.path.join(tmp, "gluster"), "bench")
    results = {}
    try:
        g.start()
        c.start()
        c.apply("kind: Volume\nmetadata: {name: bv-local}\nspec: {driver: local}\n---\n"
                "kind: Volume\nmetadata: {name: bv-sized}\nspec: {driver: local, size: 256Mi}\n---\n"
                f"kind: Volume\nmetadata: {{name: bv-gl}}\nspec: {{driver: glusterfs, servers: [\"{g.addr}\"], "
                "volume: bench}\n")
        variants = {
            "no_volume": service("b-none"),
            "local_volume": service("b-local", "    volumes: [{source: bv-local, target: /mnt/bench}]\n"),
            "sized_local_volume": service("b-sized", "    volumes: [{source: bv-sized, target: /mnt/bench}]\n"),
            "glusterfs_volume": service("b-gl", "    volumes: [{source: bv-gl, target: /mnt/bench}]\n"),
        }
        first_sized = start_once(c, "b-sized", variants["sized_local_volume"])
        print(f"start sized_local_volume first use (mkfs + loop mount): {first_sized} ms", flush=True)
        times = {k: [] for k in variants}
        plain = []
        mnt = os.path.join(tmp, "plain-mount")
        os.makedirs(mnt)
        for r in range(args.rounds):
            for k, yaml in variants.items():
                name = yaml.split("name: ", 1)[1].split("}", 1)[0]
                times[k].append(start_once(c, name, yaml))
            t0 = time.monotonic()
            sh("mount", "-t", "glusterfs", f"{g.addr}:/bench", mnt)
            plain.append((time.monotonic() - t0) * 1000)
            sh("umount", mnt)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]} ms" for k, v in times.items())
                  + f", plain mount {plain[-1]:.0f} ms", flush=True)
        for k, v in times.items():
            results[f"start_{k}"] = {"p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99), "n": len(v)}
        results["start_sized_local_volume_first_use_ms"] = first_sized
        results["plain_mount_glusterfs"] = {"p50_ms": round(pct(plain, 0.5), 1), "p99_ms": round(pct(plain, 0.99), 1),
                                            "n": len(plain)}
        # Secret delivery.
        delivery = []
        for r in range(args.rounds):
            name = f"bs-{r}"
            src = os.path.join(tmp, name)
            with open(src, "w") as f:
                f.write(f"value-{r}-{os.getpid()}")
            cmd = ("cat /run/secrets/" + name + " >/dev/null && echo READ $(date +%s%3N); exec sleep 100000")
            t0 = int(time.time() * 1000)
            c.cli("secret", "create", name, "--from-file", src)
            c.apply(f"kind: Service\nmetadata: {{name: b-secret}}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n"
                    f"    command: [/bin/sh, -c, {json.dumps(cmd)}]\n    stop_grace_period: 1s\n    secrets: [{name}]\n")
            read_at = c.wait("the task reading its secret", lambda: next(
                (int(line.split("READ ", 1)[1].split()[0]) for line in c.cli("logs", "b-secret").splitlines()
                 if "READ " in line), None), step=0.05)
            delivery.append(read_at - t0)
            c.cli("delete", "service", "b-secret", "--wait")
            c.cli("secret", "rm", name)
            print(f"secret delivery {r + 1}: {delivery[-1]} ms", flush=True)
        results["secret_delivery"] = {"p50_ms": pct(delivery, 0.5), "p99_ms": pct(delivery, 0.99), "n": len(delivery)}
        for k, v in results.items():
            print(f"{k}: {v}")
        print(json.dumps(results))
    finally:
        c.stop()
        g.stop()
        # The agent keeps its volumes mounted across its own restarts; the benchmark's go with it.
        points = [line.split(" ")[4] for line in open("/proc/self/mountinfo") if line.split(" ")[4].startswith(tmp)]
        for m in sorted(points, key=lambda p: -p.count("/")):
            subprocess.run(["umount", m], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
