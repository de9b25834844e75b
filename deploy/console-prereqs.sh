#!/usr/bin/env bash
# Installs what the web console's test needs and a fresh Debian machine may lack: Chromium (run
# headless, driven over the DevTools protocol on a pipe by tests/console/drive.py, which needs
# only Python's standard library) and curl (the API checks with a client certificate). Sourced
# by deploy/test.sh.
set -euo pipefail

console_need=()
command -v chromium >/dev/null 2>&1 || console_need+=(chromium)
command -v python3 >/dev/null 2>&1 || console_need+=(python3)
command -v curl >/dev/null 2>&1 || console_need+=(curl)
# Chromium draws text with whatever fonts there are: without any, screenshots show boxes.
ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1 || console_need+=(fonts-dejavu-core)
if [ ${#console_need[@]} -gt 0 ]; then
  echo "installing console test prerequisites: ${console_need[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${console_need[@]}" >/dev/null
fi
