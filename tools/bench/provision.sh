#!/usr/bin/env bash
# Benchmark provisioning on 127.0.0.1 and print a Markdown report: a real
# `justavps platform` runs the provisioning worker against a fresh
# PostgreSQL database (tools/pg.sh), with the local provider (real
# `justavps daemon` processes) and with the Hetzner driver pointed at
# tools/fake_hetzner.lua. tools/bench/provision_run.lua does the
# measuring:
#   1. create -> server_created and -> services_ready, local provider,
#      machines created one after another;
#   2. create -> server_created, Hetzner driver and the fake API with
#      --ready-polls 0, machines created one after another;
#   3. a burst of local machines queued at once: time until all reach
#      server_created and services_ready.
#
#   tools/bench/provision.sh [--machines N] [--burst N] [--concurrency N]
#                            [--poll-interval S] [--keep]
#
#   --machines N       machines per sequential measurement (default 10)
#   --burst N          machines queued at once (default 20)
#   --concurrency N    provision.concurrency of the platform (default 2,
#                      the config default)
#   --poll-interval S  provision.poll_interval in seconds (default 0.25, the
#                      config default)
#   --keep             keep the temporary directory with the logs
#
# Needs luajit, a build (tools/build.sh; JV_BUILD_DIR picks another build
# directory) and PostgreSQL (tools/pg.sh start runs here). The script
# ends the platform, the fake API and every daemon it started, drops its
# database, and a watchdog ends the whole run after 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

machines=10
burst=20
concurrency=2
poll_interval=0.25
keep=0
build=${JV_BUILD_DIR:-build}
watchdog_seconds=600

while [[ $# -gt 0 ]]; do
  case "$1" in
    --machines) machines=$2; shift ;;
    --burst) burst=$2; shift ;;
    --concurrency) concurrency=$2; shift ;;
    --poll-interval) poll_interval=$2; shift ;;
    --keep) keep=1 ;;
    -h | --help)
      sed -n '2,29s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "provision.sh: unknown option '$1' (see --help)" >&2
      exit 2
      ;;
  esac
  shift
done

if ! command -v luajit >/dev/null; then
  echo "provision.sh: luajit not found; install it with tools/setup.sh" >&2
  exit 1
fi
if [[ ! -x $build/justavps || ! -f $build/lua/justavps/core.so ]]; then
  echo "provision.sh: $build/justavps or $build/lua/justavps/core.so is" \
    "missing; run tools/build.sh first" >&2
  exit 1
fi

tools/pg.sh start >&2
eval "$(tools/pg.sh env)"

tmp=$(mktemp -d /tmp/justavps-provision-bench.XXXXXX)
child_pids=()

cleanup() {
  local pid file
  for pid in "${child_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${child_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  # provision_run.lua deletes its machines, and this stops the daemons that a
  # run ended by the watchdog or a signal left behind.
  for file in "$tmp"/machines/*/daemon.pid; do
    [[ -f $file ]] || continue
    pid=$(head -n1 "$file" | grep -o '^[0-9]*' || true)
    if [[ -n $pid ]] && grep -qa justavps "/proc/$pid/cmdline" 2>/dev/null
    then
      echo "provision.sh: stopping the leftover daemon $pid" >&2
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  if [[ -n ${watchdog_pid:-} ]]; then
    kill "$watchdog_pid" 2>/dev/null || true
  fi
  if [[ $keep -eq 1 ]]; then
    echo "logs kept in $tmp" >&2
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'echo "provision.sh: interrupted" >&2; exit 130' INT TERM

# The watchdog's sleep is its own child so that cleanup can end both.
(
  sleep "$watchdog_seconds" &
  sleep_pid=$!
  trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
  wait "$sleep_pid"
  echo "provision.sh: timed out after $watchdog_seconds s" >&2
  kill -TERM $$
) &
watchdog_pid=$!

# Zero delay: a created server and its create action are done at the
# first read.
luajit tools/fake_hetzner.lua --port 0 --ready-polls 0 --ready-seconds 0 \
  >"$tmp/fake_hetzner.out" 2>"$tmp/fake_hetzner.log" &
child_pids+=("$!")
hetzner_port=
for _ in $(seq 1 100); do
  hetzner_port=$(sed -n 's/.*listening port=\([0-9]*\).*/\1/p' \
    "$tmp/fake_hetzner.out" | head -n1)
  [[ -n $hetzner_port ]] && break
  sleep 0.1
done
if [[ -z $hetzner_port ]]; then
  echo "provision.sh: tools/fake_hetzner.lua did not print its port" >&2
  cat "$tmp/fake_hetzner.log" >&2
  exit 1
fi

echo "# justavps provisioning benchmark run"
echo
echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "- nproc: $(nproc)"
echo "- PostgreSQL: $(postgres --version 2>/dev/null ||
  psql --version 2>/dev/null || echo unknown)"
echo "- justavps: $("$build/justavps" --version), $build" \
  "($(sha256sum "$build/justavps" | cut -c1-12))"
echo "- load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

luajit tools/bench/provision_run.lua "$build" "$tmp" "$hetzner_port" \
  "$machines" "$burst" "$concurrency" "$poll_interval" &
child_pids+=("$!")
run_pid=$!
status=0
wait "$run_pid" || status=$?
child_pids=("${child_pids[@]/$run_pid/}")

echo "Load average after the run: $(cut -d' ' -f1-3 /proc/loadavg)"
if [[ $status -ne 0 ]]; then
  echo "provision.sh: provision_run.lua failed (status $status); the" \
    "platform log is $tmp/platform.log" >&2
  keep=1
  exit "$status"
fi
