#!/usr/bin/env bash
# Install the dependencies, build, and run `justavps dev`: every role on
# loopback with a private Postgres. Arguments go to `justavps dev`.
set -euo pipefail
cd "$(dirname "$0")/.."

tools/setup.sh
tools/build.sh
exec build/justavps dev "$@"
