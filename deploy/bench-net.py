#!/usr/bin/env python3
"""Network benchmarks on a real local cluster: `berth dev` as root, 3 masters and 3 agents, each
agent in a host of its own (a network namespace with an underlay address on a bridge).

    deploy/bench-net.py [--berth target/release/berth] [--rounds 3] [--seconds 10] [--kills 20]

1. Overlay vs underlay, side by side, interleaved round by round:
   - TCP throughput, iperf3 (Debian's) for --seconds per round: overlay = from a task on agent-1 to
     an iperf3 task on agent-2, over VXLAN; underlay = iperf3 between the two hosts' own addresses;
   - request-response latency: 5,000 round trips of 64 bytes on one TCP connection (a Python echo
     server and client, the same on both paths), p50/p99.
2. Endpoint propagation with 3 real agents, --kills times, then with the same 3 and --simulated
   simulated agents (`berth agent --simulate N --simulate-networks`: each a node of its own with
   its own QUIC session, holding a task on the network, keeping the leader's view in memory and
   logging each change of its endpoints with a timestamp), --sim-kills times:
   - dying: kill -9 of a healthy `web` task -> the moment every agent's DNS (tasks.web) and nftables
     (its endpoint chain) no longer name its address;
   - turning healthy: the replacement's healthy status (its agent's timestamp, as the leader
     recorded it) -> the moment every agent's DNS and nftables name its address.
   Each real agent is watched from inside its host by a poller that queries the agent's DNS server
   and lists its nftables chains every few milliseconds; a simulated one by its log. Every service
   is on network `wide` (a /16 with /26 node blocks: room for 1,024 nodes).

Prints one line per measurement and a JSON summary last. Root only; it refuses to run while a
`berth dev` cluster's hosts exist (they are shared). Every address is from 198.18.0.0/15.
"""

import argparse
import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import DevCluster, quantile, sh  # noqa: E402

DOMAIN = "berth.internal"

ECHO_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
while True:
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(64)
        if not b: break
        c.sendall(b)
    c.close()
"""

RR_CLIENT = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port), timeout=5); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 64; lat = []
for i in range(n + 200):
    t = time.perf_counter_ns(); c.sendall(msg); got = 0
    while got < 64: got += len(c.recv(64 - got))
    if i >= 200: lat.append((time.perf_counter_ns() - t) / 1000)
lat.sort()
print(json.dumps({"p50_us": lat[len(lat) // 2], "p99_us": lat[int(len(lat) * 0.99)], "n": n}))
"""

# Runs inside an agent's host namespace. Commands on stdin: `gone ADDR` or `present ADDR`; answers
# with the wall-clock ns at which both the agent's DNS (tasks.web) and its nftables agree.
POLLER = r"""
import json, socket, struct, subprocess, sys, time
gateway, name = sys.argv[1], sys.argv[2]
def query():
    q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)
    try:
        s.sendto(q, (gateway, 53)); r = s.recv(4096)
    except OSError:
        return None
    finally:
        s.close()
    an = struct.unpack(">H", r[6:8])[0]; i = 12
    while r[i] != 0: i += r[i] + 1
    i += 5; out = set()
    for _ in range(an):
        if r[i] & 0xC0 == 0xC0: i += 2
        else:
            while r[i] != 0: i += r[i] + 1
            i += 1
        t, _, _, l = struct.unpack(">HHIH", r[i:i + 10]); i += 10
        if t == 1 and l == 4: out.add(socket.inet_ntoa(r[i:i + 4]))
        i += l
    return out
def nft():
    p = subprocess.run(["nft", "-j", "list", "table", "ip", "berth"], capture_output=True, text=True)
    names = [o["chain"]["name"] for o in json.loads(p.stdout or "{}").get("nftables", []) if "chain" in o]
    return {n.split("-")[4] for n in names if n.startswith("ep-") and len(n.split("-")) == 6}
for line in sys.stdin:
    mode, addr = line.split()
    want = mode == "present"
    while True:
        d = query()
        if d is not None and (addr in d) == want and (addr in nft()) == want:
            break
        time.sleep(0.002)
    print(time.time_ns(), flush=True)
"""


class Bench(DevCluster):
    def __init__(self, berth, tmp):
        super().__init__(berth, tmp, "bench-net")

    def tasks(self, service=None):
        args = ["get", "tasks", "-o", "json"] + (["--service", service] if service else [])
        return json.loads(self.cli(*args))

    def stop(self):
        try:
            self.cli("delete", "service", "nb-iperf", "nb-echo", "nb-probe", "web", "sim-holder")
        except Exception:
            pass
        self.stop_dev()
        # Tasks outlive their agents: end this benchmark's (by their service names) before the
        # hosts they live in go.
        self.kill_services(["nb-iperf", "nb-echo", "nb-probe", "web"])
        self.remove_hosts()


def services():
    def on(node):
        return f"  placement: {{constraints: [\"node.name == {node}\"]}}\n"
    echo = json.dumps(ECHO_SERVER)
    return (
        "kind: Network\nmetadata: {name: wide}\nspec: {subnet: 198.18.0.0/16, block_prefix: 26}\n---\n"
        "kind: Service\nmetadata: {name: nb-iperf}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n    networks: [wide]\n"
        "    command: [/usr/bin/iperf3, -s, -p, \"5201\"]\n" + on("agent-2") + "---\n"
        "kind: Service\nmetadata: {name: nb-echo}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n    networks: [wide]\n"
        f"    command: [/usr/bin/python3, -c, {echo}, \"7000\"]\n" + on("agent-2") + "---\n"
        "kind: Service\nmetadata: {name: nb-probe}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n    networks: [wide]\n"
        "    command: [/bin/sleep, \"100000\"]\n" + on("agent-1") + "---\n"
        "kind: Service\nmetadata: {name: web}\nspec:\n  replicas: 3\n  task:\n    runtime: process\n    networks: [wide]\n"
        "    command: [/usr/bin/python3, -m, http.server, \"8080\"]\n    workdir: /tmp\n"
        "    ports: [{name: http, container: 8080}]\n"
        "    health: {http: {port: 8080, path: /}, interval: 1s, timeout: 1s, retries: 3}\n"
        "  placement: {max_replicas_per_node: 1, constraints: [\"node.labels.sim != true\"]}\n"
        "  restart: {condition: any, delay: 0s}\n"
    )


def holders():
    """One task per simulated agent on network `wide`: what makes the leader send it the network."""
    return ("kind: Service\nmetadata: {name: sim-holder}\nspec:\n  mode: global\n  task:\n    runtime: process\n"
            "    networks: [wide]\n    command: [/bin/true]\n  placement: {constraints: [\"node.labels.sim == true\"]}\n")


class SimLog:
    """Follows the simulated agents' endpoints.jsonl: per node, its latest web endpoints and when."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.latest = {}

    def poll(self):
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind("\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            r = json.loads(line)
            self.latest[r["node"]] = (r["ts_ns"], set(r["endpoints"].get("default/web", [])))

    def wait(self, n, pred, timeout=120):
        """Waits until `n` nodes satisfy pred(task ids); returns their timestamps."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.poll()
            ok = [ts for ts, ids in self.latest.values() if pred(ids)]
            if len(ok) >= n:
                return ok
            time.sleep(0.02)
        seen = sorted({tuple(sorted(ids)) for _, ids in self.latest.values()})[:3]
        raise SystemExit(f"bench-net: only {len(ok)} of {n} simulated agents got there within {timeout} s; "
                         f"their web endpoints: {seen}")


def iperf(prefix, host, port, seconds):
    out = json.loads(sh(*prefix, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"))
    return out["end"]["sum_received"]["bits_per_second"] / 1e9


def rr(prefix, host, port):
    return json.loads(sh(*prefix, "python3", "-c", RR_CLIENT, host, str(port), "5000"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--berth", default="target/release/berth")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--simulated", type=int, default=1000)
    ap.add_argument("--sim-kills", type=int, default=10)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench-net: run as root (the agents' hosts are network namespaces)")
    if os.path.exists("/run/netns/berth-dev-sw"):
        raise SystemExit("bench-net: a berth dev cluster's hosts exist; stop it and run "
                         "`berth dev --data-dir DIR --remove-hosts` first")
    if subprocess.run(["sh", "-c", "command -v iperf3"], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "iperf3"], check=True, capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    berth = os.path.realpath(a.berth)
    tmp = tempfile.mkdtemp(prefix="berth-bench-net.")
    b = Bench(berth, tmp)
    result = {"machine": os.uname().release, "berth": berth}
    ok = False

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    # (SIGINT too: a shell starts background jobs with SIGINT ignored.)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        b.start()
        path = os.path.join(tmp, "services.yaml")
        open(path, "w").write(services())
        b.cli("apply", "-f", path)

        def running(svc, n=1):
            ts = [t for t in b.tasks(svc) if t["state"] == "running" and t["pid"] > 0 and t["addresses"]]
            if svc == "web":
                # Exactly the replicas: a task berth still lists as healthy while its death is on
                # its way is not one the agents must agree on.
                ts = [t for t in ts if t["health"] == "healthy"]
                return ts if len(ts) == n else None
            return ts if len(ts) >= n else None
        srv = b.wait("iperf3 task", lambda: running("nb-iperf"))[0]["addresses"]["wide"]
        echo = b.wait("echo task", lambda: running("nb-echo"))[0]["addresses"]["wide"]
        probe = b.wait("probe task", lambda: running("nb-probe"))[0]["pid"]
        b.wait("3 healthy web tasks", lambda: running("web", 3))

        # 1. Overlay vs underlay.
        host1 = ["nsenter", "--net=/run/netns/berth-dev-1"]
        host2 = ["nsenter", "--net=/run/netns/berth-dev-2"]
        task1 = ["nsenter", "--target", str(probe), "--net"]
        under_srv = subprocess.Popen(host2 + ["iperf3", "-s", "-p", "5202"], stdout=subprocess.DEVNULL)
        under_echo = subprocess.Popen(host2 + ["python3", "-c", ECHO_SERVER, "7001"])
        b.wait("the underlay servers listening", lambda: all(
            sh(*host2, "ss", "-Hltn", f"sport = :{port}").strip() for port in (5202, 7001)))
        rows = {"underlay": {"gbps": [], "p50_us": [], "p99_us": []}, "overlay": {"gbps": [], "p50_us": [], "p99_us": []}}
        try:
            for r in range(a.rounds):
                for path_name, prefix, host, iport, eport in [("underlay", host1, "198.19.254.12", 5202, 7001),
                                                               ("overlay", task1, srv, 5201, 7000)]:
                    if path_name == "overlay":
                        host_e = echo
                    else:
                        host_e = host
                    g = iperf(prefix, host, iport, a.seconds)
                    lat = rr(prefix, host_e, eport)
                    rows[path_name]["gbps"].append(g)
                    rows[path_name]["p50_us"].append(lat["p50_us"])
                    rows[path_name]["p99_us"].append(lat["p99_us"])
                    print(f"round {r + 1} {path_name:<8} {g:7.2f} Gbit/s  rr p50 {lat['p50_us']:.0f} us  p99 {lat['p99_us']:.0f} us",
                          flush=True)
        finally:
            under_srv.kill()
            under_echo.kill()
        med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in rows.items()}
        result["throughput"] = {"rounds": rows, "median": med,
                                "overlay_over_underlay": med["overlay"]["gbps"] / med["underlay"]["gbps"]}
        print(f"throughput: overlay {med['overlay']['gbps']:.2f} Gbit/s vs underlay {med['underlay']['gbps']:.2f} "
              f"Gbit/s: {result['throughput']['overlay_over_underlay']:.2f}x; rr p50 {med['overlay']['p50_us']:.0f} "
              f"vs {med['underlay']['p50_us']:.0f} us", flush=True)

        # 2. Endpoint propagation.
        pollers = []
        for i in (1, 2, 3):
            ov = json.load(open(os.path.join(tmp, f"agent-{i}", "overlay", "overlay.json")))
            block = ov["view"]["networks"]["default/wide"]["block"]
            net = block.split("/")[0]
            gw = socket.inet_ntoa(struct.pack(">I", struct.unpack(">I", socket.inet_aton(net))[0] + 1))
            pollers.append(subprocess.Popen(
                ["nsenter", f"--net=/run/netns/berth-dev-{i}", "python3", "-u", "-c", POLLER, gw,
                 f"tasks.web.default.svc.{DOMAIN}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))

        def watch(mode, addr):
            for p in pollers:
                p.stdin.write(f"{mode} {addr}\n")
                p.stdin.flush()

        def answers():
            return [int(p.stdout.readline()) for p in pollers]

        def summary(xs):
            return {"n": len(xs), "p50_ms": quantile(xs, 0.5), "p99_ms": quantile(xs, 0.99), "max_ms": max(xs)}

        def propagate(kills, sims=None, n_sims=0):
            """kill -9 of a web task, `kills` times: per kill, the time until every agent (and
            every simulated one) dropped it, and until every one has its healthy replacement."""
            dying, healthy, each = [], [], []
            for k in range(kills):
                before = running("web", 3) or b.wait("3 healthy web tasks", lambda: running("web", 3))
                ids = {t["id"] for t in before}
                if sims:
                    sims.wait(n_sims, lambda got: got == ids)
                victim = random.choice(before)
                watch("gone", victim["addresses"]["wide"])
                t0 = time.time_ns()
                os.kill(victim["pid"], signal.SIGKILL)
                times = answers()
                if sims:
                    sim_times = sims.wait(n_sims, lambda got: victim["id"] not in got)
                    times += sim_times
                    each += [(t - t0) / 1e6 for t in sim_times]
                d = (max(times) - t0) / 1e6
                dying.append(d)

                def fresh():
                    return [t for t in b.tasks("web") if t["id"] not in ids and t["addresses"]
                            and t["desired_state"] == "running"]
                new = b.wait("the replacement's address", fresh)[0]
                watch("present", new["addresses"]["wide"])
                seen = answers()
                if sims:
                    seen += sims.wait(n_sims, lambda got: new["id"] in got)
                h = b.wait("the replacement healthy", lambda: [t for t in fresh() if t["health"] == "healthy"])[0]
                ms = max(seen) / 1e6 - h["updated_at_ms"]
                healthy.append(ms)
                who = f"3 agents + {n_sims} simulated" if sims else "3 agents"
                print(f"kill {k + 1}: {victim['id']} dead -> gone from {who} in {d:.0f} ms; "
                      f"{h['id']} healthy -> on all in {ms:.0f} ms", flush=True)
            out = {"agents": 3, "simulated": n_sims, "dying": summary(dying), "healthy": summary(healthy)}
            if each:
                out["dying_each_simulated"] = summary(each)
            for name in ("dying", "healthy"):
                s = out[name]
                print(f"propagation ({name}, 3 agents + {n_sims} simulated, {s['n']} kills, slowest agent per kill): "
                      f"p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, max {s['max_ms']:.0f} ms", flush=True)
            return out

        sim_proc = None
        try:
            result["propagation"] = propagate(a.kills)
            if a.simulated > 0:
                token = b.cli("token", "create", "--ttl", "1h", "--uses", str(a.simulated)).strip()
                endpoints = ",".join(json.load(open(os.path.join(tmp, "cluster.json")))["endpoints"])
                sim_dir = os.path.join(tmp, "sims")
                sim_proc = subprocess.Popen(
                    [berth, "agent", "--simulate", str(a.simulated), "--simulate-networks", "--name", "sim",
                     "--labels", "sim=true", "--join", endpoints, "--token", token, "--data-dir", sim_dir],
                    stdout=open(os.path.join(tmp, "sims.log"), "w"), stderr=subprocess.STDOUT)
                b.wait(f"{a.simulated} simulated nodes ready", lambda: sum(
                    n["status"] == "ready" for n in json.loads(b.cli("get", "nodes", "-o", "json"))) == 3 + a.simulated,
                    timeout=600)
                path = os.path.join(tmp, "holders.yaml")
                open(path, "w").write(holders())
                b.cli("apply", "-f", path)
                sims = SimLog(os.path.join(sim_dir, "endpoints.jsonl"))
                ids = {t["id"] for t in running("web", 3)}
                t_up = time.time()
                sims.wait(a.simulated, lambda got: got == ids, timeout=600)
                print(f"{a.simulated} simulated agents hold a task on `wide` and see web's 3 endpoints "
                      f"({time.time() - t_up:.0f} s after the holders were applied)", flush=True)
                result["propagation_simulated"] = propagate(a.sim_kills, sims, a.simulated)
        finally:
            for p in pollers:
                p.kill()
            if sim_proc:
                sim_proc.kill()
        print(json.dumps(result))
        ok = True
    finally:
        # Cleaning up is not interrupted by a second signal.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        b.stop()
        # The agents' task namespaces are bind mounts under their data dirs.
        for root, _, files in os.walk(tmp):
            if root.endswith(os.path.join("overlay", "netns")):
                for f in files:
                    subprocess.run(["umount", "-l", os.path.join(root, f)], capture_output=True)
        if ok:
            subprocess.run(["rm", "-rf", tmp])
        else:
            print(f"bench-net: failed; the cluster's logs are in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
