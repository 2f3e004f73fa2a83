"""apply: the core path against a real PostgreSQL and a real S3 endpoint."""

from __future__ import annotations

import json
import socket

from conftest import MIGRATIONS, Fleet

from fanout.errors import EXIT_OK, EXIT_TARGETS_FAILED


def test_apply_migrates_every_shard_then_reapply_is_a_noop(fleet: Fleet) -> None:
    fleet.add_databases(3)
    fleet.publish(MIGRATIONS)
    fleet.write_env()

    first = fleet.cli("apply", "--env", "test", "--format", "json")
    assert first.exit_code == EXIT_OK, first.output
    report = json.loads(first.stdout)
    assert report["totals"]["migrations_applied"] == 9
    assert {r["status"] for r in report["results"]} == {"applied"}
    for database in fleet.databases:
        assert fleet.applied(database) == ["001-create-person", "002-add-address", "003-create-order"]
        assert {"person", "customer_order"} <= fleet.tables(database)

    second = fleet.cli("apply", "--env", "test", "--format", "json")
    assert second.exit_code == EXIT_OK
    again = json.loads(second.stdout)
    assert again["totals"]["migrations_applied"] == 0
    assert {r["status"] for r in again["results"]} == {"up-to-date"}
    for database in fleet.databases:
        log_rows = fleet.query(database, "SELECT count(*) FROM _yoyo_log WHERE operation = 'apply'")
        assert log_rows == [(3,)]


def test_two_apply_processes_started_together_apply_each_migration_once_per_shard(fleet: Fleet) -> None:
    fleet.add_databases(6)
    slow = dict(MIGRATIONS)
    slow["002-add-address.sql"] = (
        "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT; SELECT pg_sleep(0.2);"
    )
    fleet.publish(slow)
    fleet.write_env()

    runs = [fleet.spawn("apply", "--env", "test", "--format", "json", "--concurrency", "3") for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]

    reports = [json.loads(stdout) for stdout, _ in outputs]
    failures = [(r["target"], r["error"]) for report in reports for r in report["results"] if r["error"]]
    assert [run.returncode for run in runs] == [EXIT_OK, EXIT_OK], (failures, [stderr for _, stderr in outputs])
    assert sum(r["totals"]["migrations_applied"] for r in reports) == 3 * 6
    for database in fleet.databases:
        rows = fleet.query(
            database, "SELECT migration_id, count(*) FROM _yoyo_log WHERE operation = 'apply' GROUP BY 1"
        )
        assert sorted(rows) == [("001-create-person", 1), ("002-add-address", 1), ("003-create-order", 1)]
        assert fleet.query(database, "SELECT count(*) FROM yoyo_lock") == [(0,)]


def test_unreachable_shard_is_reported_while_the_others_are_migrated(fleet: Fleet) -> None:
    healthy = fleet.add_databases(2)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    targets = [{"id": name, "dsn": fleet.dsn(name)} for name in healthy]
    targets.append({"id": "dead", "dsn": f"postgresql://postgres:pw@127.0.0.1:{dead_port}/nowhere"})
    fleet.publish(MIGRATIONS)
    fleet.write_env(targets)

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    by_target = {r["target"]: r for r in json.loads(result.stdout)["results"]}
    assert by_target["dead"]["status"] == "failed"
    assert by_target["dead"]["error"]["kind"] == "unreachable"
    assert "127.0.0.1" in by_target["dead"]["error"]["message"]
    for name in healthy:
        assert by_target[name]["status"] == "applied"
        assert len(fleet.applied(name)) == 3


def test_sql_error_rolls_the_shard_back_to_its_last_good_migration_and_names_the_file(fleet: Fleet) -> None:
    good, bad = fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    # A new migration that fails on one shard only, half-way through its statements.
    fleet.query(bad, "INSERT INTO person (name) VALUES ('duplicate'), ('duplicate')")
    fleet.publish(
        {
            "004-unique-names.sql": """\
                -- depends: 003-create-order
                CREATE TABLE audit (id INT);
                ALTER TABLE person ADD CONSTRAINT person_name_unique UNIQUE (name);
                """,
            "005-later.sql": "-- depends: 004-unique-names\nCREATE TABLE later (id INT);",
        }
    )

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    by_target = {r["target"]: r for r in json.loads(result.stdout)["results"]}
    failed = by_target[bad]
    assert failed["status"] == "failed"
    assert failed["error"]["kind"] == "migration"
    assert failed["error"]["migration"] == "004-unique-names"
    assert failed["error"]["file"] == "004-unique-names.sql"
    assert "could not create unique index" in failed["error"]["message"]
    assert failed["pending"] == ["004-unique-names", "005-later"]
    # Exactly at the last good migration: nothing of 004's first statement, nothing recorded.
    assert fleet.applied(bad) == ["001-create-person", "002-add-address", "003-create-order"]
    assert "audit" not in fleet.tables(bad)
    assert fleet.query(bad, "SELECT count(*) FROM yoyo_lock") == [(0,)]
    assert by_target[good]["status"] == "applied"
    assert fleet.applied(good)[-2:] == ["004-unique-names", "005-later"]


def test_wrong_password_is_an_authentication_failure(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env([{"id": "wrong", "dsn": fleet.dsn(name, password="not-the-password")}])

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    (row,) = json.loads(result.stdout)["results"]
    assert row["error"]["kind"] == "authentication"
    assert "password authentication failed" in row["error"]["message"]
    assert "not-the-password" not in result.output
    assert fleet.tables(name) == set()


def test_lock_held_by_another_process_times_out_with_its_holder_named(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    fleet.query(
        name, "CREATE TABLE yoyo_lock (locked INT DEFAULT 1, ctime TIMESTAMP, pid INT NOT NULL, PRIMARY KEY (locked))"
    )
    fleet.query(name, "INSERT INTO yoyo_lock VALUES (1, now(), 424242)")

    result = fleet.cli("apply", "--env", "test", "--lock-wait", "0.5", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    (row,) = json.loads(result.stdout)["results"]
    assert row["error"]["kind"] == "locked"
    assert "pid 424242" in row["error"]["message"]
    assert fleet.applied(name) == []
    assert fleet.query(name, "SELECT pid FROM yoyo_lock") == [(424242,)]  # never broken


def test_fail_fast_skips_targets_not_yet_started(fleet: Fleet) -> None:
    names = fleet.add_databases(3)
    targets = [{"id": "a-broken", "dsn": fleet.dsn(names[0], password="wrong")}]
    targets += [{"id": name, "dsn": fleet.dsn(name)} for name in names[1:]]
    fleet.publish(MIGRATIONS)
    fleet.write_env(targets)

    result = fleet.cli("apply", "--env", "test", "--fail-fast", "--concurrency", "1", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    statuses = {r["target"]: r["status"] for r in json.loads(result.stdout)["results"]}
    assert statuses == {"a-broken": "failed", names[1]: "skipped", names[2]: "skipped"}
    assert fleet.applied(names[1]) == []


def test_targets_naming_the_same_database_are_migrated_once(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env(
        [
            {"id": "tenant-a", "dsn": fleet.dsn(name), "tenants": ["a"]},
            {"id": "tenant-b", "dsn": fleet.dsn(name), "tenants": ["b", "c"]},
        ]
    )

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK
    report = json.loads(result.stdout)
    assert report["totals"]["targets"] == 1
    (row,) = report["results"]
    assert row["tenants"] == ["a", "b", "c"]
    assert fleet.query(name, "SELECT count(*) FROM _yoyo_log") == [(3,)]


def test_migration_that_returns_rows_does_not_pollute_the_json_report(fleet: Fleet) -> None:
    fleet.add_databases(1)
    fleet.publish({"001-select.sql": "CREATE TABLE t (id INT); SELECT 42 AS answer;"})
    fleet.write_env()

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK
    assert json.loads(result.stdout)["totals"]["migrations_applied"] == 1


def test_non_transactional_migration_and_post_apply_hook_run(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    files = dict(MIGRATIONS)
    files["004-index.sql"] = (
        "-- transactional: false\n-- depends: 003-create-order\n"
        "CREATE INDEX CONCURRENTLY person_name_idx ON person (name);"
    )
    files["post-apply-hook.sql"] = "CREATE TABLE IF NOT EXISTS hook_ran (id INT);"
    fleet.publish(files)
    fleet.write_env()

    result = fleet.cli("apply", "--env", "test")

    assert result.exit_code == EXIT_OK, result.output
    assert fleet.applied(name)[-1] == "004-index"
    assert fleet.query(name, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'person_name_idx'::regclass") == [
        (True,)
    ]
    assert "hook_ran" in fleet.tables(name)
    assert "post-apply-hook" not in fleet.applied(name)


def test_several_services_apply_in_environment_order_sharing_one_lock(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.services = ("people", "billing")
    fleet.publish(MIGRATIONS, service="people")
    fleet.publish(
        {"101-invoice.sql": "CREATE TABLE invoice (person_id INT REFERENCES person (id));"}, service="billing"
    )
    fleet.write_env()

    only_people = fleet.cli("plan", "--env", "test", "--service", "people", "--format", "json")
    assert [r["service"] for r in json.loads(only_people.stdout)["results"]] == ["people"]
    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    assert [r["service"] for r in json.loads(result.stdout)["results"]] == ["people", "billing"]
    assert fleet.applied(name)[-1] == "101-invoice"


def test_a_failed_service_skips_the_services_after_it_on_that_target(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.services = ("people", "billing")
    fleet.publish({"001-broken.sql": "CREATE TABLE person (id INT; -- syntax error"}, service="people")
    fleet.publish({"101-invoice.sql": "CREATE TABLE invoice (id INT);"}, service="billing")
    fleet.write_env()

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    rows = {r["service"]: r for r in json.loads(result.stdout)["results"]}
    assert rows["people"]["status"] == "failed"
    assert "syntax error" in rows["people"]["error"]["message"]
    assert rows["billing"]["status"] == "skipped"
    assert "invoice" not in fleet.tables(name)


def test_schema_targets_are_quoted_created_and_isolated(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.query(name, "CREATE TABLE canary (id INT)")
    fleet.publish(MIGRATIONS)
    hostile = 'x"; DROP TABLE canary; --'
    fleet.write_env(
        [
            {"id": "tenant-3", "dsn": fleet.dsn(name), "schema": "Tenant-3"},
            {"id": "hostile", "dsn": fleet.dsn(name), "schema": hostile},
        ]
    )

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    assert {"person", "customer_order", "_yoyo_migration", "yoyo_lock"} <= fleet.tables(name, "Tenant-3")
    assert {"person", "customer_order"} <= fleet.tables(name, hostile)
    assert fleet.tables(name) == {"canary"}  # public untouched, and no injection
    plan = fleet.cli("plan", "--env", "test", "--format", "json")
    assert {r["status"] for r in json.loads(plan.stdout)["results"]} == {"up-to-date"}


def test_unknown_role_is_an_authentication_failure_and_missing_database_a_database_error(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env(
        [
            {"id": "no-role", "dsn": fleet.dsn(name, user="nobody_here", password="x-password")},
            {"id": "no-db", "dsn": fleet.dsn(name + "_missing")},
        ]
    )

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    kinds = {r["target"]: r["error"]["kind"] for r in json.loads(result.stdout)["results"]}
    assert kinds == {"no-role": "authentication", "no-db": "database"}


def test_a_failing_post_apply_hook_is_its_own_kind_and_stays_due_until_it_runs(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish({**MIGRATIONS, "post-apply-count.sql": "INSERT INTO hook_runs VALUES (1);"})
    fleet.write_env()

    first = fleet.cli("apply", "--env", "test", "--format", "json")
    again = fleet.cli("apply", "--env", "test", "--format", "json")  # nothing to apply, the hook is still due
    fleet.query(name, "CREATE TABLE hook_runs (n INT)")  # the operator fixes the cause
    fixed = fleet.cli("apply", "--env", "test", "--format", "json")
    after = fleet.cli("apply", "--env", "test", "--format", "json")

    for result in (first, again):
        assert result.exit_code == EXIT_TARGETS_FAILED, result.output
        (row,) = json.loads(result.stdout)["results"]
        assert row["error"]["kind"] == "hook" and row["error"]["migration"] == "post-apply-count"
        assert "hook_runs" in row["error"]["message"] and "runs again on the next apply" in row["error"]["message"]
    assert fleet.applied(name) == ["001-create-person", "002-add-address", "003-create-order"]
    assert fixed.exit_code == EXIT_OK, fixed.output
    assert after.exit_code == EXIT_OK, after.output
    assert fleet.query(name, "SELECT count(*) FROM hook_runs") == [(1,)]  # ran once when due, not again
    actions = fleet.query(
        name, "SELECT action FROM fanout_checksum_log WHERE migration_id = 'post-apply-count' ORDER BY id"
    )
    assert [a for (a,) in actions] == ["hook-failed", "hook-failed", "hook-ran"]
