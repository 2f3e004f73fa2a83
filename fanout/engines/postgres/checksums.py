"""Content checksums on PostgreSQL (what they are: `fanout/checksums.py`).

Every function takes a psycopg2 connection or cursor and the schema that holds the
tables (names are qualified, so a migration's `search_path` cannot redirect them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

# The shared names, re-exported: the engine's modules use this one module for both.
from fanout.checksums import LOG_TABLE as LOG_TABLE, TABLE as TABLE, WHO as WHO, How as How, Recorded as Recorded
from fanout.engines.postgres.locking import qualified


def create_sql(schema: str, text: str = "TEXT") -> str:
    """The statement that creates the checksum table in `schema` when missing (`text`: its text columns' type)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {qualified(schema, TABLE)} ("
        f'"migration_id" {text} PRIMARY KEY, "sha256" {text} NOT NULL, "service" {text} NOT NULL, '
        f'"environment" {text} NOT NULL, "recorded_at" TIMESTAMP NOT NULL, "how" {text} NOT NULL)'
    )


def create_log_sql(schema: str) -> str:
    """The statement that creates the log table in `schema` when missing.

    Created when first written (an accept, a rollback, a hook), not with the other tables:
    most shards never write it, and its five relations were a sixth of the server time
    fanout spent on each new tenant schema.
    """
    return (
        f"CREATE TABLE IF NOT EXISTS {qualified(schema, LOG_TABLE)} ("
        '"id" BIGSERIAL PRIMARY KEY, "migration_id" TEXT NOT NULL, "old_sha256" TEXT, "new_sha256" TEXT NOT NULL, '
        '"action" TEXT NOT NULL, "reason" TEXT, "by" TEXT NOT NULL, "at" TIMESTAMP NOT NULL)'
    )


def read(cursor: Any, schema: str, *, exists: bool | None = None) -> dict[str, Recorded]:
    """Every recorded checksum of the shard; empty when the table does not exist (yet)."""
    if exists is None:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (qualified(schema, TABLE),))
        exists = bool(cursor.fetchone()[0])
    if not exists:
        return {}
    cursor.execute(f"SELECT {_COLUMNS} FROM {qualified(schema, TABLE)}")
    return from_json(cursor.fetchall())


_COLUMNS = '"migration_id", "sha256", "service", "environment", "how"'


def json_sql(schema: str) -> str:
    """A scalar subquery: what `read` reads, as one JSON array (for a read folded into a larger query)."""
    return f"(SELECT coalesce(json_agg(json_build_array({_COLUMNS})), '[]') FROM {qualified(schema, TABLE)})"


def from_json(rows: Sequence[Sequence[str]]) -> dict[str, Recorded]:
    """The checksums by migration id, from rows of `_COLUMNS` (as `read` fetches them, or `json_sql` returns them)."""
    return {row[0]: Recorded(*row) for row in rows}


def record_sql(
    cursor: Any,
    schema: str,
    migration_id: str,
    sha256: str,
    service: str,
    environment: str,
    how: How,
    *,
    at: Any = None,
) -> str:
    """The statement that records (or replaces) a checksum, for inclusion in a larger transaction.

    `at` is the time recorded (default: now), or an SQL expression wrapped in psycopg2's AsIs.
    """
    sql: bytes = cursor.mogrify(
        f'INSERT INTO {qualified(schema, TABLE)} ("migration_id", "sha256", "service", "environment", "recorded_at", "how") '
        'VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT ("migration_id") DO UPDATE SET '
        '"sha256" = EXCLUDED."sha256", "service" = EXCLUDED."service", "environment" = EXCLUDED."environment", '
        '"recorded_at" = EXCLUDED."recorded_at", "how" = EXCLUDED."how"',
        (migration_id, sha256, service, environment, _now() if at is None else at, how.value),
    )
    return sql.decode()


def unrecord_sql(cursor: Any, schema: str, migration_id: str) -> str:
    """The statement that forgets a rolled-back migration's checksum, for inclusion in a larger transaction.

    Deleted rather than marked: a shard that no longer has the migration has no content
    to compare, and the next apply records it afresh (the log keeps the history).
    """
    sql: bytes = cursor.mogrify(f'DELETE FROM {qualified(schema, TABLE)} WHERE "migration_id" = %s', (migration_id,))
    return sql.decode()


def log_sql(
    cursor: Any, schema: str, migration_id: str, old: str | None, new: str, action: How, reason: str | None
) -> str:
    sql: bytes = cursor.mogrify(
        f'INSERT INTO {qualified(schema, LOG_TABLE)} ("migration_id", "old_sha256", "new_sha256", "action", "reason", "by", "at") '
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (migration_id, old, new, action.value, reason, WHO, _now()),
    )
    return sql.decode()


def failed_hooks(cursor: Any, schema: str) -> set[str] | None:
    """Post-apply hooks whose last run on this shard failed: the next apply runs them even with nothing to apply.

    None when the log table does not exist (yet): nothing has failed.
    """
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (qualified(schema, LOG_TABLE),))
    if not cursor.fetchone()[0]:
        return None
    cursor.execute(
        'SELECT "migration_id" FROM (SELECT DISTINCT ON ("migration_id") "migration_id", "action" '
        f'FROM {qualified(schema, LOG_TABLE)} WHERE "action" IN (%s, %s) ORDER BY "migration_id", "id" DESC) AS "last" '
        'WHERE "action" = %s',
        (How.HOOK_FAILED.value, How.HOOK_RAN.value, How.HOOK_FAILED.value),
    )
    return {row[0] for row in cursor.fetchall()}


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
