"""A transaction-mode pooler is refused before any lock; a session-mode one works. Real PgBouncer."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest
from conftest import MIGRATIONS, PASSWORD_VARIABLE, Fleet
from pgbouncer import PgBouncer, binary

from fanout.embedded import EmbeddedPostgres
from fanout.engines.postgres import connection
from fanout.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_TARGETS_FAILED


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


def test_a_full_session_pool_refuses_the_target_in_bounded_time_instead_of_waiting_for_a_server(
    fleet: Fleet, pgbouncer_executable: str, postgres: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pooler check's second connection needs a server session of its own: with a session-mode
    pool of one, none comes while the first connection holds it. PgBouncer would keep the
    second one waiting for `query_wait_timeout` (60 s here, 120 s by default); fanout gives up
    after its `connect_timeout` and says what it could not tell, and why."""
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    with PgBouncer(pgbouncer_executable, postgres, "session", pool_size=1, query_wait_timeout=60) as bouncer:
        dsn = _through(bouncer, name)
        fleet.write_env([{"id": name, "dsn": dsn}], extra="[runner]\nconnect_timeout = 2\n")
        _leave_a_server_session(bouncer, postgres, name)

        started = time.monotonic()
        result = fleet.cli("plan", "--env", "test", "--format", "json")
        elapsed = time.monotonic() - started

    assert result.exit_code == EXIT_TARGETS_FAILED, result.output
    (row,) = json.loads(result.stdout)["results"]
    assert row["status"] == "failed"
    assert row["error"]["kind"] == "pooler"
    message = row["error"]["message"]
    assert f"cannot tell whether a transaction-mode pooler serves 127.0.0.1:{bouncer.port}" in message
    assert "no server session within 2 s" in message
    assert elapsed < 15, elapsed
    assert fleet.tables(name) == set()


def test_a_warm_session_pool_with_a_session_to_spare_passes_the_check(
    fleet: Fleet, pgbouncer_executable: str, postgres: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    asked: list[int | None] = []
    held_session = connection.held_session

    @contextmanager
    def counted(kwargs: dict[str, Any], watch: connection.Watch) -> Iterator[int | None]:
        with held_session(kwargs, watch) as pid:
            asked.append(pid)
            yield pid

    monkeypatch.setattr(connection, "held_session", counted)
    with PgBouncer(pgbouncer_executable, postgres, "session", pool_size=2, query_wait_timeout=60) as bouncer:
        fleet.write_env([{"id": name, "dsn": _through(bouncer, name)}], extra="[runner]\nconnect_timeout = 2\n")
        _leave_a_server_session(bouncer, postgres, name)
        result = fleet.cli("plan", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    assert [row["status"] for row in json.loads(result.stdout)["results"]] == ["pending"]
    assert len(asked) == 1 and asked[0] is not None  # the second connection was asked, and had its own session


def test_a_second_signal_ends_the_wait_for_a_server_session(
    fleet: Fleet, pgbouncer_executable: str, postgres: EmbeddedPostgres
) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    with PgBouncer(pgbouncer_executable, postgres, "session", pool_size=1, query_wait_timeout=120) as bouncer:
        fleet.write_env([{"id": name, "dsn": _through(bouncer, name)}], extra="[runner]\nconnect_timeout = 60\n")
        _leave_a_server_session(bouncer, postgres, name)
        process = fleet.spawn("plan", "--env", "test", "--format", "json")
        deadline = time.monotonic() + 30
        while bouncer.waiting_clients() == 0:  # the check's second connection, queued by PgBouncer
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)

        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        first_warning = process.stderr.readline()
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        stdout, stderr = process.communicate(timeout=30)
        ended_in = time.monotonic() - started

    assert "starting no new target" in first_warning, first_warning + stderr
    assert process.returncode == EXIT_INTERRUPTED, stderr
    (row,) = json.loads(stdout)["results"]
    assert row["error"]["kind"] == "interrupted"
    assert ended_in < 10, ended_in  # not the 60 s connect_timeout, nor PgBouncer's 120 s
    assert fleet.tables(name) == set()


def _leave_a_server_session(bouncer: PgBouncer, postgres: EmbeddedPostgres, database: str) -> None:
    """A server session left in the pool: fanout's connection then gets a backend older than
    itself, which is what makes the check ask a second connection."""
    warm = psycopg2.connect(
        host=bouncer.host, port=bouncer.port, dbname=database, user=postgres.user, password=postgres.password.reveal()
    )
    warm.cursor().execute("SELECT 1")
    warm.close()
    time.sleep(1.2)  # older than the connection by more than the check's tolerance
