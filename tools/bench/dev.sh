#!/usr/bin/env bash
# Benchmark the `justavps dev` stack on 127.0.0.1 and print a Markdown
# report:
#   1. cold start: from launching `justavps dev` on a new directory
#      (initdb, migrations, certificates, the three roles, the demo
#      account, key and machine) until it logs "justavps dev is ready";
#   2. warm start: the same on the directory of the last cold start;
#   3. machine create -> services_ready through the API, one machine
#      after another, polling GET /machines/SLUG every 10 ms;
#   4. latency of GET / on one backend (tools/bench/bare_server.lua),
#      directly and through edge -> broker -> daemon: curl's
#      time_starttransfer on a new connection per request (TLS handshake
#      included for the chain), and wrk -t1 -c1 over one keep-alive
#      connection;
#   5. RSS of each process of the stack after the runs.
#
#   tools/bench/dev.sh [--starts N] [--machines N] [--requests N]
#                      [--wrk-seconds S] [--keep]
#
#   --starts N       cold starts and warm starts each (default 3)
#   --machines N     machines created one after another (default 5)
#   --requests N     curl requests per side (default 200)
#   --wrk-seconds S  seconds of each wrk run (default 5)
#   --keep           keep the temporary directory with logs
#
# Needs curl, jq, wrk (tools/setup.sh --bench), luajit, python3 and a build
# (tools/build.sh; JV_BUILD_DIR picks another one), whose binary is copied
# at the start so one run uses one build. Package installs and the build
# are not part of the cold start.
set -euo pipefail
cd "$(dirname "$0")/../.."

starts=3
machines=5
requests=200
wrk_seconds=5
keep=0
build=${JV_BUILD_DIR:-build}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --starts) starts=$2; shift ;;
    --machines) machines=$2; shift ;;
    --requests) requests=$2; shift ;;
    --wrk-seconds) wrk_seconds=$2; shift ;;
    --keep) keep=1 ;;
    -h | --help)
      sed -n '2,29s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "dev.sh: unknown option '$1' (see --help)" >&2
      exit 2
      ;;
  esac
  shift
done

for tool in curl jq wrk luajit python3; do
  if ! command -v "$tool" >/dev/null; then
    echo "dev.sh: $tool is missing; run tools/setup.sh --bench" >&2
    exit 1
  fi
done

tmp=$(mktemp -d /tmp/justavps-bench-dev.XXXXXX)
bin=$tmp/justavps
cp "$build/justavps" "$bin"
dev_pid=
backend_pid=

cleanup() {
  if [[ -n $backend_pid ]]; then
    kill "$backend_pid" 2>/dev/null || true
  fi
  if [[ -n $dev_pid ]]; then
    kill -TERM "$dev_pid" 2>/dev/null || true
    wait "$dev_pid" 2>/dev/null || true
  fi
  if ((keep)); then
    echo "kept $tmp" >&2
  else
    # The cluster may live under /tmp behind the DIR/pg symlink.
    if [[ -L $tmp/dev/pg ]]; then
      rm -rf "$(readlink -f "$tmp/dev/pg")"
    fi
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT

log() {
  echo "dev.sh: $*" >&2
}

free_port() {
  python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

platform_port=$(free_port)
edge_port=$(free_port)
broker_port=$(free_port)
first_address=$((150 + RANDOM % 40))

now() {
  date +%s.%N
}

# Starts `justavps dev` on dir and sets dev_pid, and start_seconds to the
# seconds until it logged that it is ready.
start_dev() {
  local dir=$1 log_file=$2 started
  started=$(now)
  "$bin" dev --dir "$dir" --platform-port "$platform_port" \
    --edge-port "$edge_port" --broker-port "$broker_port" \
    --first-address "$first_address" --no-access-log \
    >"$log_file.out" 2>"$log_file" &
  dev_pid=$!
  for _ in $(seq 1 3000); do
    if grep -q 'msg="justavps dev is ready"' "$log_file"; then
      start_seconds=$(awk -v a="$started" -v b="$(now)" \
        'BEGIN { printf "%.3f\n", b - a }')
      return
    fi
    if grep -q 'could not start' "$log_file" || ! kill -0 "$dev_pid" 2>/dev/null; then
      log "justavps dev did not start; its log:"
      cat "$log_file" >&2
      exit 1
    fi
    sleep 0.01
  done
  log "justavps dev was not ready after 30 s"
  exit 1
}

stop_dev() {
  kill -TERM "$dev_pid"
  wait "$dev_pid" || true
  dev_pid=
}

# Prints "p50 p99 max" of the numbers on stdin, in the same unit.
percentiles() {
  sort -n | awk '{ v[NR] = $1 } END {
    i50 = int(NR * 0.50 + 0.5); if (i50 < 1) i50 = 1
    i99 = int(NR * 0.99 + 0.5); if (i99 < 1) i99 = 1
    printf "%s %s %s\n", v[i50], v[i99], v[NR] }'
}

median() {
  sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}

# 1 and 2: cold and warm starts.
cold=()
for i in $(seq 1 "$starts"); do
  rm -rf "${tmp:?}/dev"
  start_dev "$tmp/dev" "$tmp/cold-$i.log"
  cold+=("$start_seconds")
  log "cold start $i: ${cold[-1]} s"
  stop_dev
done
warm=()
for i in $(seq 1 "$starts"); do
  start_dev "$tmp/dev" "$tmp/warm-$i.log"
  warm+=("$start_seconds")
  log "warm start $i: ${warm[-1]} s"
  if ((i < starts)); then
    stop_dev
  fi
done

stack=$tmp/dev/stack.json
key=$(jq -r .api_key "$stack")
ca=$(jq -r .ca_file "$stack")
slug=$(jq -r .machine.slug "$stack")
api=http://127.0.0.1:$platform_port/api/v1
auth="Authorization: Bearer $key"

# 3: create -> services_ready.
ready_times=()
for i in $(seq 1 "$machines"); do
  started=$(now)
  new_slug=$(curl -s -H "$auth" \
    -d '{"name":"bench","region":"local","server_type":"local"}' \
    "$api/machines" | jq -r .slug)
  stage=
  for _ in $(seq 1 3000); do
    stage=$(curl -s -H "$auth" "$api/machines/$new_slug" | jq -r .stage)
    [[ $stage == services_ready || $stage == failed ]] && break
    sleep 0.01
  done
  if [[ $stage != services_ready ]]; then
    log "machine $new_slug ended at stage $stage"
    exit 1
  fi
  ready_times+=("$(awk -v a="$started" -v b="$(now)" \
    'BEGIN { printf "%.3f\n", b - a }')")
  log "machine $i: ${ready_times[-1]} s"
  curl -s -o /dev/null -X DELETE -H "$auth" "$api/machines/$new_slug"
done

# 4: latency, direct and through the chain.
luajit tools/bench/bare_server.lua "$build" >"$tmp/backend.port" \
  2>"$tmp/backend.log" &
backend_pid=$!
for _ in $(seq 1 100); do
  [[ -s $tmp/backend.port ]] && break
  sleep 0.05
done
backend=$(head -n1 "$tmp/backend.port")
direct_url=http://127.0.0.1:$backend/
chain_host=$backend-$slug.justavps.localhost:$edge_port
chain_url=https://$chain_host/

if [[ $(curl -s --cacert "$ca" -H "$auth" "$chain_url") != "hello world" ]]; then
  log "the chain did not return the backend's body"
  exit 1
fi

for _ in $(seq 1 "$requests"); do
  curl -s -o /dev/null -w '%{time_starttransfer}\n' "$direct_url"
done >"$tmp/direct.txt"
for _ in $(seq 1 "$requests"); do
  curl -s -o /dev/null -w '%{time_starttransfer}\n' --cacert "$ca" \
    -H "$auth" "$chain_url"
done >"$tmp/chain.txt"

wrk -t1 -c1 -d"${wrk_seconds}s" --latency "$direct_url" >"$tmp/wrk-direct.txt"
wrk -t1 -c1 -d"${wrk_seconds}s" --latency -H "Host: $chain_host" \
  -H "$auth" "https://127.0.0.1:$edge_port/" >"$tmp/wrk-chain.txt"

# 5: RSS of each process.
rss() {
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo "?"
}
demo_pid=$(cut -d' ' -f1 "$tmp/dev/machines/$slug/daemon.pid")

wrk_field() {
  local file=$1 what=$2
  case "$what" in
    rps) awk '/^Requests\/sec:/ { print $2 }' "$file" ;;
    *) awk -v p="$what%" '$1 == p { print $2 }' "$file" ;;
  esac
}

read -r d50 d99 dmax < <(awk '{ printf "%.0f\n", $1 * 1e6 }' "$tmp/direct.txt" | percentiles)
read -r c50 c99 cmax < <(awk '{ printf "%.0f\n", $1 * 1e6 }' "$tmp/chain.txt" | percentiles)

cat <<REPORT
### Run of $(date -u '+%Y-%m-%d %H:%M UTC') (commit $(git rev-parse --short HEAD), build $(sha256sum "$bin" | cut -c1-12))

Command: \`tools/bench/dev.sh --starts $starts --machines $machines --requests $requests --wrk-seconds $wrk_seconds\`

| measurement | median | runs |
| --- | ---: | --- |
| cold start to ready (new directory, initdb included) | $(printf '%s\n' "${cold[@]}" | median) s | ${cold[*]} |
| warm start to ready (same directory) | $(printf '%s\n' "${warm[@]}" | median) s | ${warm[*]} |
| machine create to services_ready | $(printf '%s\n' "${ready_times[@]}" | median) s | ${ready_times[*]} |

First byte of GET / (curl time_starttransfer, a new connection per
request, $requests requests each, in microseconds):

| path | p50 | p99 | max |
| --- | ---: | ---: | ---: |
| direct to the backend (HTTP) | $d50 | $d99 | $dmax |
| edge -> broker -> daemon -> backend (HTTPS, API key) | $c50 | $c99 | $cmax |

One keep-alive connection (wrk -t1 -c1 -d${wrk_seconds}s):

| path | requests/s | p50 | p99 |
| --- | ---: | ---: | ---: |
| direct to the backend | $(wrk_field "$tmp/wrk-direct.txt" rps) | $(wrk_field "$tmp/wrk-direct.txt" 50) | $(wrk_field "$tmp/wrk-direct.txt" 99) |
| edge -> broker -> daemon -> backend | $(wrk_field "$tmp/wrk-chain.txt" rps) | $(wrk_field "$tmp/wrk-chain.txt" 50) | $(wrk_field "$tmp/wrk-chain.txt" 99) |

RSS after the runs (KiB): platform $(rss "$(cat "$tmp/dev/run/platform.pid")"), edge $(rss "$(cat "$tmp/dev/run/edge.pid")"), broker $(rss "$(cat "$tmp/dev/run/broker.pid")"), demo machine daemon $(rss "$demo_pid"), justavps dev $(rss "$dev_pid").
REPORT
