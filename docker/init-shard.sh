#!/bin/sh
# Creates the fanout role and the tenant databases listed in $TENANT_DATABASES on a shard server.
# psql quotes the password and the names itself (:'var', :"var"): whatever they hold stays a
# literal, and the password is read from the environment, never put on a command line.
set -euf  # -f: the names are split on spaces, never globbed
: "${SHARD_PASSWORD:?}"  # psql's \getenv (psql 15+) would leave an unset one to a syntax error
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<'SQL'
\getenv password SHARD_PASSWORD
CREATE ROLE fanout LOGIN PASSWORD :'password';
SQL
for db in $TENANT_DATABASES; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" -v database="$db" <<'SQL'
CREATE DATABASE :"database" OWNER fanout;
SQL
done
