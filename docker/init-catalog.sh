#!/bin/sh
# The catalog: a database whose `shards` table is fanout's shard directory (kind = "sql"),
# readable by a role that may only read it.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE ROLE catalog_reader LOGIN PASSWORD '${CATALOG_PASSWORD}';
CREATE DATABASE catalog;
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname catalog -f /fanout/catalog.sql
