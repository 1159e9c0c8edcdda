#!/usr/bin/env bash
# N replicas of a guarded-serving image behind HAProxy, on one PostgreSQL, on this host.
#
#   GUARDED_SERVING_STORE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \
#   deploy/replicas/replicas.sh up IMAGE [N]   # N replicas (default 3) and the balancer
#   deploy/replicas/replicas.sh restart        # rolling restart: drain, SIGTERM, start, ready, one at a time
#   deploy/replicas/replicas.sh status         # the balancer's view of each replica
#   deploy/replicas/replicas.sh down           # SIGTERM every replica, stop the balancer
#
# Environment (the defaults suit one host):
#   GUARDED_SERVING_STORE_URL  the shared store (required for `up`): drift counts, the prediction log
#                              and outcomes add up across replicas there
#   LB_PORT=8080               where HAProxy listens (127.0.0.1)
#   REPLICA_PORTS="3001 3002 3003"   one port per replica (default: 3001.. for N replicas)
#   ADMIN_PORT=$((LB_PORT+1))  HAProxy's runtime API (127.0.0.1), used by `restart`
#   WORKERS=1                  worker processes per replica
#   GRACE=30                   seconds between SIGTERM and SIGKILL when a replica stops
#   STATE_DIR=/tmp/guarded-serving-replicas-$LB_PORT   the HAProxy config, pid file and state
#   GUARDED_SERVING_TOKEN(_FILE), OTEL_EXPORTER_OTLP_ENDPOINT are passed on to the replicas.
#
# Replicas use the host's network (each on its own loopback port), so they reach a PostgreSQL that
# listens on 127.0.0.1. On a cluster, deploy/k8s/ does the same with a Deployment and a Service.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/../container/containers.conf}"
LB_PORT="${LB_PORT:-8080}"
ADMIN_PORT="${ADMIN_PORT:-$((LB_PORT + 1))}"
GRACE="${GRACE:-30}"
WORKERS="${WORKERS:-1}"
STATE_DIR="${STATE_DIR:-/tmp/guarded-serving-replicas-$LB_PORT}"
NAME_PREFIX="gs-replica-$LB_PORT"

die() { echo "replicas.sh: $*" >&2; exit 2; }

admin() {  # one command to HAProxy's runtime API; prints the answer
    exec 3<>"/dev/tcp/127.0.0.1/$ADMIN_PORT"
    printf '%s\n' "$1" >&3
    cat <&3
    exec 3<&-
}

stat_field() {  # stat_field SERVER COLUMN: a column of `show stat` for one server of the backend
    admin "show stat" | awk -F, -v s="$1" -v col="$2" '
        NR == 1 { for (i = 1; i <= NF; i++) { n = $i; sub(/^# /, "", n); idx[n] = i } }
        $1 == "replicas" && $2 == s { print $(idx[col]) }'
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds
    local deadline=$((SECONDS + $1)) what="$2"
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out waiting for $what"
        sleep 0.2
    done
}

ready() { curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$1/readyz" 2>/dev/null; }
drained() { [[ "$(stat_field "$1" scur)" == 0 && "$(stat_field "$1" qcur)" == 0 ]]; }
up_in_lb() { [[ "$(stat_field "$1" status)" == UP ]]; }

start_replica() {  # start_replica INDEX PORT
    local args=(run -d --name "$NAME_PREFIX-r$1" --network host --stop-timeout "$GRACE"
                -e "GUARDED_SERVING_STORE_URL=$GUARDED_SERVING_STORE_URL" -e "GUARDED_SERVING_WORKERS=$WORKERS")
    local var
    for var in GUARDED_SERVING_TOKEN GUARDED_SERVING_TOKEN_FILE OTEL_EXPORTER_OTLP_ENDPOINT; do
        [[ -n "${!var:-}" ]] && args+=(-e "$var=${!var}")
    done
    [[ -n "${GUARDED_SERVING_TOKEN_FILE:-}" ]] && args+=(-v "$GUARDED_SERVING_TOKEN_FILE:$GUARDED_SERVING_TOKEN_FILE:ro")
    podman "${args[@]}" "$(cat "$STATE_DIR/image")" --host 127.0.0.1 --port "$2" >/dev/null
}

write_haproxy_cfg() {
    cat >"$STATE_DIR/haproxy.cfg" <<EOF
global
    maxconn 4096
    stats socket ipv4@127.0.0.1:$ADMIN_PORT level admin

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout queue 30s
    timeout http-request 10s
    # A request whose connection failed, or whose replica died before answering (empty response),
    # is sent again to another replica. The first never reached a replica: always safe. The
    # second may have been served and logged by the dead replica: the retry carries the same
    # X-Request-ID, by which the service can recognise an identical retry. Never retried:
    # timeouts and 5xx answers (the request was taken; a 503 from the store is not a replica fault).
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
    option http-buffer-request

frontend guarded
    bind 127.0.0.1:$LB_PORT
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    http-response set-header X-Served-By %s
    default-server check inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
EOF
    local i=1 port ports
    read -ra ports <"$STATE_DIR/ports"
    for port in "${ports[@]}"; do
        echo "    server r$i 127.0.0.1:$port" >>"$STATE_DIR/haproxy.cfg"
        i=$((i + 1))
    done
}

cmd_up() {
    local image="${1:-}" n="${2:-3}"
    [[ -n "$image" ]] || die "usage: $0 up IMAGE [N]"
    [[ -n "${GUARDED_SERVING_STORE_URL:-}" ]] || die "set GUARDED_SERVING_STORE_URL to the shared PostgreSQL"
    command -v haproxy >/dev/null || die "haproxy is missing: apt-get install haproxy"
    mkdir -p "$STATE_DIR"
    echo "$image" >"$STATE_DIR/image"
    local ports
    read -ra ports <<<"${REPLICA_PORTS:-$(seq -s ' ' 3001 $((3000 + n)))}"
    echo "${ports[*]}" >"$STATE_DIR/ports"
    local i=1 port
    for port in "${ports[@]}"; do
        start_replica "$i" "$port"
        i=$((i + 1))
    done
    for port in "${ports[@]}"; do
        wait_for 180 "the replica on port $port" ready "$port"
    done
    write_haproxy_cfg
    haproxy -D -f "$STATE_DIR/haproxy.cfg" -p "$STATE_DIR/haproxy.pid"
    i=1
    for port in "${ports[@]}"; do
        wait_for 30 "r$i to be UP in the balancer" up_in_lb "r$i"
        i=$((i + 1))
    done
    echo "${#ports[@]} replicas of $image behind http://127.0.0.1:$LB_PORT"
}

cmd_restart() {
    [[ -f "$STATE_DIR/ports" ]] || die "nothing is up (no $STATE_DIR/ports)"
    local i=1 port ports
    read -ra ports <"$STATE_DIR/ports"
    for port in "${ports[@]}"; do
        # Out of the rotation first, then wait for its requests to finish: nothing in flight is
        # cut, and no new request reaches a replica that is stopping.
        admin "set server replicas/r$i state maint" >/dev/null
        wait_for "$GRACE" "r$i to drain" drained "r$i"
        podman stop -t "$GRACE" "$NAME_PREFIX-r$i" >/dev/null
        podman rm -f "$NAME_PREFIX-r$i" >/dev/null
        start_replica "$i" "$port"
        wait_for 180 "r$i to be ready" ready "$port"
        admin "set server replicas/r$i state ready" >/dev/null
        wait_for 30 "r$i to be UP in the balancer" up_in_lb "r$i"
        echo "restarted r$i (port $port)"
        i=$((i + 1))
    done
}

cmd_status() {
    # Per replica: state, current and total sessions, connection and response errors, and the
    # requests HAProxy sent again (retries) or to another replica (redispatches).
    admin "show stat" | awk -F, '$1 == "replicas" && $2 != "BACKEND" {
        printf "%s status=%s sessions=%s total=%s conn_errors=%s resp_errors=%s retries=%s redispatches=%s\n",
            $2, $18, $5, $8, $14, $15, $16, $17 }'
}

cmd_down() {
    local i=1 port ports
    if [[ -f "$STATE_DIR/ports" ]]; then
        read -ra ports <"$STATE_DIR/ports"
        for port in "${ports[@]}"; do
            podman rm -f -t "$GRACE" "$NAME_PREFIX-r$i" >/dev/null 2>&1 || true
            i=$((i + 1))
        done
    fi
    if [[ -f "$STATE_DIR/haproxy.pid" ]]; then
        kill "$(cat "$STATE_DIR/haproxy.pid")" 2>/dev/null || true
        rm -f "$STATE_DIR/haproxy.pid"
    fi
    echo "down"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    restart) cmd_restart ;;
    status) cmd_status ;;
    down) cmd_down ;;
    *) die "usage: $0 up IMAGE [N] | restart | status | down" ;;
esac
