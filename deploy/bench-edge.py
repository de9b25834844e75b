#!/usr/bin/env python3
"""Edge benchmarks on a real local cluster: `berth dev` as root (3 masters, 3 agents, each in a
host of its own; agent-1 is the edge router).

    deploy/bench-edge.py [--berth target/release/berth] [--rounds 3] [--seconds 10]
                         [--connections 50] [--changes 30]

1. Requests per second and latency p50/p99 through the edge, side by side, interleaved round by
   round, with wrk from the machine's own namespace, for one route to the same two backend tasks
   (nginx answering 200 "ok", on agents 2 and 3), plain HTTP and TLS (the same certificate), the
   order of the three rotating from round to round:
   - berth: the route served by agent-1's edge router (HAProxy run by the agent, its config
     rendered from the route), ports 80/443;
   - haproxy: HAProxy configured by hand for the same route (by Host, X-Forwarded-For, -Proto and
     -Host, the same retries), in the same host, ports 8081/8444;
   - nginx: nginx configured by hand for the same route (server_name, the same headers, upstream
     keep-alive, the next upstream on an error), ports 8082/8445;
   - edge-config: berth's generated configuration, copied and started by hand, ports 8083/8446
     (separates the configuration's cost from how the agent runs HAProxy).
   All three proxies run in agent-1's host and reach the tasks over the overlay, with their
   default thread/worker counts (one per CPU), and all three write an access log line per
   request to a file (the edge must; the hand-made ones do the same work).
2. Route change to first request served at the edge: --changes times, a new route is applied and
   the edge is asked for its host every 5 ms until it answers 200; p50/p99 from the apply.

Prints one line per measurement and a JSON summary last. Root only; refuses to run while a
`berth dev` cluster's hosts exist (they are shared). Every address is from 198.18.0.0/15.
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import DevCluster, quantile, sh  # noqa: E402

EDGE_NS = "berth-dev-1"
EDGE = "198.19.254.11"
HOST = "bench.apps.berth.test"

NGINX_BACKEND = """
worker_processes 1;
pid /tmp/nginx.pid;
error_log stderr;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path /tmp/body; proxy_temp_path /tmp/proxy; fastcgi_temp_path /tmp/fcgi;
    uwsgi_temp_path /tmp/uwsgi; scgi_temp_path /tmp/scgi;
    keepalive_requests 100000;
    server { listen 8080; location / { return 200 "ok\\n"; } }
}
"""

SERVICES = f"""
kind: Service
metadata: {{name: eb-web}}
spec:
  replicas: 2
  task:
    runtime: process
    command: [/usr/sbin/nginx, -e, stderr, -p, /tmp, -c, /srv/nginx.conf, -g, "daemon off;"]
    configs: [{{source: eb-nginx, target: /srv/nginx.conf}}]
    ports: [{{name: http, container: 8080}}]
    health: {{tcp: {{port: 8080}}, interval: 2s}}
    resources: {{cpu: 0.1, memory: 32Mi}}
  placement:
    constraints: ["node.name != agent-1"]
    max_replicas_per_node: 1
---
kind: Route
metadata: {{name: eb-web}}
spec:
  host: {HOST}
  service: eb-web
  port: http
  tls: {{termination: edge, secret: eb-cert}}
"""

HAPROXY_BY_HAND = """
global
    log stdout format raw local0 info
    ssl-default-bind-options ssl-min-ver TLSv1.2
    tune.ssl.default-dh-param 2048
defaults
    mode http
    log global
    option httplog
    option dontlognull
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 30s
    retries 3
    retry-on conn-failure empty-response
    option redispatch 1
    http-reuse safe
frontend plain
    bind 0.0.0.0:8081
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request disable-l7-retry unless {{ method GET HEAD OPTIONS PUT DELETE TRACE }}
    use_backend web if {{ hdr(host) -i {host} }}
frontend tls
    bind 0.0.0.0:8444 ssl crt {cert} alpn h2,http/1.1
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request disable-l7-retry unless {{ method GET HEAD OPTIONS PUT DELETE TRACE }}
    use_backend web if {{ hdr(host) -i {host} }}
backend web
    balance roundrobin
{servers}
"""

NGINX_BY_HAND = """
worker_processes auto;
pid {dir}/nginx-hand.pid;
error_log {dir}/nginx-hand.err;
events {{ worker_connections 8192; }}
http {{
    access_log {dir}/nginx-hand-access.log;
    client_body_temp_path {dir}/nb; proxy_temp_path {dir}/np; fastcgi_temp_path {dir}/nf;
    uwsgi_temp_path {dir}/nu; scgi_temp_path {dir}/ns;
    keepalive_requests 100000;
    upstream web {{
{servers}
        keepalive 128;
    }}
    server {{
        listen 8082;
        listen 8445 ssl http2;
        server_name {host};
        ssl_certificate {cert};
        ssl_certificate_key {cert};
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_next_upstream error;
        }}
    }}
}}
"""


def http_status(addr, port, host, timeout=1.0):
    try:
        with socket.create_connection((addr, port), timeout=timeout) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(64).decode(errors="replace")
            return int(data.split()[1]) if data.startswith("HTTP/") else None
    except (OSError, ValueError, IndexError):
        return None


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_wrk(text):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    lat = {}
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        lat[q] = float(m.group(1)) * UNITS[m.group(2)] if m else None
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    return {"rps": rps, "p50_ms": lat["50"], "p99_ms": lat["99"],
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1).strip() if socket_errors else ""}


class Bench(DevCluster):
    def __init__(self, berth, tmp):
        super().__init__(berth, tmp, "bench-edge")
        self.hand = []

    def certificate(self):
        d = self.dir
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", f"{d}/eb.key", "-out", f"{d}/eb.crt", "-days", "2", "-subj", f"/CN={HOST}",
           "-addext", f"subjectAltName=DNS:{HOST}")
        pem = f"{d}/eb.pem"
        with open(pem, "w") as f:
            f.write(open(f"{d}/eb.crt").read() + open(f"{d}/eb.key").read())
        return pem

    def deploy(self, pem):
        conf = os.path.join(self.dir, "nginx-backend.conf")
        with open(conf, "w") as f:
            f.write(NGINX_BACKEND)
        self.cli("config", "create", "eb-nginx", "--from-file", conf)
        self.cli("secret", "create", "eb-cert", "--from-file", pem)
        spec = os.path.join(self.dir, "bench.yaml")
        with open(spec, "w") as f:
            f.write(SERVICES)
        self.cli("apply", "-f", spec, "--wait", "--timeout", "3m")

        def endpoints():
            r = json.loads(self.cli("describe", "route", "eb-web", "-o", "json"))
            eps = sorted(e["address"] for e in r["endpoints"])
            return eps if len(eps) == 2 else None
        eps = self.wait("two endpoints for the route", endpoints)
        self.wait("the route at the edge", lambda: http_status(EDGE, 80, HOST) == 200)
        return eps

    def start_by_hand(self, pem, eps):
        servers = "\n".join(f"    server e{i} {a}" for i, a in enumerate(eps))
        hcfg = os.path.join(self.dir, "haproxy-hand.cfg")
        with open(hcfg, "w") as f:
            f.write(HAPROXY_BY_HAND.format(cert=pem, servers=servers, host=HOST))
        ncfg = os.path.join(self.dir, "nginx-hand.conf")
        with open(ncfg, "w") as f:
            f.write(NGINX_BY_HAND.format(dir=self.dir, cert=pem, host=HOST,
                                         servers="\n".join(f"        server {a};" for a in eps)))
        sh("haproxy", "-c", "-q", "-f", hcfg)
        hlog = open(os.path.join(self.dir, "haproxy-hand.log"), "w")
        self.hand.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{EDGE_NS}", "haproxy", "-W", "-db", "-f", hcfg],
                                          stdout=hlog, stderr=subprocess.STDOUT, start_new_session=True))
        self.hand.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{EDGE_NS}", "nginx", "-e",
                                           os.path.join(self.dir, "nginx-hand.err"), "-c", ncfg, "-g", "daemon off;"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        self.wait("haproxy by hand", lambda: http_status(EDGE, 8081, HOST) == 200, 30)
        self.wait("nginx by hand", lambda: http_status(EDGE, 8082, HOST) == 200, 30)
        # The edge's own configuration, copied and started by hand on other ports: tells the cost
        # of the configuration apart from that of how the agent runs HAProxy.
        node = next(n for n in json.loads(self.cli("get", "nodes", "-o", "json")) if n["name"] == "agent-1")["id"]
        run = f"/run/berth/{node}/edge"
        text = open(f"{run}/haproxy.cfg").read()
        text = text.replace("bind 0.0.0.0:80\n", "bind 0.0.0.0:8083\n").replace("bind 0.0.0.0:443 ", "bind 0.0.0.0:8446 ")
        text = text.replace(f"stats socket {run}/admin.sock", f"stats socket {self.dir}/copy-admin.sock")
        ccfg = os.path.join(self.dir, "haproxy-edge-copy.cfg")
        with open(ccfg, "w") as f:
            f.write(text)
        clog = open(os.path.join(self.dir, "haproxy-edge-copy.log"), "w")
        self.hand.append(subprocess.Popen(["nsenter", f"--net=/run/netns/{EDGE_NS}", "haproxy", "-W", "-db", "-f", ccfg],
                                          stdout=clog, stderr=subprocess.STDOUT, start_new_session=True))
        self.wait("the edge's configuration by hand", lambda: http_status(EDGE, 8083, HOST) == 200, 30)

    def wrk(self, url, seconds, connections):
        out = sh("wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-H", f"Host: {HOST}", url)
        return parse_wrk(out)

    def route_changes(self, n):
        times = []
        for i in range(n):
            host = f"rc-{i}.apps.berth.test"
            spec = os.path.join(self.dir, "rc.yaml")
            with open(spec, "w") as f:
                f.write(f"kind: Route\nmetadata: {{name: rc-{i}}}\nspec: {{host: {host}, service: eb-web, port: http}}\n")
            t0 = time.monotonic()
            self.cli("apply", "-f", spec)
            deadline = t0 + 30
            while http_status(EDGE, 80, host, 0.5) != 200:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench-edge: route {host} never served")
                time.sleep(0.005)
            ms = (time.monotonic() - t0) * 1000
            times.append(ms)
            print(f"route change {i + 1}/{n}: served after {ms:.0f} ms", flush=True)
            self.cli("delete", "route", f"rc-{i}")
        return times

    def stop(self):
        for p in self.hand:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.cli("delete", "route", "eb-web")
            self.cli("delete", "service", "eb-web")
        except Exception:
            pass
        self.stop_dev()
        # The edge's HAProxy and the tasks outlive their agents: end this benchmark's.
        pidfile = os.path.join(self.dir, "agent-1", "edge", "haproxy.pid")
        try:
            os.killpg(int(open(pidfile).read().split()[0]), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
        self.kill_services(["eb-web"])
        self.remove_hosts()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--berth", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "berth"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--changes", type=int, default=30)
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench-edge: run as root (the hosts are network namespaces)")
    if os.path.exists(f"/run/netns/{EDGE_NS}"):
        raise SystemExit(f"bench-edge: /run/netns/{EDGE_NS} exists: a `berth dev` cluster's hosts are up; stop it "
                         "and run `berth dev --data-dir DIR --remove-hosts` first")
    for tool in ("wrk", "haproxy", "nginx", "openssl"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            raise SystemExit(f"bench-edge: {tool} is missing: source deploy/edge-prereqs.sh")
    tmp = tempfile.mkdtemp(prefix="berth-bench-edge-")
    b = Bench(a.berth, tmp)
    results = {name: {"plain": [], "tls": []} for name in ("berth", "haproxy", "nginx", "edge-config")}
    targets = {"berth": (80, 443), "haproxy": (8081, 8444), "nginx": (8082, 8445), "edge-config": (8083, 8446)}
    try:
        b.start()
        pem = b.certificate()
        eps = b.deploy(pem)
        b.start_by_hand(pem, eps)
        print(f"backends: {', '.join(eps)} (nginx tasks); proxies in {EDGE_NS} ({EDGE})", flush=True)
        for r in range(a.rounds):
            # The order rotates round by round, so that no proxy always goes first.
            names = list(targets)
            names = names[r % len(names):] + names[:r % len(names)]
            for mode in ("plain", "tls"):
                for name in names:
                    ports = targets[name]
                    url = f"http://{EDGE}:{ports[0]}/" if mode == "plain" else f"https://{EDGE}:{ports[1]}/"
                    m = b.wrk(url, a.seconds, a.connections)
                    results[name][mode].append(m)
                    print(f"round {r + 1} {mode:5} {name:7}: {m['rps']:9.0f} req/s  p50 {m['p50_ms']:.2f} ms  "
                          f"p99 {m['p99_ms']:.2f} ms  non-2xx {m['non_2xx']} {m['socket_errors']}", flush=True)
        changes = b.route_changes(a.changes)
    finally:
        b.stop()
    summary = {"rounds": a.rounds, "seconds": a.seconds, "connections": a.connections, "proxies": {}}
    for name, modes in results.items():
        summary["proxies"][name] = {}
        for mode, runs in modes.items():
            summary["proxies"][name][mode] = {
                "rps_median": statistics.median(m["rps"] for m in runs),
                "p50_ms_median": statistics.median(m["p50_ms"] for m in runs),
                "p99_ms_median": statistics.median(m["p99_ms"] for m in runs),
                "non_2xx": sum(m["non_2xx"] for m in runs),
            }
    for mode in ("plain", "tls"):
        base = summary["proxies"]["berth"][mode]
        for other in ("haproxy", "nginx"):
            o = summary["proxies"][other][mode]
            summary.setdefault("ratios", {})[f"{mode}_rps_berth_over_{other}"] = round(base["rps_median"] / o["rps_median"], 3)
            summary["ratios"][f"{mode}_p99_berth_over_{other}"] = round(base["p99_ms_median"] / o["p99_ms_median"], 3)
            # The same ratios round by round (each pair measured minutes apart at most): on a
            # shared, noisy machine their median and spread say more than a ratio of medians.
            pairs = list(zip(results["berth"][mode], results[other][mode]))
            rps = sorted(b["rps"] / x["rps"] for b, x in pairs)
            p99 = sorted(b["p99_ms"] / x["p99_ms"] for b, x in pairs)
            summary.setdefault("paired", {})[f"{mode}_berth_over_{other}"] = {
                "rps_median": round(statistics.median(rps), 3), "rps_min": round(rps[0], 3), "rps_max": round(rps[-1], 3),
                "p99_median": round(statistics.median(p99), 3), "p99_min": round(p99[0], 3), "p99_max": round(p99[-1], 3),
            }
    summary["route_change_ms"] = {"n": len(changes), "p50": quantile(changes, 0.5), "p99": quantile(changes, 0.99),
                                  "max": max(changes)}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
