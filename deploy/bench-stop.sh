#!/usr/bin/env bash
# Time from `berth delete service` (3 replicas) to the last of its processes gone, measured from
# the outside (/proc), on a local cluster of real masters and agents (`berth dev`).
#
#   deploy/bench-stop.sh [BERTH_BINARY] [ROUNDS]      (default: target/release/berth, 5 rounds)
#
# The task is `python3 -m http.server` when /usr/bin/python3 exists (a program with no SIGTERM handler of
# its own: as PID 1 of its namespace it would ignore SIGTERM), else `sh -c 'sleep 1000'`.
# Prints one line per round, then a JSON summary. Works with any berth binary that has `dev`,
# `apply`, `get tasks` and `delete service`, so two builds can be compared in one run.
set -euo pipefail
bin="${1:-target/release/berth}"
rounds="${2:-5}"
bin="$(realpath "$bin")"
dir="$(mktemp -d /tmp/berth-bench-stop.XXXXXX)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base=$(( (port % 20000) + 30000 ))
dev_pid=""
cleanup() {
  if [ -n "$dev_pid" ]; then
    "$bin" --config "$dir/berth.toml" delete service bench-stop >/dev/null 2>&1 || true
    kill -INT "$dev_pid" 2>/dev/null || true
    wait "$dev_pid" 2>/dev/null || true
  fi
  # Tasks outlive their agents: end any left over (only this benchmark's, by its service name).
  python3 - <<'EOF' || true
import os, signal
for p in os.listdir('/proc'):
    if p.isdigit():
        try:
            env = open(f'/proc/{p}/environ', 'rb').read().split(b'\0')
        except OSError:
            continue
        if b'BERTH_SERVICE=bench-stop' in env:
            try: os.kill(int(p), signal.SIGKILL)
            except OSError: pass
EOF
  rm -rf "$dir"
}
trap cleanup EXIT

# Host-network agents (as root, newer builds would otherwise give each agent a host of its own).
nohosts=$("$bin" dev --help 2>/dev/null | grep -q -- --no-hosts && echo --no-hosts || true)
"$bin" dev --data-dir "$dir" --base-port "$base" --agents 2 $nohosts >"$dir/dev.log" 2>&1 &
dev_pid=$!
berth() { "$bin" --config "$dir/berth.toml" "$@"; }
for _ in $(seq 1 600); do
  [ -f "$dir/berth.toml" ] && berth get nodes -o json 2>/dev/null | python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if sum(x["status"]=="ready" for x in n)==2 else 1)' && break
  sleep 0.2
done

if [ -x /usr/bin/python3 ]; then
  cmd='["/usr/bin/python3", "-m", "http.server", "0", "--bind", "127.0.0.1"]'
  what="python3 -m http.server"
else
  cmd='["/bin/sh", "-c", "sleep 1000"]'
  what="sh -c 'sleep 1000'"
fi
cat >"$dir/svc.yaml" <<EOF
kind: Service
metadata: {name: bench-stop}
spec:
  mode: replicated
  replicas: 3
  task:
    runtime: process
    command: $cmd
    resources: {cpu: 0.1, memory: 32Mi}
EOF

results=()
for r in $(seq 1 "$rounds"); do
  berth apply -f "$dir/svc.yaml" >/dev/null
  for _ in $(seq 1 600); do
    n=$(berth get tasks --service bench-stop -o json | python3 -c 'import json,sys; print(sum(t["state"]=="running" and t["desired_state"]=="running" and t.get("pid",0)>0 for t in json.load(sys.stdin)))')
    [ "$n" = 3 ] && break
    sleep 0.1
  done
  ms=$(python3 - "$bin" "$dir/berth.toml" <<'EOF'
import os, subprocess, sys, time
def procs():
    out = 0
    for p in os.listdir('/proc'):
        if p.isdigit():
            try:
                env = open(f'/proc/{p}/environ', 'rb').read().split(b'\0')
                stat = open(f'/proc/{p}/stat').read()
            except OSError:
                continue
            if b'BERTH_SERVICE=bench-stop' in env and stat.rsplit(')', 1)[1].split()[0] != 'Z':
                out += 1
    return out
assert procs() >= 3, "the service's processes are not running"
t = time.monotonic()
subprocess.run([sys.argv[1], '--config', sys.argv[2], 'delete', 'service', 'bench-stop'], check=True, stdout=subprocess.DEVNULL)
while procs() > 0:
    if time.monotonic() - t > 120:
        sys.exit("processes still running 120 s after the delete")
    time.sleep(0.005)
print(round((time.monotonic() - t) * 1000))
EOF
)
  echo "round $r: delete service (3 replicas of $what) -> last process gone: ${ms} ms"
  results+=("$ms")
  # The service must be gone before it is applied again.
  for _ in $(seq 1 600); do
    [ "$(berth get services -o json | python3 -c 'import json,sys; print(sum(s.get("name")=="bench-stop" for s in json.load(sys.stdin)))')" = 0 ] && break
    sleep 0.1
  done
done
python3 - "$bin" "$what" "${results[@]}" <<'EOF'
import json, statistics, sys
ms = sorted(int(x) for x in sys.argv[3:])
print(json.dumps({"benchmark": "delete-to-last-process-gone", "binary": sys.argv[1], "task": sys.argv[2],
                  "replicas": 3, "rounds": len(ms), "ms": ms, "p50_ms": statistics.median(ms), "max_ms": ms[-1]}))
EOF
