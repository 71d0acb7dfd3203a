# bench/lib.sh — what bench/compare.sh and bench/callgrind.sh share: sourced, never run.
# shellcheck shell=bash
#
# `. bench/lib.sh NAME` from the repository's root defines the helpers below; NAME prefixes
# every log line. Afterwards `pids` collects the processes a script starts, for its
# cleanup to stop.

bench_name=$1
pids=()

log() { printf '[%s] %s\n' "$bench_name" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

have() { command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 ]]; }

# Installs with apt-get the PACKAGE of every COMMAND:PACKAGE whose command is missing,
# then puts /usr/sbin on PATH (ss, nginx and haproxy live there).
install_missing() {
  local pair missing=()
  for pair in "$@"; do have "${pair%%:*}" || missing+=("${pair#*:}"); done
  if ((${#missing[@]})); then
    log "installing with apt-get: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
      { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; } ||
      die "apt-get install ${missing[*]} failed"
  fi
  PATH=$PATH:/usr/sbin
}

# Sets server_cpu and client_cpu: the servers on core 0, loadgen on core 1 when there is one.
pick_cores() {
  server_cpu=0 client_cpu=1
  if (($(nproc) < 2)); then
    client_cpu=0
    log "one core: server and loadgen share it"
  fi
}

# Sets bin to the directory of `tiergate`, `loadgen` and `limit-server`: BIN_DIR when
# given, else a release build made now.
release_binaries() {
  local b
  if [[ -n ${BIN_DIR:-} ]]; then
    bin=$(cd "$BIN_DIR" && pwd) || die "BIN_DIR $BIN_DIR is not a directory"
  else
    log "building release binaries (tiergate, loadgen, limit-server)"
    cargo build --release -q -p gateway -p bench --bins
    bin=${CARGO_TARGET_DIR:-$PWD/target}/release
  fi
  for b in tiergate loadgen limit-server; do [[ -x $bin/$b ]] || die "no $b in $bin"; done
}

pg() { PGPASSWORD=postgres psql -X -q -h 127.0.0.1 -U postgres -d postgres "$@"; }

# What a run leaves behind, removed at its exit: the Redis keys matching $1 (when
# REDIS_URL is set) and the database named in created_db (when there is one).
drop_run_data() {
  if [[ -n ${REDIS_URL:-} ]]; then
    redis-cli -u "$REDIS_URL" --scan --pattern "$1" 2>/dev/null |
      xargs -r redis-cli -u "$REDIS_URL" DEL >/dev/null 2>&1 || true
  fi
  [[ -n ${created_db:-} ]] && { pg -c "DROP DATABASE IF EXISTS $created_db WITH (FORCE)" >/dev/null 2>&1 || true; }
  return 0
}

# Stops every process in pids and waits for them.
stop_started() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}

# Ports nothing listens on (others may run servers on this box: never assume a fixed
# one). free_port sets $port; not called in $(...), so `taken` grows in this shell.
taken=" " port=
free_port() {
  local i
  for ((i = 0; i < 200; i++)); do
    # Below Linux's ephemeral range (32768 and up), where clients' own ports live.
    port=$((20000 + RANDOM % 12000))
    [[ $taken == *" $port "* ]] && continue
    if [[ -z $(ss -Htan "( sport = :$port )" 2>/dev/null) ]] && ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      taken+="$port "
      return 0
    fi
  done
  die "found no free port"
}

# up PID URL [SECONDS]: waits until URL answers 200 while process PID lives (at most
# SECONDS, default 30); says why not.
up() {
  local pid=$1 url=$2 seconds=${3:-30} i
  for ((i = 0; i < seconds * 10; i++)); do
    # Alive too: a port taken by someone else's server must not pass for ours.
    if curl -kfsS -o /dev/null "$url" 2>/dev/null; then kill -0 "$pid" 2>/dev/null && return 0; fi
    kill -0 "$pid" 2>/dev/null || { log "process $pid exited before $url answered"; return 1; }
    sleep 0.1
  done
  log "$url did not answer within $seconds s"
  return 1
}
