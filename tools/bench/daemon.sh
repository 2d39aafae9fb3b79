#!/usr/bin/env bash
# Benchmark the machine daemon (`justavps daemon`) on 127.0.0.1 and print a
# Markdown report:
#   1. the port proxy, one hop: wrk through the daemon's /_port/PORT/ and
#      through nginx as a reverse proxy, both to the same backend
#      (tools/bench/bare_server.lua);
#   2. the /_pty terminal: keystroke echo latency and `cat` throughput
#      through the WebSocket (tools/bench/daemon_pty.lua);
#   3. start-up time and idle RSS (tools/bench/daemon_start.lua).
#
#   tools/bench/daemon.sh [--duration S] [--warmup S] [--reps N]
#                         [--samples N] [--file-mib N] [--starts N]
#                         [--quick] [--no-proxy] [--no-pty] [--no-start]
#                         [--perf] [--keep]
#
#   --duration S  seconds of each measured wrk run (default 10)
#   --warmup S    seconds of the unmeasured wrk run before each one (default 2)
#   --reps N      measured wrk runs per proxy, interleaved; the report shows
#                 the median (default 3)
#   --samples N   timed keystrokes after 200 untimed ones (default 1000)
#   --file-mib N  size in MiB of the file that cat prints (default 64)
#   --starts N    timed daemon starts (default 10)
#   --quick       --duration 3 --warmup 1 --reps 1 --samples 200
#                 --file-mib 8 --starts 3
#   --perf        also profile the daemon under wrk with perf record
#   --keep        keep the temporary directory with raw output and logs
#
# Needs wrk and nginx (tools/setup.sh --bench), luajit, taskset, curl, ss,
# bash and a build (tools/build.sh); JV_BUILD_DIR picks another build
# directory, which is copied at the start so that a rebuild during the run
# does not mix builds. The proxies and the daemon run on CPU 0; wrk, the
# backend and the Lua clients on CPU 1. Every process this script starts is
# ended when it exits, and a watchdog ends the whole run after 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

duration=10
warmup=2
reps=3
samples=1000
echo_warmup=200
file_mib=64
cat_runs=3
starts=10
connections=32
run_proxy=1
run_pty=1
run_start=1
run_perf=0
keep=0
build=${JV_BUILD_DIR:-build}
server_cpu=0
client_cpu=1
watchdog_seconds=900

while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) duration=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --reps) reps=$2; shift ;;
    --samples) samples=$2; shift ;;
    --file-mib) file_mib=$2; shift ;;
    --starts) starts=$2; shift ;;
    --quick)
      duration=3; warmup=1; reps=1; samples=200; file_mib=8; starts=3
      ;;
    --no-proxy) run_proxy=0 ;;
    --no-pty) run_pty=0 ;;
    --no-start) run_start=0 ;;
    --perf) run_perf=1 ;;
    --keep) keep=1 ;;
    -h | --help)
      sed -n '2,33s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "daemon.sh: unknown option '$1' (see --help)" >&2
      exit 2
      ;;
  esac
  shift
done

for tool in wrk nginx luajit taskset curl ss bash base64; do
  if ! command -v "$tool" >/dev/null; then
    echo "daemon.sh: $tool not found; install it with tools/setup.sh" \
      "--bench" >&2
    exit 1
  fi
done
if [[ $run_perf -eq 1 ]] && ! command -v perf >/dev/null; then
  echo "daemon.sh: --perf needs perf, which is not installed" >&2
  exit 1
fi
if [[ ! -x $build/justavps || ! -f $build/lua/justavps/core.so ]]; then
  echo "daemon.sh: $build/justavps or $build/lua/justavps/core.so is" \
    "missing; run tools/build.sh first" >&2
  exit 1
fi

tmp=$(mktemp -d /tmp/justavps-daemon-bench.XXXXXX)
# Every process to end on exit: servers, daemons and the Lua clients.
started_pids=()

mkdir -p "$tmp/build/lua/justavps" "$tmp/home" "$tmp/state"
cp "$build/justavps" "$tmp/build/justavps"
cp "$build/lua/justavps/core.so" "$tmp/build/lua/justavps/core.so"
source_build=$build
build=$tmp/build

# The daemon and the Lua clients run with this environment only, so that
# no JUSTAVPS_DAEMON_* override or shell start-up file of the caller
# changes what is measured. The copied binary finds the Lua tree through
# JUSTAVPS_ROOT, and the terminal's login shell starts in the empty HOME.
clean_env=(env -i "PATH=$PATH" "HOME=$tmp/home" "LANG=C.UTF-8"
  "JUSTAVPS_ROOT=$PWD")
# LuaJIT's profiler and trace log (see lua/justavps/cli.lua) are the
# settings that pass through.
for var in JUSTAVPS_JIT_PROFILE JUSTAVPS_JIT_VERBOSE; do
  if [[ -n ${!var:-} ]]; then
    clean_env+=("$var=${!var}")
  fi
done

cleanup() {
  local pid
  for pid in "${started_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${started_pids[@]}"; do
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
trap 'echo "daemon.sh: interrupted" >&2; exit 130' INT TERM

# The watchdog's sleep is its own child so that cleanup can end both.
(
  sleep "$watchdog_seconds" &
  sleep_pid=$!
  trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  wait "$sleep_pid"
  echo "daemon.sh: timed out after $watchdog_seconds s" >&2
  kill -TERM $$
) &
watchdog_pid=$!

# ---------------------------------------------------------------------------
# Helpers

log() {
  echo "daemon.sh: $*" >&2
}

forget_pid() {
  local pid=$1 i
  for i in "${!started_pids[@]}"; do
    if [[ ${started_pids[$i]} == "$pid" ]]; then
      unset 'started_pids[i]'
    fi
  done
}

stop_process() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

# Prints a TCP port on 127.0.0.1 that nothing listens on, from 10000 up to
# the start of the kernel's ephemeral range, so that no outgoing connection
# gets it as its source port. A connect from source port P to port P on
# the same address, while nothing listens there, connects to itself.
free_port() {
  local port low
  low=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range)
  if ((low <= 10000)); then
    log "the ephemeral port range starts at $low, below 10000"
    return 1
  fi
  for _ in $(seq 1 100); do
    port=$((10000 + RANDOM % (low - 10000)))
    if [[ -z $(ss -Htln "sport = :$port") ]]; then
      echo "$port"
      return 0
    fi
  done
  log "no free port found in 100 tries"
  return 1
}

# wait_ready name url pid: waits up to 10 s until url returns the 12-byte
# greeting.
wait_ready() {
  local name=$1 url=$2 pid=$3 body
  for _ in $(seq 1 100); do
    body=$(curl -s --max-time 1 "$url" || true)
    if [[ $body == "hello world" ]]; then
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited before it answered on $url"
      return 1
    fi
    sleep 0.1
  done
  log "$name: no greeting from $url within 10 s (last body: '$body')"
  return 1
}

# start_lua_server script cpu: starts a Lua server script that prints its
# port, and sets started_pid and started_port.
start_lua_server() {
  local script=$1 cpu=$2
  local out
  out=$tmp/$(basename "$script" .lua)-$RANDOM
  "${clean_env[@]}" taskset -c "$cpu" luajit "$script" "$build" \
    >"$out.port" 2>"$out.log" &
  started_pid=$!
  started_pids+=("$started_pid")
  for _ in $(seq 1 100); do
    [[ -s $out.port ]] && break
    sleep 0.1
  done
  started_port=$(head -n1 "$out.port")
  if [[ -z $started_port ]]; then
    log "$script printed no port; its log ($out.log):"
    cat "$out.log" >&2
    return 1
  fi
}

# write_daemon_config path public-port: the config of every daemon this
# script starts. Heartbeats go to the stand-in platform, once an hour.
write_daemon_config() {
  cat >"$1" <<EOF
{
  "slug": "bench-1",
  "token": "0123456789abcdef0123",
  "platform_url": "http://127.0.0.1:$platform_port",
  "public": { "host": "127.0.0.1", "port": $2 },
  "internal": { "host": "127.0.0.1", "port": 0 },
  "broker_cidrs": ["127.0.0.0/8"],
  "routing": { "default_port": $backend_port },
  "toolbox_root": "$tmp/home",
  "state_dir": "$tmp/state",
  "heartbeat_interval": 3600
}
EOF
}

# Starts a daemon on CPU $server_cpu with a free public port; sets
# daemon_pid, daemon_port and daemon_log.
start_daemon() {
  daemon_log=$tmp/daemon-$RANDOM.log
  write_daemon_config "$tmp/daemon.json" 0
  "${clean_env[@]}" taskset -c "$server_cpu" "$build/justavps" daemon \
    --config "$tmp/daemon.json" --access-log=false 2>"$daemon_log" &
  daemon_pid=$!
  started_pids+=("$daemon_pid")
  daemon_port=
  for _ in $(seq 1 100); do
    daemon_port=$(sed -n \
      's/.*msg=listening .*listener=public .*port=\([0-9]*\).*/\1/p' \
      "$daemon_log" | head -n1)
    [[ -n $daemon_port ]] && break
    sleep 0.1
  done
  if [[ -z $daemon_port ]]; then
    log "the daemon did not log its public port; its log:"
    cat "$daemon_log" >&2
    return 1
  fi
  wait_ready "justavps daemon (log $daemon_log)" \
    "http://127.0.0.1:$daemon_port/_port/$backend_port/" "$daemon_pid"
}

# Starts nginx with one worker as a reverse proxy from /_port/BACKEND/ to
# the backend; sets nginx_port, nginx_master_pid, nginx_worker_pid and
# nginx_log.
start_nginx() {
  local prefix=$tmp/nginx
  mkdir -p "$prefix/temp"
  nginx_log=$prefix/error.log
  nginx_port=$(free_port)
  cat >"$prefix/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $prefix/nginx.pid;
error_log $prefix/error.log warn;
events {
  worker_connections 1024;
}
http {
  access_log off;
  client_body_temp_path $prefix/temp/body;
  proxy_temp_path $prefix/temp/proxy;
  fastcgi_temp_path $prefix/temp/fastcgi;
  uwsgi_temp_path $prefix/temp/uwsgi;
  scgi_temp_path $prefix/temp/scgi;
  upstream backend {
    server 127.0.0.1:$backend_port;
    keepalive 32;
  }
  server {
    listen 127.0.0.1:$nginx_port;
    location /_port/$backend_port/ {
      proxy_pass http://backend/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  taskset -c "$server_cpu" nginx -p "$prefix/" -c "$prefix/nginx.conf" \
    -e "$prefix/error.log" 2>"$prefix/stderr.log" &
  nginx_master_pid=$!
  started_pids+=("$nginx_master_pid")
  wait_ready "nginx (log $prefix/error.log)" \
    "http://127.0.0.1:$nginx_port/_port/$backend_port/" "$nginx_master_pid"
  nginx_worker_pid=$(pgrep -P "$nginx_master_pid" | head -n1)
  if [[ -z $nginx_worker_pid ]]; then
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

# percent ticks seconds: CPU share of ticks over seconds of wall time.
percent() {
  awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v d="$2" \
    'BEGIN { printf "%.0f%%", 100 * t / hz / d }'
}

# run_wrk url seconds out: wrk pinned to CPU $client_cpu.
run_wrk() {
  taskset -c "$client_cpu" wrk -t1 -c"$connections" -d"$2"s --latency \
    "$1" >"$3"
}

# Prints the value of key=value in a line of a Lua client's output.
field() {
  sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" <<<" $2"
}

# ---------------------------------------------------------------------------
# Machine

echo "# justavps daemon benchmark run"
echo
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "- nproc: $(nproc)"
echo "- CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo |
  head -n1)"
echo "- kernel: $(uname -r)"
echo "- memory: $(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' \
  /proc/meminfo)"
echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
echo "- wrk: $(wrk -v 2>&1 | head -n1 | awk '{ print $2 }')"
echo "- luajit: $(luajit -v | awk '{ print $2 }'), libluajit-5.1-2" \
  "$(dpkg-query -W -f='${Version}' libluajit-5.1-2 2>/dev/null || echo '?')"
echo "- bash: $(bash --version | head -n1 | awk '{ print $4 }')"
echo "- justavps: $("$build/justavps" --version), built in $source_build" \
  "($(sha256sum "$build/justavps" | cut -c1-12) justavps," \
  "$(sha256sum "$build/lua/justavps/core.so" | cut -c1-12) core.so)"
echo "- files under core/, lua/ and policies/ that differ from the commit:" \
  "$(git status --porcelain -- core lua policies | wc -l)"
echo "- proxies and daemons on CPU $server_cpu; wrk, the backend and the Lua" \
  "clients on CPU $client_cpu (taskset)"
echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

log "starting the backend and the stand-in platform"
start_lua_server tools/bench/bare_server.lua "$client_cpu"
backend_pid=$started_pid
backend_port=$started_port
wait_ready "bare_server.lua" "http://127.0.0.1:$backend_port/" "$backend_pid"
start_lua_server tools/bench/daemon_platform.lua "$client_cpu"
platform_port=$started_port

# ---------------------------------------------------------------------------
# Port proxy

if [[ $run_proxy -eq 1 || $run_pty -eq 1 ]]; then
  log "starting the daemon"
  start_daemon
fi

if [[ $run_proxy -eq 1 ]]; then
  log "starting nginx"
  start_nginx

  sides=(daemon nginx)
  declare -A label url busy_pid alive_pid log_file
  label[daemon]="justavps daemon, /_port/$backend_port/"
  label[nginx]="nginx, 1 worker, proxy_pass with keepalive 32"
  url[daemon]="http://127.0.0.1:$daemon_port/_port/$backend_port/"
  url[nginx]="http://127.0.0.1:$nginx_port/_port/$backend_port/"
  busy_pid[daemon]=$daemon_pid
  busy_pid[nginx]=$nginx_worker_pid
  alive_pid[daemon]=$daemon_pid
  alive_pid[nginx]=$nginx_master_pid
  log_file[daemon]=$daemon_log
  log_file[nginx]=$nginx_log

  echo "## Port proxy, one hop: GET through the proxy to a 12-byte backend"
  echo
  echo "wrk -t1 -c$connections -d${duration}s --latency on the URL below," \
    "a ${warmup} s wrk run before each measured run, $reps measured runs" \
    "per proxy, interleaved. Backend: tools/bench/bare_server.lua on CPU" \
    "$client_cpu. \"proxy CPU\" is the CPU time of the proxy process (the" \
    "nginx worker) over the run's length: below about 95%, either other" \
    "processes took part of CPU $server_cpu or the proxy waited for wrk or" \
    "the backend. \"backend CPU\" is the same for the backend, which" \
    "shares CPU $client_cpu with wrk. Responses as curl received them" \
    "(head + body):"
  echo
  for side in "${sides[@]}"; do
    bytes=$(curl -s -D - -o /dev/null "${url[$side]}" | wc -c)
    echo "- ${label[$side]}: ${url[$side]}, $((bytes + 12)) bytes"
  done
  echo
  echo "| run | proxy | requests/s | p50 | p99 | proxy CPU |" \
    "CPU us/request | backend CPU | errors |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"

  declare -A rps_runs p50_runs p99_runs cost_runs
  for rep in $(seq 1 "$reps"); do
    # Rotate the order so that no proxy always runs first.
    for k in "${!sides[@]}"; do
      side=${sides[$(((k + rep - 1) % ${#sides[@]}))]}
      log "proxy run $rep/$reps: ${label[$side]}"
      run_wrk "${url[$side]}" "$warmup" "$tmp/warmup.txt"
      out=$tmp/wrk-$side-$rep.txt
      ticks_before=$(cpu_ticks "${busy_pid[$side]}")
      backend_before=$(cpu_ticks "$backend_pid")
      if ! run_wrk "${url[$side]}" "$duration" "$out" ||
        ! kill -0 "${alive_pid[$side]}" 2>/dev/null; then
        log "wrk failed or ${label[$side]} exited; wrk output and the" \
          "end of the log (${log_file[$side]}):"
        cat "$out" >&2
        tail -n 20 "${log_file[$side]}" >&2
        exit 1
      fi
      ticks=$(($(cpu_ticks "${busy_pid[$side]}") - ticks_before))
      backend_ticks=$(($(cpu_ticks "$backend_pid") - backend_before))
      rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
      p50=$(to_us "$(awk '$1 == "50%" { print $2 }' "$out")")
      p99=$(to_us "$(awk '$1 == "99%" { print $2 }' "$out")")
      cost=$(awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" -v r="$rps" \
        -v d="$duration" 'BEGIN { printf "%.2f", 1e6 * t / hz / (r * d) }')
      errors=$(grep -E 'Socket errors|Non-2xx' "$out" | tr -s ' ' |
        paste -sd';' - || true)
      rps_runs[$side]+="$rps "
      p50_runs[$side]+="$p50 "
      p99_runs[$side]+="$p99 "
      cost_runs[$side]+="$cost "
      echo "| $rep | ${label[$side]} | $rps | $p50 us | $p99 us |" \
        "$(percent "$ticks" "$duration") | $cost |" \
        "$(percent "$backend_ticks" "$duration") | ${errors:-none} |"
    done
  done
  echo

  # shellcheck disable=SC2086 # the run lists are space-separated numbers
  nginx_rps=$(median ${rps_runs[nginx]})
  echo "Medians over $reps runs (each column the median of its own runs)," \
    "and the ratio to nginx (target: daemon >= 1.0x):"
  echo
  echo "| proxy | requests/s | x nginx | p50 | p99 | CPU us/request |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  for side in "${sides[@]}"; do
    # shellcheck disable=SC2086
    {
      rps=$(median ${rps_runs[$side]})
      p50=$(median ${p50_runs[$side]})
      p99=$(median ${p99_runs[$side]})
      cost=$(median ${cost_runs[$side]})
    }
    awk -v l="${label[$side]}" -v r="$rps" -v nr="$nginx_rps" -v a="$p50" \
      -v b="$p99" -v c="$cost" 'BEGIN {
      printf "| %s | %.0f | %.2f | %.0f us | %.0f us | %.2f |\n",
        l, r, r / nr, a, b, c
    }'
  done
  echo

  if [[ $run_perf -eq 1 ]]; then
    log "perf: the daemon under wrk"
    run_wrk "${url[daemon]}" 6 "$tmp/perf-wrk.txt" &
    wrk_pid=$!
    started_pids+=("$wrk_pid")
    sleep 0.5
    perf record -q -p "$daemon_pid" -o "$tmp/perf-daemon.data" \
      -- sleep 5 >/dev/null 2>&1
    wait "$wrk_pid"
    forget_pid "$wrk_pid"
    echo "### perf: the daemon proxying under wrk"
    echo
    echo "perf record -p DAEMON for 5 s of a 6 s wrk run: the share of" \
      "samples by object, then the top 30 symbols outside the kernel."
    echo
    echo '```'
    perf report -i "$tmp/perf-daemon.data" --stdio --no-children \
      --sort dso --percent-limit 0.5 2>/dev/null | grep -v '^#' |
      grep -v '^$' || true
    echo
    perf report -i "$tmp/perf-daemon.data" --stdio --no-children \
      --sort dso,symbol 2>/dev/null | grep -v '^#' | grep -v '^$' |
      grep -v 'kernel.kallsyms' | head -n 30 || true
    echo '```'
    echo
  fi

  stop_process "$nginx_master_pid"
  echo "Load average after the proxy runs: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
fi

# ---------------------------------------------------------------------------
# Terminal

if [[ $run_pty -eq 1 ]]; then
  log "terminal: writing a $file_mib MiB file"
  # 8192 lines of 128 bytes per MiB: 127 base64 characters and a newline.
  # They are printable, so the terminal passes them through unchanged
  # except for NL -> CR NL. Every 4 lines encode 127 * 3 random bytes, so
  # a multiple of 4 lines needs no padding.
  head -c $((file_mib * 8192 * 127 * 3 / 4)) /dev/urandom |
    base64 -w 127 >"$tmp/cat.txt"
  if [[ $(stat -c %s "$tmp/cat.txt") -ne $((file_mib * 1024 * 1024)) ]]; then
    log "the generated file $tmp/cat.txt is not $file_mib MiB"
    exit 1
  fi

  log "terminal: echo latency and cat throughput"
  "${clean_env[@]}" taskset -c "$client_cpu" luajit \
    tools/bench/daemon_pty.lua "$daemon_port" "$tmp/cat.txt" "$samples" \
    "$echo_warmup" "$cat_runs" "$build" >"$tmp/pty.out" 2>"$tmp/pty.err" &
  client_pid=$!
  started_pids+=("$client_pid")
  if ! wait "$client_pid"; then
    log "daemon_pty.lua failed; its output, then the end of the daemon" \
      "log ($daemon_log):"
    cat "$tmp/pty.out" "$tmp/pty.err" >&2
    tail -n 20 "$daemon_log" >&2
    exit 1
  fi
  forget_pid "$client_pid"

  echo_line=$(grep '^echo_us ' "$tmp/pty.out")
  echo "## Terminal: /_pty through the WebSocket"
  echo
  echo "tools/bench/daemon_pty.lua on CPU $client_cpu, attached to the" \
    "daemon above with a 120 x 40 terminal. The shell is /bin/bash, the" \
    "daemon's default, as a login shell with an empty HOME and" \
    "PS1='P> '. The shell and cat are children of the daemon and share" \
    "CPU $server_cpu with it."
  echo
  echo "Keystroke echo: one byte per binary frame, timed until it comes back" \
    "in an output frame (bash's readline echoes it), DEL after each to" \
    "keep the line empty. $echo_warmup untimed keystrokes first, then" \
    "$(field n "$echo_line") timed ones (target: p99 under 2000 us):"
  echo
  echo "| min | p50 | p90 | p99 | p99.9 | max | mean |"
  echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  echo "| $(field min "$echo_line") us | $(field p50 "$echo_line") us |" \
    "$(field p90 "$echo_line") us | $(field p99 "$echo_line") us |" \
    "$(field p999 "$echo_line") us | $(field max "$echo_line") us |" \
    "$(field mean "$echo_line") us |"
  echo
  echo "Output throughput: \`cat FILE; echo END_\$((40+2))\` typed into the" \
    "shell, timed from the send to the marker in the output. FILE has" \
    "$file_mib MiB of base64 lines of 128 bytes, so the terminal adds one" \
    "CR per line. MiB/s counts the file's bytes."
  echo
  echo "| run | file | output received | seconds | MiB/s |"
  echo "| ---: | ---: | ---: | ---: | ---: |"
  rates=()
  while read -r line; do
    run=$(field run "$line")
    file_bytes=$(field file_bytes "$line")
    output_bytes=$(field output_bytes "$line")
    seconds=$(field seconds "$line")
    rate=$(awk -v b="$file_bytes" -v s="$seconds" \
      'BEGIN { printf "%.1f", b / 1048576 / s }')
    rates+=("$rate")
    echo "| $run | $file_bytes bytes | $output_bytes bytes | $seconds |" \
      "$rate |"
  done < <(grep '^cat ' "$tmp/pty.out")
  echo
  echo "Median: $(median "${rates[@]}") MiB/s."
  echo
fi

if [[ -n ${daemon_pid:-} ]]; then
  stop_process "$daemon_pid"
fi

# ---------------------------------------------------------------------------
# Start-up time and idle memory

if [[ $run_start -eq 1 ]]; then
  log "start-up time and idle memory"
  start_port=$(free_port)
  write_daemon_config "$tmp/start.json" "$start_port"
  "${clean_env[@]}" taskset -c "$client_cpu" luajit \
    tools/bench/daemon_start.lua "$build/justavps" "$tmp/start.json" \
    "$start_port" "$server_cpu" "$starts" 2 "$build" \
    >"$tmp/start.out" 2>"$tmp/start.err" &
  client_pid=$!
  started_pids+=("$client_pid")
  if ! wait "$client_pid"; then
    log "daemon_start.lua failed; its output:"
    cat "$tmp/start.out" "$tmp/start.err" >&2
    exit 1
  fi
  forget_pid "$client_pid"

  start_ms=()
  while read -r line; do
    start_ms+=("$(field ms "$line")")
  done < <(grep '^start ' "$tmp/start.out")
  true_ms=()
  while read -r line; do
    true_ms+=("$(field ms "$line")")
  done < <(grep '^spawn_true ' "$tmp/start.out")
  rss_runs=()
  while read -r line; do
    rss_runs+=("$(field vmrss_kib "$line")")
  done < <(grep '^memory ' "$tmp/start.out")

  echo "## Start-up time and idle memory"
  echo
  echo "tools/bench/daemon_start.lua on CPU $client_cpu. Start-up: from" \
    "just before the spawn of \`taskset -c $server_cpu justavps daemon\`" \
    "to the first connection that the public port accepts, retried" \
    "without pause; $starts starts, one after another."
  echo
  echo "| | median | min | max | all runs |"
  echo "| --- | ---: | ---: | ---: | --- |"
  echo "| daemon start-up | $(median "${start_ms[@]}") ms |" \
    "$(printf '%s\n' "${start_ms[@]}" | sort -g | head -n1) ms |" \
    "$(printf '%s\n' "${start_ms[@]}" | sort -g | tail -n1) ms |" \
    "${start_ms[*]} |"
  echo "| spawn of \`taskset -c $server_cpu true\` to its exit |" \
    "$(median "${true_ms[@]}") ms |" \
    "$(printf '%s\n' "${true_ms[@]}" | sort -g | head -n1) ms |" \
    "$(printf '%s\n' "${true_ms[@]}" | sort -g | tail -n1) ms |" \
    "${true_ms[*]} |"
  echo
  echo "Idle memory of 3 more daemons, started one after another, with" \
    "no connection ever made to them, 2 s after each logged both" \
    "listeners (target: VmRSS under 8 MiB = 8192 KiB). Pss is the sum" \
    "over /proc/PID/smaps, which shares each library page among the" \
    "processes that map it."
  echo
  echo "| daemon | VmRSS | RssAnon | RssFile | VmHWM | Pss |"
  echo "| ---: | ---: | ---: | ---: | ---: | ---: |"
  while read -r line; do
    echo "| $(field run "$line") | $(field vmrss_kib "$line") KiB |" \
      "$(field rss_anon_kib "$line") KiB |" \
      "$(field rss_file_kib "$line") KiB |" \
      "$(field vmhwm_kib "$line") KiB | $(field pss_kib "$line") KiB |"
  done < <(grep '^memory ' "$tmp/start.out")
  echo
  echo "Median VmRSS: $(median "${rss_runs[@]}") KiB."
  echo
  echo "The largest mappings of the last daemon by Rss (/proc/PID/smaps," \
    "summed per file):"
  echo
  echo "| mapping | Rss | Pss |"
  echo "| --- | ---: | ---: |"
  while read -r line; do
    echo "| ${line#*name=} | $(field rss_kib "$line") KiB |" \
      "$(field pss_kib "$line") KiB |"
  done < <(grep '^mapping ' "$tmp/start.out")
  echo
fi

echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
