"""A transaction-mode pooler is refused before any lock; a session-mode one works. Real PgBouncer."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import MIGRATIONS, PASSWORD_VARIABLE, Fleet
from pgbouncer import PgBouncer, binary

from fanout.embedded import EmbeddedPostgres
from fanout.errors import EXIT_OK, EXIT_TARGETS_FAILED


@pytest.fixture(scope="module")
def pgbouncer_executable() -> str:
    return binary()


@pytest.fixture
def transaction_pool(pgbouncer_executable: str, postgres: EmbeddedPostgres) -> Iterator[PgBouncer]:
    with PgBouncer(pgbouncer_executable, postgres, "transaction") as bouncer:
        yield bouncer


@pytest.fixture
def session_pool(pgbouncer_executable: str, postgres: EmbeddedPostgres) -> Iterator[PgBouncer]:
    with PgBouncer(pgbouncer_executable, postgres, "session") as bouncer:
        yield bouncer


def _through(bouncer: PgBouncer, database: str) -> str:
    return f"postgresql://postgres:${{{PASSWORD_VARIABLE}}}@{bouncer.host}:{bouncer.port}/{database}"


def test_a_transaction_mode_pooler_is_refused_before_any_lock_or_table(
    fleet: Fleet, transaction_pool: PgBouncer
) -> None:
    names = fleet.add_databases(3)
    fleet.publish(MIGRATIONS)
    fleet.write_env([{"id": name, "dsn": _through(transaction_pool, name)} for name in names])

    applied = fleet.cli("apply", "--env", "test", "--format", "json")
    planned = fleet.cli("plan", "--env", "test", "--format", "json")

    for result in (applied, planned):
        assert result.exit_code == EXIT_TARGETS_FAILED, result.output
        for row in json.loads(result.stdout)["results"]:
            assert row["status"] == "failed"
            assert row["error"]["kind"] == "pooler"
            message = row["error"]["message"]
            assert f"a transaction-mode pooler serves 127.0.0.1:{transaction_pool.port}" in message
            assert "Refused before taking any lock" in message
    for name in names:  # nothing was created, locked or applied
        assert fleet.tables(name) == set()
        assert fleet.query(name, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]


def test_a_session_mode_pooler_keeps_working_with_schema_per_tenant_targets(
    fleet: Fleet, session_pool: PgBouncer
) -> None:
    first, second = fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    fleet.write_env(
        [
            {"id": first, "dsn": _through(session_pool, first)},
            {"id": f"{second}/tenant_a", "dsn": _through(session_pool, second), "schema": "tenant_a"},
        ]
    )

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    assert [row["status"] for row in json.loads(result.stdout)["results"]] == ["applied", "applied"]
    assert fleet.applied(first) == ["001-create-person", "002-add-address", "003-create-order"]
    assert {"_yoyo_migration", "person"} <= fleet.tables(second, "tenant_a")  # search_path held all along
    assert "person" not in fleet.tables(second)
    again = fleet.cli("plan", "--env", "test", "--format", "json")
    assert again.exit_code == EXIT_OK, again.output
