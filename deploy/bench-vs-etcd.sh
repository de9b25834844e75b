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
# etcd-server has the server; etcdctl (used to find the leader) is in etcd-client.
if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
fi

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
"$berth" dev --data-dir "$work/berth" --base-port "$base" --agents 0 > "$work/berth-dev.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do [ -f "$work/berth/berth.toml" ] && break; sleep 0.2; done
# berth speaks mutual TLS only; the credentials come from the berth.toml that `berth dev` wrote.
# etcd runs in plain text here, so berth carries the TLS cost and etcd does not.
export BERTH_CONFIG="$work/berth/berth.toml"
berth_eps="127.0.0.1:$base,127.0.0.1:$((base+1)),127.0.0.1:$((base+2))"

# The leader of each cluster, so that single-client latency is measured both on the leader and
# through a follower (where the write is forwarded), for both systems alike.
etcd_leader=$(ETCDCTL_API=3 etcdctl --endpoints "$etcd_eps" endpoint status -w json | python3 -c '
import json, sys
st = json.load(sys.stdin)
leader = st[0]["Status"]["leader"]
print(next(s["Endpoint"] for s in st if s["Status"]["header"]["member_id"] == leader))')
etcd_follower=$(echo "$etcd_eps" | tr , '\n' | grep -v "^${etcd_leader#http://}$" | head -n 1)
berth_leader_id=$("$berth" cluster status --endpoints "$berth_eps" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
berth_leader="127.0.0.1:$((base + berth_leader_id - 1))"
berth_follower=$(echo "$berth_eps" | tr , '\n' | grep -v "^${berth_leader}$" | head -n 1)

run() { # target endpoints clients ops where
  "$berth" bench kv --target "$1" --endpoints "$2" --clients "$3" --ops "$4" --value-size 256 -o json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); d["via"]=sys.argv[1]; print(json.dumps(d))' "$5"
}

echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
run etcd "${etcd_leader#http://}" 1 2000 leader
run berth "$berth_leader" 1 2000 leader
run etcd "$etcd_follower" 1 2000 follower
run berth "$berth_follower" 1 2000 follower
run etcd "$etcd_eps" 64 20000 all
run berth "$berth_eps" 64 20000 all
