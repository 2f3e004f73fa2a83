#!/bin/sh
# Creates the fanout user and the tenant databases listed in $TENANT_DATABASES on a MariaDB shard
# server (the image's entrypoint runs this once, against its socket-only first start).
# The password is escaped for a string literal (\ and '), each name for a quoted identifier (`),
# and the statements go to the client on its input, never on its command line.
set -euf  # -f: the names are split on spaces, never globbed
literal() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e "s/'/''/g"; }
identifier() { printf '%s' "$1" | sed -e 's/`/``/g'; }
sql="CREATE USER 'fanout'@'%' IDENTIFIED BY '$(literal "$SHARD_PASSWORD")';"
for db in $TENANT_DATABASES; do
  name=$(identifier "$db")
  sql="$sql CREATE DATABASE \`$name\`; GRANT ALL PRIVILEGES ON \`$name\`.* TO 'fanout'@'%';"
done
printf '%s\n' "$sql" | MYSQL_PWD="$MARIADB_ROOT_PASSWORD" mariadb --protocol=socket --user=root
