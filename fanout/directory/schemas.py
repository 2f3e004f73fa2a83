"""Schema-per-tenant discovery: one target per tenant schema inside each database.

Used with any backend (`[directory.schemas]`): each listed database is opened read-only
and its tenant schemas are enumerated with a LIKE pattern on schema names or with a
query that returns schema names. Each schema becomes a target whose yoyo tables live in
that schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import psycopg2

from fanout.config import SchemaDiscovery
from fanout.directory import Target
from fanout.errors import DirectoryError
from fanout.secret import error_line

DISCOVERY_WORKERS = 16
_PATTERN_QUERY = "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s ORDER BY 1"


def discover_schemas(targets: Sequence[Target], discovery: SchemaDiscovery) -> list[Target]:
    with ThreadPoolExecutor(max_workers=DISCOVERY_WORKERS, thread_name_prefix="fanout-schemas") as pool:
        expanded = pool.map(lambda t: _expand(t, discovery), targets)
        return [target for group in expanded for target in group]


def _expand(target: Target, discovery: SchemaDiscovery) -> list[Target]:
    if target.engine != "postgresql":
        return [target]  # a MySQL/MariaDB database has no schemas: it stays one target
    kwargs = target.libpq_kwargs(application_name="fanout directory", connect_timeout=10, read_only=True)
    try:
        connection = psycopg2.connect(**kwargs)
    except psycopg2.Error as e:
        raise DirectoryError(f"cannot list the schemas of {target.display}: {error_line(e, 1)}") from None
    try:
        with connection.cursor() as cursor:
            if discovery.pattern is not None:
                cursor.execute(_PATTERN_QUERY, (discovery.pattern,))
            else:
                assert discovery.query is not None
                cursor.execute(discovery.query)
            schemas = [str(row[0]) for row in cursor.fetchall()]
    except psycopg2.Error as e:
        raise DirectoryError(f"schema discovery failed on {target.display}: {error_line(e, 1)}") from None
    finally:
        connection.rollback()
        connection.close()
    return [replace(target, id=f"{target.id}/{schema}", schema=schema, tenants=(schema,)) for schema in schemas]
