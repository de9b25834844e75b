#!/usr/bin/env bash
# Installs what sandboxed tasks need and a fresh Debian machine may lack: an OCI runtime (runc;
# crun 1.8 refuses hosts whose cgroup v2 hierarchy holds controllers beside v1 ones, as these
# machines do) and a static init for every task (tini's `tini-static`); and, for the tests of
# `runtime: oci`, a real OCI registry (`docker-registry`) and a C compiler for the static escape
# helpers. Sourced by deploy/test.sh and deploy/dev-cluster.sh.
set -euo pipefail

sandbox_need=()
[ -x /usr/sbin/runc ] || [ -x /usr/bin/runc ] || command -v runc >/dev/null 2>&1 || sandbox_need+=(runc)
[ -x /usr/bin/tini-static ] || [ -x /usr/bin/docker-init ] || sandbox_need+=(tini)
command -v docker-registry >/dev/null 2>&1 || sandbox_need+=(docker-registry)
command -v cc >/dev/null 2>&1 || sandbox_need+=(gcc libc6-dev)
if [ ${#sandbox_need[@]} -gt 0 ]; then
  echo "installing sandbox prerequisites: ${sandbox_need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${sandbox_need[@]}" >/dev/null
fi
