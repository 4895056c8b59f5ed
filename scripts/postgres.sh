#!/usr/bin/env bash
# A throw-away PostgreSQL server for the tests (Debian's `postgresql`, installed if absent).
#
#   scripts/postgres.sh start    # install if needed, initdb once, start; prints the server URL
#   scripts/postgres.sh stop     # stop it (the data directory stays for the next start)
#   scripts/postgres.sh url      # print the URL of a running server
#   scripts/postgres.sh status   # exit 0 when it runs
#
# Idempotent: `start` on a running server only prints its URL. Listens on 127.0.0.1 and on a
# socket inside its data directory, trusts local connections (test data only: never use this
# cluster for anything else) and runs without fsync, which makes CREATE DATABASE per test cheap.
# As root, the server runs as the `postgres` user that the Debian package creates.
#   SAFEPATCH_PG_DIR   data directory (default /tmp/safepatch-pg-<uid>)
#   SAFEPATCH_PG_PORT  TCP port (default 55432)
set -euo pipefail
action="${1:-start}"
port="${SAFEPATCH_PG_PORT:-55432}"
data="${SAFEPATCH_PG_DIR:-/tmp/safepatch-pg-$(id -u)}"
url="postgresql+psycopg://postgres@127.0.0.1:${port}/postgres"

bindir() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [[ -x "$dir/pg_ctl" ]] && { echo "$dir"; return 0; }
  done
  return 1
}

install_postgres() {
  bindir >/dev/null && return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "postgres.sh: PostgreSQL is not installed; run as root (apt-get install postgresql)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends postgresql >/dev/null ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends postgresql >/dev/null; }
  # Debian's package starts its own cluster on 5432; ours is separate, so leave that one alone.
}

# Run a PostgreSQL tool as the server's user: `postgres` when we are root (initdb refuses root).
as_owner() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

running() { [[ -d "$data" ]] && as_owner "$(bindir)/pg_ctl" -D "$data" status >/dev/null 2>&1; }

case "$action" in
  start)
    install_postgres
    bin="$(bindir)"
    if ! running; then
      if [[ ! -f "$data/PG_VERSION" ]]; then
        mkdir -p "$data"
        [[ $(id -u) -eq 0 ]] && chown postgres:postgres "$data"
        chmod 700 "$data"
        as_owner "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
          >"$data.initdb.log" 2>&1 || { cat "$data.initdb.log" >&2; exit 1; }
      fi
      as_owner "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start -o \
        "-p $port -k $data -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
-c full_page_writes=off -c max_connections=200" >/dev/null ||
        { tail -20 "$data/server.log" >&2; exit 1; }
    fi
    echo "$url"
    ;;
  stop)
    if running; then as_owner "$(bindir)/pg_ctl" -D "$data" -w -m fast stop >/dev/null; fi
    ;;
  url)
    running && echo "$url"
    ;;
  status)
    running
    ;;
  *)
    echo "usage: $0 start|stop|url|status" >&2
    exit 2
    ;;
esac
