#!/usr/bin/env bash
# Builds a container image of berth from a local binary, with no registry: FROM scratch, holding
# the binary and the shared libraries it links (as ldd lists them), an /etc/passwd for root, and
# nothing else. One image serves masters and agents (`berth master ...`, `berth agent ...`).
#
#   deploy/image.sh [BINARY] [TAG]     # default: $CARGO_TARGET_DIR/release/berth (or target/), berth:local
#
# Agents in this image run tasks through the Docker runtime (the host's socket mounted into the
# container): the image has no runc, tini or shell for process tasks.
set -euo pipefail

bin="${1:-${CARGO_TARGET_DIR:-target}/release/berth}"
tag="${2:-berth:local}"
if [ ! -x "$bin" ]; then
    echo "image.sh: $bin is not an executable berth binary: build it with 'cargo build --release -p berth-cli' or name one" >&2
    exit 1
fi
command -v docker >/dev/null 2>&1 || { echo "image.sh: the docker CLI is not installed" >&2; exit 1; }

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$root/data"
chmod 1777 "$root/tmp"
cp "$bin" "$root/usr/local/bin/berth"
# The libraries the binary links, at the paths the dynamic loader looks for them (the loader too).
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
echo "root:x:0:0:root:/data:/usr/sbin/nologin" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENTRYPOINT ["/usr/local/bin/berth"]
DOCKERFILE
docker build -q -t "$tag" "$ctx" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes) from $bin"
