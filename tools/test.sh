#!/usr/bin/env bash
# Run every check JustAVPS has: install the dependencies, build, start a
# private PostgreSQL, run the busted specs under luajit, then luacheck and
# the clang-format check. The last line printed is the count of all of them,
# "N passed, N failed", after a line "N skipped" when specs are pending.
#
#   tools/test.sh [--sanitize] [--no-lint] [busted arguments...]
#
#   --sanitize  build into build-asan/ with ASan and UBSan, run the specs
#               against that build, and count any sanitizer report as a
#               failure
#   --no-lint   skip luacheck and the clang-format check
#   anything else goes to busted: a spec file, --tags=NAME, --filter=TEXT
#
# Exits 0 only when nothing failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# Send stderr to stdout so that the closing line stays last even for a
# caller that captures the two streams apart.
exec 2>&1

sanitize=0
lint=1
busted_args=()

for arg in "$@"; do
  case "$arg" in
    --sanitize) sanitize=1 ;;
    --no-lint) lint=0 ;;
    -h | --help)
      sed -n '2,14s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *) busted_args+=("$arg") ;;
  esac
done

passed=0
failed=0
skipped=0
pg_started=0
summary_file=$(mktemp /tmp/justavps-test-summary.XXXXXX)

# Stops what this script started, then prints the closing line last, so
# that it stays the final line whichever step failed or was interrupted.
finish() {
  trap - EXIT INT TERM
  if ((pg_started)); then
    tools/pg.sh stop >/dev/null 2>&1 || echo "test.sh: tools/pg.sh stop failed"
  fi
  rm -f "$summary_file"

  # CI reads the last line, which must be exactly "N passed, N failed".
  if ((skipped > 0)); then
    echo "$skipped skipped (pending specs)"
  fi
  echo "$passed passed, $failed failed"

  if ((failed > 0)); then
    exit 1
  fi
  exit 0
}

step_failed() {
  echo "test.sh: $*"
  failed=$((failed + 1))
}

# On SIGINT or SIGTERM, stop busted first. timeout(1) runs busted in a
# process group of its own, so a signal sent to this script's group does
# not reach busted, and timeout forwards the signal it gets.
interrupted() {
  step_failed "interrupted"
  if [[ -n "${busted_pid:-}" ]]; then
    kill -TERM "$busted_pid" 2>/dev/null
    wait "$busted_pid" 2>/dev/null
  fi
  exit 130
}

trap finish EXIT
trap interrupted INT TERM

echo "== setup"
if ! tools/setup.sh </dev/null; then
  step_failed "tools/setup.sh failed"
  exit 1
fi

echo "== build"
build_dir=build
build_options=()
if ((sanitize)); then
  build_dir=build-asan
  build_options=(--sanitize)
fi
if ! tools/build.sh "${build_options[@]}" </dev/null; then
  step_failed "tools/build.sh failed"
  exit 1
fi

echo "== postgres"
if tools/pg.sh start </dev/null && pg_env=$(tools/pg.sh env); then
  pg_started=1
  eval "$pg_env"
  echo "PGHOST=$PGHOST PGPORT=$PGPORT PGUSER=$PGUSER PGDATABASE=$PGDATABASE"
else
  # Specs that need no database still run and count.
  step_failed "tools/pg.sh start failed"
fi

echo "== busted"
# Specs find the build they run against here, for example to spawn the
# justavps executable.
export JV_BUILD_DIR="$PWD/$build_dir"
export JV_TEST_SUMMARY="$summary_file"

# --ignore-lua: .busted names luajit as the interpreter, and busted would
# otherwise start itself again through a shell that drops the quoting.
busted_cmd=(luajit /usr/bin/busted --ignore-lua
  --cpath="$build_dir/lua/?.so"
  -o spec/support/summary_output.lua)
if ((sanitize)); then
  # The module is built with ASan but luajit is not, so luajit must start
  # with the ASan runtime in LD_PRELOAD. Other programs must not inherit it,
  # because curl and psql then hang in setlocale (Debian 12, gcc 12).
  # So a luajit wrapper first in PATH sets LD_PRELOAD, and LUA_INIT removes
  # it from the environment of each luajit once the loader has used it.
  # Specs that start luajit by name get the same treatment.
  libasan=$(gcc -print-file-name=libasan.so)
  wrapper_dir="$PWD/$build_dir/test-bin"
  mkdir -p "$wrapper_dir"
  printf '#!/bin/sh
LD_PRELOAD=%q exec %q "$@"
' "$libasan" \
    "$(command -v luajit)" >"$wrapper_dir/luajit"
  chmod +x "$wrapper_dir/luajit"
  unset_preload='local ffi = require("ffi")
ffi.cdef([[int jv_test_unsetenv(const char *name) asm("unsetenv");]])
ffi.C.jv_test_unsetenv("LD_PRELOAD")'

  # ASan reports go to files, one per process, so that they count as a
  # failure below and stay out of the output that specs capture.
  # Leak detection is off because luajit unloads the module before
  # LeakSanitizer runs at exit, which leaves its reports without symbols,
  # and memory kept until exit would count as leaked.
  report_dir="$PWD/$build_dir/sanitizer-reports"
  rm -rf "$report_dir"
  mkdir -p "$report_dir"
  busted_cmd=(env PATH="$wrapper_dir:$PATH" LUA_INIT="$unset_preload"
    ASAN_OPTIONS="detect_leaks=0:log_path=$report_dir/asan"
    UBSAN_OPTIONS="print_stacktrace=1:log_path=$report_dir/ubsan"
    "${busted_cmd[@]}")
fi

busted_timeout=${JV_TEST_TIMEOUT:-3600}
# busted runs in the background so that the signal traps run at once,
# not when busted ends.
if ((sanitize)); then
  # UBSan ignores log_path here and prints its reports to stderr, so busted
  # writes to a log that is shown live and searched for reports afterwards.
  busted_log="$PWD/$build_dir/busted.log"
  timeout -k 30 "$busted_timeout" "${busted_cmd[@]}" "${busted_args[@]}" \
    </dev/null >"$busted_log" 2>&1 &
  busted_pid=$!
  tail -n +1 -f --pid="$busted_pid" "$busted_log" &
  tail_pid=$!
else
  timeout -k 30 "$busted_timeout" "${busted_cmd[@]}" "${busted_args[@]}" \
    </dev/null &
  busted_pid=$!
fi
wait "$busted_pid"
busted_status=$?
busted_pid=
if [[ -n "${tail_pid:-}" ]]; then
  wait "$tail_pid"
fi

if [[ -s "$summary_file" ]]; then
  read -r spec_passed spec_failed spec_pending <"$summary_file"
  passed=$((passed + spec_passed))
  failed=$((failed + spec_failed))
  skipped=$((skipped + spec_pending))
  if ((busted_status != 0 && spec_failed == 0)); then
    step_failed "busted exited with status $busted_status after all tests passed"
  fi
elif ((busted_status == 124)); then
  step_failed "busted timed out after $busted_timeout s (JV_TEST_TIMEOUT)"
else
  step_failed "busted exited with status $busted_status and wrote no counts"
fi

if ((sanitize)); then
  echo "== sanitizer reports"
  shopt -s nullglob
  reports=("$report_dir"/*)
  shopt -u nullglob
  ubsan_reports=$(grep -c 'runtime error: ' "$busted_log")
  if ((${#reports[@]} == 0 && ubsan_reports == 0)); then
    echo "sanitizers: no reports"
    passed=$((passed + 1))
  else
    for report in "${reports[@]}"; do
      echo "-- $report"
      cat "$report"
    done
    grep -oE '[A-Za-z0-9_./-]+:[0-9]+:[0-9]+: runtime error: .*' "$busted_log"
    step_failed "sanitizers reported problems: ${#reports[@]} ASan report" \
      "files in $report_dir, $ubsan_reports UBSan reports in $busted_log"
  fi
fi

if ((lint)); then
  echo "== luacheck"
  lua_dirs=()
  for dir in lua policies providers spec; do
    if [[ -d "$dir" ]]; then
      lua_dirs+=("$dir")
    fi
  done
  luacheck_options=(-q)
  if [[ ! -t 1 ]]; then
    luacheck_options+=(--no-color)
  fi
  if luacheck "${luacheck_options[@]}" "${lua_dirs[@]}" </dev/null; then
    passed=$((passed + 1))
  else
    step_failed "luacheck found problems"
  fi

  echo "== clang-format"
  shopt -s nullglob
  c_files=(core/*.c core/*.h core/include/*.h)
  shopt -u nullglob
  format_log=$(clang-format --dry-run "${c_files[@]}" 2>&1)
  violations=$(grep -c ': warning: ' <<<"$format_log")
  if ((violations == 0)); then
    echo "clang-format: ${#c_files[@]} files conform to .clang-format"
    passed=$((passed + 1))
  else
    grep ': warning: ' <<<"$format_log" | cut -d: -f1 | sort | uniq -c
    echo "clang-format: $violations places differ; see them with" \
      "'clang-format --dry-run FILE', fix with 'clang-format -i FILE'"
    step_failed "clang-format check failed"
  fi
fi
