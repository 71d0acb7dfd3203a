#!/usr/bin/env bash
# bench/callgrind.sh — instructions per request of Tiergate's two hot paths, by callgrind.
#
# A count of instructions does not care what else the box is doing, so two builds can be
# compared on a shared machine where wall-clock figures wander by 20 %. Two rows:
#
#   l1-hit     `GET /items/{id}` answered from L1 (one item, read once before the run),
#              access lines off (`RUST_LOG=warn`);
#   l1-hit-logged  the same with the default logging (`RUST_LOG=info`: an access line
#              per request, stdout to a file), for the access line's cost;
#   proxy-1k   a 1 KiB GET proxied to limit-server (`--body-bytes 1024`) through one
#              route and one upstream group with one target.
#
# For each row Tiergate (release build) runs alone under `valgrind --tool=callgrind`,
# pinned to core 0; loadgen (16 connections, one thread) and the upstream run on core 1.
# loadgen sends WARMUP requests that are not counted (connections open, pools and caches
# fill, lazy statics initialise), the counters are zeroed (`callgrind_control -z`), then
# REQUESTS requests are sent and the counters dumped (`callgrind_control -d`). The figure
# is every instruction the process ran in that window (all threads: workers, timers,
# background tasks) divided by REQUESTS. Repeated runs of one build agree within a few
# instructions per request.
#
# Usage: bench/callgrind.sh [WARMUP (default 5000)] [REQUESTS (default 30000)]
# Environment: BIN_DIR=DIR measures the `tiergate`, `loadgen` and `limit-server` in DIR
#              instead of building them (to compare two builds: copy one build's
#              binaries aside, build the other);
#              ROWS=l1-hit,l1-hit-logged,proxy-1k (default all three);
#              CALLGRIND_OUT=DIR keeps each row's dump there (DIR/ROW.callgrind) for
#              `callgrind_annotate`, to see which functions the instructions went to;
#              DATABASE_URL (default: a database of its own on 127.0.0.1:5432, created
#              and dropped by the run), REDIS_URL (default redis://127.0.0.1:6379; the
#              run's keys have a prefix of their own and are deleted at exit).
# Output: one markdown table on stdout; progress on stderr. Installs valgrind, jq, curl,
# psql, redis-cli, taskset and ss with apt-get when missing; starts PostgreSQL and Redis
# with scripts/services when they are not up.
set -euo pipefail

warmup=${1:-5000}
requests=${2:-30000}
[[ $warmup =~ ^[0-9]+$ ]] || { echo "callgrind: WARMUP must be a whole number, got '$warmup'" >&2; exit 2; }
[[ $requests =~ ^[1-9][0-9]*$ ]] || { echo "callgrind: REQUESTS must be a positive whole number, got '$requests'" >&2; exit 2; }
rows=${ROWS:-l1-hit,l1-hit-logged,proxy-1k}
[[ $rows =~ ^(l1-hit|l1-hit-logged|proxy-1k)(,(l1-hit|l1-hit-logged|proxy-1k))*$ ]] || { echo "callgrind: ROWS must list l1-hit, l1-hit-logged and/or proxy-1k separated by commas, got '$rows'" >&2; exit 2; }
want() { [[ ,$rows, == *,$1,* ]]; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=bench/lib.sh
. bench/lib.sh callgrind
install_missing valgrind:valgrind jq:jq curl:curl psql:postgresql-client taskset:util-linux ss:iproute2 redis-cli:redis-tools
pick_cores
release_binaries

tmp=$(mktemp -d)
prefix=callgrind-$$
created_db=
cleanup() {
  stop_started
  rm -rf "$tmp"
  drop_run_data "$prefix*"
}
trap cleanup EXIT

why() { head -c 300 "$1" 2>/dev/null | tr '\n|' '  '; }

# Starts Tiergate under callgrind with the environment and arguments given; sets $server.
# Logs at $rust_log (warn: no access lines); stdout, with the access lines, to $1.
rust_log=warn
start_tiergate() {
  local log_file=$1
  shift
  env "$@" RUST_LOG=$rust_log taskset -c "$server_cpu" valgrind --tool=callgrind \
    --callgrind-out-file="$tmp/callgrind.out.%p" "$bin/tiergate" "${TIERGATE_ARGS[@]}" serve \
    >"$log_file" 2>&1 &
  server=$!
  pids+=("$server")
}

# Warms up, then counts REQUESTS requests to $3 in process $2 (row $1): instructions per
# request.
count() {
  local row=$1 pid=$2 url=$3 total
  shift 3
  taskset -c "$client_cpu" "$bin/loadgen" "$url" -c 16 -t 1 -n "$warmup" -q "$@" >/dev/null 2>"$tmp/warmup.err" ||
    die "loadgen (warm-up) failed: $(why "$tmp/warmup.err")"
  callgrind_control -z "$pid" >/dev/null 2>"$tmp/control.err" || die "callgrind_control -z failed: $(why "$tmp/control.err")"
  taskset -c "$client_cpu" "$bin/loadgen" "$url" -c 16 -t 1 -n "$requests" -q \
    --json "$tmp/run.json" "$@" >/dev/null 2>"$tmp/run.err" || die "loadgen failed: $(why "$tmp/run.err")"
  callgrind_control -d "$pid" >/dev/null 2>"$tmp/control.err" || die "callgrind_control -d failed: $(why "$tmp/control.err")"
  local errors
  errors=$(jq '.errors // 0' "$tmp/run.json")
  [[ $errors == 0 ]] || die "$errors of the measured requests failed"
  # The dump's `totals:` line: instructions (Ir), the only event collected.
  total=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$tmp/callgrind.out.$pid".* | tail -n 1)
  [[ -n $total ]] || die "no totals in the callgrind dump"
  if [[ -n ${CALLGRIND_OUT:-} ]]; then
    mkdir -p "$CALLGRIND_OUT"
    cp "$(ls "$tmp/callgrind.out.$pid".* | tail -n 1)" "$CALLGRIND_OUT/$row.callgrind"
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  echo $((total / requests))
}

table=()
# The L1-hit row $1 (access lines as $2 says), labelled $3.
l1_row() {
  local row=$1 label=$3 id
  rust_log=$2
  free_port && http_port=$port
  free_port && admin_port=$port
  TIERGATE_ARGS=()
  log "$row: starting Tiergate under callgrind"
  start_tiergate "$tmp/$row.log" TIERGATE_LISTEN__HTTP=127.0.0.1:$http_port \
    TIERGATE_LISTEN__ADMIN=127.0.0.1:$admin_port TIERGATE_REDIS__KEY_PREFIX=$prefix
  up "$server" "http://127.0.0.1:$admin_port/readyz" 120 || die "Tiergate did not start: $(why "$tmp/$row.log")"
  id=$(curl -fsS -H 'content-type: application/json' -d '{"name":"callgrind"}' \
    "http://127.0.0.1:$http_port/items" | jq -r .item.id) || die "could not create an item"
  curl -fsS -o /dev/null "http://127.0.0.1:$http_port/items/$id"
  log "$row: $warmup requests, then $requests counted"
  table+=("| $row: $label | $(count "$row" "$server" "http://127.0.0.1:$http_port/" --scenario hot --id "$id") |")
  rust_log=warn
}
if want l1-hit || want l1-hit-logged; then
  scripts/services >&2 || die "PostgreSQL and Redis are not up and scripts/services could not start them"
  if [[ -z ${DATABASE_URL:-} ]]; then
    created_db=tiergate_callgrind_$$
    pg -c "CREATE DATABASE $created_db" >/dev/null || die "could not create database $created_db"
    export DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/$created_db
  fi
  export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
fi
if want l1-hit; then
  l1_row l1-hit warn "\`GET /items/{id}\`, L1 hit"
fi
if want l1-hit-logged; then
  l1_row l1-hit-logged info "the same, an access line per request (to a file)"
fi

if want proxy-1k; then
  free_port && upstream_port=$port
  free_port && proxy_port=$port
  free_port && admin_port=$port
  taskset -c "$client_cpu" "$bin/limit-server" "127.0.0.1:$upstream_port" --threads 1 --body-bytes 1024 \
    >"$tmp/upstream.log" 2>&1 &
  pids+=($!)
  up $! "http://127.0.0.1:$upstream_port/" 120 || die "limit-server did not start: $(why "$tmp/upstream.log")"
  cat >"$tmp/proxy.toml" <<CONF
[listen]
http = "127.0.0.1:$proxy_port"
admin = "127.0.0.1:$admin_port"
[[routes]]
name = "pass"
path = "/"
upstream = "origin"
[[upstreams]]
name = "origin"
targets = ["127.0.0.1:$upstream_port"]
balance = "round_robin"
CONF
  TIERGATE_ARGS=(--config "$tmp/proxy.toml")
  log "proxy-1k: starting Tiergate under callgrind"
  start_tiergate "$tmp/proxy.log" TIERGATE_REDIS__KEY_PREFIX=$prefix
  up "$server" "http://127.0.0.1:$proxy_port/" 120 || die "Tiergate did not start: $(why "$tmp/proxy.log")"
  log "proxy-1k: $warmup requests, then $requests counted"
  table+=("| proxy-1k: 1 KiB GET through one upstream group | $(count proxy-1k "$server" "http://127.0.0.1:$proxy_port/") |")
fi

echo "| request (Tiergate on core $server_cpu, $requests after $warmup unmeasured) | instructions per request |"
echo "|---|---|"
printf '%s\n' "${table[@]}"
