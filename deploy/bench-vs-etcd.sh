#!/usr/bin/env bash
# berth next to etcd on the same machine, with the same harness (`berth bench kv`): 3 members
# each on loopback, fsync on (both defaults), 256-byte values, 1 and 64 clients. Both speak mutual
# TLS on every connection, as berth always does and as etcd does under Kubernetes: etcd gets
# certificates from an openssl CA (client and peer TLS with client-certificate auth).
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

# etcd's certificates: one P-256 CA, one certificate for the members (server and client use, for
# 127.0.0.1) and one for the benchmark client.
pki="$work/etcd-pki"
mkdir -p "$pki"
openssl ecparam -name prime256v1 -genkey -noout -out "$pki/ca.key" 2>/dev/null
openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=etcd-bench-ca" -days 2 -out "$pki/ca.crt" 2>/dev/null
issue() { # name extensions
  openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$1.key" 2>/dev/null
  openssl req -new -key "$pki/$1.key" -subj "/CN=$1" -out "$pki/$1.csr" 2>/dev/null
  printf '%s\n' "$2" > "$pki/$1.ext"
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
    -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
}
issue member "subjectAltName=IP:127.0.0.1,DNS:localhost
extendedKeyUsage=serverAuth,clientAuth"
issue client "extendedKeyUsage=clientAuth"
etcd_tls=(--cert-file "$pki/member.crt" --key-file "$pki/member.key" --client-cert-auth --trusted-ca-file "$pki/ca.crt"
  --peer-cert-file "$pki/member.crt" --peer-key-file "$pki/member.key" --peer-client-cert-auth
  --peer-trusted-ca-file "$pki/ca.crt")
etcdctl_tls=(--cacert "$pki/ca.crt" --cert "$pki/client.crt" --key "$pki/client.key")
etcd_client_tls=(--ca-cert "$pki/ca.crt" --cert "$pki/client.crt" --key "$pki/client.key")

# etcd: 3 members.
declare -a ec ep
for i in 1 2 3; do ec[$i]=$(free_port); ep[$i]=$(free_port); done
initial="e1=https://127.0.0.1:${ep[1]},e2=https://127.0.0.1:${ep[2]},e3=https://127.0.0.1:${ep[3]}"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$work/etcd-$i" "${etcd_tls[@]}" \
    --listen-client-urls "https://127.0.0.1:${ec[$i]}" --advertise-client-urls "https://127.0.0.1:${ec[$i]}" \
    --listen-peer-urls "https://127.0.0.1:${ep[$i]}" --initial-advertise-peer-urls "https://127.0.0.1:${ep[$i]}" \
    --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token bench \
    --log-level error > "$work/etcd-$i.log" 2>&1 &
  pids+=($!)
done
etcd_eps="127.0.0.1:${ec[1]},127.0.0.1:${ec[2]},127.0.0.1:${ec[3]}"
for _ in $(seq 1 100); do
  ETCDCTL_API=3 etcdctl "${etcdctl_tls[@]}" --endpoints "$etcd_eps" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done

# berth: 3 masters via berth dev.
base=$(free_port)
nohosts=$("$berth" dev --help 2>/dev/null | grep -q -- --no-hosts && echo --no-hosts || true)
"$berth" dev --data-dir "$work/berth" --base-port "$base" --agents 0 $nohosts > "$work/berth-dev.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do [ -f "$work/berth/berth.toml" ] && break; sleep 0.2; done
# berth's credentials come from the berth.toml that `berth dev` wrote.
berth_config="$work/berth/berth.toml"
berth_eps="127.0.0.1:$base,127.0.0.1:$((base+1)),127.0.0.1:$((base+2))"

# The leader of each cluster, so that single-client latency is measured both on the leader and
# through a follower (where the write is forwarded), for both systems alike.
etcd_leader=$(ETCDCTL_API=3 etcdctl "${etcdctl_tls[@]}" --endpoints "$etcd_eps" endpoint status -w json | python3 -c '
import json, sys
st = json.load(sys.stdin)
leader = st[0]["Status"]["leader"]
print(next(s["Endpoint"] for s in st if s["Status"]["header"]["member_id"] == leader))')
etcd_follower=$(echo "$etcd_eps" | tr , '\n' | grep -v "^${etcd_leader#https://}$" | head -n 1)
berth_leader_id=$("$berth" cluster status --config "$berth_config" --endpoints "$berth_eps" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader"])')
berth_leader="127.0.0.1:$((base + berth_leader_id - 1))"
berth_follower=$(echo "$berth_eps" | tr , '\n' | grep -v "^${berth_leader}$" | head -n 1)

run() { # target endpoints clients ops where
  if [ "$1" = etcd ]; then creds=("${etcd_client_tls[@]}"); else creds=(--config "$berth_config"); fi
  "$berth" bench kv --target "$1" "${creds[@]}" --endpoints "$2" --clients "$3" --ops "$4" --value-size 256 -o json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); d["via"]=sys.argv[1]; print(json.dumps(d))' "$5"
}

echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"

# Idle memory, side by side: each member's resident set once both clusters have been up and idle
# for 10 s (before any load), as {"idle_rss_kib": {"etcd": [...], "berth": [...]}}.
sleep 10
rss() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
etcd_rss=$(for p in "${pids[@]:0:3}"; do rss "$p"; done | paste -sd,)
berth_rss=$(for p in $(pgrep -f -- "--data-dir $work/berth/master-" || true); do rss "$p"; done | paste -sd,)
echo "{\"idle_rss_kib\": {\"etcd\": [$etcd_rss], \"berth\": [$berth_rss]}}"
run etcd "${etcd_leader#https://}" 1 2000 leader
run berth "$berth_leader" 1 2000 leader
run etcd "$etcd_follower" 1 2000 follower
run berth "$berth_follower" 1 2000 follower
run etcd "$etcd_eps" 64 20000 all
run berth "$berth_eps" 64 20000 all
