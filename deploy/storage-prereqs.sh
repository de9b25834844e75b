#!/usr/bin/env bash
# Installs what volumes use and a fresh Debian machine may lack: e2fsprogs (mkfs.ext4 for sized
# local volumes, loop-mounted), and GlusterFS (the FUSE client `mount.glusterfs` that agents use
# for `driver: glusterfs` volumes, and `glusterd` for the tests' own one-brick server). Sourced by
# deploy/test.sh and deploy/dev-cluster.sh.
set -euo pipefail

storage_need=()
command -v mkfs.ext4 >/dev/null 2>&1 || storage_need+=(e2fsprogs)
command -v mount.glusterfs >/dev/null 2>&1 || [ -x /sbin/mount.glusterfs ] || storage_need+=(glusterfs-client)
command -v glusterd >/dev/null 2>&1 || [ -x /usr/sbin/glusterd ] || storage_need+=(glusterfs-server)
if [ ${#storage_need[@]} -gt 0 ]; then
  echo "installing storage prerequisites: ${storage_need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${storage_need[@]}" >/dev/null
  # Debian may start glusterd on install; the tests run their own, in a namespace of their own.
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now glusterd >/dev/null 2>&1 || true; fi
fi
