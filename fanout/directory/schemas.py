"""Schema-per-tenant discovery: one target per tenant schema inside each database.

Used with any backend (`[directory.schemas]`): each listed database is opened read-only
and its tenant schemas are enumerated with a LIKE pattern on schema names or with a
query that returns schema names. Each schema becomes a target whose yoyo tables live in
that schema.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import psycopg2

from fanout.config import SchemaDiscovery
from fanout.directory import Target
from fanout.engines.postgres.cancel import PgCancel
from fanout.errors import DirectoryError
from fanout.interrupt import Watchdog
from fanout.secret import error_line

DISCOVERY_WORKERS = 16
CONNECT_TIMEOUT_SECONDS = 10
QUERY_TIMEOUT_SECONDS = 60.0  # the discovery query's statement_timeout, and how long a silent database is awaited
_PATTERN_QUERY = "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s ORDER BY 1"


def discover_schemas(targets: Sequence[Target], discovery: SchemaDiscovery) -> list[Target]:
    # The server's statement_timeout answers first; the watchdog only acts on a database gone
    # silent (a hung proxy), which would otherwise keep the listing, and the run, waiting for ever.
    watchdog = Watchdog(grace=1.0)
    with ThreadPoolExecutor(max_workers=DISCOVERY_WORKERS, thread_name_prefix="fanout-schemas") as pool:
        expanded = pool.map(lambda t: _expand(t, discovery, watchdog), targets)
        return [target for group in expanded for target in group]


def _expand(target: Target, discovery: SchemaDiscovery, watchdog: Watchdog) -> list[Target]:
    if target.engine != "postgresql":
        return [target]  # a MySQL/MariaDB database has no schemas: it stays one target
    kwargs = target.libpq_kwargs(
        application_name="fanout directory", connect_timeout=CONNECT_TIMEOUT_SECONDS, read_only=True
    )
    kwargs["options"] = f"{kwargs['options']} -c statement_timeout={round(QUERY_TIMEOUT_SECONDS * 1000)}"
    try:
        connection = psycopg2.connect(**kwargs)
    except psycopg2.Error as e:
        raise DirectoryError(f"cannot list the schemas of {target.display}: {error_line(e, 1)}") from None
    cancel = PgCancel(connection)
    watched = watchdog.watch(cancel, time.monotonic() + QUERY_TIMEOUT_SECONDS + 1.0)
    try:
        with connection.cursor() as cursor:
            if discovery.pattern is not None:
                cursor.execute(_PATTERN_QUERY, (discovery.pattern,))
            else:
                assert discovery.query is not None
                cursor.execute(discovery.query)
            schemas = [str(row[0]) for row in cursor.fetchall()]
    except psycopg2.Error as e:
        if watched.abandoned:
            raise DirectoryError(
                f"schema discovery on {target.display}: the database stopped answering: "
                f"no answer within {QUERY_TIMEOUT_SECONDS:g}s"
            ) from None
        raise DirectoryError(f"schema discovery failed on {target.display}: {error_line(e, 1)}") from None
    finally:
        watchdog.release(watched)
        cancel.close()
        with contextlib.suppress(psycopg2.Error):
            connection.rollback()
        connection.close()
    return [replace(target, id=f"{target.id}/{schema}", schema=schema, tenants=(schema,)) for schema in schemas]
