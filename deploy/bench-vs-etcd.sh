#!/usr/bin/env bash
# berth next to etcd on the same machine, with the same harness (`berth bench kv`): 3 members
# each on loopback, fsync on (both defaults), 256-byte values, 1 and 64 clients.
# Needs Debian's etcd-server (installed if missing). Prints one JSON line per run.
# Usage: deploy/bench-vs-etcd.sh [path/to/berth]   (default: the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
berth="${1:-$target/release/berth}"
[ -x "$berth" ] || { echo "no berth binary at $berth: build it with 'cargo build --release -p berth-cli'" >&2; exit 1; }
command -v etcd >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null; }

work=$(mktemp -d /tmp/berth-vs-etcd.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# etcd: 3 members.
declare -a ec ep
for i in 1 2 3; do ec[$i]=$(free_port); ep[$i]=$(free_port); done
initial="e1=http://127.0.0.1:${ep[1]},e2=http://127.0.0.1:${ep[2]},e3=http://127.0.0.1:${ep[3]}"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$work/etcd-$i" \
    --listen-client-urls "http://127.0.0.1:${ec[$i]}" --advertise-client-urls "http://127.0.0.1:${ec[$i]}" \
    --listen-peer-urls "http://127.0.0.1:${ep[$i]}" --initial-advertise-peer-urls "http://127.0.0.1:${ep[$i]}" \
    --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token bench \
    --log-level error > "$work/etcd-$i.log" 2>&1 &
  pids+=($!)
done
etcd_eps="127.0.0.1:${ec[1]},127.0.0.1:${ec[2]},127.0.0.1:${ec[3]}"
for _ in $(seq 1 100); do
  ETCDCTL_API=3 etcdctl --endpoints "$etcd_eps" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done

# berth: 3 masters via berth dev.
base=$(free_port)
"$berth" dev --data-dir "$work/berth" --base-port "$base" > "$work/berth-dev.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do [ -f "$work/berth/berth.toml" ] && break; sleep 0.2; done
berth_eps="127.0.0.1:$base,127.0.0.1:$((base+1)),127.0.0.1:$((base+2))"

echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
for clients in 1 64; do
  ops=$(( clients == 1 ? 2000 : 20000 ))
  for t in etcd berth; do
    eps=$([ "$t" = etcd ] && echo "$etcd_eps" || echo "$berth_eps")
    "$berth" bench kv --target "$t" --endpoints "$eps" --clients "$clients" --ops "$ops" --value-size 256 -o json | tr -d '\n ' ; echo
  done
done
