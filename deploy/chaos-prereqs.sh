#!/usr/bin/env bash
# Installs what the chaos suite (chaos/, `berth-chaos`) uses and a fresh Debian machine may lack:
# iproute2 and nftables for network namespaces and partitions, strace for fsync fault injection,
# libfaketime for clock skew, and etcd-server for the failover comparison with etcd 3.4.
# Sourced by deploy/test.sh.
set -euo pipefail

chaos_need=()
command -v ip >/dev/null 2>&1 || chaos_need+=(iproute2)
command -v nft >/dev/null 2>&1 || chaos_need+=(nftables)
command -v strace >/dev/null 2>&1 || chaos_need+=(strace)
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || chaos_need+=(libfaketime)
command -v etcd >/dev/null 2>&1 || chaos_need+=(etcd-server)
if [ ${#chaos_need[@]} -gt 0 ]; then
  echo "installing chaos suite prerequisites: ${chaos_need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${chaos_need[@]}" >/dev/null
  # Debian starts the etcd service on install; the suite runs its own members.
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true; fi
fi
