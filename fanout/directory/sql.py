"""The catalog directory: a query against a metadata database, one row per shard.

The query runs in a READ ONLY transaction and may use `%(env)s` (the environment's
name). Columns are read by name: `shard_id` (or `id`), `host`, `port`, `dbname` (or
`database`) are required; `user`, `password`, `schema`, `tenants` (an array or a
comma-separated string), `sslmode` and `flavor` are optional. Credentials missing from the rows
come from the directory's `user`/`password` settings. `flavor` is the row's engine, as the
HTTP directory's field: `postgresql` (also `postgres`, `pg`; the default when the column is
absent or NULL) or `mysql`/`mariadb` (one engine: the server's flavor is read when
connecting); a MySQL row has no `schema` nor `sslmode` (PostgreSQL's).
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

import psycopg2

from fanout.config import SqlDirectoryConfig
from fanout.directory import DEFAULT_TCP, FLAVORS, FLAVORS_HELP, MYSQL, POSTGRESQL, Target
from fanout.engines.postgres.cancel import PgCancel
from fanout.errors import ConfigError, DirectoryError
from fanout.interrupt import Watchdog
from fanout.secret import Secret, error_line, register

_APPLICATION_NAME = "fanout directory"
_READ_ONLY = "-c default_transaction_read_only=on"
_KEYWORD_PASSWORD = re.compile(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")
_QUOTED = re.compile(r'"[^"]*"')


class SqlDirectory:
    def __init__(self, config: SqlDirectoryConfig, environment: str) -> None:
        self._config = config
        self._environment = environment

    def targets(self) -> list[Target]:
        rows = self._rows()
        return [self._target(index, row) for index, row in enumerate(rows)]

    def _rows(self) -> list[dict[str, Any]]:
        try:
            connection = psycopg2.connect(**self._connect_kwargs())
        except psycopg2.Error as e:
            raise DirectoryError(f"cannot connect to the catalog database: {error_line(e, 1)}") from None
        # The server's statement_timeout answers first; the watchdog only acts on a catalog gone silent.
        watchdog = Watchdog(grace=1.0)
        cancel = PgCancel(connection)
        watched = watchdog.watch(cancel, time.monotonic() + self._config.timeout + 1.0)
        try:
            connection.set_session(readonly=True)
            with connection.cursor() as cursor:
                cursor.execute(self._config.query, {"env": self._environment})
                if cursor.description is None:
                    raise DirectoryError("the catalog query returned no result set")
                columns = [c.name for c in cursor.description]
                return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        except psycopg2.Error as e:
            if watched.abandoned:
                raise DirectoryError(
                    f"the catalog database stopped answering: no answer within {self._config.timeout:g}s (timeout)"
                ) from None
            raise DirectoryError(f"the catalog query failed: {error_line(e, 1)}") from None
        finally:
            watchdog.release(watched)
            cancel.close()
            with contextlib.suppress(psycopg2.Error):
                connection.rollback()
            connection.close()

    def _connect_kwargs(self) -> dict[str, Any]:
        """Parsed by fanout, not libpq: libpq quotes the malformed piece of a DSN, password included.

        `timeout` bounds the connection and (as statement_timeout) the query; keepalives and
        tcp_user_timeout end a wait on a catalog that vanished.
        """
        dsn = self._config.dsn.reveal()
        timeout = self._config.timeout
        statement_timeout = f"-c statement_timeout={round(timeout * 1000)}"
        if "://" not in dsn:  # a libpq keyword string (host=... password=...)
            for match in _KEYWORD_PASSWORD.finditer(dsn):
                register(match.group(1).strip("'"))
            try:
                psycopg2.extensions.parse_dsn(dsn)
            except psycopg2.ProgrammingError as e:
                # libpq quotes the word it could not read: with an unquoted space in the password,
                # that word is the password's second half.
                problem = _QUOTED.sub(
                    lambda m: m.group(0) if m.group(0) == '"="' else '"***"',
                    error_line(e, 1).removeprefix("invalid dsn: "),
                )
                raise ConfigError(f"directory.dsn: not a valid key=value connection string: {problem}") from None
            return {"dsn": dsn, "connect_timeout": max(1, round(timeout)), "application_name": _APPLICATION_NAME,
                    "options": f"{_READ_ONLY} {statement_timeout}", **DEFAULT_TCP.libpq()}  # fmt: skip
        catalog = Target.from_dsn("catalog", dsn, what="directory.dsn", engines=(POSTGRESQL,))
        kwargs = catalog.libpq_kwargs(application_name=_APPLICATION_NAME, connect_timeout=timeout, read_only=True)
        kwargs["options"] = f"{kwargs['options']} {statement_timeout}"
        return kwargs

    def _target(self, index: int, row: dict[str, Any]) -> Target:
        shard_id = row.get("shard_id", row.get("id"))
        dbname = row.get("dbname", row.get("database"))
        where = f"catalog row {index + 1}" + (f" (shard {shard_id})" if shard_id is not None else "")
        missing = [
            name
            for name, value in (
                ("shard_id", shard_id),
                ("host", row.get("host")),
                ("port", row.get("port")),
                ("dbname", dbname),
            )
            if value in (None, "")
        ]
        if missing:
            raise DirectoryError(f"{where}: missing column or value: {', '.join(missing)}")
        try:
            port = int(row["port"])
        except (TypeError, ValueError):
            raise DirectoryError(f"{where}: port {row['port']!r} is not a number") from None
        flavor = row.get("flavor")
        engine = POSTGRESQL if flavor in (None, "") else FLAVORS.get(str(flavor).lower())
        if engine is None:
            raise DirectoryError(f"{where}: flavor {flavor!r} is {FLAVORS_HELP}")
        if engine == MYSQL:
            for postgresql_only in ("schema", "sslmode"):
                if row.get(postgresql_only):
                    raise DirectoryError(
                        f"{where}: a {str(flavor).lower()} database takes no {postgresql_only} "
                        f"(got {postgresql_only} {row[postgresql_only]!r})"
                    )
        password = row.get("password")
        tenants = row.get("tenants") or ()
        if isinstance(tenants, str):
            tenants = [t.strip() for t in tenants.split(",") if t.strip()]
        options = (("sslmode", str(row["sslmode"])),) if row.get("sslmode") else ()
        return Target(
            id=str(shard_id),
            host=str(row["host"]),
            port=port,
            dbname=str(dbname),
            user=row.get("user") or self._config.user,
            password=Secret(str(password)) if password else self._config.password,
            schema=row.get("schema") or None,
            options=options,
            tenants=tuple(str(t) for t in tenants),
            engine=engine,
        )
