#!/usr/bin/env bash
# Configure and build JustAVPS: the justavps executable and the Lua module
# build/lua/justavps/core.so that specs load under luajit.
#
#   tools/build.sh             RelWithDebInfo build into build/
#   tools/build.sh --sanitize  ASan and UBSan build into build-asan/
set -euo pipefail
cd "$(dirname "$0")/.."

dir=build
options=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)

for arg in "$@"; do
  case "$arg" in
    --sanitize)
      dir=build-asan
      options+=(-DJV_SANITIZE=ON)
      ;;
    -h | --help)
      sed -n '2,7s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "build.sh: unknown option '$arg' (expected --sanitize)" >&2
      exit 2
      ;;
  esac
done

cmake -S . -B "$dir" "${options[@]}"
cmake --build "$dir" -j"$(nproc)"
