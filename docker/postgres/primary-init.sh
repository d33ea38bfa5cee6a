#!/bin/sh
# The primary's first start (docker-entrypoint-initdb.d): replication connections
# from the standby, and synchronous replication from the next start on (set
# now, the init's own statements would wait for a standby that is not there yet).
set -eu
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" \
  -c "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 (standby)'"
