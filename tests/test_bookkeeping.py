"""yoyo's tables as yoyo writes them (issue 13, point 8): hook log rows, finish times, apply --to."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from conftest import Fleet

from fanout.errors import EXIT_CONFIG, EXIT_OK

CHAIN = {
    "001-person.sql": "CREATE TABLE person (id INT);",
    "002-address.sql": "-- depends: 001-person\nCREATE TABLE address (id INT);",
    "003-order.sql": "-- depends: 002-address\nCREATE TABLE customer_order (id INT);",
    "004-audit.sql": "CREATE TABLE audit (id INT);",  # depends on nothing, as yoyo reads it
}


def _log(fleet: Fleet, database: str) -> list[tuple[str, str]]:
    return fleet.query(database, "SELECT migration_id, operation FROM _yoyo_log ORDER BY created_at_utc, migration_id")


def test_post_apply_hook_gets_yoyos_apply_log_row_each_time_something_was_applied(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);", "post-apply.sql": "CREATE OR REPLACE VIEW v AS SELECT 1;"})
    fleet.write_env()

    first = fleet.cli("apply", "--env", "test")
    idle = fleet.cli("apply", "--env", "test")
    fleet.publish({"002-u.sql": "-- depends: 001-t\nCREATE TABLE u (id INT);"})
    second = fleet.cli("apply", "--env", "test")

    assert [first.exit_code, idle.exit_code, second.exit_code] == [EXIT_OK] * 3, first.output + second.output
    assert _log(fleet, database) == [
        ("001-t", "apply"),
        ("post-apply", "apply"),
        ("002-u", "apply"),
        ("post-apply", "apply"),
    ]
    hook_hashes = fleet.query(
        database, "SELECT DISTINCT migration_hash FROM _yoyo_log WHERE migration_id = 'post-apply'"
    )
    assert len(hook_hashes) == 1 and hook_hashes[0][0]
    assert fleet.applied(database) == ["001-t", "002-u"]  # hooks are logged, never marked


def test_recorded_times_are_when_each_migration_finished(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "001-quick.sql": "CREATE TABLE quick (id INT);",
            "002-slow.sql": "-- depends: 001-quick\nCREATE TABLE slow (id INT);\nSELECT pg_sleep(1.5);",
            "003-slow-outside-a-transaction.sql": (
                "-- depends: 002-slow\n-- transactional: false\nSELECT pg_sleep(1.5);"
            ),
        }
    )
    fleet.write_env()
    started = datetime.now(UTC).replace(tzinfo=None)

    result = fleet.cli("apply", "--env", "test")

    assert result.exit_code == EXIT_OK, result.output
    applied = dict(fleet.query(database, "SELECT migration_id, applied_at_utc FROM _yoyo_migration"))
    logged = dict(fleet.query(database, "SELECT migration_id, created_at_utc FROM _yoyo_log"))
    checksummed = dict(fleet.query(database, "SELECT migration_id, recorded_at FROM fanout_checksums"))
    for times in (applied, logged, checksummed):
        assert times["001-quick"] < started + timedelta(seconds=1.5)
        assert times["002-slow"] >= started + timedelta(seconds=1.5)
        assert times["003-slow-outside-a-transaction"] >= times["002-slow"] + timedelta(seconds=1.5)


def test_apply_to_applies_that_migration_and_what_it_depends_on_only(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(CHAIN)
    fleet.write_env()

    to_address = fleet.cli("apply", "--env", "test", "--to", "002-address", "--format", "json")
    assert to_address.exit_code == EXIT_OK, to_address.output
    assert fleet.applied(database) == ["001-person", "002-address"]
    assert json.loads(to_address.stdout)["totals"]["migrations_applied"] == 2

    # A part of an id names its migration when it names one only, as in yoyo; audit depends on nothing.
    to_audit = fleet.cli("apply", "--env", "test", "--to", "audit")
    assert to_audit.exit_code == EXIT_OK, to_audit.output
    assert fleet.applied(database) == ["001-person", "002-address", "004-audit"]

    rest = fleet.cli("apply", "--env", "test")
    assert rest.exit_code == EXIT_OK, rest.output
    assert fleet.applied(database) == ["001-person", "002-address", "004-audit", "003-order"]


def test_apply_to_an_unknown_or_ambiguous_id_is_a_config_error_before_any_shard_is_touched(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(CHAIN)
    fleet.write_env()
    new_database = database + "_new"

    unknown = fleet.cli("apply", "--env", "test", "--to", "005-nothing")
    ambiguous = fleet.cli("apply", "--env", "test", "--to", "00")
    boot = fleet.cli(
        "bootstrap", "--env", "test", "--target", fleet.dsn(new_database), "--create-database", "--to", "nope"
    )

    assert [unknown.exit_code, ambiguous.exit_code, boot.exit_code] == [EXIT_CONFIG] * 3
    assert unknown.stderr.strip().splitlines() == [
        "fanout: error: --to 005-nothing: no migration id of the run's services ('app') is or contains it"
    ]
    assert "--to 00: names 4 migrations (001-person, 002-address, 003-order, 004-audit)" in ambiguous.stderr
    assert "--to nope" in boot.stderr
    assert fleet.tables(database) == set()
    assert fleet.query("postgres", "SELECT count(*) FROM pg_database WHERE datname = %s", (new_database,)) == [(0,)]


def test_bootstrap_to_brings_a_new_shard_up_to_that_migration(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(CHAIN)
    fleet.write_env()

    result = fleet.cli("bootstrap", "--env", "test", "--target", database, "--to", "003-order", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    assert fleet.applied(database) == ["001-person", "002-address", "003-order"]
    status = json.loads(result.stdout)["status"]["results"]
    assert [r["pending"] for r in status] == [["004-audit"]]


def test_resume_with_to_retries_the_failed_targets_up_to_that_migration(fleet: Fleet) -> None:
    broken, healthy = fleet.add_databases(2)
    fleet.query(broken, "CREATE TABLE customer_order (id INT)")  # makes 003-order fail there
    fleet.publish(CHAIN)
    fleet.write_env()

    first = fleet.cli("apply", "--env", "test", "--to", "003-order", "--format", "json")
    fleet.query(broken, "DROP TABLE customer_order")
    resumed = fleet.cli("apply", "--env", "test", "--resume", json.loads(first.stdout)["run_id"], "--to", "003-order")

    assert first.exit_code != EXIT_OK
    assert resumed.exit_code == EXIT_OK, resumed.output
    for database in (broken, healthy):
        assert fleet.applied(database) == ["001-person", "002-address", "003-order"]


def test_yoyo_tables_of_an_older_yoyo_are_upgraded_by_yoyo_and_keep_what_they_recorded(fleet: Fleet) -> None:
    # A new shard gets yoyo's tables at yoyo's current version directly; tables an older yoyo
    # (< 6: `_yoyo_migration` with id and ctime, no version table) left must still go through
    # yoyo's own upgrade, which carries their rows over.
    (old, new) = fleet.add_databases(2)
    fleet.query(old, "CREATE TABLE person (id INT)")
    fleet.query(old, "CREATE TABLE _yoyo_migration (id VARCHAR(191) NOT NULL PRIMARY KEY, ctime TIMESTAMP)")
    fleet.query(old, "INSERT INTO _yoyo_migration VALUES ('001-person', '2020-01-01 00:00:00')")
    fleet.publish(CHAIN)
    fleet.write_env()

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    ran = {r["database"].rsplit("/", 1)[-1]: [m["id"] for m in r["ran"]] for r in json.loads(result.stdout)["results"]}
    assert ran[old] == ["002-address", "003-order", "004-audit"]  # 001 was recorded by the older yoyo
    assert sorted(ran[new]) == sorted(name.removesuffix(".sql") for name in CHAIN)
    for database in (old, new):
        assert fleet.query(database, "SELECT version FROM _yoyo_version") == [(2,)]
        columns = fleet.query(
            database,
            "SELECT column_name FROM information_schema.columns WHERE table_name = '_yoyo_migration' ORDER BY 1",
        )
        assert columns == [("applied_at_utc",), ("migration_hash",), ("migration_id",)]
    assert fleet.query(
        old, "SELECT migration_id, applied_at_utc FROM _yoyo_migration WHERE migration_id = '001-person'"
    ) == [("001-person", datetime(2020, 1, 1))]
