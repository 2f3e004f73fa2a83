#!/bin/sh
# Creates the fanout role and the tenant databases listed in $TENANT_DATABASES on a shard server.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE ROLE fanout LOGIN PASSWORD '${SHARD_PASSWORD}';
SQL
for db in $TENANT_DATABASES; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" -c "CREATE DATABASE $db OWNER fanout"
done
