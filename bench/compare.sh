#!/usr/bin/env bash
# bench/compare.sh — Tiergate next to its peers on loopback, three tables.
#
# Every server runs pinned to core 0 (taskset), loadgen to core 1, one row at a time:
#
# 1. The app. limit-server (a minimal hyper server with a fixed answer: the upper
#    limit), Tiergate's items API (L1 hit; Zipf reads over 10,000 items; the same with
#    10 % PUTs; a cold miss storm over ids never read), the L1 hit once more on a second
#    Tiergate with the default logging (RUST_LOG=info: an access line per request, stdout
#    to a file) and nginx answering a fixed string. "vs limit" is req/s relative to
#    limit-server. Zipf, mix and cold run on a third Tiergate, so that the two L1-hit
#    rows meet instances in the same state.
# 2. Proxy pass-through of a 1 KiB body served by limit-server (--body-bytes 1024):
#    the upstream alone, then Tiergate (route → upstream group, round robin), nginx
#    (upstream block with keepalive, HTTP/1.1, one worker) and HAProxy (one thread,
#    http-reuse always) in front of it. Upstream reuse comes from limit-server's own
#    counts (SIGUSR1 before and after the row): the share of upstream requests that
#    went over an already open connection. "vs nginx" compares req/s and CPU/request.
#    Then the three proxies once more in open loop at a fixed rate all of them sustain
#    (PROXY_RATE, default 5000 req/s, latency from the intended send time): at
#    saturation p99 is mostly queueing, here it is the proxy's own. Last, Tiergate and
#    nginx closed loop with their default access logs, each to a file (Tiergate's JSON
#    line, RUST_LOG=info; nginx's `combined` format, unbuffered as it ships), and the
#    three proxies closed loop once more with TLS on the client's side (keep-alive
#    HTTP/1.1, the certificate of table 3; HAProxy reads it as one PEM with its key).
# 3. TLS termination with one ECDSA P-256 certificate (openssl, made per run): Tiergate
#    and nginx on a fixed small body (/livez): keep-alive HTTP/1.1; h2 by ALPN (4
#    connections x 8 streams); and HTTP/1.1 with a new connection and a full handshake
#    for every request (loadgen --tls, no session resumption). The handshake rows skip
#    the client's certificate check (--insecure; the server's work is the same): with
#    it, loadgen's one core ran out before the servers did and the row measured loadgen.
#
# 4. The goals of issues 7, 5, 4, 17 and 20, each judged on its rows: the L1 hit at >= 0.9x
#    limit-server's req/s and <= 1.2x its CPU per request; with access lines on, the L1
#    hit at >= 0.9x its req/s with them off and <= 1.1x its CPU per request; the proxy at
#    >= 1.0x nginx's req/s at <= 1.0x its CPU per request and no worse p99 (issue 20), and
#    at >= 1.2x with less CPU (issue 5, the stretch); the TLS proxy row at >= 1.0x the
#    better of nginx and HAProxy (issue 20); each TLS row at >= 1.2x nginx's req/s with no
#    worse p99.
#
# Server CPU per request is utime + stime of the server's processes (from /proc, before
# and after the row) over the requests answered; for the proxies it leaves out the
# upstream, which shares core 0 with them. Access logs are off everywhere but in the
# rows ending -logged: nginx `access_log off`, HAProxy logs nothing without a `log` line,
# Tiergate `RUST_LOG=warn` (its access lines are at info).
#
# A server that does not start, or a row that answers nothing, is reported as failed
# and the others still run (e.g. Tiergate's proxy row, before the proxy is built, fails
# with "unknown field `routes`"). Installs nginx, haproxy, jq, openssl, curl, psql, redis-cli and
# taskset with apt-get when missing; starts PostgreSQL and Redis with scripts/services
# when they are not up; stops everything it started on exit, and drops the database it
# created and the Redis keys Tiergate wrote.
#
# Usage: bench/compare.sh [DURATION (default 5s)] [CONNECTIONS (default 16)]
# Environment: ROUNDS=N runs every row N times, in turn (all rows, then all again …), and
#              reports for each the round with the median req/s: on a shared box this
#              keeps one burst of someone else's work from deciding a ratio. Default 1.
#              PROXY_RATE=N for the open-loop proxy rows (req/s; default 5000).
#              TABLES=app,proxy,tls (default all three): the tables to measure, so one
#              change can be checked against its peers in a shorter run.
#              DATABASE_URL (default postgres://postgres:postgres@127.0.0.1:5432/tiergate_bench,
#              created when missing), REDIS_URL (default redis://127.0.0.1:6379),
#              COMPARE_JSON=FILE (also write every row as JSON there).
#              BIN_DIR=DIR runs the `tiergate`, `loadgen` and `limit-server` in DIR
#              instead of building them (a build copied aside, to compare two).
set -euo pipefail

duration=${1:-5s}
conns=${2:-16}
[[ $conns =~ ^[0-9]+$ && $conns -gt 0 ]] || { echo "compare: CONNECTIONS must be a positive whole number, got '$conns'" >&2; exit 2; }
case $duration in
  *ms) secs=1 ;;
  *s) secs=${duration%s} ;;
  *m) secs=$((${duration%m} * 60)) ;;
  *) secs=x ;;
esac
[[ $secs =~ ^[0-9]+$ && $secs -gt 0 ]] || { echo "compare: DURATION must look like 5s, 500ms or 1m, got '$duration'" >&2; exit 2; }
rounds=${ROUNDS:-1}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "compare: ROUNDS must be a positive whole number, got '$rounds'" >&2; exit 2; }
proxy_rate=${PROXY_RATE:-5000}
[[ $proxy_rate =~ ^[1-9][0-9]*$ ]] || { echo "compare: PROXY_RATE must be a positive whole number, got '$proxy_rate'" >&2; exit 2; }
tables=${TABLES:-app,proxy,tls}
[[ $tables =~ ^(app|proxy|tls)(,(app|proxy|tls))*$ ]] || { echo "compare: TABLES must list app, proxy and/or tls separated by commas, got '$tables'" >&2; exit 2; }
want() { [[ ,$tables, == *,$1,* ]]; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
# shellcheck source=bench/lib.sh
. bench/lib.sh compare
install_missing nginx:nginx haproxy:haproxy jq:jq openssl:openssl curl:curl psql:postgresql-client \
  taskset:util-linux ss:iproute2 redis-cli:redis-tools
pick_cores
release_binaries

scripts/services >&2 || die "PostgreSQL and Redis are not up and scripts/services could not start them"
export DATABASE_URL=${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/tiergate_bench}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
db=${DATABASE_URL##*/}
db=${db%%\?*}
# A database this run creates is dropped at exit; one that was there is left alone.
created_db=
if [[ $db =~ ^[a-z_][a-z0-9_]*$ ]]; then
  if ! pg -tc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    if pg -c "CREATE DATABASE $db" >/dev/null; then
      created_db=$db
    else
      log "could not create database $db (Tiergate will say why)"
    fi
  fi
fi

tmp=$(mktemp -d)
cleanup() {
  stop_started
  rm -rf "$tmp"
  # Tiergate's cache keys of this run (both instances' prefixes), and its database.
  drop_run_data 'bench-compare*'
}
trap cleanup EXIT

# The first lines of a log, on one line, for a table cell.
why() { head -c 200 "$1" 2>/dev/null | tr '\n|' '  '; }

free_port && limit_port=$port
free_port && upstream_port=$port
free_port && tiergate_port=$port
free_port && admin_port=$port
free_port && tiergate_tls_port=$port
free_port && proxy_port=$port
free_port && proxy_admin_port=$port
free_port && nginx_port=$port
free_port && nginx_tls_port=$port
free_port && haproxy_port=$port
free_port && logged_port=$port
free_port && store_port=$port
free_port && store_admin_port=$port
free_port && logged_admin_port=$port
free_port && proxy_logged_port=$port
free_port && proxy_logged_admin_port=$port
free_port && nginx_logged_port=$port
free_port && proxy_tls_port=$port
free_port && nginx_proxy_tls_port=$port
free_port && haproxy_tls_port=$port

# A self-signed leaf (not a CA: rustls refuses a CA certificate as a server's own).
cat >"$tmp/cert.cnf" <<CONF
[req]
distinguished_name = dn
x509_extensions = leaf
prompt = no
[dn]
CN = localhost
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
CONF
openssl req -x509 -config "$tmp/cert.cnf" -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>"$tmp/openssl.log" || die "openssl could not make a certificate: $(why "$tmp/openssl.log")"

taskset -c "$server_cpu" "$bin/limit-server" "127.0.0.1:$limit_port" --threads 1 >"$tmp/limit.log" 2>&1 &
pids+=($!) && limit_pid=$!
taskset -c "$server_cpu" "$bin/limit-server" "127.0.0.1:$upstream_port" --threads 1 --body-bytes 1024 \
  >"$tmp/upstream.out" 2>"$tmp/upstream.log" &
pids+=($!) && upstream_pid=$!

TIERGATE_LISTEN__HTTP=127.0.0.1:$tiergate_port TIERGATE_LISTEN__ADMIN=127.0.0.1:$admin_port \
  TIERGATE_LISTEN__HTTPS=127.0.0.1:$tiergate_tls_port TIERGATE_TLS__CERT=$tmp/cert.pem TIERGATE_TLS__KEY=$tmp/key.pem \
  TIERGATE_REDIS__KEY_PREFIX=bench-compare RUST_LOG=warn \
  taskset -c "$server_cpu" "$bin/tiergate" serve >"$tmp/tiergate.log" 2>&1 &
pids+=($!) && tiergate_pid=$!

# The Zipf, mix and cold rows on a Tiergate of their own: the two L1-hit rows then meet
# instances in the same state (the cold storm leaves the L1 it ran on full and busy
# evicting, which made the L1 hit without access lines slower than the one with them).
TIERGATE_LISTEN__HTTP=127.0.0.1:$store_port TIERGATE_LISTEN__ADMIN=127.0.0.1:$store_admin_port \
  TIERGATE_REDIS__KEY_PREFIX=bench-compare-store RUST_LOG=warn \
  taskset -c "$server_cpu" "$bin/tiergate" serve >"$tmp/tiergate-store.log" 2>&1 &
pids+=($!) && store_pid=$!

# The same Tiergate with the default logging: an access line per request, to a file.
TIERGATE_LISTEN__HTTP=127.0.0.1:$logged_port TIERGATE_LISTEN__ADMIN=127.0.0.1:$logged_admin_port \
  TIERGATE_REDIS__KEY_PREFIX=bench-compare-logged RUST_LOG=info \
  taskset -c "$server_cpu" "$bin/tiergate" serve >"$tmp/tiergate-logged.log" 2>&1 &
pids+=($!) && logged_pid=$!

# Tiergate as a reverse proxy only: every path to the upstream group. Twice: without
# access lines, and with them (the default logging) to a file.
proxy_config() { # http-port admin-port https-port
  cat <<CONF
[listen]
http = "127.0.0.1:$1"
admin = "127.0.0.1:$2"
https = "127.0.0.1:$3"
[tls]
cert = "$tmp/cert.pem"
key = "$tmp/key.pem"
[log]
format = "json"
[[routes]]
name = "pass"
path = "/"
upstream = "origin"
[[upstreams]]
name = "origin"
targets = ["127.0.0.1:$upstream_port"]
balance = "round_robin"
CONF
}
proxy_config "$proxy_port" "$proxy_admin_port" "$proxy_tls_port" >"$tmp/tiergate-proxy.toml"
TIERGATE_REDIS__KEY_PREFIX=bench-compare-proxy RUST_LOG=warn \
  taskset -c "$server_cpu" "$bin/tiergate" --config "$tmp/tiergate-proxy.toml" serve >"$tmp/tiergate-proxy.log" 2>&1 &
pids+=($!) && proxy_pid=$!
free_port && proxy_logged_tls_port=$port
proxy_config "$proxy_logged_port" "$proxy_logged_admin_port" "$proxy_logged_tls_port" >"$tmp/tiergate-proxy-logged.toml"
TIERGATE_REDIS__KEY_PREFIX=bench-compare-proxy-logged RUST_LOG=info \
  taskset -c "$server_cpu" "$bin/tiergate" --config "$tmp/tiergate-proxy-logged.toml" serve >"$tmp/tiergate-proxy-logged.log" 2>&1 &
pids+=($!) && proxy_logged_pid=$!

cat >"$tmp/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $tmp; proxy_temp_path $tmp; fastcgi_temp_path $tmp;
  uwsgi_temp_path $tmp; scgi_temp_path $tmp;
  upstream origin { server 127.0.0.1:$upstream_port; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$nginx_port;
    location = /static { default_type application/json; return 200 '{"source":"cache"}'; }
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:$nginx_proxy_tls_port ssl;
    ssl_certificate $tmp/cert.pem;
    ssl_certificate_key $tmp/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:$nginx_logged_port;
    access_log $tmp/nginx-access.log;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:$nginx_tls_port ssl http2;
    ssl_certificate $tmp/cert.pem;
    ssl_certificate_key $tmp/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location = /livez { default_type application/json; return 200 '{"status":"ok"}'; }
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
  http-reuse always
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$haproxy_port
  default_backend origin
frontend fe_tls
  bind 127.0.0.1:$haproxy_tls_port ssl crt $tmp/cert-and-key.pem
  default_backend origin
backend origin
  server s1 127.0.0.1:$upstream_port
CONF
cat "$tmp/cert.pem" "$tmp/key.pem" >"$tmp/cert-and-key.pem"
taskset -c "$server_cpu" haproxy -db -f "$tmp/haproxy.cfg" >"$tmp/haproxy.log" 2>&1 &
pids+=($!) && haproxy_pid=$!

up "$limit_pid" "http://127.0.0.1:$limit_port/" || die "limit-server did not start: $(why "$tmp/limit.log")"
up "$upstream_pid" "http://127.0.0.1:$upstream_port/" || die "limit-server (upstream) did not start: $(why "$tmp/upstream.log")"
up "$tiergate_pid" "http://127.0.0.1:$admin_port/readyz" || die "Tiergate did not start: $(why "$tmp/tiergate.log")"
up "$store_pid" "http://127.0.0.1:$store_admin_port/readyz" || die "Tiergate (Zipf, mix, cold) did not start: $(why "$tmp/tiergate-store.log")"
nginx_ok=1 haproxy_ok=1 proxy_ok=1 logged_ok=1 proxy_logged_ok=1
up "$logged_pid" "http://127.0.0.1:$logged_admin_port/readyz" || logged_ok=0
up "$nginx_pid" "http://127.0.0.1:$nginx_port/static" || nginx_ok=0
up "$haproxy_pid" "http://127.0.0.1:$haproxy_port/" || haproxy_ok=0
{ up "$proxy_pid" "http://127.0.0.1:$proxy_admin_port/readyz" && up "$proxy_pid" "http://127.0.0.1:$proxy_port/"; } || proxy_ok=0
{ up "$proxy_logged_pid" "http://127.0.0.1:$proxy_logged_admin_port/readyz" && up "$proxy_logged_pid" "http://127.0.0.1:$proxy_logged_port/"; } || proxy_logged_ok=0

id=$(curl -fsS -H 'content-type: application/json' -d '{"name":"compare"}' "http://127.0.0.1:$tiergate_port/items" | jq -r .item.id) ||
  die "could not create an item (log: $tmp/tiergate.log)"
curl -fsS -o /dev/null "http://127.0.0.1:$tiergate_port/items/$id"
((logged_ok)) && curl -fsS -o /dev/null "http://127.0.0.1:$logged_port/items/$id"

# Items for the Zipf and mix rows, and ids never read for the cold storm (more than a
# miss storm gets through in the run; past them it would meet 404s).
zipf_items=10000 cold_items=$((40000 * secs))
seed() { # n -> first id of n new items
  psql -X -q -t -A "$DATABASE_URL" -c \
    "WITH made AS (INSERT INTO items (name) SELECT 'compare ' || g FROM generate_series(1, $1) g RETURNING id) SELECT min(id) FROM made"
}
zipf_first=$(seed "$zipf_items") || die "could not insert items with psql"
cold_first=$(seed $((cold_items * rounds))) || die "could not insert items with psql"

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

# The upstream's "connections=N requests=M" now (SIGUSR1; it prints one line each).
upstream_counts() {
  local before after i
  before=$(wc -l <"$tmp/upstream.out")
  kill -USR1 "$upstream_pid"
  for ((i = 0; i < 50; i++)); do
    after=$(wc -l <"$tmp/upstream.out")
    ((after > before)) && break
    sleep 0.05
  done
  tail -n 1 "$tmp/upstream.out" | sed -n 's/^connections=\([0-9]*\) requests=\([0-9]*\)$/\1 \2/p'
}

app_rows=() proxy_rows=() tls_rows=()
mkdir "$tmp/rows"
# A row that could not be measured: label reason; the label on stdout.
failed() {
  jq -n --arg name "$1" --arg why "$2" '{"label": $name, "failed": $why}' >"$tmp/rows/$1.r$round.json"
  log "failed: $1: $2"
  echo "$1"
}
# One measurement: label pid url [loadgen args...]; the label on stdout.
# UPSTREAM=1 adds the upstream's connection counts; ROW_CONNS overrides CONNECTIONS.
measure() {
  local label=$1 pid=$2 url=$3
  shift 3
  local before after c0=0 r0=0 c1=0 r1=0
  [[ ${UPSTREAM:-0} == 1 ]] && read -r c0 r0 < <(upstream_counts)
  before=$(ticks "$pid")
  if ! taskset -c "$client_cpu" "$bin/loadgen" "$url" -c "${ROW_CONNS:-$conns}" -t 1 -d "$duration" -q \
    --label "$label" --json "$tmp/$label.json" "$@" >/dev/null 2>"$tmp/$label.err"; then
    failed "$label" "loadgen: $(why "$tmp/$label.err")"
    return
  fi
  after=$(ticks "$pid")
  [[ ${UPSTREAM:-0} == 1 ]] && read -r c1 r1 < <(upstream_counts)
  jq --argjson cpu $((after - before)) --argjson hz "$hz" \
    --argjson up_conns $((c1 - c0)) --argjson up_reqs $((r1 - r0)) --argjson up "${UPSTREAM:-0}" \
    '. + {cpu_us_per_req: (if .requests > 0 then $cpu / $hz * 1e6 / .requests else 0 end)}
       + (if $up == 1 then {upstream_conns: $up_conns, upstream_reqs: $up_reqs} else {} end)' \
    "$tmp/$label.json" >"$tmp/rows/$label.r$round.json"
  log "done: $label (round $round of $rounds)"
  echo "$label"
}

# A proxy row: measured when its server started ($1 is 1), else a failed row with the
# start of the server's log ($2). The other arguments as `measure` takes them.
proxy_row() { # ok log label pid url [loadgen arguments]
  local ok=$1 log=$2
  shift 2
  if ((ok)); then
    proxy_rows+=("$(UPSTREAM=1 measure "$@")")
  else
    proxy_rows+=("$(failed "$1" "did not start: $(why "$log")")")
  fi
}

tg=http://127.0.0.1:$tiergate_port
store=http://127.0.0.1:$store_port
tls=(--ca "$tmp/cert.pem")
handshakes=(--insecure --new-conn)
tiergate_tls=https://127.0.0.1:$tiergate_tls_port/livez
nginx_tls=https://127.0.0.1:$nginx_tls_port/livez
for ((round = 1; round <= rounds; round++)); do
  cold_round=$((cold_first + (round - 1) * cold_items))
  if want app; then
  app_rows+=("$(measure limit-server "$limit_pid" "http://127.0.0.1:$limit_port/items/1")")
  app_rows+=("$(measure tiergate-l1-hit "$tiergate_pid" "$tg/" --scenario hot --id "$id")")
  if ((logged_ok)); then
    app_rows+=("$(measure tiergate-l1-hit-logged "$logged_pid" "http://127.0.0.1:$logged_port/" --scenario hot --id "$id")")
  else
    app_rows+=("$(failed tiergate-l1-hit-logged "did not start: $(why "$tmp/tiergate-logged.log")")")
  fi
  # Zipf and mix: one unmeasured second first, so the hot ids are in L1 as in steady state.
  taskset -c "$client_cpu" "$bin/loadgen" "$store/" -c "$conns" -t 1 -d 1s -q \
    --scenario zipf --items "$zipf_items" --first-id "$zipf_first" >/dev/null 2>&1 || true
  app_rows+=("$(measure tiergate-zipf "$store_pid" "$store/" --scenario zipf --items "$zipf_items" --first-id "$zipf_first")")
  app_rows+=("$(measure tiergate-mix "$store_pid" "$store/" --scenario mix --items "$zipf_items" --first-id "$zipf_first" --write-ratio 0.1)")
  app_rows+=("$(measure tiergate-cold "$store_pid" "$store/" --scenario cold --first-id "$cold_round")")
  if ((nginx_ok)); then
    app_rows+=("$(measure nginx-static "$nginx_pid" "http://127.0.0.1:$nginx_port/static")")
  else
    app_rows+=("$(failed nginx-static "did not start: $(why "$tmp/nginx.log") $(why "$tmp/nginx-error.log")")")
  fi
  fi

  if want proxy; then
  proxy_rows+=("$(UPSTREAM=1 measure upstream-direct "$upstream_pid" "http://127.0.0.1:$upstream_port/")")
  open=(--rate "$proxy_rate")
  proxy_row "$proxy_ok" "$tmp/tiergate-proxy.log" tiergate-proxy "$proxy_pid" "http://127.0.0.1:$proxy_port/"
  proxy_row "$nginx_ok" "$tmp/nginx-error.log" nginx-proxy "$nginx_pid" "http://127.0.0.1:$nginx_port/"
  proxy_row "$haproxy_ok" "$tmp/haproxy.log" haproxy-proxy "$haproxy_pid" "http://127.0.0.1:$haproxy_port/"
  proxy_row "$proxy_ok" "$tmp/tiergate-proxy.log" "tiergate-proxy-at-$proxy_rate" "$proxy_pid" "http://127.0.0.1:$proxy_port/" "${open[@]}"
  proxy_row "$nginx_ok" "$tmp/nginx-error.log" "nginx-proxy-at-$proxy_rate" "$nginx_pid" "http://127.0.0.1:$nginx_port/" "${open[@]}"
  proxy_row "$haproxy_ok" "$tmp/haproxy.log" "haproxy-proxy-at-$proxy_rate" "$haproxy_pid" "http://127.0.0.1:$haproxy_port/" "${open[@]}"
  proxy_row "$proxy_logged_ok" "$tmp/tiergate-proxy-logged.log" tiergate-proxy-logged "$proxy_logged_pid" "http://127.0.0.1:$proxy_logged_port/"
  proxy_row "$nginx_ok" "$tmp/nginx-error.log" nginx-proxy-logged "$nginx_pid" "http://127.0.0.1:$nginx_logged_port/"
  proxy_row "$proxy_ok" "$tmp/tiergate-proxy.log" tiergate-proxy-tls "$proxy_pid" "https://127.0.0.1:$proxy_tls_port/" "${tls[@]}"
  proxy_row "$nginx_ok" "$tmp/nginx-error.log" nginx-proxy-tls "$nginx_pid" "https://127.0.0.1:$nginx_proxy_tls_port/" "${tls[@]}"
  proxy_row "$haproxy_ok" "$tmp/haproxy.log" haproxy-proxy-tls "$haproxy_pid" "https://127.0.0.1:$haproxy_tls_port/" "${tls[@]}"
  fi

  want tls || continue
  if up "$tiergate_pid" "$tiergate_tls"; then
    tls_rows+=("$(measure tiergate-tls "$tiergate_pid" "$tiergate_tls" "${tls[@]}")")
    tls_rows+=("$(ROW_CONNS=4 measure tiergate-tls-h2 "$tiergate_pid" "$tiergate_tls" "${tls[@]}" --http2 --streams 8)")
    tls_rows+=("$(measure tiergate-tls-handshake "$tiergate_pid" "$tiergate_tls" "${handshakes[@]}")")
  else
    tls_rows+=("$(failed tiergate-tls "no HTTPS answer: $(why "$tmp/tiergate.log")")")
  fi
  if ((nginx_ok)) && up "$nginx_pid" "$nginx_tls"; then
    tls_rows+=("$(measure nginx-tls "$nginx_pid" "$nginx_tls" "${tls[@]}")")
    tls_rows+=("$(ROW_CONNS=4 measure nginx-tls-h2 "$nginx_pid" "$nginx_tls" "${tls[@]}" --http2 --streams 8)")
    tls_rows+=("$(measure nginx-tls-handshake "$nginx_pid" "$nginx_tls" "${handshakes[@]}")")
  else
    tls_rows+=("$(failed nginx-tls "no HTTPS answer: $(why "$tmp/nginx-error.log")")")
  fi
done

# One row per label: the round with the median req/s (the lower of the two middle ones
# for an even count), so its latencies and CPU come from the same measurement.
pick() {
  local label
  while read -r label; do
    jq -s 'map(select(.failed | not)) as $ok
      | if ($ok | length) > 0 then ($ok | sort_by(.requests_per_sec) | .[(length - 1) / 2 | floor]) + {rounds: ($ok | length)} else .[0] end' \
      "$tmp/rows/$label".r*.json >"$tmp/$label.row.json"
    echo "$tmp/$label.row.json"
  done
}
if want app; then mapfile -t app_rows < <(printf '%s\n' "${app_rows[@]}" | awk '!seen[$0]++' | pick); fi
if want proxy; then mapfile -t proxy_rows < <(printf '%s\n' "${proxy_rows[@]}" | awk '!seen[$0]++' | pick); fi
if want tls; then mapfile -t tls_rows < <(printf '%s\n' "${tls_rows[@]}" | awk '!seen[$0]++' | pick); fi

if [[ -n ${COMPARE_JSON:-} ]]; then
  jq -s . "${app_rows[@]}" "${proxy_rows[@]}" "${tls_rows[@]}" >"$COMPARE_JSON"
fi

r2='def r2: (. * 100 | round) / 100;'
echo "loadgen: $conns connections (TLS h2 rows: 4 x 8 streams), HTTP/1.1 unless marked, closed loop (rows ending -at-N: open loop at N req/s), $duration per row, median of $rounds round(s), server on core $server_cpu, loadgen on core $client_cpu"
if want app; then
echo
echo "| app | req/s | vs limit | p50 ms | p99 ms | p99.9 ms | server CPU µs/req | errors | non-2xx |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
jq -rs "$r2"' (.[0].requests_per_sec // 0) as $top | .[] |
  if .failed then "| \(.label) | failed: \(.failed) | | | | | | | |" else
  "| \(.label) | \(.requests_per_sec | floor) | \(if $top > 0 then .requests_per_sec / $top | r2 else "n/a" end) | \(.p50_ms) | \(.p99_ms) | \(.p999_ms) | \(.cpu_us_per_req | r2) | \(.errors) | \(.non_success) |" end' \
  "${app_rows[@]}"
fi
if want proxy; then
echo
echo "| proxy, 1 KiB body | req/s | req/s vs nginx | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/req | CPU vs nginx | upstream conns opened | upstream reuse | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
jq -rs "$r2"' (map(select((.label | startswith("nginx")) and (.failed | not))) | map({key: (.label | sub("^nginx"; "")), value: .}) | from_entries) as $refs | .[] |
  if .failed then "| \(.label) | failed: \(.failed) | | | | | | | | | |" else
  $refs[.label | sub("^[a-z]+"; "")] as $ref |
  "| \(.label) | \(.requests_per_sec | floor) | \(if $ref then .requests_per_sec / $ref.requests_per_sec | r2 else "n/a" end) | \(.p50_ms) | \(.p99_ms) | \(.p999_ms) | \(.cpu_us_per_req | r2) | \(if $ref and $ref.cpu_us_per_req > 0 then .cpu_us_per_req / $ref.cpu_us_per_req | r2 else "n/a" end) | \(.upstream_conns) | \(if .upstream_reqs > 0 then ((1 - .upstream_conns / .upstream_reqs) * 100 | if . < 0 then 0 else . end | r2 | tostring) + " %" else "n/a" end) | \(.errors) |" end' \
  "${proxy_rows[@]}"
fi
if want tls; then
echo
echo "| TLS (ECDSA P-256, /livez) | proto | new conn per request | req/s | req/s vs nginx | p50 ms | p99 ms | p99.9 ms | server CPU µs/req | TLS full handshakes | errors |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
jq -rs "$r2"' (map(select((.label | startswith("nginx")) and (.failed | not))) | map({key: (.label | sub("^nginx"; "")), value: .}) | from_entries) as $ref | .[] |
  if .failed then "| \(.label) | failed: \(.failed) | | | | | | | | | |" else
  (.label | sub("^[a-z]+"; "")) as $k |
  "| \(.label) | \(if .protocol == "http2" then "h2" else "h1" end) \(.connections)×\(if .protocol == "http2" then 8 else 1 end) | \(if ($k | endswith("handshake")) then "yes" else "no" end) | \(.requests_per_sec | floor) | \(if $ref[$k] then .requests_per_sec / $ref[$k].requests_per_sec | r2 else "n/a" end) | \(.p50_ms) | \(.p99_ms) | \(.p999_ms) | \(.cpu_us_per_req | r2) | \(.tls_handshakes) | \(.errors) |" end' \
  "${tls_rows[@]}"
fi

# The goals of the issues these tables answer (7: L1 against the limit, proxy and TLS
# against nginx; 5 and 20: the proxy; 4: TLS; 17: the access log's cost), each judged on its
# rows above.
echo
echo "| goal | measured | met |"
echo "|---|---|---|"
jq -rs --arg tables "$tables" "$r2"' map(select(.failed | not)) | (map({key: .label, value: .}) | from_entries) as $r |
($tables | split(",")) as $measured |
def against($ours; $peer):
  if $r[$ours] and $r[$peer] and $r[$peer].requests_per_sec > 0 and $r[$peer].cpu_us_per_req > 0 then
    {rps: ($r[$ours].requests_per_sec / $r[$peer].requests_per_sec),
     cpu: ($r[$ours].cpu_us_per_req / $r[$peer].cpu_us_per_req),
     p99: $r[$ours].p99_ms, peer_p99: $r[$peer].p99_ms}
  else null end;
def goal($table; $name; $ours; $peer; measured; met):
  if ($measured | index($table)) == null then empty
  else against($ours; $peer) as $a
    | if $a then ($a | "| \($name) | \(measured) | \(if met then "yes" else "**no**" end) |")
      else "| \($name) | not measured (a row failed) | n/a |" end
  end;
goal("app"; "L1 hit vs limit-server: ≥ 0.9× req/s, ≤ 1.2× CPU per request";
  "tiergate-l1-hit"; "limit-server";
  "\(.rps | r2)× req/s, \(.cpu | r2)× CPU"; .rps >= 0.9 and .cpu <= 1.2),
goal("app"; "L1 hit with access lines (to a file) vs without: ≥ 0.9× req/s, ≤ 1.1× CPU per request";
  "tiergate-l1-hit-logged"; "tiergate-l1-hit";
  "\(.rps | r2)× req/s, \(.cpu | r2)× CPU"; .rps >= 0.9 and .cpu <= 1.1),
goal("proxy"; "proxy vs nginx: ≥ 1.0× req/s, ≤ 1.0× CPU per request, p99 no worse (issue 20)";
  "tiergate-proxy"; "nginx-proxy";
  "\(.rps | r2)× req/s, \(.cpu | r2)× CPU, p99 \(.p99) vs \(.peer_p99) ms"; .rps >= 1 and .cpu <= 1 and .p99 <= .peer_p99),
goal("proxy"; "the same, both with their default access logs (to a file)";
  "tiergate-proxy-logged"; "nginx-proxy-logged";
  "\(.rps | r2)× req/s, \(.cpu | r2)× CPU, p99 \(.p99) vs \(.peer_p99) ms"; .rps >= 1 and .cpu <= 1 and .p99 <= .peer_p99),
(if ($measured | index("proxy")) == null then empty
  else [against("tiergate-proxy-tls"; "nginx-proxy-tls"), against("tiergate-proxy-tls"; "haproxy-proxy-tls")] | map(select(.)) as $peers
  | if ($peers | length) == 2 then ($peers | min_by(.rps)) as $a
      | "| TLS keep-alive proxy vs the better of nginx and HAProxy: ≥ 1.0× req/s (issue 20) | \($a.rps | r2)× req/s, \($a.cpu | r2)× CPU, p99 \($a.p99) vs \($a.peer_p99) ms | \(if $a.rps >= 1 then "yes" else "**no**" end) |"
    else "| TLS keep-alive proxy vs the better of nginx and HAProxy: ≥ 1.0× req/s (issue 20) | not measured (a row failed) | n/a |" end
  end),
goal("proxy"; "proxy vs nginx: ≥ 1.2× req/s, less CPU per request, p99 no worse (stretch)";
  "tiergate-proxy"; "nginx-proxy";
  "\(.rps | r2)× req/s, \(.cpu | r2)× CPU, p99 \(.p99) vs \(.peer_p99) ms"; .rps >= 1.2 and .cpu < 1 and .p99 <= .peer_p99),
((["tls", "TLS h1 keep-alive"], ["tls-h2", "TLS h2"], ["tls-handshake", "TLS new handshakes"]) as [$row, $name]
  | goal("tls"; "\($name) vs nginx: ≥ 1.2× req/s, p99 no worse"; "tiergate-\($row)"; "nginx-\($row)";
    "\(.rps | r2)× req/s, p99 \(.p99) vs \(.peer_p99) ms"; .rps >= 1.2 and .p99 <= .peer_p99))' \
  "${app_rows[@]}" "${proxy_rows[@]}" "${tls_rows[@]}"
