#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests (as root; scripts/install.sh installs PostgreSQL).
#
#   scripts/postgres.sh run CMD [ARGS...]   start a cluster, run CMD with EMBER_TEST_DATABASE_URL set to its
#                                           database, stop and remove the cluster; exits with CMD's status
#   scripts/postgres.sh start               start one and print `export EMBER_TEST_DATABASE_URL=...` (for eval)
#   scripts/postgres.sh stop DIR            stop and remove the cluster in DIR (printed by start)
#
# Each cluster lives in its own /var/tmp/ember-pg.XXXXXX (data, log, and the Unix socket: it listens on no TCP
# port, so it never meets another PostgreSQL) and runs as the `postgres` user with trust authentication, no
# fsync (throwaway data) and room for every test daemon's connections. A cluster whose `run` was killed
# (owner process gone) is stopped and removed by the next start.
set -euo pipefail

PREFIX=/var/tmp/ember-pg.
DATABASE=ember
say() { echo "postgres.sh: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "run as root (it runs the cluster as the postgres user)"
    exit 1
fi
bindir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
if [ -z "$bindir" ] || ! id postgres >/dev/null 2>&1; then
    say "PostgreSQL is not installed: run scripts/install.sh"
    exit 1
fi
as_postgres() { runuser -u postgres -- "$@"; }

# "pid starttime" of a process: a pid alone may be reused
identity() { echo "$1 $(awk '{print $22}' "/proc/$1/stat" 2>/dev/null || echo gone)"; }

stop_cluster() {  # DIR
    local dir=$1
    [ -n "$dir" ] || return 0
    if [ -f "$dir/data/postmaster.pid" ]; then
        as_postgres "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

sweep() {  # clusters left by a killed `run`
    local dir owner
    for dir in "$PREFIX"*; do
        [ -d "$dir" ] && [ -f "$dir/owner" ] || continue
        owner=$(cat "$dir/owner")
        if [ "$owner" != "manual" ] && [ "$(identity "${owner%% *}")" != "$owner" ]; then
            say "removing a cluster a killed run left behind: $dir"
            stop_cluster "$dir"
        fi
    done
}

start_cluster() {  # OWNER -> sets DIR and URL
    sweep
    DIR=$(mktemp -d "${PREFIX}XXXXXX")
    echo "$1" > "$DIR/owner"
    chown postgres: "$DIR"
    as_postgres "$bindir/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --no-locale --no-sync \
        --no-instructions >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; return 1; }
    cat >> "$DIR/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$DIR'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    if ! as_postgres "$bindir/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start >/dev/null; then
        cat "$DIR/server.log" >&2
        return 1
    fi
    as_postgres "$bindir/createdb" -h "$DIR" -U postgres "$DATABASE"
    URL="postgresql+psycopg://postgres@/$DATABASE?host=$DIR"
}

case "${1:-}" in
run)
    shift
    [ $# -gt 0 ] || { say "usage: $0 run CMD [ARGS...]"; exit 2; }
    started=$SECONDS
    trap 'stop_cluster "$DIR"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    DIR=
    start_cluster "$(identity $$)"
    say "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') in $DIR (ready in $((SECONDS - started)) s)"
    say "EMBER_TEST_DATABASE_URL=$URL $*"
    status=0
    EMBER_TEST_DATABASE_URL=$URL "$@" || status=$?
    exit "$status"
    ;;
start)
    DIR=
    trap 'stop_cluster "$DIR"' EXIT
    start_cluster manual
    trap - EXIT
    echo "export EMBER_TEST_DATABASE_URL='$URL'  # stop: $0 stop $DIR"
    ;;
stop)
    case "${2:-}" in "$PREFIX"??????) stop_cluster "$2" ;; *) say "usage: $0 stop ${PREFIX}XXXXXX"; exit 2 ;; esac
    ;;
*)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
