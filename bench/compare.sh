#!/usr/bin/env bash
# bench/compare.sh — Tiergate next to its peers on loopback, one table.
#
# Starts, each pinned to core 0 (taskset): limit-server (a minimal hyper server, the
# upper limit), Tiergate (release build, against the local PostgreSQL and Redis),
# nginx (static answer; reverse proxy to limit-server) and HAProxy (reverse proxy
# to limit-server). loadgen runs pinned to core 1, one scenario per server, and the
# table gives requests/s, p50/p99/p99.9, the server's CPU time per request (utime +
# stime of its processes from /proc, before and after) and req/s relative to
# limit-server. Installs nginx, haproxy and jq with apt-get when missing. Everything
# it starts is stopped on exit.
#
# Usage: bench/compare.sh [DURATION (default 5s)] [CONNECTIONS (default 16)]
# Environment: DATABASE_URL (default postgres://postgres:postgres@127.0.0.1:5432/tiergate_bench,
#              created when missing), REDIS_URL (default redis://127.0.0.1:6379).
set -euo pipefail

duration=${1:-5s}
conns=${2:-16}
[[ $conns =~ ^[0-9]+$ && $conns -gt 0 ]] || { echo "compare: CONNECTIONS must be a positive whole number, got '$conns'" >&2; exit 2; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

have() { command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]]; }
missing=()
have nginx || missing+=(nginx)
have haproxy || missing+=(haproxy)
have jq || missing+=(jq)
have taskset || missing+=(util-linux)
if ((${#missing[@]})); then
  log "installing with apt-get: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; } ||
    die "apt-get install ${missing[*]} failed"
fi
PATH=$PATH:/usr/sbin
cores=$(nproc)
if ((cores >= 2)); then server_cpu=0 client_cpu=1; else server_cpu=0 client_cpu=0; log "one core: server and loadgen share it"; fi

log "building release binaries (tiergate, loadgen, limit-server)"
cargo build --release -q -p gateway -p bench --bins
bin=$root/target/release

export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/tiergate_bench}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
db=${DATABASE_URL##*/}
if [[ $db =~ ^[a-z_][a-z0-9_]*$ ]]; then
  PGPASSWORD=postgres psql -X -q -h 127.0.0.1 -U postgres -d postgres -tc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
    PGPASSWORD=postgres psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $db" >/dev/null ||
    log "could not create database $db (Tiergate will say why)"
fi

tmp=$(mktemp -d)
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# Waits until $1 answers 200 (at most 30 s).
wait_for() {
  local i
  for ((i = 0; i < 300; i++)); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "$1 did not answer within 30 s (logs in $tmp)"
}

limit_port=18090 tiergate_port=18080 admin_port=18081 nginx_port=18082 haproxy_port=18083

taskset -c "$server_cpu" "$bin/limit-server" "127.0.0.1:$limit_port" --threads 1 >"$tmp/limit.log" 2>&1 &
pids+=($!) && limit_pid=$!

TIERGATE_LISTEN__HTTP=127.0.0.1:$tiergate_port TIERGATE_LISTEN__ADMIN=127.0.0.1:$admin_port \
  TIERGATE_REDIS__KEY_PREFIX=bench-compare RUST_LOG=warn \
  taskset -c "$server_cpu" "$bin/tiergate" serve >"$tmp/tiergate.log" 2>&1 &
pids+=($!) && tiergate_pid=$!

cat >"$tmp/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $tmp; proxy_temp_path $tmp; fastcgi_temp_path $tmp;
  uwsgi_temp_path $tmp; scgi_temp_path $tmp;
  upstream limit { server 127.0.0.1:$limit_port; keepalive 64; }
  server {
    listen 127.0.0.1:$nginx_port;
    location = /static { default_type application/json; return 200 '{"source":"cache"}'; }
    location / { proxy_pass http://limit; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
taskset -c "$server_cpu" nginx -c "$tmp/nginx.conf" -p "$tmp" >"$tmp/nginx.log" 2>&1 &
pids+=($!) && nginx_pid=$!

cat >"$tmp/haproxy.cfg" <<CONF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$haproxy_port
  default_backend limit
backend limit
  server s1 127.0.0.1:$limit_port
CONF
taskset -c "$server_cpu" haproxy -db -f "$tmp/haproxy.cfg" >"$tmp/haproxy.log" 2>&1 &
pids+=($!) && haproxy_pid=$!

wait_for "http://127.0.0.1:$limit_port/"
wait_for "http://127.0.0.1:$admin_port/readyz"
wait_for "http://127.0.0.1:$nginx_port/static"
wait_for "http://127.0.0.1:$haproxy_port/"
id=$(curl -fsS -H 'content-type: application/json' -d '{"name":"compare"}' "http://127.0.0.1:$tiergate_port/items" | jq -r .item.id) ||
  die "could not create an item (log: $tmp/tiergate.log)"
curl -fsS -o /dev/null "http://127.0.0.1:$tiergate_port/items/$id"

# CPU ticks (utime + stime) of a process and its children.
ticks() {
  local pid=$1 total=0 p f
  for p in $pid $(pgrep -P "$pid" || true); do
    [[ -r /proc/$p/stat ]] || continue
    read -r -a f <"/proc/$p/stat"
    # Fields after the ")" of the name: utime is field 14, stime 15 (1-based).
    local rest=${f[*]}
    rest=${rest##*) }
    read -r -a f <<<"$rest"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}
hz=$(getconf CLK_TCK)

rows=()
run() { # label pid url [loadgen args...]
  local label=$1 pid=$2 url=$3
  shift 3
  local before after
  before=$(ticks "$pid")
  taskset -c "$client_cpu" "$bin/loadgen" "$url" -c "$conns" -t 1 -d "$duration" -q \
    --label "$label" --json "$tmp/$label.json" "$@" >/dev/null
  after=$(ticks "$pid")
  jq --argjson cpu $((after - before)) --argjson hz "$hz" \
    '. + {cpu_us_per_req: (if .requests > 0 then $cpu / $hz * 1e6 / .requests else 0 end)}' \
    "$tmp/$label.json" >"$tmp/$label.row.json"
  rows+=("$tmp/$label.row.json")
  log "done: $label"
}

run limit-server "$limit_pid" "http://127.0.0.1:$limit_port/items/1"
run tiergate-l1-hit "$tiergate_pid" "http://127.0.0.1:$tiergate_port/" --scenario hot --id "$id"
run nginx-static "$nginx_pid" "http://127.0.0.1:$nginx_port/static"
run nginx-proxy "$nginx_pid" "http://127.0.0.1:$nginx_port/items/1"
run haproxy-proxy "$haproxy_pid" "http://127.0.0.1:$haproxy_port/items/1"

echo "loadgen: $conns connections, $duration each, server on core $server_cpu, loadgen on core $client_cpu"
echo
echo "| server | req/s | vs limit | p50 ms | p99 ms | p99.9 ms | server CPU µs/req | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
jq -rs '(.[0].requests_per_sec) as $top | .[] |
  "| \(.label) | \(.requests_per_sec | floor) | \((.requests_per_sec / $top * 100 | floor) / 100) | \(.p50_ms) | \(.p99_ms) | \(.p999_ms) | \((.cpu_us_per_req * 100 | floor) / 100) | \(.errors) |"' "${rows[@]}"
