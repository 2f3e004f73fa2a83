#!/bin/sh
# The catalog: a database whose `shards` table is fanout's shard directory (kind = "sql"),
# readable by a role that may only read it. psql quotes the password (:'password'), read from
# the environment, never put on a command line.
set -eu
: "${CATALOG_PASSWORD:?}"  # psql's \getenv (psql 15+) would leave an unset one to a syntax error
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<'SQL'
\getenv password CATALOG_PASSWORD
CREATE ROLE catalog_reader LOGIN PASSWORD :'password';
CREATE DATABASE catalog;
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname catalog -f /fanout/catalog.sql
