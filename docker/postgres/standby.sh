#!/bin/sh
# The standby: on its first start, a copy of the primary (pg_basebackup -R: it
# streams from it from then on, as application_name "standby", which the
# primary waits for on every commit); then the server. Promote it with
#   docker compose exec -u postgres postgres-standby pg_ctl promote
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_isready -h postgres-primary -U "$POSTGRES_USER" -q; do sleep 1; done
  mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
  gosu postgres env PGPASSWORD="$POSTGRES_PASSWORD" pg_basebackup -h postgres-primary -U "$POSTGRES_USER" \
    -D "$PGDATA" -X stream -R -c fast
  # streams as "standby"; waits for no standby of its own once promoted (the
  # primary's synchronous_standby_names came along with the copy)
  printf "%s\n" "primary_conninfo = 'host=postgres-primary user=$POSTGRES_USER password=$POSTGRES_PASSWORD application_name=standby'" \
    "synchronous_standby_names = ''" >> "$PGDATA/postgresql.auto.conf"
fi
exec gosu postgres postgres
