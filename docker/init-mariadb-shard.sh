#!/bin/sh
# Creates the fanout user and the tenant databases listed in $TENANT_DATABASES on a MariaDB shard
# server (the image's entrypoint runs this once, against its socket-only first start).
set -eu
sql="CREATE USER 'fanout'@'%' IDENTIFIED BY '${SHARD_PASSWORD}';"
for db in $TENANT_DATABASES; do
  sql="$sql CREATE DATABASE \`$db\`; GRANT ALL PRIVILEGES ON \`$db\`.* TO 'fanout'@'%';"
done
MYSQL_PWD="$MARIADB_ROOT_PASSWORD" mariadb --protocol=socket --user=root -e "$sql"
