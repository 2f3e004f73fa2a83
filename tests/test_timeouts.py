"""Session timeouts, retries with backoff, lost connections and non-transactional migrations."""

from __future__ import annotations

import json
import threading
import time

import psycopg2
from conftest import MIGRATIONS, Fleet

from fanout.errors import EXIT_OK, EXIT_TARGETS_FAILED
from fanout.report import from_dict, to_dict

ALTER_PERSON = {
    "004-rename.sql": "-- depends: 003-create-order\nALTER TABLE person ADD COLUMN nickname TEXT;",
}


def migrated_shard(fleet: Fleet, extra: str = "") -> str:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env(extra=extra)
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    return name


RETRY_FAST = '[runner]\nlock_timeout = "200ms"\nretries = 2\nretry_backoff = 0.05\n'


def test_a_migration_behind_a_long_transaction_fails_fast_after_visible_retries(fleet: Fleet) -> None:
    name = migrated_shard(fleet, RETRY_FAST)
    fleet.publish(ALTER_PERSON)
    blocker = psycopg2.connect(**fleet.postgres.connect_kwargs(name))
    try:
        with blocker.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM person")  # an open transaction holding ACCESS SHARE on person
            result = fleet.cli("apply", "--env", "test", "--format", "json")
            cursor.execute("SELECT count(*) FROM person")  # the blocker was never disturbed
    finally:
        blocker.close()

    assert result.exit_code == EXIT_TARGETS_FAILED
    report = json.loads(result.stdout)
    assert to_dict(from_dict(report)) == report  # errors and retries read back as they were written
    (row,) = report["results"]
    assert row["error"]["kind"] == "lock-timeout"
    assert row["error"]["migration"] == "004-rename"
    assert "lock timeout" in row["error"]["message"]
    assert [(r["attempt"], r["migration"]) for r in row["retries"]] == [(1, "004-rename"), (2, "004-rename")]
    assert all("55P03" in r["reason"] for r in row["retries"])
    assert "004-rename" not in fleet.applied(name)
    assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)]


def test_a_retry_succeeds_once_the_blocking_transaction_ends(fleet: Fleet) -> None:
    name = migrated_shard(fleet, '[runner]\nlock_timeout = "200ms"\nretries = 8\nretry_backoff = 0.1\n')
    fleet.publish(ALTER_PERSON)
    blocker = psycopg2.connect(**fleet.postgres.connect_kwargs(name))
    blocker.cursor().execute("SELECT count(*) FROM person")

    def release_after_the_first_timeout() -> None:
        # Waiting on the lock, then no longer waiting: the first attempt timed out. Only then end the blocker.
        seen_waiting, deadline = False, time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = fleet.query(
                name,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%%nickname%%'",
            )
            if seen_waiting and not waiting:
                break
            seen_waiting = seen_waiting or bool(waiting)
            time.sleep(0.005)
        blocker.rollback()

    release = threading.Thread(target=release_after_the_first_timeout)
    release.start()
    try:
        result = fleet.cli("apply", "--env", "test", "--format", "json")
    finally:
        release.join()
        blocker.close()

    assert result.exit_code == EXIT_OK, result.output
    (row,) = json.loads(result.stdout)["results"]
    assert row["status"] == "applied"
    assert row["retries"], "the first attempts must have hit the lock timeout"
    assert fleet.applied(name)[-1] == "004-rename"


def test_statement_timeout_stops_a_runaway_migration_without_retrying_it(fleet: Fleet) -> None:
    name = migrated_shard(fleet, '[runner]\nstatement_timeout = "300ms"\nretries = 3\n')
    fleet.publish(
        {"004-slow.sql": "-- depends: 003-create-order\nALTER TABLE person ADD COLUMN x INT;\nSELECT pg_sleep(30);"}
    )

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    (row,) = json.loads(result.stdout)["results"]
    assert row["error"]["kind"] == "statement-timeout"
    assert row["retries"] == []
    assert row["seconds"] < 10
    assert "x" not in {
        r[0]
        for r in fleet.query(name, "SELECT column_name FROM information_schema.columns WHERE table_name = 'person'")
    }


def test_a_dropped_connection_is_retried_on_a_new_one_and_applies_once(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    slow = dict(MIGRATIONS)
    slow["002-add-address.sql"] = (
        "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT; SELECT pg_sleep(2);"
    )
    fleet.publish(slow)
    fleet.write_env(extra="[runner]\nretry_backoff = 0.05\n")

    def terminate_the_runner() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            killed = fleet.query(
                name,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE '%%pg_sleep(2)%%' AND pid <> pg_backend_pid()",
            )
            if killed:
                return
            time.sleep(0.02)

    killer = threading.Thread(target=terminate_the_runner)
    killer.start()
    result = fleet.cli("apply", "--env", "test", "--format", "json")
    killer.join()

    assert result.exit_code == EXIT_OK, result.output
    (row,) = json.loads(result.stdout)["results"]
    assert any("connection" in r["reason"] for r in row["retries"])
    assert [m["id"] for m in row["ran"]] == ["001-create-person", "002-add-address", "003-create-order"]
    assert fleet.query(name, "SELECT migration_id, count(*) FROM _yoyo_log GROUP BY 1 ORDER BY 1") == [
        ("001-create-person", 1),
        ("002-add-address", 1),
        ("003-create-order", 1),
    ]
    assert row["broken_lock"] is not None  # its own first session's lock, provably dead
    assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)]


def test_a_failed_concurrent_index_is_reported_as_invalid(fleet: Fleet) -> None:
    name = migrated_shard(fleet)
    fleet.query(name, "INSERT INTO person (name) VALUES ('same'), ('same')")
    fleet.publish(
        {
            "004-index.sql": "-- transactional: false\n-- depends: 003-create-order\n"
            "CREATE UNIQUE INDEX CONCURRENTLY person_name_unique ON person (name);",
        }
    )

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    (row,) = json.loads(result.stdout)["results"]
    assert row["error"]["kind"] == "migration"
    assert row["error"]["invalid_indexes"] == ["public.person_name_unique"]
    assert "INVALID index public.person_name_unique" in row["error"]["message"]
    assert fleet.query(name, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'person_name_unique'::regclass") == [
        (False,)
    ]
    assert "004-index" not in fleet.applied(name)


def test_a_concurrent_index_builds_outside_a_transaction(fleet: Fleet) -> None:
    name = migrated_shard(fleet)
    fleet.publish(
        {
            "004-index.sql": "-- transactional: false\n-- depends: 003-create-order\n"
            "CREATE INDEX CONCURRENTLY person_name_idx ON person (name);",
        }
    )

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    assert fleet.applied(name)[-1] == "004-index"
    assert fleet.query(name, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'person_name_idx'::regclass") == [
        (True,)
    ]
