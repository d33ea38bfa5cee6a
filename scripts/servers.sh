#!/usr/bin/env bash
# Local PostgreSQL, Redis and RabbitMQ for the demo and the tests, from Debian's
# packages, under a git-ignored state folder, on the ports the README names.
#
#   scripts/servers.sh install   apt-get the servers (and build deps) if missing
#   scripts/servers.sh up        install if needed, start whatever is not running
#   scripts/servers.sh down      stop all three (data is kept)
#   scripts/servers.sh status    say what is running
#   scripts/servers.sh env       print export lines: eval "$(scripts/servers.sh env)"
#   scripts/servers.sh state     print the state folder (made if missing)
#   scripts/servers.sh reset     down, delete the state folder
#
# Safe to run twice: every step checks before it acts.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd /  # the postgres and rabbitmq users may not be allowed into the clone
PG_PORT=${CONVEYOR_PG_PORT:-55432}
REDIS_PORT=${CONVEYOR_REDIS_PORT:-56379}
AMQP_PORT=${CONVEYOR_AMQP_PORT:-55672}
AMQP_DIST_PORT=${CONVEYOR_AMQP_DIST_PORT:-55673}
# the management plugin's HTTP API (bounded queues: Conveyor sets its max-length policies there)
AMQP_MGMT_PORT=${CONVEYOR_AMQP_MGMT_PORT:-$((AMQP_PORT + 2))}
# a second set of servers (another clone, a helper's worktree) sets all four ports,
# CONVEYOR_AMQP_NODENAME (say conveyor2@localhost) and CONVEYOR_STATE_DIR or its own clone
PG_BIN=/usr/lib/postgresql/15/bin

PACKAGES="build-essential cmake pkg-config git
  librabbitmq-dev libhiredis-dev libpq-dev libcjson-dev uuid-dev libconfig-dev libsodium-dev libmicrohttpd-dev libcurl4-openssl-dev tzdata
  postgresql redis-server redis-tools rabbitmq-server amqp-tools
  python3-pika python3-redis python3-psycopg2 python3-jsonschema python3-prometheus-client python3-yaml procps clang libclang-rt-14-dev
  curl openssl iproute2 docker-compose"

log() { printf 'servers: %s\n' "$*" >&2; }
die() { printf 'servers: error: %s\n' "$*" >&2; exit 1; }

# The state folder must be reachable by the postgres and rabbitmq users; a clone
# under a private home is not, so then the state lives in /var/tmp with a link.
state_dir() {
  if [ -n "${CONVEYOR_STATE_DIR:-}" ]; then echo "$CONVEYOR_STATE_DIR"; return; fi
  local s="$ROOT/.state"
  if [ -L "$s" ]; then readlink -f "$s"; return; fi
  mkdir -p "$s"
  chmod 755 "$s"
  if id postgres >/dev/null 2>&1 && ! su postgres -s /bin/sh -c "test -x '$s'" 2>/dev/null; then
    local alt="/var/tmp/conveyor-state-$(echo "$ROOT" | md5sum | cut -c1-8)"
    mkdir -p "$alt"; chmod 755 "$alt"
    rmdir "$s" 2>/dev/null || true
    ln -sfn "$alt" "$s"
    echo "$alt"; return
  fi
  echo "$s"
}

need_install() {
  for b in "$PG_BIN/postgres" /usr/bin/redis-server /usr/sbin/rabbitmq-server /usr/bin/amqp-publish \
           /usr/include/amqp.h /usr/include/hiredis/hiredis.h /usr/include/cjson/cJSON.h \
           /usr/include/libconfig.h /usr/include/sodium.h /usr/include/microhttpd.h /usr/include/x86_64-linux-gnu/curl/curl.h /usr/include/uuid/uuid.h /usr/bin/cmake \
           /usr/bin/clang /usr/bin/curl /usr/bin/openssl /usr/bin/ip /usr/sbin/tc /usr/bin/docker-compose \
           /usr/bin/pkg-config /usr/bin/g++ /usr/bin/readelf; do  # the last three: test_library (build-essential, pkg-config)
    [ -e "$b" ] || return 0
  done
  /usr/bin/python3 -c 'import pika, redis, psycopg2, jsonschema, prometheus_client, yaml' 2>/dev/null || return 0
  return 1
}

cmd_install() {
  if need_install; then
    [ "$(id -u)" = 0 ] || die "packages are missing and installing them needs root"
    log "installing Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq $PACKAGES >/dev/null
  fi
}

pg_running()    { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; }
redis_running() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }
rabbit_env() {
  local st=$1
  export RABBITMQ_NODENAME=${CONVEYOR_AMQP_NODENAME:-conveyor@localhost}
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$AMQP_PORT
  export RABBITMQ_DIST_PORT=$AMQP_DIST_PORT
  export RABBITMQ_MNESIA_BASE=$st/rabbitmq/mnesia
  export RABBITMQ_LOG_BASE=$st/rabbitmq/log
  export RABBITMQ_PID_FILE=$st/rabbitmq/rabbitmq.pid
  export RABBITMQ_ENABLED_PLUGINS_FILE=$st/rabbitmq/enabled_plugins
  export RABBITMQ_CONFIG_FILE=$st/rabbitmq/rabbitmq
  export RABBITMQ_ADVANCED_CONFIG_FILE=$st/rabbitmq/advanced.config
}
rabbit_running() {
  local st=$1
  rabbit_env "$st"
  [ -f "$RABBITMQ_PID_FILE" ] && kill -0 "$(cat "$RABBITMQ_PID_FILE")" 2>/dev/null &&
    timeout 20 rabbitmqctl -q -n "$RABBITMQ_NODENAME" status >/dev/null 2>&1
}

pg_up() {
  local st=$1 d="$1/pg"
  if pg_running; then
    # the rate-limit tests read commit times (pg_xact_commit_timestamp): a cluster
    # started before that setting existed is switched on and restarted, once
    if [ "$(psql -h 127.0.0.1 -p "$PG_PORT" -U conveyor -d postgres -tAc 'show track_commit_timestamp')" != on ]; then
      log "PostgreSQL: track_commit_timestamp on (a restart)"
      psql -q -h 127.0.0.1 -p "$PG_PORT" -U conveyor -d postgres -c 'ALTER SYSTEM SET track_commit_timestamp = on'
      su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -w -t 60 -D '$d' -l '$d/server.log' restart" >/dev/null
    fi
    return
  fi
  if [ ! -f "$d/PG_VERSION" ]; then
    log "initialising PostgreSQL in $d"
    mkdir -p "$d"; chown postgres:postgres "$d"; chmod 700 "$d"
    su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$d' -U conveyor --auth=trust -E UTF8 --locale=C.UTF-8" >/dev/null
    cat >> "$d/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$d'
max_connections = 200
shared_buffers = 256MB
fsync = on
synchronous_commit = on
track_commit_timestamp = on
CONF
  fi
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -w -t 60 -D '$d' -l '$d/server.log' start" >/dev/null
  if ! psql -h 127.0.0.1 -p "$PG_PORT" -U conveyor -d postgres -tAc "select 1 from pg_database where datname='conveyor'" | grep -q 1; then
    psql -q -h 127.0.0.1 -p "$PG_PORT" -U conveyor -d postgres -c 'create database conveyor'
  fi
}

redis_up() {
  local d="$1/redis"
  if redis_running; then return; fi
  mkdir -p "$d"
  log "starting Redis on 127.0.0.1:$REDIS_PORT (AOF on, appendfsync always)"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$d" --daemonize yes \
    --pidfile "$d/redis.pid" --logfile "$d/redis.log" \
    --appendonly yes --appendfsync always --save '' >/dev/null
  for _ in $(seq 50); do redis_running && return; sleep 0.1; done
  die "Redis did not start; see $d/redis.log"
}

# the plugins Conveyor needs: the management API (bounded queues' policies) and
# the consistent-hash exchange (lanes: docs/contract.md, section 10)
RABBIT_PLUGINS='[rabbitmq_management,rabbitmq_consistent_hash_exchange].'
rabbit_up() {
  local st=$1
  if rabbit_running "$st"; then
    rabbit_env "$st"
    if [ "$(cat "$RABBITMQ_ENABLED_PLUGINS_FILE" 2>/dev/null)" != "$RABBIT_PLUGINS" ]; then
      log "enabling RabbitMQ's consistent-hash exchange (a server started before lanes)"
      echo "$RABBIT_PLUGINS" > "$RABBITMQ_ENABLED_PLUGINS_FILE"
      rabbitmq-plugins -q -n "$RABBITMQ_NODENAME" enable --online rabbitmq_consistent_hash_exchange >/dev/null ||
        die "cannot enable rabbitmq_consistent_hash_exchange"
    fi
    return
  fi
  rabbit_env "$st"
  mkdir -p "$st/rabbitmq/mnesia" "$st/rabbitmq/log"
  echo "$RABBIT_PLUGINS" > "$RABBITMQ_ENABLED_PLUGINS_FILE"
  printf 'loopback_users.guest = true\nlisteners.tcp.default = 127.0.0.1:%s\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\n' \
    "$AMQP_PORT" "$AMQP_MGMT_PORT" > "$st/rabbitmq/rabbitmq.conf"
  # a dead-lettered message a full queue refused (at-least-once dead-lettering of the
  # delay queues) is offered again after this long (RabbitMQ's default: 2 min)
  echo '[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 5000}]}].' > "$RABBITMQ_ADVANCED_CONFIG_FILE"
  chown -R rabbitmq:rabbitmq "$st/rabbitmq"
  log "starting RabbitMQ on 127.0.0.1:$AMQP_PORT (about 10 s)"
  rm -f "$RABBITMQ_PID_FILE"
  nohup rabbitmq-server > "$st/rabbitmq/log/console.log" 2>&1 &
  for _ in $(seq 100); do [ -f "$RABBITMQ_PID_FILE" ] && break; sleep 0.2; done
  timeout 120 rabbitmqctl -q -n "$RABBITMQ_NODENAME" wait "$RABBITMQ_PID_FILE" >/dev/null 2>&1 ||
    die "RabbitMQ did not start; see $st/rabbitmq/log"
}

# The servers' ports lie in Linux's ephemeral range (32768-60999): a client
# socket may take one as its local port while a server is down (a chaos restart,
# the TLS test's own servers) and the server then cannot listen on it. Reserving
# them keeps the kernel from handing them out; where /proc/sys is read-only it
# is said and skipped.
TLS_TEST_PORTS=${CONVEYOR_TLS_PORT_BASE:-57000}  # and the failover test's (57030-57041)
reserve_ports() {
  local f=/proc/sys/net/ipv4/ip_local_reserved_ports
  local want="$PG_PORT,$REDIS_PORT,$AMQP_PORT,$AMQP_DIST_PORT,$AMQP_MGMT_PORT,$TLS_TEST_PORTS-$((TLS_TEST_PORTS + 49))"
  local have; have=$(cat "$f" 2>/dev/null) || return 0
  local merged=${have:+$have,}$want
  if ! echo "$merged" > "$f" 2>/dev/null; then
    log "cannot reserve ports $want in $f (read-only): a client socket may take one while its server restarts"
  fi
}

cmd_up() {
  cmd_install
  local st; st=$(state_dir)
  reserve_ports
  pg_up "$st"; redis_up "$st"; rabbit_up "$st"
  log "all up (state in $st)"
}

cmd_down() {
  local st; st=$(state_dir)
  if [ -f "$st/pg/postmaster.pid" ]; then
    su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -w -D '$st/pg' -m fast stop" >/dev/null 2>&1 || true
  fi
  if redis_running; then redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true; fi
  rabbit_env "$st"
  if [ -f "$RABBITMQ_PID_FILE" ]; then
    timeout 60 rabbitmqctl -q -n "$RABBITMQ_NODENAME" stop "$RABBITMQ_PID_FILE" >/dev/null 2>&1 || true
    rm -f "$RABBITMQ_PID_FILE"
  fi
  log "all down"
}

cmd_status() {
  local st; st=$(state_dir)
  pg_running && echo "postgresql: up (127.0.0.1:$PG_PORT)" || echo "postgresql: down"
  redis_running && echo "redis: up (127.0.0.1:$REDIS_PORT)" || echo "redis: down"
  rabbit_running "$st" && echo "rabbitmq: up (127.0.0.1:$AMQP_PORT)" || echo "rabbitmq: down"
}

cmd_env() {
  cat <<ENV
export CONVEYOR_DATABASE_URL='postgresql://conveyor@127.0.0.1:$PG_PORT/conveyor'
export CONVEYOR_RABBITMQ_URL='amqp://guest:guest@127.0.0.1:$AMQP_PORT'
export CONVEYOR_REDIS_URL='redis://127.0.0.1:$REDIS_PORT/0'
export CONVEYOR_RABBITMQ_MANAGEMENT_URL='http://guest:guest@127.0.0.1:$AMQP_MGMT_PORT'
ENV
}

case "${1:-}" in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  state) state_dir ;;
  pg-restart)  # a crash and restart of PostgreSQL (tests): immediate stop, then start
    st=$(state_dir)
    su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -w -t 60 -D '$st/pg' -m immediate -l '$st/pg/server.log' restart" >/dev/null ;;
  pg-stop)  # a clean stop of PostgreSQL (tests: "terminating connection due to administrator command"); `up` starts it
    st=$(state_dir)
    su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -w -t 60 -D '$st/pg' -m fast stop" >/dev/null ;;
  rabbit-env) st=$(state_dir); rabbit_env "$st"; env | grep '^RABBITMQ_' ;;
  reset) cmd_down; st=$(state_dir); rm -rf "${st:?}"/*; log "state removed" ;;
  -h|--help|help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "usage: $0 install|up|down|status|env|state|reset (see --help)" >&2; exit 2 ;;
esac
