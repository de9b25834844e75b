#!/usr/bin/env bash
# Quick start: a local HA cluster of 3 masters on 127.0.0.1:7001-7003 and 3 agents, data in
# ./berth-dev (CA and admin credentials in ./berth-dev/pki, client config in ./berth-dev/berth.toml).
# Installs missing build prerequisites, builds berth, then runs `berth dev` until Ctrl-C.
# Extra arguments go to `berth dev` (e.g. --masters 5 --base-port 8001).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/prereqs.sh
# Volumes: mkfs.ext4 for sized local volumes, the GlusterFS client for glusterfs ones (as root).
if [ "$(id -u)" -eq 0 ]; then source deploy/storage-prereqs.sh; fi
# Sandboxed tasks: runc and a static init (tini).
source deploy/sandbox-prereqs.sh
source deploy/edge-prereqs.sh
cargo build -p berth-cli --bin berth
target="${CARGO_TARGET_DIR:-target}"
exec "$target/debug/berth" dev --data-dir "${BERTH_DEV_DIR:-berth-dev}" "$@"
