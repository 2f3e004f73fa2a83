"""What a yoyo migration is as PostgreSQL statements, and what a shard holds of one (yoyo's table, in-doubt checks)."""

from __future__ import annotations

from typing import Any

from yoyo.migrations import Migration, MigrationStep, TransactionWrapper

from fanout.engines.postgres import indoubt, locking
from fanout.report import InDoubt

MIGRATION_TABLE = "_yoyo_migration"
VERSION_TABLE = "_yoyo_version"


def applied_json_sql(schema: str) -> str:
    """A scalar subquery: yoyo's records of the applied migrations (hash, id), as one JSON array.

    A scalar subquery so that a session reads them in the round trip of its other reads."""
    return (
        '(SELECT coalesce(json_agg(json_build_array("migration_hash", "migration_id")), \'[]\') '
        f"FROM {locking.qualified(schema, MIGRATION_TABLE)})"
    )


def applied_from_json(rows: list[list[str]]) -> dict[str, str]:
    return {row[0]: row[1] for row in rows}


def plain_rollback_sql(migration: Migration) -> list[str] | None:
    """The statements of a transactional .sql migration's rollback file, in yoyo's order; None when it needs yoyo's steps.

    yoyo pairs the rollback file's statements with the migration's steps and runs the
    steps in reverse, which executes the rollback statements in file order.
    """
    if not (migration.is_raw_sql() and migration.use_transactions):
        return None
    statements = []
    for step in reversed(migration.steps):
        if not isinstance(step, TransactionWrapper) or step.ignore_errors is not None:
            return None
        inner = step.step
        if type(inner) is not MigrationStep or not isinstance(inner._rollback, str | None):
            return None
        if inner._rollback:
            statements.append(inner._rollback)
    return statements


def sql_statements(migration: Migration) -> list[str] | None:
    """The SQL statements of a .sql migration, in order; None when it has Python steps."""
    statements = []
    for step in migration.steps:
        inner = getattr(step, "step", None)
        if (
            not isinstance(inner, MigrationStep)
            or type(inner) is not MigrationStep
            or not isinstance(inner._apply, str)
        ):
            return None
        statements.append(inner._apply)
    return statements


def examine(
    cursor: Any, schema: str, only_schema: bool, migration: Migration, mark: indoubt.Mark
) -> tuple[InDoubt, indoubt.Found, bool]:
    """What the shard holds of a migration in doubt, and whether it is an index-only migration."""
    builds, only = indoubt.index_builds(sql_statements(migration) or [])
    _, invalid_now = indoubt.read(cursor, schema, only_schema=only_schema, marks=False)
    found = indoubt.inspect(cursor, builds, invalid_now, mark.invalid_before)
    doubt = InDoubt(
        migration.id, mark.operation, mark.run_id, mark.host, mark.pid, mark.started_at,
        found.invalid, found.valid, found.missing,
    )  # fmt: skip
    return doubt, found, only


def plain_sql(migration: Migration) -> list[str] | None:
    """The statements of a transactional .sql migration; None when it needs yoyo's steps."""
    if not (migration.is_raw_sql() and migration.use_transactions):
        return None
    statements = []
    for step in migration.steps:
        if not isinstance(step, TransactionWrapper) or step.ignore_errors is not None:
            return None
        inner = step.step
        if type(inner) is not MigrationStep or not isinstance(inner._apply, str):
            return None
        statements.append(inner._apply)
    return statements
