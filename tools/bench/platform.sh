#!/usr/bin/env bash
# Benchmark the platform API on 127.0.0.1 against a real `justavps
# platform` process and a fresh database, and print a Markdown report:
#   1. GET /api/v1/machines with an API key of an account with 50 machines;
#   2. signed heartbeats from 200 machines in turn (tools/bench/
#      platform_sign.lua writes them, tools/bench/platform_wrk.lua replays
#      each once, so every nonce is new).
# For both it reports requests/s, p50 and p99 (wrk), the CPU of the
# platform process, of its PostgreSQL backends and of the whole machine,
# and the SQL statements per request, counted from the PostgreSQL log with
# log_statement = all in a separate pass of --count sequential requests.
#
#   tools/bench/platform.sh [--duration S] [--warmup S] [--reps N]
#                           [--count N] [--connections N] [--quick]
#                           [--heartbeat-only] [--keep]
#
#   --duration S  seconds of each measured wrk run (default 10)
#   --warmup S    seconds of the unmeasured wrk run before each one (default 2)
#   --reps N      measured runs per workload, interleaved; the report shows
#                 the median (default 3)
#   --count N     requests of each workload in the statement count (default 200)
#   --connections N  wrk connections, each with one request in flight
#                 (default 32)
#   --quick       --duration 3 --warmup 1 --reps 1 --count 50
#   --heartbeat-only  measure only the heartbeat workload
#   --keep        keep the temporary directory with raw output and logs
#
# The heartbeat count first sends one heartbeat from every machine, which
# fills the platform's machine lookup cache, and counts those apart.
# For each measured heartbeat run it also reports the transactions the
# database committed per heartbeat (xact_commit of pg_stat_database).
# JUSTAVPS_PLATFORM_HEARTBEAT_* variables pass through to the platform.
#
# Needs wrk, luajit, taskset, curl, psql, a build (tools/build.sh, copied at
# the start; JV_BUILD_DIR picks another one) and the test PostgreSQL
# (tools/pg.sh start, or the server of PGHOST, PGPORT and PGUSER when
# PGHOST is set), whose log it reads and where it creates a database and
# drops it at exit. The platform runs on CPU 0 and wrk on CPU 1;
# PostgreSQL is not pinned. Every process this script starts is ended when
# it exits, and a watchdog ends the whole run after 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

duration=10
warmup=2
reps=3
count=200
keep=0
heartbeat_only=0
build=${JV_BUILD_DIR:-build}
server_cpu=0
client_cpu=1
connections=32
# Signed heartbeats written per second of a wrk run: above the 10,000/s
# target, so that wrk runs out only when the platform is faster than that,
# and then the run reports non-2xx responses.
heartbeat_rate_cap=15000
watchdog_seconds=900

while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) duration=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --reps) reps=$2; shift ;;
    --count) count=$2; shift ;;
    --connections) connections=$2; shift ;;
    --quick) duration=3; warmup=1; reps=1; count=50 ;;
    --heartbeat-only) heartbeat_only=1 ;;
    --keep) keep=1 ;;
    -h | --help)
      sed -n '2,40s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "platform.sh: unknown option '$1' (see --help)" >&2
      exit 2
      ;;
  esac
  shift
done

for tool in wrk luajit taskset curl psql; do
  if ! command -v "$tool" >/dev/null; then
    echo "platform.sh: $tool not found; install it with tools/setup.sh" \
      "--bench" >&2
    exit 1
  fi
done
if [[ ! -x $build/justavps || ! -f $build/lua/justavps/core.so ]]; then
  echo "platform.sh: $build/justavps or $build/lua/justavps/core.so is" \
    "missing; run tools/build.sh first" >&2
  exit 1
fi
# A PGHOST set by the caller wins, as in the specs' support/pg.lua.
if [[ -z ${PGHOST:-} ]]; then
  tools/pg.sh start >&2
  eval "$(tools/pg.sh env)"
fi
pg_log="$(readlink -f var/test-pg)/postgres.log"
if [[ ! -r $pg_log ]]; then
  echo "platform.sh: cannot read the PostgreSQL log $pg_log" >&2
  exit 1
fi

# The platform's heartbeat settings (JUSTAVPS_PLATFORM_HEARTBEAT_*) pass
# through from this script's environment, so runs can compare them, and
# so do JUSTAVPS_JIT_PROFILE and JUSTAVPS_JIT_VERBOSE (LuaJIT's profiler
# and trace log, see lua/justavps/cli.lua).
platform_env=()
while IFS= read -r setting; do
  platform_env+=("$setting")
done < <(env | grep -E '^JUSTAVPS_(PLATFORM_HEARTBEAT_|JIT_PROFILE=|JIT_VERBOSE=)' || true)

tmp=$(mktemp -d /tmp/justavps-platform-bench.XXXXXX)
started_pids=()
dbname=

mkdir -p "$tmp/build/lua/justavps" "$tmp/home"
cp "$build/justavps" "$tmp/build/justavps"
cp "$build/lua/justavps/core.so" "$tmp/build/lua/justavps/core.so"
source_build=$build
build=$tmp/build
export JUSTAVPS_ROOT=$PWD

cleanup() {
  local pid
  for pid in "${started_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${started_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n $dbname ]]; then
    luajit tools/bench/platform_setup.lua drop "$build" "$dbname" >&2 || true
  fi
  if [[ -n ${watchdog_pid:-} ]]; then
    kill "$watchdog_pid" 2>/dev/null || true
  fi
  if [[ $keep -eq 1 ]]; then
    echo "raw output kept in $tmp" >&2
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'echo "platform.sh: interrupted" >&2; exit 130' INT TERM

# The watchdog's sleep is its own child so that cleanup can end both.
(
  sleep "$watchdog_seconds" &
  sleep_pid=$!
  trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  wait "$sleep_pid"
  echo "platform.sh: timed out after $watchdog_seconds s" >&2
  kill -TERM $$
) &
watchdog_pid=$!

log() {
  echo "platform.sh: $*" >&2
}

# Prints the CPU time the given pids used, user and system, in clock ticks.
# A pid that has exited counts 0.
cpu_ticks() {
  local pid total=0 t
  for pid in "$@"; do
    t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null |
      awk '{ print $12 + $13 }')
    total=$((total + ${t:-0}))
  done
  echo "$total"
}

# Prints "busy total" clock ticks of all CPUs from /proc/stat.
machine_ticks() {
  awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' \
    /proc/stat
}

# Prints the pids of the PostgreSQL backends connected to the database.
backend_pids() {
  psql -XAtc "SELECT pid FROM pg_stat_activity WHERE datname = '$dbname'"
}

# Prints the transactions committed in the bench database so far.
xact_commits() {
  psql -XAtc "SELECT xact_commit FROM pg_stat_database
    WHERE datname = '$dbname'"
}

to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) f = 1
    else if (v ~ /ms$/) f = 1000
    else if (v ~ /m$/) f = 60000000
    else if (v ~ /s$/) f = 1000000
    else f = 1
    printf "%.0f", n * f
  }'
}

median() {
  printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 }
    END {
      if (NR % 2) print a[(NR + 1) / 2]
      else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2
    }'
}

# start_platform name: starts the platform on CPU 0 and sets platform_pid
# and platform_port.
start_platform() {
  local name=$1 port=
  env -i "PATH=$PATH" "HOME=$tmp/home" "LANG=C.UTF-8" \
    "JUSTAVPS_ROOT=$PWD" "PGHOST=$PGHOST" "PGPORT=$PGPORT" \
    "PGUSER=$PGUSER" "PGDATABASE=$dbname" \
    "JUSTAVPS_PLATFORM_LISTEN_PORT=0" "${platform_env[@]}" \
    taskset -c "$server_cpu" "$build/justavps" platform \
    --access-log=false 2>"$tmp/platform-$name.log" &
  platform_pid=$!
  started_pids+=("$platform_pid")
  for _ in $(seq 1 100); do
    port=$(sed -n 's/.*msg=listening .*port=\([0-9]*\).*/\1/p' \
      "$tmp/platform-$name.log" | head -n1)
    [[ -n $port ]] && break
    sleep 0.1
  done
  if [[ -z $port ]]; then
    log "the platform did not log a listening port; its log:"
    cat "$tmp/platform-$name.log" >&2
    exit 1
  fi
  platform_port=$port
}

stop_platform() {
  local i
  kill -TERM "$platform_pid" 2>/dev/null || true
  wait "$platform_pid" 2>/dev/null || true
  for i in "${!started_pids[@]}"; do
    if [[ ${started_pids[$i]} == "$platform_pid" ]]; then
      unset 'started_pids[i]'
    fi
  done
}

# send_heartbeats file: posts each signed heartbeat of file with curl, one
# at a time, and fails on any status other than 200.
send_heartbeats() {
  local path ts nonce signature body status
  while IFS=$'\t' read -r path ts nonce signature body; do
    status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
      -H "Content-Type: application/json" \
      -H "X-JustAVPS-Machine-Timestamp: $ts" \
      -H "X-JustAVPS-Machine-Nonce: $nonce" \
      -H "X-JustAVPS-Machine-Signature: $signature" \
      --data-binary "$body" "http://127.0.0.1:$platform_port$path")
    if [[ $status != 200 ]]; then
      log "heartbeat $path returned $status"
      exit 1
    fi
  done <"$1"
}

# count_statements from-byte n pids...: prints the statements that the
# given backends logged after from-byte of the PostgreSQL log, per request
# (count / n), grouped by their first 80 characters, and a total line.
count_statements() {
  local from=$1 n=$2
  shift 2
  tail -c +"$((from + 1))" "$pg_log" | awk -v n="$n" -v pids=" $* " '
    match($0, /\[[0-9]+\] LOG:  (statement|execute [^:]*): /) {
      pid = substr($0, RSTART + 1)
      sub(/\].*/, "", pid)
      if (index(pids, " " pid " ") == 0) next
      text = substr($0, RSTART + RLENGTH)
      c[substr(text, 1, 80)]++
      total++
    }
    END {
      for (t in c) printf "| %.2f | `%s` |\n", c[t] / n, t
      printf "| **%.2f** | total |\n", total / n
    }' | sort -t'|' -k2 -gr
}

# ---------------------------------------------------------------------------
# Setup

log "creating the database"
setup_out=$(luajit tools/bench/platform_setup.lua create "$build" \
  "$tmp/machines.txt") || {
  dbname=$(sed -n 's/^dbname=//p' <<<"${setup_out:-}")
  exit 1
}
dbname=$(sed -n 's/^dbname=//p' <<<"$setup_out")
api_key=$(sed -n 's/^key=//p' <<<"$setup_out")
auth="Authorization: Bearer $api_key"

# ---------------------------------------------------------------------------
# Statement count: log_statement = all for this database only, a platform
# that connects after it is set, and sequential requests.

log "counting SQL statements over $count requests of each workload"
psql -XAqc "ALTER DATABASE \"$dbname\" SET log_statement = 'all'"
start_platform count
list_url="http://127.0.0.1:$platform_port/api/v1/machines"
# One request first, so that the pool has connected and the key's
# last_used_at (written at most once a minute) is fresh.
status=$(curl -s -o "$tmp/list.json" -w '%{http_code}' -H "$auth" "$list_url")
if [[ $status != 200 ]] || ! grep -q '"slug":"list-050"' "$tmp/list.json"; then
  log "GET /api/v1/machines returned $status without the 50 machines:"
  head -c 500 "$tmp/list.json" >&2
  exit 1
fi
machine_count=$(wc -l <"$tmp/machines.txt")
luajit tools/bench/platform_sign.lua "$tmp/machines.txt" \
  "$((machine_count + count))" "count-" "$tmp/count.tsv" "$build"
head -n "$machine_count" "$tmp/count.tsv" >"$tmp/count-first.tsv"
tail -n +"$((machine_count + 1))" "$tmp/count.tsv" >"$tmp/count-rest.tsv"

from=$(stat -c %s "$pg_log")
for _ in $(seq 1 "$count"); do
  curl -s -o /dev/null -H "$auth" "$list_url"
done
sleep 0.5
pids=$(backend_pids | tr '\n' ' ')
list_statements=$(count_statements "$from" "$count" $pids)

# The first heartbeat of each machine, while the platform's caches are
# empty, then the counted ones with the caches filled.
from=$(stat -c %s "$pg_log")
send_heartbeats "$tmp/count-first.tsv"
sleep 0.5
pids=$(backend_pids | tr '\n' ' ')
first_heartbeat_statements=$(count_statements "$from" "$machine_count" $pids)

from=$(stat -c %s "$pg_log")
send_heartbeats "$tmp/count-rest.tsv"
sleep 0.5
pids=$(backend_pids | tr '\n' ' ')
heartbeat_statements=$(count_statements "$from" "$count" $pids)
stop_platform
psql -XAqc "ALTER DATABASE \"$dbname\" RESET log_statement"

# ---------------------------------------------------------------------------
# Throughput

start_platform load
list_url="http://127.0.0.1:$platform_port/api/v1/machines"
base_url="http://127.0.0.1:$platform_port"

declare -A rps p50 p99 platform_cpu pg_cpu machine_cpu commits
bad_runs=0

# measure workload rep: one unmeasured and one measured wrk run.
measure() {
  local workload=$1 rep=$2 out=$tmp/wrk-$1-$2.txt args t0 t1 p0 p1 m0 m1
  local x0 x1 requests
  local tick=$(getconf CLK_TCK) pids
  if [[ $workload == list ]]; then
    args=(-H "$auth" "$list_url")
    taskset -c "$client_cpu" wrk -t1 -c"$connections" -d"${warmup}s" \
      "${args[@]}" >/dev/null
  else
    luajit tools/bench/platform_sign.lua "$tmp/machines.txt" \
      "$((heartbeat_rate_cap * warmup))" "warm$rep-" "$tmp/warm.tsv" "$build"
    taskset -c "$client_cpu" wrk -t1 -c"$connections" -d"${warmup}s" \
      -s tools/bench/platform_wrk.lua "$base_url" -- "$tmp/warm.tsv" \
      >/dev/null
    luajit tools/bench/platform_sign.lua "$tmp/machines.txt" \
      "$((heartbeat_rate_cap * duration))" "run$rep-" "$tmp/run.tsv" "$build"
    args=(-s tools/bench/platform_wrk.lua "$base_url" -- "$tmp/run.tsv")
  fi
  pids=$(backend_pids | tr '\n' ' ')
  # PostgreSQL publishes a backend's counters about once a second.
  sleep 1.5
  x0=$(xact_commits)
  t0=$(cpu_ticks "$platform_pid")
  p0=$(cpu_ticks $pids)
  read -r m0 mt0 < <(machine_ticks)
  taskset -c "$client_cpu" wrk -t1 -c"$connections" -d"${duration}s" \
    --latency "${args[@]}" >"$out"
  t1=$(cpu_ticks "$platform_pid")
  p1=$(cpu_ticks $pids)
  read -r m1 mt1 < <(machine_ticks)
  sleep 1.5
  x1=$(xact_commits)

  if grep -q "Non-2xx\|Socket errors" "$out"; then
    log "$workload run $rep had errors:"
    grep "Non-2xx\|Socket errors" "$out" >&2
    bad_runs=$((bad_runs + 1))
  fi
  rps[$workload,$rep]=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$out")
  p50[$workload,$rep]=$(to_us "$(awk '$1 == "50%" { print $2 }' "$out")")
  p99[$workload,$rep]=$(to_us "$(awk '$1 == "99%" { print $2 }' "$out")")
  platform_cpu[$workload,$rep]=$(awk -v a="$t0" -v b="$t1" -v d="$duration" \
    -v hz="$tick" 'BEGIN { printf "%.0f", (b - a) / hz / d * 100 }')
  pg_cpu[$workload,$rep]=$(awk -v a="$p0" -v b="$p1" -v d="$duration" \
    -v hz="$tick" 'BEGIN { printf "%.0f", (b - a) / hz / d * 100 }')
  machine_cpu[$workload,$rep]=$(awk -v a="$m0" -v b="$m1" -v c="$mt0" \
    -v e="$mt1" 'BEGIN { printf "%.0f", (b - a) / (e - c) * 200 }')
  requests=$(awk '$2 == "requests" && $3 == "in" { print $1 }' "$out")
  commits[$workload,$rep]=$(awk -v a="$x0" -v b="$x1" -v n="$requests" \
    'BEGIN { printf "%.3f", (b - a) / n }')
  log "$workload run $rep: ${rps[$workload,$rep]} requests/s," \
    "${commits[$workload,$rep]} commits per request"
}

workloads=(list heartbeat)
if ((heartbeat_only)); then
  workloads=(heartbeat)
fi
for rep in $(seq 1 "$reps"); do
  if ((heartbeat_only)); then
    order=(heartbeat)
  elif ((rep % 2)); then
    order=(list heartbeat)
  else
    order=(heartbeat list)
  fi
  for workload in "${order[@]}"; do
    measure "$workload" "$rep"
  done
done
heartbeat_rows=$(psql -XAtc "SELECT count(*) FROM machine_metrics" \
  "$dbname")
stop_platform

# ---------------------------------------------------------------------------
# Report

column() {
  local -n values=$1
  local workload=$2 rep list=()
  for rep in $(seq 1 "$reps"); do
    list+=("${values[$workload,$rep]}")
  done
  median "${list[@]}"
}

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "### Run of $(date -u '+%Y-%m-%d %H:%M') UTC (commit $commit)"
echo
options="--duration $duration --warmup $warmup --reps $reps --count $count"
((connections != 32)) && options+=" --connections $connections"
((heartbeat_only)) && options+=" --heartbeat-only"
echo "\`tools/bench/platform.sh $options\`, build from $source_build, wrk" \
  "-t1 -c$connections. Medians of $reps interleaved runs; CPU is percent" \
  "of one core over the measured run, the machine column of both cores" \
  "(200 = all busy)."
echo
echo "| workload | requests/s | p50 (ms) | p99 (ms) | platform CPU | PostgreSQL backends CPU | machine CPU |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for workload in "${workloads[@]}"; do
  name="GET /api/v1/machines (50 machines)"
  [[ $workload == heartbeat ]] && name="heartbeat, 200 machines"
  printf '| %s | %s | %.2f | %.2f | %s%% | %s%% | %s%% |\n' "$name" \
    "$(column rps "$workload")" \
    "$(awk -v v="$(column p50 "$workload")" 'BEGIN { print v / 1000 }')" \
    "$(awk -v v="$(column p99 "$workload")" 'BEGIN { print v / 1000 }')" \
    "$(column platform_cpu "$workload")" "$(column pg_cpu "$workload")" \
    "$(column machine_cpu "$workload")"
done
echo
echo "Runs, in order of the table: requests/s per run:"
for workload in "${workloads[@]}"; do
  list=()
  for rep in $(seq 1 "$reps"); do
    list+=("${rps[$workload,$rep]}")
  done
  echo "- $workload: ${list[*]}"
done
list=()
for rep in $(seq 1 "$reps"); do
  list+=("${commits[heartbeat,$rep]}")
done
echo
echo "Transactions committed per heartbeat under load (xact_commit of the" \
  "bench database over each measured run, including the provisioning" \
  "worker's polls): ${list[*]}."
if ((${#platform_env[@]})); then
  echo "Platform settings from the environment: ${platform_env[*]}."
fi
echo
echo "Heartbeats recorded (machine_metrics rows at the end): $heartbeat_rows."
echo "Runs with non-2xx responses or socket errors: $bad_runs."
echo
echo "SQL statements per request, from log_statement = all over $count" \
  "sequential requests of each workload, counting only the platform's" \
  "backends:"
echo
echo "GET /api/v1/machines:"
echo
echo "| per request | statement (first 80 characters) |"
echo "| ---: | --- |"
echo "$list_statements"
echo
echo "Heartbeat, the first from each of the $machine_count machines (empty" \
  "caches):"
echo
echo "| per request | statement (first 80 characters) |"
echo "| ---: | --- |"
echo "$first_heartbeat_statements"
echo
echo "Heartbeat, the next $count (caches filled):"
echo
echo "| per request | statement (first 80 characters) |"
echo "| ---: | --- |"
echo "$heartbeat_statements"
