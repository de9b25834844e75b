"""What the benchmark scripts share: running commands, quantiles, and a `berth dev` cluster of
real processes (3 masters and N agents, each agent in a host of its own when run as root) driven
through the real CLI."""

import json
import os
import signal
import socket
import subprocess
import time


def sh(*args, **kw):
    return subprocess.run(list(args), check=True, capture_output=True, text=True, **kw).stdout


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


class DevCluster:
    """A `berth dev` cluster in `tmp`; `name` prefixes the errors."""

    def __init__(self, berth, tmp, name):
        self.berth = berth
        self.dir = tmp
        self.name = name
        self.dev = None

    def cli(self, *args):
        return sh(self.berth, "--config", os.path.join(self.dir, "berth.toml"), *args)

    def wait(self, what, fn, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                v = fn()
            except (subprocess.CalledProcessError, json.JSONDecodeError, KeyError):
                v = None
            if v:
                return v
            time.sleep(0.1)
        raise SystemExit(f"{self.name}: timed out waiting for {what}")

    def start(self, agents=3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1] % 20000 + 30000
        s.close()
        log = open(os.path.join(self.dir, "dev.log"), "w")
        self.dev = subprocess.Popen(
            [self.berth, "dev", "--data-dir", self.dir, "--base-port", str(base), "--agents", str(agents)],
            stdout=log, stderr=subprocess.STDOUT)
        self.wait("berth.toml", lambda: os.path.exists(os.path.join(self.dir, "berth.toml")))
        self.wait(f"{agents} ready agents with networks", lambda: sum(
            n["status"] == "ready" and n.get("networks") is True
            for n in json.loads(self.cli("get", "nodes", "-o", "json"))) == agents)

    def stop_dev(self):
        """Stops `berth dev` (its tasks and the edge's HAProxy outlive it, as on real hosts)."""
        if self.dev:
            self.dev.send_signal(signal.SIGINT)
            self.dev.wait(60)

    @staticmethod
    def kill_services(names):
        """kill -9 of every process of these services (by their BERTH_SERVICE), before their hosts go."""
        wanted = {f"BERTH_SERVICE={n}".encode() for n in names}
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    env = open(f"/proc/{p}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                if wanted.intersection(env):
                    try:
                        os.kill(int(p), signal.SIGKILL)
                    except OSError:
                        pass

    def remove_hosts(self):
        subprocess.run([self.berth, "dev", "--data-dir", self.dir, "--remove-hosts"], capture_output=True)
