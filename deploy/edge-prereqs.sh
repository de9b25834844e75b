#!/usr/bin/env bash
# Installs what edge nodes and the edge's tests and benchmarks need and a fresh Debian machine may
# lack: HAProxy (the edge router), and for the benchmark's side-by-side runs and the tests' HTTP/2
# checks, nginx, wrk and h2load (nghttp2-client). berth runs its own HAProxy processes, never the
# package's service. Sourced by deploy/test.sh and deploy/dev-cluster.sh.
set -euo pipefail

edge_need=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || edge_need+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || edge_need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || edge_need+=(wrk)
command -v h2load >/dev/null 2>&1 || edge_need+=(nghttp2-client)
if [ ${#edge_need[@]} -gt 0 ]; then
  echo "installing edge prerequisites: ${edge_need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${edge_need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"
