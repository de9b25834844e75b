#!/usr/bin/env bash
# A multi-host cluster on one Docker host (deploy/compose.yaml): 3 masters and 3 agents, each a
# container with its own address (198.19.200.11-13 and .21-23).
#
#   deploy/compose.sh up [BINARY]   # image from BINARY (default: the release build), PKI, masters,
#                                   # a join token, agents; waits until 3 nodes are ready
#   deploy/compose.sh down          # removes the containers, their volumes, and the agents' tasks
#
# Settings (environment): BERTH_COMPOSE_DIR (default ./berth-compose: the PKI, the join token and
# berth.toml for the CLI), BERTH_PROJECT (default berth: the compose project), BERTH_IMAGE
# (default berth:local). Needs docker and docker-compose; the agents run tasks with the host's
# Docker.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd="${1:-}"
dir="${BERTH_COMPOSE_DIR:-$PWD/berth-compose}"
export BERTH_PROJECT="${BERTH_PROJECT:-berth}"
export BERTH_IMAGE="${BERTH_IMAGE:-berth:local}"
export BERTH_PKI="$dir/pki"
export BERTH_TOKEN_DIR="$dir/token"
compose=(docker-compose -p "$BERTH_PROJECT" -f deploy/compose.yaml)
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "compose.sh: docker-compose is not installed (apt-get install docker-compose)" >&2
    exit 1
fi

down() {
    "${compose[@]}" down -v --remove-orphans
    # The agents' tasks are containers of the host's Docker, labelled with their agent's data dir.
    for i in 1 2 3; do
        ids="$(docker ps -aq --filter "label=berth.owner=/data/$BERTH_PROJECT/agent-$i")"
        [ -z "$ids" ] || docker rm -f $ids >/dev/null
    done
}

# Polls `berth ARGS` until its output satisfies the Python test $1 on `v` (parsed JSON).
wait_for() {
    local what="$1" test="$2"
    shift 2
    for _ in $(seq 1 240); do
        if out="$("$berth" --config "$dir/berth.toml" "$@" -o json 2>/dev/null)" &&
            python3 -c "import json,sys; v=json.loads(sys.argv[1]); sys.exit(0 if ($test) else 1)" "$out"; then
            return 0
        fi
        sleep 0.5
    done
    echo "compose.sh: timed out waiting for $what; see '${compose[*]} logs'" >&2
    return 1
}

case "$cmd" in
up)
    berth="${2:-${CARGO_TARGET_DIR:-target}/release/berth}"
    bash deploy/image.sh "$berth" "$BERTH_IMAGE"
    mkdir -p "$dir" "$BERTH_TOKEN_DIR"
    chmod 0700 "$dir"
    [ -f "$BERTH_PKI/ca.crt" ] || "$berth" pki init --out "$BERTH_PKI" >/dev/null
    cat > "$dir/berth.toml" <<TOML
endpoints = ["198.19.200.11:7001", "198.19.200.12:7001", "198.19.200.13:7001"]
ca_cert = "$BERTH_PKI/ca.crt"
cert = "$BERTH_PKI/admin.crt"
key = "$BERTH_PKI/admin.key"
TOML
    "${compose[@]}" up -d master-1 master-2 master-3
    wait_for "a leader" 'v.get("leader", 0) > 0' cluster status
    # Agents that joined before keep their identity (in their volumes); new ones need a token.
    "$berth" --config "$dir/berth.toml" token create --uses 3 --ttl 1h > "$BERTH_TOKEN_DIR/join-token"
    "${compose[@]}" up -d agent-1 agent-2 agent-3
    wait_for "3 ready nodes" 'sum(1 for n in v if n["status"] == "ready") == 3' get nodes
    echo "berth on compose: 3 masters (198.19.200.11-13:7001), 3 agents (198.19.200.21-23)"
    echo "  export BERTH_CONFIG=$dir/berth.toml"
    echo "  berth get nodes"
    ;;
down)
    down
    ;;
*)
    echo "usage: deploy/compose.sh up [BINARY] | down" >&2
    exit 2
    ;;
esac
