#!/usr/bin/env bash
# Benchmark justavps against nginx on 127.0.0.1 and print a Markdown report:
# HTTP throughput and latency (wrk), idle RSS and RSS per idle keep-alive
# connection, and the nonce cache (tools/bench/nonce_bench.lua).
#
#   tools/bench/run.sh [--duration S] [--warmup S] [--reps N] [--quick]
#                      [--no-http] [--no-memory] [--no-nonce] [--perf]
#                      [--keep]
#
#   --duration S  seconds of each measured wrk run (default 10)
#   --warmup S    seconds of the unmeasured wrk run before each one (default 2)
#   --reps N      measured runs per server, interleaved; the report shows the
#                 median (default 3)
#   --quick       --duration 3 --warmup 1 --reps 1, 1000 held connections only
#   --perf        also profile the bare and serve servers under wrk with
#                 perf record and print the top of perf report
#   --keep        keep the temporary directory with raw wrk output and logs
#
# Needs wrk and nginx (tools/setup.sh --bench), taskset, curl, ss and a build
# (tools/build.sh); JV_BUILD_DIR picks another build directory, which is
# copied at the start so that a rebuild during the run does not mix builds.
# Servers run on CPU 0 and wrk on CPU 1. Every server this script starts is
# killed when it exits, and a watchdog ends the whole run after 30 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

duration=10
warmup=2
reps=3
connections=32
hold_counts=(1000 5000)
run_http=1
run_memory=1
run_nonce=1
run_perf=0
keep=0
build=${JV_BUILD_DIR:-build}
server_cpu=0
client_cpu=1
watchdog_seconds=1800

while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) duration=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --reps) reps=$2; shift ;;
    --quick) duration=3; warmup=1; reps=1; hold_counts=(1000) ;;
    --no-http) run_http=0 ;;
    --no-memory) run_memory=0 ;;
    --no-nonce) run_nonce=0 ;;
    --perf) run_perf=1 ;;
    --keep) keep=1 ;;
    -h | --help)
      sed -n '2,22s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "run.sh: unknown option '$1' (see --help)" >&2
      exit 2
      ;;
  esac
  shift
done

for tool in wrk nginx luajit taskset curl ss; do
  if ! command -v "$tool" >/dev/null; then
    echo "run.sh: $tool not found; install it with tools/setup.sh --bench" >&2
    exit 1
  fi
done
if [[ $run_perf -eq 1 ]] && ! command -v perf >/dev/null; then
  echo "run.sh: --perf needs perf, which is not installed" >&2
  exit 1
fi
if [[ ! -x $build/justavps || ! -f $build/lua/justavps/core.so ]]; then
  echo "run.sh: $build/justavps or $build/lua/justavps/core.so is missing;" \
    "run tools/build.sh first" >&2
  exit 1
fi

# The server and the client each keep up to max(hold_counts) sockets open.
max_hold=0
for n in "${hold_counts[@]}"; do
  if ((n > max_hold)); then
    max_hold=$n
  fi
done
need_fds=$((max_hold + 1000))
if (($(ulimit -n) < need_fds)); then
  if ! ulimit -n "$need_fds" 2>/dev/null; then
    echo "run.sh: cannot raise the file descriptor limit to $need_fds" \
      "(hard limit $(ulimit -Hn)); lower the held connection counts" >&2
    exit 1
  fi
fi

tmp=$(mktemp -d /tmp/justavps-bench.XXXXXX)
server_pids=()

mkdir -p "$tmp/build/lua/justavps"
cp "$build/justavps" "$tmp/build/justavps"
cp "$build/lua/justavps/core.so" "$tmp/build/lua/justavps/core.so"
source_build=$build
build=$tmp/build
# The copied binary finds the Lua tree through this instead of its path.
export JUSTAVPS_ROOT=$PWD

cleanup() {
  local pid
  for pid in "${server_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${server_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
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
trap 'echo "run.sh: interrupted" >&2; exit 130' INT TERM

# The watchdog's sleep is its own child so that cleanup can end both.
(
  sleep "$watchdog_seconds" &
  sleep_pid=$!
  trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  wait "$sleep_pid"
  echo "run.sh: timed out after $watchdog_seconds s" >&2
  kill -TERM $$
) &
watchdog_pid=$!

# ---------------------------------------------------------------------------
# Helpers

log() {
  echo "run.sh: $*" >&2
}

# Prints a TCP port on 127.0.0.1 that nothing listens on.
free_port() {
  local port
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 20000))
    if [[ -z $(ss -Htln "sport = :$port") ]]; then
      echo "$port"
      return 0
    fi
  done
  log "no free port found in 100 tries"
  return 1
}

# wait_ready name port pid: waits up to 10 s until GET / on port returns
# the 12-byte greeting.
wait_ready() {
  local name=$1 port=$2 pid=$3 body
  for _ in $(seq 1 100); do
    body=$(curl -s --max-time 1 "http://127.0.0.1:$port/" || true)
    if [[ $body == "hello world" ]]; then
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited before it answered on 127.0.0.1:$port"
      return 1
    fi
    sleep 0.1
  done
  log "$name: no greeting from 127.0.0.1:$port within 10 s" \
    "(last body: '$body')"
  return 1
}

# Prints VmRSS of pid in KiB.
rss_kib() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

stop_server() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for i in "${!server_pids[@]}"; do
    if [[ ${server_pids[$i]} == "$pid" ]]; then
      unset 'server_pids[i]'
    fi
  done
}

# Each start_* function starts one server on CPU $server_cpu and sets
# started_pid (the process that owns the client connections), started_port
# and started_log.

start_bare() {
  local out=$tmp/bare-$RANDOM
  started_log=$out.log
  taskset -c "$server_cpu" luajit tools/bench/bare_server.lua "$build" \
    >"$out.port" 2>"$out.log" &
  started_pid=$!
  server_pids+=("$started_pid")
  for _ in $(seq 1 100); do
    [[ -s $out.port ]] && break
    sleep 0.1
  done
  started_port=$(head -n1 "$out.port")
  wait_ready "bare_server.lua (log $out.log)" "$started_port" "$started_pid"
}

# start_dev [access-log]: the serve role; with an argument the access log is
# on and goes to a file in $tmp.
start_dev() {
  local out=$tmp/dev-$RANDOM
  started_log=$out.log
  local args=(serve --port 0 --no-watch)
  [[ $# -eq 0 ]] && args+=(--no-access-log)
  taskset -c "$server_cpu" "$build/justavps" "${args[@]}" 2>"$out.log" &
  started_pid=$!
  server_pids+=("$started_pid")
  started_port=
  for _ in $(seq 1 100); do
    started_port=$(sed -n 's/.*msg=listening .*port=\([0-9]*\).*/\1/p' \
      "$out.log" | head -n1)
    [[ -n $started_port ]] && break
    sleep 0.1
  done
  if [[ -z $started_port ]]; then
    log "the serve role did not log a listening port; its log:"
    cat "$out.log" >&2
    return 1
  fi
  wait_ready "justavps serve (log $out.log)" "$started_port" "$started_pid"
}

# Starts nginx with one worker; started_pid is the worker, nginx_master_pid
# the master.
start_nginx() {
  local prefix=$tmp/nginx-$RANDOM
  mkdir -p "$prefix/temp"
  started_log=$prefix/error.log
  started_port=$(free_port)
  cat >"$prefix/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $prefix/nginx.pid;
error_log $prefix/error.log warn;
worker_rlimit_nofile $need_fds;
events {
  worker_connections $need_fds;
}
http {
  access_log off;
  default_type text/plain;
  client_body_temp_path $prefix/temp/body;
  proxy_temp_path $prefix/temp/proxy;
  fastcgi_temp_path $prefix/temp/fastcgi;
  uwsgi_temp_path $prefix/temp/uwsgi;
  scgi_temp_path $prefix/temp/scgi;
  server {
    listen 127.0.0.1:$started_port;
    location / {
      return 200 "hello world\n";
    }
  }
}
EOF
  taskset -c "$server_cpu" nginx -p "$prefix/" -c "$prefix/nginx.conf" \
    -e "$prefix/error.log" 2>"$prefix/stderr.log" &
  nginx_master_pid=$!
  server_pids+=("$nginx_master_pid")
  wait_ready "nginx (log $prefix/error.log)" "$started_port" \
    "$nginx_master_pid"
  started_pid=$(pgrep -P "$nginx_master_pid" | head -n1)
  if [[ -z $started_pid ]]; then
    log "nginx has no worker process; see $prefix/error.log"
    return 1
  fi
}

# Converts a wrk duration such as 512.00us, 1.20ms or 1.00s to microseconds.
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

# Prints the CPU time pid has used, user and system, in clock ticks.
cpu_ticks() {
  sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

# run_wrk port seconds out: wrk pinned to CPU $client_cpu.
run_wrk() {
  taskset -c "$client_cpu" wrk -t1 -c"$connections" -d"$2"s --latency \
    "http://127.0.0.1:$1/" >"$3"
}

# ---------------------------------------------------------------------------
# Machine

echo "# justavps benchmark run"
echo
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "- nproc: $(nproc)"
echo "- CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
echo "- kernel: $(uname -r)"
echo "- memory: $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' \
  /proc/meminfo)"
echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
echo "- wrk: $(wrk -v 2>&1 | head -n1 | awk '{ print $2 }')"
echo "- luajit: $(luajit -v | awk '{ print $2 }'), libluajit-5.1-2" \
  "$(dpkg-query -W -f='${Version}' libluajit-5.1-2 2>/dev/null || echo '?')"
echo "- justavps: $("$build/justavps" --version), built in $source_build" \
  "($(sha256sum "$build/justavps" | cut -c1-12) justavps," \
  "$(sha256sum "$build/lua/justavps/core.so" | cut -c1-12) core.so)"
echo "- files under core/ and lua/ that differ from the commit:" \
  "$(git status --porcelain -- core lua | wc -l)"
echo "- servers on CPU $server_cpu, wrk and the connection client on CPU" \
  "$client_cpu (taskset)"
echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# ---------------------------------------------------------------------------
# HTTP

if [[ $run_http -eq 1 ]]; then
  sides=(nginx bare dev dev_log)
  declare -A label port pid busy_pid log_file
  label[nginx]="nginx, 1 worker"
  label[bare]="justavps bare core handler"
  label[dev]="justavps serve role, no access log"
  label[dev_log]="justavps serve role, access log to a file"

  log "starting the servers"
  start_nginx
  port[nginx]=$started_port
  pid[nginx]=$nginx_master_pid
  busy_pid[nginx]=$started_pid
  log_file[nginx]=$started_log
  start_bare
  port[bare]=$started_port
  pid[bare]=$started_pid
  busy_pid[bare]=$started_pid
  log_file[bare]=$started_log
  start_dev
  port[dev]=$started_port
  pid[dev]=$started_pid
  busy_pid[dev]=$started_pid
  log_file[dev]=$started_log
  start_dev access-log
  port[dev_log]=$started_port
  pid[dev_log]=$started_pid
  busy_pid[dev_log]=$started_pid
  log_file[dev_log]=$started_log

  echo "## HTTP: GET / with a 12-byte body"
  echo
  echo "wrk -t1 -c$connections -d${duration}s --latency, a ${warmup} s wrk" \
    "run before each measured run, $reps measured runs per server," \
    "interleaved. \"server CPU\" is the CPU time the serving process" \
    "used during the measured run over its length: below about 95% other" \
    "processes took part of CPU $server_cpu. Response sizes (head + body)" \
    "as curl received them:"
  echo
  for side in "${sides[@]}"; do
    bytes=$(curl -s -D - -o /dev/null "http://127.0.0.1:${port[$side]}/" |
      wc -c)
    echo "- ${label[$side]}: $((bytes + 12)) bytes"
  done
  echo
  echo "| run | server | requests/s | p50 | p99 | server CPU | errors |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | --- |"

  declare -A rps_runs p50_runs p99_runs
  for rep in $(seq 1 "$reps"); do
    # Rotate the order so that no server always runs first.
    for k in "${!sides[@]}"; do
      side=${sides[$(((k + rep - 1) % ${#sides[@]}))]}
      log "run $rep/$reps: ${label[$side]}"
      run_wrk "${port[$side]}" "$warmup" "$tmp/warmup.txt"
      out=$tmp/wrk-$side-$rep.txt
      ticks_before=$(cpu_ticks "${busy_pid[$side]}")
      if ! run_wrk "${port[$side]}" "$duration" "$out" ||
        ! kill -0 "${pid[$side]}" 2>/dev/null; then
        log "wrk failed or ${label[$side]} exited; wrk output and the" \
          "end of the server log (${log_file[$side]}):"
        cat "$out" >&2
        tail -n 20 "${log_file[$side]}" >&2
        exit 1
      fi
      ticks_after=$(cpu_ticks "${busy_pid[$side]}")
      cpu=$(awk -v t=$((ticks_after - ticks_before)) \
        -v hz="$(getconf CLK_TCK)" -v d="$duration" \
        'BEGIN { printf "%.0f%%", 100 * t / hz / d }')
      rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
      p50=$(to_us "$(awk '$1 == "50%" { print $2 }' "$out")")
      p99=$(to_us "$(awk '$1 == "99%" { print $2 }' "$out")")
      errors=$(grep -E 'Socket errors|Non-2xx' "$out" | tr -s ' ' |
        paste -sd';' - || true)
      rps_runs[$side]+="$rps "
      p50_runs[$side]+="$p50 "
      p99_runs[$side]+="$p99 "
      echo "| $rep | ${label[$side]} | $rps | ${p50} us | ${p99} us | $cpu |" \
        "${errors:-none} |"
    done
  done
  echo

  # shellcheck disable=SC2086 # the run lists are space-separated numbers
  {
    nginx_rps=$(median ${rps_runs[nginx]})
    nginx_p99=$(median ${p99_runs[nginx]})
  }
  echo "Medians over $reps runs (p50 and p99 each the median of the runs)," \
    "and ratios to nginx:"
  echo
  echo "| server | requests/s | x nginx | p50 | p99 | p99 / nginx p99 |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  for side in "${sides[@]}"; do
    # shellcheck disable=SC2086
    {
      rps=$(median ${rps_runs[$side]})
      p50=$(median ${p50_runs[$side]})
      p99=$(median ${p99_runs[$side]})
    }
    awk -v l="${label[$side]}" -v r="$rps" -v nr="$nginx_rps" -v a="$p50" \
      -v b="$p99" -v nb="$nginx_p99" 'BEGIN {
      printf "| %s | %.0f | %.2f | %.0f us | %.0f us | %.2f |\n",
        l, r, r / nr, a, b, b / nb
    }'
  done
  echo

  if [[ $run_perf -eq 1 ]]; then
    for side in bare dev; do
      log "perf: ${label[$side]}"
      run_wrk "${port[$side]}" 6 "$tmp/perf-wrk.txt" &
      wrk_pid=$!
      sleep 0.5
      perf record -q -p "${pid[$side]}" -o "$tmp/perf-$side.data" \
        -- sleep 5 >/dev/null 2>&1
      wait "$wrk_pid"
      echo "### perf, ${label[$side]}: share of samples by object, then the"
      echo "top 25 symbols outside the kernel"
      echo
      echo '```'
      perf report -i "$tmp/perf-$side.data" --stdio --no-children \
        --sort dso --percent-limit 0.5 2>/dev/null | grep -v '^#' |
        grep -v '^$' || true
      echo
      perf report -i "$tmp/perf-$side.data" --stdio --no-children \
        --sort dso,symbol 2>/dev/null | grep -v '^#' | grep -v '^$' |
        grep -v 'kernel.kallsyms' | head -n 25 || true
      echo '```'
      echo
    done
  fi

  for side in "${sides[@]}"; do
    stop_server "${pid[$side]}"
  done
  echo "Load average after the HTTP runs: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
fi

# ---------------------------------------------------------------------------
# Memory

if [[ $run_memory -eq 1 ]]; then
  echo "## Memory"
  echo
  echo "VmRSS from /proc/PID/status, 1 s after the server answered its first"
  echo "request (curl). For nginx the worker owns the connections; the idle"
  echo "line gives master + worker. Per connection: a fresh server, 16"
  echo "connections opened and closed to warm it, then RSS before and after"
  echo "tools/bench/hold_conns.lua opens N keep-alive connections that each"
  echo "made one request and stay idle."
  echo
  echo "| server | idle RSS | N | RSS before | RSS with N idle | per connection |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"

  for kind in bare dev nginx; do
    case $kind in
      bare) name="justavps bare core handler" ;;
      dev) name="justavps dev role, no access log" ;;
      nginx) name="nginx, 1 worker" ;;
    esac

    "start_$kind"
    sleep 1
    if [[ $kind == nginx ]]; then
      master=$(rss_kib "$nginx_master_pid")
      worker=$(rss_kib "$started_pid")
      idle="$((master + worker)) KiB ($master + $worker)"
      stop_server "$nginx_master_pid"
    else
      idle="$(rss_kib "$started_pid") KiB"
      stop_server "$started_pid"
    fi

    for n in "${hold_counts[@]}"; do
      log "memory: $name, $n connections"
      "start_$kind"
      holder_pid=$started_pid
      [[ $kind == nginx ]] && server_pid=$nginx_master_pid ||
        server_pid=$started_pid

      taskset -c "$client_cpu" luajit tools/bench/hold_conns.lua \
        "$started_port" 16 0 "$build" >/dev/null
      sleep 0.5
      before=$(rss_kib "$holder_pid")

      ready=$tmp/hold-$kind-$n.out
      taskset -c "$client_cpu" luajit tools/bench/hold_conns.lua \
        "$started_port" "$n" 60 "$build" >"$ready" &
      client_pid=$!
      for _ in $(seq 1 300); do
        grep -q '^ready' "$ready" && break
        if ! kill -0 "$client_pid" 2>/dev/null; then
          break
        fi
        sleep 0.1
      done
      if ! grep -q "^ready $n\$" "$ready"; then
        log "hold_conns.lua did not open $n connections to $name"
        kill -TERM "$client_pid" 2>/dev/null || true
        exit 1
      fi
      sleep 0.5
      after=$(rss_kib "$holder_pid")
      kill -TERM "$client_pid"
      wait "$client_pid" || true
      stop_server "$server_pid"

      awk -v l="$name" -v i="$idle" -v n="$n" -v b="$before" -v a="$after" \
        'BEGIN {
        printf "| %s | %s | %d | %d KiB | %d KiB | %.0f bytes |\n",
          l, i, n, b, a, (a - b) * 1024 / n
      }'
    done
  done
  echo
fi

# ---------------------------------------------------------------------------
# Nonce cache

if [[ $run_nonce -eq 1 ]]; then
  log "nonce cache"
  echo "## Nonce cache"
  echo
  echo "luajit tools/bench/nonce_bench.lua BUILD-COPY (on CPU $server_cpu)"
  echo
  echo '```'
  taskset -c "$server_cpu" luajit tools/bench/nonce_bench.lua "$build"
  echo '```'
fi
