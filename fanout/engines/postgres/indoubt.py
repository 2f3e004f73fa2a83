"""Non-transactional migrations on PostgreSQL: the marks, and what a shard holds of one in doubt
(what a mark is: `fanout/indoubt.py`).

Every function takes a psycopg2 cursor; the SQL reads (inspection) work inside a
read-only transaction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fanout.engines.postgres.locking import qualified

# The shared names, re-exported: the engine's modules use this one module for both.
from fanout.indoubt import TABLE as TABLE, Mark as Mark


def create_sql(schema: str) -> str:
    """The statement that creates the marks table in `schema` when missing.

    Created before the first mark is written (a non-transactional migration), not with the
    other tables: most shards never hold a mark. A missing table holds no mark.
    """
    return (
        f"CREATE TABLE IF NOT EXISTS {qualified(schema, TABLE)} ("
        '"migration_id" TEXT PRIMARY KEY, "operation" TEXT NOT NULL, "run_id" TEXT NOT NULL, "host" TEXT NOT NULL, '
        '"pid" INT NOT NULL, "backend_pid" INT NOT NULL, "started_at" TIMESTAMP NOT NULL, '
        '"invalid_before" TEXT[] NOT NULL)'
    )


# Every INVALID index fanout can see, the select list's `name` being its schema.name.
_EVERY_INVALID = (
    "FROM pg_catalog.pg_index i "
    "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "CROSS JOIN LATERAL format('%I.%I', n.nspname, c.relname) AS shown(name) "
    "WHERE NOT i.indisvalid AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
)
# As one array; `{where}` narrows it to a target's schema.
_INVALID_SQL = "SELECT coalesce(array_agg(name ORDER BY name), '{{}}') " + _EVERY_INVALID + " {where}"

# The INVALID indexes of one schema, through indexed lookups only: the schema's relations by their
# dependency on it (pg_depend), their indexes (pg_index by indrelid). Scanning pg_index instead
# costs time in proportion to every index of the database, for each of thousands of tenant schemas.
# No join either: planning joins of catalogs that other sessions are filling (DDL in other tenant
# schemas) probes the ends of their indexes for merge-join estimates, 2.7 ms of planning per schema
# at 10,000 schemas, four times the execution; lookups by a subquery's value are not estimated that way.
# An index lives in the schema of its table, so the schema's name is the index's.
_SCHEMA_INVALID_SQL = (
    "SELECT coalesce(array_agg(name ORDER BY name), '{{}}') FROM (SELECT format('%I.%I', '{schema}', "
    "(SELECT c.relname FROM pg_catalog.pg_class c WHERE c.oid = i.indexrelid)) AS name "
    "FROM pg_catalog.pg_index i WHERE NOT i.indisvalid AND i.indrelid = ANY (ARRAY("
    "SELECT d.objid FROM pg_catalog.pg_depend d WHERE d.refclassid = 'pg_catalog.pg_namespace'::regclass "
    "AND d.classid = 'pg_catalog.pg_class'::regclass "
    "AND d.refobjid = (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = '{schema}')))) AS invalid"
)
# Every INVALID index of the database, as pairs of its schema and schema.name: a plan over many
# tenant schemas of one database reads them once (one scan of pg_index, 10-20 ms at 10,000
# schemas) instead of once per schema (0.47 ms of server CPU each, a third of a plan's reads).
INVALID_BY_SCHEMA_SQL = (
    "SELECT coalesce(json_agg(json_build_array(n.nspname, name) ORDER BY name), '[]') " + _EVERY_INVALID
)


def invalid_by_schema(pairs: Sequence[Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """`INVALID_BY_SCHEMA_SQL`'s pairs as each schema's INVALID indexes, in `invalid_sql`'s order."""
    by_schema: dict[str, list[str]] = {}
    for schema, index in pairs:
        by_schema.setdefault(schema, []).append(index)
    return {schema: tuple(indexes) for schema, indexes in by_schema.items()}


# Schemas made by initdb are pinned on PostgreSQL 14 and older: no dependency on them is recorded.
_PINNED = frozenset({"public", "pg_catalog", "information_schema", "pg_toast"})


def invalid_sql(only: str | None) -> str:
    """A query returning one row, one array: every INVALID index (only those of schema `only`, when given)."""
    if only is not None and only not in _PINNED:
        return _SCHEMA_INVALID_SQL.format(schema=only.replace("'", "''"))
    where = "AND n.nspname = '" + only.replace("'", "''") + "'" if only is not None else ""
    return _INVALID_SQL.format(where=where)


def mark_sql(
    cursor: Any,
    schema: str,
    migration_id: str,
    *,
    operation: str,
    run_id: str,
    host: str,
    pid: int,
    invalid: Sequence[str],
) -> str:
    """The statement that marks a migration as started (committed on its own, before the migration runs)."""
    sql: bytes = cursor.mogrify(
        f'INSERT INTO {qualified(schema, TABLE)} ("migration_id", "operation", "run_id", "host", "pid", "backend_pid", "started_at", '
        '"invalid_before") VALUES (%s, %s, %s, %s, %s, pg_backend_pid(), '
        "(clock_timestamp() AT TIME ZONE 'UTC'), %s::text[]) "
        'ON CONFLICT ("migration_id") DO UPDATE SET "operation" = EXCLUDED."operation", "run_id" = EXCLUDED."run_id", '
        '"host" = EXCLUDED."host", "pid" = EXCLUDED."pid", "backend_pid" = EXCLUDED."backend_pid", '
        '"started_at" = EXCLUDED."started_at", "invalid_before" = EXCLUDED."invalid_before"',
        (migration_id, operation, run_id, host, pid, list(invalid)),
    )
    return sql.decode()


def clear_sql(cursor: Any, schema: str, migration_id: str) -> str:
    """The statement that clears a migration's mark; part of the transaction that records (or unmarks) it."""
    sql: bytes = cursor.mogrify(f'DELETE FROM {qualified(schema, TABLE)} WHERE "migration_id" = %s', (migration_id,))
    return sql.decode()


def read(
    cursor: Any, schema: str, *, only_schema: bool, marks: bool | None = True
) -> tuple[dict[str, Mark], tuple[str, ...]]:
    """Every mark of the shard and every INVALID index, in one round trip (two when `marks` is None and there are some).

    `marks`: whether the marks table exists; None: find out (it is created with the first mark).
    `only_schema`: only the INVALID indexes of `schema` (a schema-per-tenant target), else all of the database's.
    """
    invalid = invalid_sql(schema if only_schema else None)
    if marks is None:
        exists = cursor.mogrify("to_regclass(%s) IS NOT NULL", (qualified(schema, TABLE),)).decode()
        cursor.execute(f"SELECT inv.names, {exists} FROM ({invalid}) AS inv(names)")
        names, marks = cursor.fetchone()
        if not marks:
            return {}, tuple(names)
    if not marks:
        cursor.execute(invalid)
        return {}, tuple(cursor.fetchone()[0])
    cursor.execute(
        'SELECT inv.names, m."migration_id", m."operation", m."run_id", m."host", m."pid", m."started_at", '
        f'm."invalid_before" FROM ({invalid}) AS inv(names) LEFT JOIN {qualified(schema, TABLE)} m ON true'
    )
    rows = cursor.fetchall()
    found = {
        row[1]: Mark(row[1], row[2], row[3], row[4], row[5], row[6], tuple(row[7] or ()))
        for row in rows
        if row[1] is not None
    }
    return found, tuple(rows[0][0]) if rows else ()


# ---- what a migration builds ------------------------------------------------------------

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_CREATE_INDEX = re.compile(
    rf"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?P<concurrently>CONCURRENTLY\s+)?(?P<ine>IF\s+NOT\s+EXISTS\s+)?"
    rf"(?:(?P<name>{_IDENT})\s+)?ON\s+(?:ONLY\s+)?(?P<table>{_IDENT}(?:\s*\.\s*{_IDENT})?)",
    re.IGNORECASE,
)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


@dataclass(frozen=True, slots=True)
class IndexBuild:
    """A CREATE INDEX statement of a migration."""

    name: str | None  # None: PostgreSQL picks the name
    table: str  # as written (possibly schema-qualified, quoted), resolved like the migration resolves it
    if_not_exists: bool


def index_builds(statements: Sequence[str]) -> tuple[list[IndexBuild], bool]:
    """The indexes a migration's statements create, and whether index builds are all it does."""
    builds: list[IndexBuild] = []
    only = bool(statements)
    for statement in statements:
        text = _COMMENTS.sub(" ", statement).strip().rstrip(";").strip()
        if not text:
            continue
        found = _CREATE_INDEX.match(text)
        if found is None:
            only = False
            continue
        name = found["name"]
        builds.append(IndexBuild(_unquote(name) if name else None, found["table"], bool(found["ine"])))
    return builds, only and all(b.name for b in builds)


def _unquote(identifier: str) -> str:
    if identifier.startswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier.lower()


@dataclass(frozen=True, slots=True)
class Found:
    """What a shard holds of a migration in doubt."""

    invalid: tuple[str, ...]  # INVALID indexes it builds, or that appeared since it started
    valid: tuple[str, ...]  # indexes it builds that exist and are VALID
    missing: tuple[str, ...]  # indexes it builds that do not exist
    own_invalid: tuple[str, ...]  # the INVALID ones it builds by name (what a repair drops)
    blocking: tuple[str, ...]  # VALID ones whose statement has no IF NOT EXISTS: a re-run would fail on them


def inspect(cursor: Any, builds: Sequence[IndexBuild], invalid_now: Sequence[str], since: Sequence[str]) -> Found:
    """Look up each index a migration builds (on its table, as the migration's session would resolve it)."""
    valid: list[str] = []
    invalid: list[str] = []
    missing: list[str] = []
    blocking: list[str] = []
    for build in builds:
        if build.name is None:
            continue
        cursor.execute(
            "SELECT format('%%I.%%I', n.nspname, c.relname), i.indisvalid FROM pg_catalog.pg_index i "
            "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname = %s AND i.indrelid = to_regclass(%s)",
            (build.name, build.table),
        )
        row = cursor.fetchone()
        if row is None:
            missing.append(build.name)
        elif row[1]:
            valid.append(row[0])
            if not build.if_not_exists:
                blocking.append(row[0])
        else:
            invalid.append(row[0])
    appeared = [name for name in invalid_now if name not in since and name not in invalid]
    return Found(tuple(invalid + appeared), tuple(valid), tuple(missing), tuple(invalid), tuple(blocking))


def repairable(only_indexes: bool, found: Found) -> bool:
    """True when dropping `found.own_invalid` and running the migration again is exactly what is needed.

    That holds for a migration that only builds named indexes, when every index still
    there after the drop is one its statement skips (IF NOT EXISTS): nothing else could
    have happened, and nothing else would fail on "already exists".
    """
    return only_indexes and not found.blocking


def drop_sql(index: str) -> str:
    """DROP INDEX CONCURRENTLY for a `schema.name` as `invalid_sql` formats it (already quoted)."""
    return f"DROP INDEX CONCURRENTLY IF EXISTS {index}"
