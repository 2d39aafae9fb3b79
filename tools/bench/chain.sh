#!/usr/bin/env bash
# Benchmark the proxy chain edge -> broker -> daemon -> backend on
# 127.0.0.1 and print a Markdown report:
#   1. HTTP: wrk through the justavps chain, through two nginx chains of
#      the same three hops (one worker holding all three, and one process
#      per hop like the justavps chain), and directly to the backend;
#   2. WebSocket: echo throughput of 64 KiB messages through the chain,
#      both nginx chains and directly (tools/bench/chain_ws.lua);
#   3. broker memory: RSS per idle connection (tools/bench/hold_conns.lua)
#      and per recorded nonce (tools/bench/chain_nonces.lua).
#
#   tools/bench/chain.sh [--duration S] [--warmup S] [--reps N]
#                        [--ws-seconds S] [--idle N] [--nonces N]
#                        [--quick] [--cost N] [--keep]
#
#   --duration S    seconds of each measured wrk run (default 10)
#   --warmup S      seconds of the unmeasured wrk or WebSocket run before
#                   each measured one (default 2)
#   --reps N        measured runs per side, interleaved, for HTTP and
#                   WebSocket; the report shows the median (default 3)
#   --ws-seconds S  seconds of each WebSocket run (default 5)
#   --idle N        idle connections held open to the broker (default 2000)
#   --nonces N      signed requests sent to fill the nonce cache
#                   (default 200000)
#   --quick         --duration 3 --warmup 1 --reps 1 --ws-seconds 2
#                   --idle 500 --nonces 20000
#   --cost N        instead of the measurements above, count the work of
#                   each hop for N requests: user-space instructions per
#                   request under callgrind (with one nginx hop for
#                   reference) and system calls per request under strace
#                   (needs valgrind and strace)
#   --keep          keep the temporary directory with raw output and logs
#
# Needs wrk and nginx (tools/setup.sh --bench), luajit, taskset, curl, ss,
# a build (tools/build.sh, copied at the start; JV_BUILD_DIR picks another
# one) and the test PostgreSQL (tools/pg.sh start), where the script
# creates a database and drops it at exit. The edge, broker, daemon and
# nginx run on CPU 0; wrk, the backend and the Lua clients on CPU 1.
# Every process this script starts is ended when it exits, and a watchdog
# ends the whole run after 20 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

duration=10
warmup=2
reps=3
ws_seconds=5
idle_count=2000
nonce_count=200000
keep=0
cost=0
build=${JV_BUILD_DIR:-build}
server_cpu=0
client_cpu=1
connections=32
watchdog_seconds=1200

while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) duration=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --reps) reps=$2; shift ;;
    --ws-seconds) ws_seconds=$2; shift ;;
    --idle) idle_count=$2; shift ;;
    --nonces) nonce_count=$2; shift ;;
    --quick)
      duration=3; warmup=1; reps=1; ws_seconds=2; idle_count=500
      nonce_count=20000
      ;;
    --cost) cost=$2; shift ;;
    --keep) keep=1 ;;
    -h | --help)
      sed -n '2,40s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "chain.sh: unknown option '$1' (see --help)" >&2
      exit 2
      ;;
  esac
  shift
done

tools=(wrk nginx luajit taskset curl ss)
if ((cost > 0)); then
  tools+=(valgrind callgrind_control strace)
fi
for tool in "${tools[@]}"; do
  if ! command -v "$tool" >/dev/null; then
    echo "chain.sh: $tool not found; install it with tools/setup.sh --bench" >&2
    exit 1
  fi
done
if [[ ! -x $build/justavps || ! -f $build/lua/justavps/core.so ]]; then
  echo "chain.sh: $build/justavps or $build/lua/justavps/core.so is" \
    "missing; run tools/build.sh first" >&2
  exit 1
fi
if [[ -z ${PGHOST:-} ]]; then
  tools/pg.sh start >&2
  eval "$(tools/pg.sh env)"
fi

need_fds=$((idle_count + 1000))
if (($(ulimit -n) < need_fds)); then
  if ! ulimit -n "$need_fds" 2>/dev/null; then
    echo "chain.sh: cannot raise the file descriptor limit to $need_fds" \
      "(hard limit $(ulimit -Hn)); lower --idle" >&2
    exit 1
  fi
fi

tmp=$(mktemp -d /tmp/justavps-chain-bench.XXXXXX)
# Every process to end on exit: servers and the Lua clients.
started_pids=()
dbname=

mkdir -p "$tmp/build/lua/justavps" "$tmp/home" "$tmp/state"
cp "$build/justavps" "$tmp/build/justavps"
cp "$build/lua/justavps/core.so" "$tmp/build/lua/justavps/core.so"
source_build=$build
build=$tmp/build
export JUSTAVPS_ROOT=$PWD

# The servers run with this environment only, so that no JUSTAVPS_* or
# PG* override of the caller changes what is measured. The edge gets the
# PG* variables of the test server and its database on top.
clean_env=(env -i "PATH=$PATH" "HOME=$tmp/home" "LANG=C.UTF-8"
  "JUSTAVPS_ROOT=$PWD")
# LuaJIT's profiler and trace log pass through (see lua/justavps/cli.lua).
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
  if [[ -n $dbname ]]; then
    luajit tools/bench/chain_setup.lua drop "$build" "$dbname" >&2 || true
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
trap 'echo "chain.sh: interrupted" >&2; exit 130' INT TERM

# The watchdog's sleep is its own child so that cleanup can end both.
(
  sleep "$watchdog_seconds" &
  sleep_pid=$!
  trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  wait "$sleep_pid"
  echo "chain.sh: timed out after $watchdog_seconds s" >&2
  kill -TERM $$
) &
watchdog_pid=$!

# ---------------------------------------------------------------------------
# Helpers

log() {
  echo "chain.sh: $*" >&2
}

stop_process() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for i in "${!started_pids[@]}"; do
    if [[ ${started_pids[$i]} == "$pid" ]]; then
      unset 'started_pids[i]'
    fi
  done
}

# Prints a TCP port on 127.0.0.1 that nothing listens on, below the
# kernel's ephemeral range so that no outgoing connection takes it.
free_port() {
  local port low
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range)
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

# wait_ready name url pid [header]: waits up to 10 s until url returns the
# 12-byte greeting.
wait_ready() {
  local name=$1 url=$2 pid=$3 header=${4:-X-Bench: 1} body
  for _ in $(seq 1 100); do
    body=$(curl -s --max-time 1 -H "$header" -H "Host: $host" "$url" ||
      true)
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

# wait_port log listener: prints the port that a justavps role logged for
# the listener, waiting up to 10 s.
wait_port() {
  local file=$1 listener=$2 port=
  for _ in $(seq 1 100); do
    port=$(sed -n \
      "s/.*msg=listening .*listener=$listener .*port=\([0-9]*\).*/\1/p" \
      "$file" | head -n1)
    if [[ -n $port ]]; then
      echo "$port"
      return 0
    fi
    sleep 0.1
  done
  log "no listening port for $listener in $file; the log:"
  cat "$file" >&2
  return 1
}

rss_kib() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

# Prints the CPU time the given pids used, user and system, in clock ticks.
cpu_ticks() {
  local pid total=0 t
  for pid in "$@"; do
    t=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }')
    total=$((total + t))
  done
  echo "$total"
}

# sys_ticks pid: the system part (stime) of cpu_ticks.
sys_ticks() {
  sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $13 }'
}

# sys_sum pid...: the sum of sys_ticks.
sys_sum() {
  local pid total=0
  for pid in "$@"; do
    total=$((total + $(sys_ticks "$pid")))
  done
  echo "$total"
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

# ---------------------------------------------------------------------------
# The chain

slug=bench-chain
domain=chain.test
host=$slug.$domain
broker_id=bench-broker
broker_secret=chain-bench-broker-secret-0123456789abcdef
jwt_secret=chain-bench-jwt-secret-0123456789abcdef0123

log "creating the database"
setup_out=$(luajit tools/bench/chain_setup.lua create "$build" "$slug")
dbname=$(sed -n 's/^dbname=//p' <<<"$setup_out")
api_key=$(sed -n 's/^key=//p' <<<"$setup_out")
auth="Authorization: Bearer $api_key"

log "starting the backend"
taskset -c "$client_cpu" luajit tools/bench/chain_backend.lua "$build" \
  >"$tmp/backend.port" 2>"$tmp/backend.log" &
backend_pid=$!
started_pids+=("$backend_pid")
for _ in $(seq 1 100); do
  [[ -s $tmp/backend.port ]] && break
  sleep 0.1
done
backend_port=$(head -n1 "$tmp/backend.port")
wait_ready "chain_backend.lua" "http://127.0.0.1:$backend_port/" \
  "$backend_pid"

# start_daemon: sets daemon_pid and daemon_port.
start_daemon() {
  cat >"$tmp/daemon.json" <<JSON
{
  "slug": "$slug",
  "token": "chain-bench-machine-token-0123456789",
  "platform_url": "http://127.0.0.1:$(free_port)",
  "heartbeat_interval": 3600,
  "public": { "host": "127.0.0.1", "port": 0 },
  "internal": { "host": "127.0.0.1", "port": 0 },
  "broker_cidrs": ["127.0.0.0/8"],
  "routing": { "default_port": $backend_port },
  "toolbox_root": "$tmp/home",
  "state_dir": "$tmp/state"
}
JSON
  "${clean_env[@]}" taskset -c "$server_cpu" "$build/justavps" daemon \
    --config "$tmp/daemon.json" --access-log=false 2>"$tmp/daemon.log" &
  daemon_pid=$!
  started_pids+=("$daemon_pid")
  daemon_port=$(wait_port "$tmp/daemon.log" public)
}

# start_broker name [max-bytes] [allow-ports-json]: sets broker_pid,
# broker_port and broker_log.
start_broker() {
  local name=$1 max_bytes=${2:-64M} allow_ports=${3:-[]}
  broker_log=$tmp/broker-$name.log
  cat >"$tmp/broker-$name.json" <<JSON
{
  "broker_id": "$broker_id",
  "secret": "$broker_secret",
  "insecure_plain_http": true,
  "forwarded_proto": "http",
  "listen": { "host": "127.0.0.1", "port": 0 },
  "nonce": { "max_bytes": "$max_bytes" },
  "target": { "allow_networks": ["127.0.0.0/8"],
              "allow_ports": $allow_ports }
}
JSON
  "${clean_env[@]}" taskset -c "$server_cpu" "$build/justavps" broker \
    --config "$tmp/broker-$name.json" --access-log=false \
    2>"$broker_log" &
  broker_pid=$!
  started_pids+=("$broker_pid")
  broker_port=$(wait_port "$broker_log" main)
}

# start_edge: sets edge_pid and edge_port.
start_edge() {
  cat >"$tmp/edge.json" <<JSON
{
  "domain": "$domain",
  "insecure_plain_http": true,
  "listen": { "host": "127.0.0.1", "port": 0 },
  "brokers": [{ "url": "http://127.0.0.1:$broker_port", "id": "$broker_id",
                "secret": "$broker_secret" }],
  "machine_port": $daemon_port,
  "cache": { "machine_ttl": 600, "credential_ttl": 600 }
}
JSON
  "${clean_env[@]}" "PGHOST=$PGHOST" "PGPORT=$PGPORT" "PGUSER=$PGUSER" \
    "PGDATABASE=$dbname" "JUSTAVPS_EDGE_JWT_SECRET=$jwt_secret" \
    taskset -c "$server_cpu" "$build/justavps" edge \
    --config "$tmp/edge.json" --access-log=false 2>"$tmp/edge.log" &
  edge_pid=$!
  started_pids+=("$edge_pid")
  edge_port=$(wait_port "$tmp/edge.log" main)
  wait_ready "justavps edge (log $tmp/edge.log)" \
    "http://127.0.0.1:$edge_port/" "$edge_pid" "$auth"
}

# nginx_conf prefix listen_port upstream_port: writes prefix/nginx.conf
# for one worker whose server blocks proxy_pass, with upstream
# keep-alive, from listen_port to upstream_port. With extra "listen
# upstream" pairs after those three arguments, one worker holds several
# server blocks.
nginx_conf() {
  local prefix=$1
  shift
  mkdir -p "$prefix/temp"
  {
    cat <<CONF
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
  proxy_http_version 1.1;
  proxy_set_header Host \$http_host;
  # Upstream keep-alive for requests, and WebSocket upgrades passed on.
  map \$http_upgrade \$upstream_connection {
    default upgrade;
    "" "";
  }
  proxy_set_header Upgrade \$http_upgrade;
  proxy_set_header Connection \$upstream_connection;
  # An upgraded connection is relayed through one buffer of this size
  # each way: the size the justavps pipe reads.
  proxy_buffer_size 256k;
  proxy_buffers 4 256k;
  proxy_busy_buffers_size 256k;
CONF
    while [[ $# -gt 0 ]]; do
      cat <<CONF
  upstream to_$2 {
    server 127.0.0.1:$2;
    keepalive 32;
  }
  server {
    listen 127.0.0.1:$1;
    location / { proxy_pass http://to_$2; }
  }
CONF
      shift 2
    done
    echo "}"
  } >"$prefix/nginx.conf"
}

# run_nginx prefix port: starts nginx with prefix/nginx.conf on the server
# CPU, waits until port responds and sets run_master and run_worker.
run_nginx() {
  local prefix=$1 port=$2
  taskset -c "$server_cpu" nginx -p "$prefix/" -c "$prefix/nginx.conf" \
    -e "$prefix/error.log" 2>"$prefix/stderr.log" &
  run_master=$!
  started_pids+=("$run_master")
  wait_ready "nginx (log $prefix/error.log)" "http://127.0.0.1:$port/" \
    "$run_master"
  run_worker=$(pgrep -P "$run_master" | head -n1)
}

# start_nginx: the two nginx chains of three hops, each hop a proxy_pass
# with upstream keep-alive to the next and the last to the backend.
#   - nginx: the three hops as server blocks of one worker, so a request
#     crosses no process boundary between hops;
#   - nginx3: one nginx with one worker per hop, three processes like the
#     justavps chain.
# Sets nginx_port, nginx_master_pid, nginx_worker_pid, nginx3_port,
# nginx3_masters and nginx3_workers.
start_nginx() {
  local port2 port3 i
  local -a ports
  nginx_port=$(free_port)
  port2=$(free_port)
  port3=$(free_port)
  nginx_conf "$tmp/nginx" "$nginx_port" "$port2" "$port2" "$port3" \
    "$port3" "$backend_port"
  run_nginx "$tmp/nginx" "$nginx_port"
  nginx_master_pid=$run_master
  nginx_worker_pid=$run_worker

  ports=("$(free_port)" "$(free_port)" "$(free_port)" "$backend_port")
  nginx3_port=${ports[0]}
  nginx3_masters=""
  nginx3_workers=""
  for i in 2 1 0; do
    nginx_conf "$tmp/nginx3-$i" "${ports[$i]}" "${ports[$((i + 1))]}"
    run_nginx "$tmp/nginx3-$i" "${ports[$i]}"
    nginx3_masters+="$run_master "
    nginx3_workers+="$run_worker "
  done
}

log "starting the daemon, the broker, the edge and nginx"
start_daemon
start_broker chain
chain_broker_pid=$broker_pid
start_edge
if ((cost == 0)); then
  start_nginx
fi

# ---------------------------------------------------------------------------
# Work per request (--cost)

# cost_load mode port count [mode arguments]: sends count requests over 8
# connections with tools/bench/chain_load.lua.
cost_load() {
  local mode=$1 port=$2 count=$3
  shift 3
  taskset -c "$client_cpu" luajit tools/bench/chain_load.lua "$build" \
    "$mode" "$port" "$count" 8 "$host" "$@"
}

# cost_callgrind role: starts a second instance of role (edge, broker or
# daemon) with the chain's config under callgrind, instrumentation off, or
# for "nginx" one nginx worker proxying to the backend. It warms the
# instance with 400 requests and then counts the instructions of $cost
# more. Prints the instructions per request.
cost_callgrind() {
  local role=$1 config listener env_extra=() vlog out vpid port ir
  case $role in
    daemon)
      # The port watcher's scans and the heartbeats would land in the
      # counted window, more of them the slower the build: this instance
      # scans once an hour, after the first scan that the wait below lets
      # finish, and sends no heartbeat.
      config=$tmp/daemon-cost.json listener=public
      sed -e '1s/^{/{ "ports_interval": 3600,/' \
        -e 's/"platform_url": "[^"]*"/"platform_url": ""/' \
        "$tmp/daemon.json" >"$config"
      ;;
    broker) config=$tmp/broker-chain.json listener=main ;;
    edge)
      config=$tmp/edge.json listener=main
      env_extra=("PGHOST=$PGHOST" "PGPORT=$PGPORT" "PGUSER=$PGUSER"
        "PGDATABASE=$dbname" "JUSTAVPS_EDGE_JWT_SECRET=$jwt_secret")
      ;;
  esac
  vlog=$tmp/callgrind-$role.log
  out=$tmp/callgrind-$role.out
  port=
  if [[ $role == nginx ]]; then
    # One nginx process (no master) proxying to the backend, as each hop
    # of the three-process nginx chain does.
    port=$(free_port)
    nginx_conf "$tmp/nginx-cost" "$port" "$backend_port"
    sed -i '1i master_process off;' "$tmp/nginx-cost/nginx.conf"
    taskset -c "$server_cpu" valgrind --tool=callgrind --instr-atstart=no \
      --callgrind-out-file="$out" nginx -p "$tmp/nginx-cost/" \
      -c "$tmp/nginx-cost/nginx.conf" -e "$tmp/nginx-cost/error.log" \
      2>"$vlog" &
    vpid=$!
    started_pids+=("$vpid")
    for _ in $(seq 1 600); do
      curl -s --max-time 1 -o /dev/null "http://127.0.0.1:$port/" && break
      sleep 0.1
    done
  else
    "${clean_env[@]}" "${env_extra[@]}" taskset -c "$server_cpu" valgrind \
      --tool=callgrind --instr-atstart=no --smc-check=all-non-file \
      --callgrind-out-file="$out" "$build/justavps" "$role" \
      --config "$config" --access-log=false 2>"$vlog" &
    vpid=$!
    started_pids+=("$vpid")
    for _ in $(seq 1 600); do
      port=$(sed -n \
        "s/.*msg=listening .*listener=$listener .*port=\([0-9]*\).*/\1/p" \
        "$vlog" | head -n1)
      [[ -n $port ]] && break
      sleep 0.1
    done
  fi
  if [[ -z $port ]]; then
    log "$role under callgrind did not start; its log:"
    cat "$vlog" >&2
    stop_process "$vpid"
    return 1
  fi

  if [[ $role == daemon ]]; then
    for _ in $(seq 1 600); do
      grep -q 'msg="port opened"' "$vlog" && break
      sleep 0.1
    done
  fi

  local args=()
  case $role in
    daemon | nginx) args=(plain "$port") ;;
    broker)
      args=(broker "$port" "$broker_secret" "$broker_id" "$slug"
        "$daemon_port")
      ;;
    edge) args=(edge "$port" "Bearer $api_key") ;;
  esac
  cost_load "${args[0]}" "${args[1]}" 400 "${args[@]:2}" >/dev/null

  callgrind_control -i on "$vpid" >/dev/null
  cost_load "${args[0]}" "${args[1]}" "$cost" "${args[@]:2}" \
    >"$tmp/callgrind-$role.load"
  callgrind_control -i off "$vpid" >/dev/null
  callgrind_control -d "$vpid" >/dev/null
  stop_process "$vpid"
  if ! grep -q "^done=$cost failed=0\$" "$tmp/callgrind-$role.load"; then
    log "not every request to $role succeeded:" \
      "$(cat "$tmp/callgrind-$role.load")"
    return 1
  fi
  ir=$(cat "$out".* | awk '/^totals:/ { s += $2 } END { print s + 0 }')
  awk -v i="$ir" -v n="$cost" 'BEGIN { printf "%.0f", i / n }'
}

# cost_strace: counts the system calls of the chain's edge, broker and
# daemon (with their children) while $cost requests go through the edge,
# and prints one Markdown row per process.
cost_strace() {
  local role pid spids=()
  cost_load edge "$edge_port" 400 "Bearer $api_key" >/dev/null
  for role in edge broker daemon; do
    case $role in
      edge) pid=$edge_pid ;;
      broker) pid=$chain_broker_pid ;;
      daemon) pid=$daemon_pid ;;
    esac
    strace -c -f -o "$tmp/strace-$role.txt" -p "$pid" 2>/dev/null &
    spids+=($!)
    started_pids+=($!)
  done
  sleep 1
  cost_load edge "$edge_port" "$cost" "Bearer $api_key" \
    >"$tmp/strace.load"
  for pid in "${spids[@]}"; do
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  for role in edge broker daemon; do
    awk -v n="$cost" -v role="$role" '
      $NF ~ /^[a-z_0-9]+$/ && $NF != "total" && $4 ~ /^[0-9]+$/ {
        calls[$NF] = $4
      }
      END {
        io = calls["read"] + calls["recvfrom"] + calls["write"] \
          + calls["writev"] + calls["sendto"]
        other = 0
        for (k in calls) {
          if (k != "read" && k != "recvfrom" && k != "write" \
              && k != "writev" && k != "sendto" && k != "epoll_wait") {
            other += calls[k]
          }
        }
        printf "| %s | %.2f | %.2f | %.2f | %.2f |\n", role, io / n,
          (calls["write"] + calls["writev"] + calls["sendto"]) / n,
          calls["epoll_wait"] / n, other / n
      }' "$tmp/strace-$role.txt"
  done
}

if ((cost > 0)); then
  echo "# justavps proxy chain: work per request"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- justavps: built in $source_build" \
    "($(sha256sum "$build/justavps" | cut -c1-12))"
  echo "- $(valgrind --version), $(strace -V | head -n1)"
  echo
  echo "User-space instructions per request (callgrind Ir) of a second" \
    "instance of each role with the chain's config, after 400 warm-up" \
    "requests, over $cost GET / requests from tools/bench/chain_load.lua" \
    "(8 keep-alive connections). The edge's requests carry the API key" \
    "and go on to the chain's broker; the broker's are signed for the" \
    "chain's daemon; the daemon's are plain. Kernel work is not counted."
  echo
  echo "| hop | instructions per request |"
  echo "| --- | ---: |"
  for role in edge broker daemon nginx; do
    log "callgrind: $role"
    echo "| $role | $(cost_callgrind "$role") |"
  done
  echo
  echo "The nginx row is one nginx worker, without a master process," \
    "proxying the same plain requests to the backend with upstream" \
    "keep-alive: one hop of the nginx chains."
  echo
  echo "System calls per request of the chain's processes (strace -c -f," \
    "children included) over $cost requests through the edge." \
    "\"I/O\" is read, recvfrom, write, writev and sendto; \"other\" is" \
    "every call but those and epoll_wait (the daemon's port watcher" \
    "runs here too)."
  echo
  echo "| process | I/O calls | of which writes | epoll_wait | other |"
  echo "| --- | ---: | ---: | ---: | ---: |"
  log "strace"
  cost_strace
  exit 0
fi

# ---------------------------------------------------------------------------
# Machine

echo "# justavps proxy chain benchmark run"
echo
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "- nproc: $(nproc)"
echo "- CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
echo "- kernel: $(uname -r)"
echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
echo "- wrk: $(wrk -v 2>&1 | head -n1 | awk '{ print $2 }')"
echo "- justavps: $("$build/justavps" --version), built in $source_build" \
  "($(sha256sum "$build/justavps" | cut -c1-12))"
echo "- files under core/ and lua/ that differ from the commit:" \
  "$(git status --porcelain -- core lua | wc -l)"
echo "- edge, broker, daemon and nginx on CPU $server_cpu; wrk, the" \
  "backend and the Lua clients on CPU $client_cpu (taskset)"
echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# ---------------------------------------------------------------------------
# HTTP

sides=(chain nginx nginx3 daemon direct)
declare -A label url header busy
label[chain]="justavps edge -> broker -> daemon"
label[daemon]="justavps daemon alone, one hop"
label[nginx]="nginx, 3 server blocks, 1 worker"
label[nginx3]="nginx, 3 processes, 1 per hop"
label[direct]="direct to the backend"
url[chain]="http://127.0.0.1:$edge_port/"
url[nginx]="http://127.0.0.1:$nginx_port/"
url[nginx3]="http://127.0.0.1:$nginx3_port/"
url[daemon]="http://127.0.0.1:$daemon_port/"
url[direct]="http://127.0.0.1:$backend_port/"
header[chain]=$auth
header[nginx]="X-Bench: 1"
header[nginx3]="X-Bench: 1"
header[daemon]="X-Bench: 1"
header[direct]="X-Bench: 1"
busy[chain]="$edge_pid $chain_broker_pid $daemon_pid"
busy[nginx]=$nginx_worker_pid
busy[nginx3]=$nginx3_workers
busy[daemon]=$daemon_pid
busy[direct]=$backend_pid

# run_wrk side seconds out
run_wrk() {
  taskset -c "$client_cpu" wrk -t1 -c"$connections" -d"$2"s --latency \
    -H "Host: $host" -H "${header[$1]}" "${url[$1]}" >"$3"
}

echo "## HTTP: GET / with a 12-byte backend body"
echo
echo "wrk -t1 -c$connections -d${duration}s --latency -H 'Host: $host'," \
  "with -H 'Authorization: Bearer <proxy key>' for the justavps chain," \
  "a ${warmup} s wrk run before each measured run, $reps measured runs per" \
  "side, interleaved. The daemon-alone rows send wrk straight to the" \
  "daemon's public port, which loopback may reach as a broker. \"proxy CPU\" is the CPU time of the proxy processes" \
  "(edge + broker + daemon, the nginx worker or workers, or the daemon; for the" \
  "direct rows the backend on CPU $client_cpu) over the run's length, out of 100% for" \
  "CPU $server_cpu."
echo
echo "| run | side | requests/s | p50 | p99 | proxy CPU | errors |"
echo "| --- | --- | ---: | ---: | ---: | ---: | --- |"

declare -A rps_runs p50_runs p99_runs
# CPU microseconds per request of each justavps process in the chain rows.
split_rows=()
for rep in $(seq 1 "$reps"); do
  for k in "${!sides[@]}"; do
    side=${sides[$(((k + rep - 1) % ${#sides[@]}))]}
    log "HTTP run $rep/$reps: ${label[$side]}"
    run_wrk "$side" "$warmup" "$tmp/warmup.txt"
    out=$tmp/wrk-$side-$rep.txt
    # shellcheck disable=SC2086 # busy lists space-separated pids
    ticks_before=$(cpu_ticks ${busy[$side]})
    if [[ $side == chain ]]; then
      split_before=("$(cpu_ticks "$edge_pid")" \
        "$(cpu_ticks "$chain_broker_pid")" "$(cpu_ticks "$daemon_pid")" \
        "$(sys_ticks "$edge_pid")" "$(sys_ticks "$chain_broker_pid")" \
        "$(sys_ticks "$daemon_pid")")
    fi
    if ! run_wrk "$side" "$duration" "$out"; then
      log "wrk failed on ${label[$side]}:"
      cat "$out" >&2
      exit 1
    fi
    # shellcheck disable=SC2086
    ticks_after=$(cpu_ticks ${busy[$side]})
    cpu=$(awk -v t=$((ticks_after - ticks_before)) \
      -v hz="$(getconf CLK_TCK)" -v d="$duration" \
      'BEGIN { printf "%.0f%%", 100 * t / hz / d }')
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    if [[ $side == chain ]]; then
      split_after=("$(cpu_ticks "$edge_pid")" \
        "$(cpu_ticks "$chain_broker_pid")" "$(cpu_ticks "$daemon_pid")" \
        "$(sys_ticks "$edge_pid")" "$(sys_ticks "$chain_broker_pid")" \
        "$(sys_ticks "$daemon_pid")")
      split_rows+=("$(awk -v r="$rps" -v d="$duration" \
        -v hz="$(getconf CLK_TCK)" -v rep="$rep" \
        -v e=$((split_after[0] - split_before[0])) \
        -v b=$((split_after[1] - split_before[1])) \
        -v m=$((split_after[2] - split_before[2])) \
        -v es=$((split_after[3] - split_before[3])) \
        -v bs=$((split_after[4] - split_before[4])) \
        -v ms=$((split_after[5] - split_before[5])) 'BEGIN {
        u = 1e6 / hz / (r * d)
        printf "| %d | %.1f (%.1f) | %.1f (%.1f) | %.1f (%.1f) | %.1f (%.1f) |",
          rep, e * u, es * u, b * u, bs * u, m * u, ms * u,
          (e + b + m) * u, (es + bs + ms) * u
      }')")
    fi
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
  nginx3_rps=$(median ${rps_runs[nginx3]})
  direct_p50=$(median ${p50_runs[direct]})
}
echo "Medians over $reps runs; \"added p50\" is the side's p50 minus the" \
  "direct p50:"
echo
echo "| side | requests/s | x nginx, 1 worker | x nginx, 3 processes | p50 | p99 | added p50 |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for side in "${sides[@]}"; do
  # shellcheck disable=SC2086
  {
    rps=$(median ${rps_runs[$side]})
    p50=$(median ${p50_runs[$side]})
    p99=$(median ${p99_runs[$side]})
  }
  awk -v l="${label[$side]}" -v r="$rps" -v nr="$nginx_rps" \
    -v n3="$nginx3_rps" -v a="$p50" -v b="$p99" -v d="$direct_p50" 'BEGIN {
    printf "| %s | %.0f | %.2f | %.2f | %.0f us | %.0f us | %.0f us |\n",
      l, r, r / nr, r / n3, a, b, a - d
  }'
done
echo
echo "CPU time per request of each process in the justavps chain rows" \
  "(utime + stime from /proc/PID/stat over the run, divided by the" \
  "requests served, in microseconds; the system part, stime, in" \
  "brackets):"
echo
echo "| run | edge | broker | daemon | total |"
echo "| --- | ---: | ---: | ---: | ---: |"
printf '%s\n' "${split_rows[@]}"
echo
echo "Load average after the HTTP runs: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# ---------------------------------------------------------------------------
# WebSocket

echo "## WebSocket: echo of 64 KiB binary messages"
echo
echo "tools/bench/chain_ws.lua: one connection, ${ws_seconds} s per run," \
  "at most 8 messages unanswered, MB/s of echoed payload received" \
  "(10^6 bytes), a ${warmup} s run on a connection of its own before each" \
  "measured run, $reps measured runs per side, interleaved."
echo
echo "\"proxy CPU\" is as for HTTP, with the system part in brackets."
echo
echo "| run | side | MB/s | messages | proxy CPU |"
echo "| --- | --- | ---: | ---: | ---: |"
declare -A ws_runs
ws_sides=(chain nginx nginx3 direct)
for rep in $(seq 1 "$reps"); do
  for k in "${!ws_sides[@]}"; do
    side=${ws_sides[$(((k + rep - 1) % ${#ws_sides[@]}))]}
    log "WebSocket run $rep/$reps: ${label[$side]}"
    if [[ $side == chain ]]; then
      args=("$edge_port" "$ws_seconds" "$host" "Bearer $api_key" "$build")
    elif [[ $side == nginx ]]; then
      args=("$nginx_port" "$ws_seconds" "$host" "" "$build")
    elif [[ $side == nginx3 ]]; then
      args=("$nginx3_port" "$ws_seconds" "$host" "" "$build")
    else
      args=("$backend_port" "$ws_seconds" "127.0.0.1" "" "$build")
    fi
    out=$tmp/ws-$side-$rep.txt
    # As for HTTP, a run before the measured one, because the first
    # WebSocket run after the HTTP runs was often the slowest of its series.
    warm_args=("${args[@]}")
    warm_args[1]=$warmup
    if ! taskset -c "$client_cpu" luajit tools/bench/chain_ws.lua \
      "${warm_args[@]}" >"$tmp/ws-warmup.txt"; then
      log "chain_ws.lua failed on ${label[$side]}"
      exit 1
    fi
    # shellcheck disable=SC2086 # busy lists space-separated pids
    {
      ticks_before=$(cpu_ticks ${busy[$side]})
      sys_before=$(sys_sum ${busy[$side]})
    }
    if ! taskset -c "$client_cpu" luajit tools/bench/chain_ws.lua \
      "${args[@]}" >"$out"; then
      log "chain_ws.lua failed on ${label[$side]}"
      exit 1
    fi
    # shellcheck disable=SC2086
    {
      ticks_after=$(cpu_ticks ${busy[$side]})
      sys_after=$(sys_sum ${busy[$side]})
    }
    cpu=$(awk -v t=$((ticks_after - ticks_before)) \
      -v st=$((sys_after - sys_before)) -v hz="$(getconf CLK_TCK)" \
      -v d="$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' "$out")" \
      'BEGIN { printf "%.0f%% (%.0f%%)", 100 * t / hz / d, 100 * st / hz / d }')
    mbps=$(sed -n 's/.*mb_per_s=\([0-9.]*\).*/\1/p' "$out")
    messages=$(sed -n 's/.*messages=\([0-9]*\).*/\1/p' "$out")
    ws_runs[$side]+="$mbps "
    echo "| $rep | ${label[$side]} | $mbps | $messages | $cpu |"
  done
done
echo
# shellcheck disable=SC2086
{
  ws_direct=$(median ${ws_runs[direct]})
}
echo "Medians, and their share of the direct median:"
echo
echo "| side | MB/s | of direct |"
echo "| --- | ---: | ---: |"
for side in "${ws_sides[@]}"; do
  # shellcheck disable=SC2086
  awk -v l="${label[$side]}" -v m="$(median ${ws_runs[$side]})" \
    -v d="$ws_direct" 'BEGIN { printf "| %s | %.1f | %.0f%% |\n", l, m, 100 * m / d }'
done
echo

stop_process "$edge_pid"
stop_process "$nginx_master_pid"
for pid in $nginx3_masters; do
  stop_process "$pid"
done
stop_process "$chain_broker_pid"

# ---------------------------------------------------------------------------
# Broker memory

echo "## Broker memory"
echo
echo "VmRSS of a fresh broker from /proc/PID/status."
echo

log "broker memory: $idle_count idle connections"
start_broker idle
taskset -c "$client_cpu" luajit tools/bench/hold_conns.lua "$broker_port" \
  16 0 "$build" >/dev/null
sleep 0.5
idle_rss=$(rss_kib "$broker_pid")
ready=$tmp/hold.out
taskset -c "$client_cpu" luajit tools/bench/hold_conns.lua "$broker_port" \
  "$idle_count" 60 "$build" >"$ready" 2>"$tmp/hold.err" &
client_pid=$!
started_pids+=("$client_pid")
for _ in $(seq 1 300); do
  grep -q '^ready' "$ready" && break
  kill -0 "$client_pid" 2>/dev/null || break
  sleep 0.1
done
if ! grep -q "^ready $idle_count\$" "$ready"; then
  log "hold_conns.lua did not open $idle_count connections to the broker:"
  cat "$tmp/hold.err" >&2
  exit 1
fi
sleep 0.5
held_rss=$(rss_kib "$broker_pid")
stop_process "$client_pid"
stop_process "$broker_pid"
echo "Idle connections: tools/bench/hold_conns.lua opens and closes 16" \
  "connections to warm the broker, then opens N connections that each" \
  "send one unsigned GET /, which the broker rejects with 400" \
  "missing_header on a kept-alive connection, and stay idle."
echo
echo "| N | RSS before | RSS with N idle | per connection |"
echo "| ---: | ---: | ---: | ---: |"
awk -v n="$idle_count" -v b="$idle_rss" -v a="$held_rss" 'BEGIN {
  printf "| %d | %d KiB | %d KiB | %.0f bytes |\n", n, b, a, (a - b) * 1024 / n
}'
echo

nonce_bytes=8M
nonce_bytes_count=$((8 * 1024 * 1024))
warm_nonces=20000
log "broker memory: $nonce_count nonces"
# Only the daemon's port is allowed, and the requests are signed for port
# 1, so the broker records each nonce and then returns 403 target_denied
# without dialing anything.
start_broker nonces "$nonce_bytes" "[$daemon_port]"
capacity=$(sed -n 's/.*nonce_capacity=\([0-9]*\).*/\1/p' "$broker_log" |
  head -n1)
start_rss=$(rss_kib "$broker_pid")
taskset -c "$client_cpu" luajit tools/bench/chain_nonces.lua "$broker_port" \
  "$warm_nonces" "$broker_id" "$broker_secret" 1 "$slug" "$build" >/dev/null
sleep 0.5
before_rss=$(rss_kib "$broker_pid")
nonce_start=$(date +%s.%N)
taskset -c "$client_cpu" luajit tools/bench/chain_nonces.lua "$broker_port" \
  "$nonce_count" "$broker_id" "$broker_secret" 1 "$slug" "$build" >/dev/null
nonce_end=$(date +%s.%N)
sleep 0.5
after_rss=$(rss_kib "$broker_pid")
stop_process "$broker_pid"
echo "Nonces: a fresh broker with nonce.max_bytes $nonce_bytes (capacity" \
  "$capacity entries, allocated at start but counted in RSS only once" \
  "written), RSS at start, after $warm_nonces signed requests that warm it" \
  "and after N more (tools/bench/chain_nonces.lua, signed with" \
  "lua/justavps/edge_sig.lua for a denied port, so the broker records the" \
  "nonce and then rejects the request with 403). \"From start\" divides the growth from start by" \
  "$warm_nonces + N, so it includes the cache pages that the nonces" \
  "touched and the Lua heap of request handling. \"After warm-up\"" \
  "divides the growth over the last N nonces by N."
echo
echo "| N | RSS at start | RSS after warm-up | RSS after N | per nonce, from start | per nonce, after warm-up | requests/s |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
awk -v n="$nonce_count" -v w="$warm_nonces" -v s="$start_rss" \
  -v b="$before_rss" -v a="$after_rss" -v t0="$nonce_start" \
  -v t1="$nonce_end" 'BEGIN {
  printf "| %d | %d KiB | %d KiB | %d KiB | %.1f bytes | %.1f bytes | %.0f |\n",
    n, s, b, a, (a - s) * 1024 / (n + w), (a - b) * 1024 / n, n / (t1 - t0)
}'
echo
echo "The cache itself takes max_bytes / capacity =" \
  "$(awk -v c="$capacity" -v m="$nonce_bytes_count" 'BEGIN { printf "%.2f", m / c }')" \
  "bytes per entry at capacity, fixed at start."
echo
echo "Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
