#!/usr/bin/env bash
# Builds the tiny image the docker runtime tests use, `berth-test/busybox:1`: FROM scratch with a
# static busybox at /bin/busybox and /bin/sh -> busybox. No registry is needed: the binary comes
# from the Debian package `busybox-static` (installed with apt-get when missing; run as root).
#
# Idempotent: does nothing when the image already exists (set BERTH_TEST_IMAGE_REBUILD=1 to rebuild).
# The image has no entrypoint; run `/bin/busybox sh -c '...'` or `/bin/busybox httpd -f -p 8080 -h /`.
set -euo pipefail

IMAGE="${BERTH_TEST_IMAGE:-berth-test/busybox:1}"

if ! command -v docker >/dev/null 2>&1; then
    echo "test-image.sh: the docker CLI is not installed" >&2
    exit 1
fi

if [ "${BERTH_TEST_IMAGE_REBUILD:-0}" != "1" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi

# A static busybox: the Debian package's binary, or one named by BUSYBOX.
is_static() {
    # `ldd` prints "not a dynamic executable" (or "statically linked") for a static binary.
    local out
    out="$(LC_ALL=C ldd "$1" 2>&1 || true)"
    case "$out" in
    *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
    *) return 1 ;;
    esac
}

BUSYBOX="${BUSYBOX:-}"
if [ -z "$BUSYBOX" ]; then
    for candidate in /bin/busybox /usr/bin/busybox; do
        if [ -x "$candidate" ] && is_static "$candidate"; then
            BUSYBOX="$candidate"
            break
        fi
    done
fi
if [ -z "$BUSYBOX" ]; then
    echo "test-image.sh: installing busybox-static (a static busybox for the test image)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q busybox-static >/dev/null; then
        apt-get update -q >/dev/null
        apt-get install -y -q busybox-static >/dev/null
    fi
    BUSYBOX=/bin/busybox
fi
if ! is_static "$BUSYBOX"; then
    echo "test-image.sh: $BUSYBOX is not statically linked; install busybox-static or set BUSYBOX" >&2
    exit 1
fi

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/root/bin" "$ctx/root/tmp" "$ctx/root/www"
cp "$BUSYBOX" "$ctx/root/bin/busybox"
chmod 0755 "$ctx/root/bin/busybox"
chmod 1777 "$ctx/root/tmp"
for applet in sh echo sleep cat ls true false kill ps env httpd wget nc; do
    ln -s busybox "$ctx/root/bin/$applet"
done
echo "berth test image" >"$ctx/root/www/index.html"
cat >"$ctx/Dockerfile" <<'EOF'
FROM scratch
COPY root/ /
ENV PATH=/bin
LABEL berth.test-image="1"
EOF

# The classic builder needs nothing from a registry (nor buildx) for FROM scratch; its output is
# shown only when it fails.
if ! DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" "$ctx" >"$ctx/build.log" 2>&1; then
    cat "$ctx/build.log" >&2
    echo "test-image.sh: docker build of $IMAGE failed" >&2
    exit 1
fi
echo "test-image.sh: built $IMAGE" >&2
