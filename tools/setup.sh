#!/usr/bin/env bash
# Install the Debian 12 packages that building, running and testing JustAVPS
# need. Safe to rerun: when every package is already installed it only checks
# and exits, so it also works without root on a prepared machine.
#
#   tools/setup.sh          build, run and test dependencies
#   tools/setup.sh --bench  the same plus nginx-light and wrk for benchmarks
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  luajit libluajit-5.1-dev lua-cjson lua-busted lua-check lua-filesystem
  libuv1-dev libssl-dev libpq-dev libcurl4-openssl-dev node-llhttp
  postgresql postgresql-contrib
  curl ca-certificates openssl procps iproute2
  clang-format
  # Provisioning specs validate generated files with the real tools.
  cloud-init systemd openssh-client openssh-server shellcheck python3
  python3-yaml
  # The dev walkthrough and its end-to-end spec: jq reads stack.json, and
  # a Python WebSocket client opens the terminal.
  jq python3-websockets
  # The Hetzner fake is checked against Hetzner's own CLI.
  hcloud-cli
)

for arg in "$@"; do
  case "$arg" in
    --bench)
      packages+=(nginx-light wrk)
      ;;
    -h | --help)
      sed -n '2,8s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *)
      echo "setup.sh: unknown option '$arg' (expected --bench)" >&2
      exit 2
      ;;
  esac
done

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != ii* ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup: all ${#packages[@]} packages are installed"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "setup.sh: missing packages: ${missing[*]}" >&2
  echo "setup.sh: run it as root (sudo tools/setup.sh) to install them" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup: installing ${missing[*]}"
# The package lists may be absent or stale on a fresh machine, and an
# install from stale lists fails on files the mirror no longer has.
apt-get update -q </dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
