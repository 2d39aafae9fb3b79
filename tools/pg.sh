#!/usr/bin/env bash
# A private PostgreSQL cluster for specs, under var/test-pg.
#
#   tools/pg.sh start   initdb on first use, then start the server
#   tools/pg.sh stop    stop the server (the data stays for the next start)
#   tools/pg.sh env     print `export PG...=` lines for PGHOST, PGPORT,
#                       PGUSER and PGDATABASE: eval "$(tools/pg.sh env)"
#   tools/pg.sh reset   stop the server and delete the cluster
#
# The server listens on a Unix socket in the cluster directory and on
# 127.0.0.1 at a free port, never on other addresses. Authentication is
# `trust`, so the cluster is for tests only. initdb and postgres refuse to
# run as root: as root the cluster belongs to the `postgres` system user.
# When that user cannot reach var/test-pg (a checkout under /root, say) or
# the socket path would be too long, the cluster lives in a directory under
# /tmp and var/test-pg is a symlink to it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd -P)

link="$root/var/test-pg"
db_user=justavps
db_name=justavps_test

die() {
  echo "pg.sh: $*" >&2
  exit 1
}

pg_bindir() {
  local dir
  dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d \
    2>/dev/null | sort -V | tail -n 1)
  [[ -x "$dir/initdb" ]] ||
    die "initdb not found under /usr/lib/postgresql; run tools/setup.sh"
  echo "$dir"
}

# Runs a command as the user that owns the cluster.
as_owner() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# Prints the cluster directory, creating it when needed.
cluster_dir() {
  local dir="$link"

  if [[ -L "$link" ]]; then
    readlink -f "$link"
    return
  fi
  if [[ -d "$link" ]]; then
    echo "$link"
    return
  fi

  mkdir -p "$root/var"
  # Linux limits a Unix socket path to 107 bytes, and ".s.PGSQL.NNNNN" adds 15.
  if [[ $(id -u) -eq 0 ]]; then
    if ((${#dir} > 90)) ||
      ! runuser -u postgres -- test -x "$root/var" 2>/dev/null; then
      dir=$(mktemp -d /tmp/justavps-test-pg.XXXXXX)
      ln -s "$dir" "$link"
    else
      mkdir -p "$dir"
    fi
    chown postgres: "$dir"
  else
    if ((${#dir} > 90)); then
      dir=$(mktemp -d /tmp/justavps-test-pg.XXXXXX)
      ln -s "$dir" "$link"
    else
      mkdir -p "$dir"
    fi
  fi
  chmod 700 "$dir"
  echo "$dir"
}

# Prints a TCP port on 127.0.0.1 that no socket listens on now.
free_port() {
  local port
  for _ in $(seq 1 50); do
    port=$((20000 + RANDOM % 40000))
    if ! ss -Htln "sport = :$port" | grep -q .; then
      echo "$port"
      return
    fi
  done
  die "found no free TCP port after 50 tries"
}

is_running() {
  local dir=$1
  [[ -f "$dir/data/PG_VERSION" ]] &&
    as_owner "$(pg_bindir)/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

cmd_start() {
  local bin dir port
  bin=$(pg_bindir)
  dir=$(cluster_dir)

  if is_running "$dir"; then
    echo "pg: already running on port $(cat "$dir/port"), socket in $dir"
    return
  fi

  if [[ ! -f "$dir/data/PG_VERSION" ]]; then
    rm -rf "$dir/data"
    as_owner "$bin/initdb" -D "$dir/data" -U "$db_user" --auth=trust \
      --encoding=UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
      die "initdb failed; see $dir/initdb.log"
    # Durability is not needed for test data, and skipping it saves time.
    cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  fi

  # A port that was free when checked may be taken before the server binds
  # it, so a failed start is retried on another port.
  for attempt in 1 2 3 4 5; do
    port=$(free_port)
    echo "$port" | as_owner tee "$dir/port" >/dev/null
    if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w \
      -t 60 -o "-p $port" start >/dev/null; then
      break
    fi
    if ((attempt == 5)); then
      tail -n 20 "$dir/postgres.log" >&2 || true
      die "server did not start after 5 tries; see $dir/postgres.log"
    fi
  done

  if ! as_owner "$bin/psql" -h "$dir" -p "$port" -U "$db_user" -d postgres \
    -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db_name'" |
    grep -q 1; then
    as_owner "$bin/createdb" -h "$dir" -p "$port" -U "$db_user" "$db_name"
  fi
  echo "pg: running on port $port, socket in $dir"
}

cmd_stop() {
  local dir
  [[ -e "$link" ]] || return 0
  dir=$(readlink -f "$link")
  if is_running "$dir"; then
    as_owner "$(pg_bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    echo "pg: stopped"
  fi
}

cmd_env() {
  local dir
  [[ -e "$link" ]] || die "no cluster in $link; run tools/pg.sh start first"
  dir=$(readlink -f "$link")
  is_running "$dir" || die "the cluster in $dir is not running"
  printf 'export PGHOST=%q\n' "$dir"
  printf 'export PGPORT=%q\n' "$(cat "$dir/port")"
  printf 'export PGUSER=%q\n' "$db_user"
  printf 'export PGDATABASE=%q\n' "$db_name"
}

cmd_reset() {
  local dir
  cmd_stop
  [[ -e "$link" ]] || return 0
  dir=$(readlink -f "$link")
  rm -rf "$dir"
  rm -f "$link"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  reset) cmd_reset ;;
  *)
    sed -n '2,9s/^# \{0,1\}//p' "$0" >&2
    exit 2
    ;;
esac
