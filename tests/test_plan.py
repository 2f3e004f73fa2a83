"""plan and status: read-only, exact, and usable by CI."""

from __future__ import annotations

import json

from conftest import MIGRATIONS, Fleet

from fanout.errors import EXIT_OK, EXIT_PENDING
from fanout.report import from_dict, to_dict


def _catalog(fleet: Fleet, database: str) -> list[tuple[object, ...]]:
    return fleet.query(
        database, "SELECT relname, relkind FROM pg_class WHERE relnamespace = 'public'::regnamespace ORDER BY 1"
    )


def test_plan_as_a_read_only_role_succeeds_and_writes_nothing(fleet: Fleet) -> None:
    fresh, migrated = fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    fleet.write_env([{"id": migrated, "dsn": fleet.dsn(migrated)}])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(migrated, "DELETE FROM _yoyo_migration WHERE migration_id <> '001-create-person'")

    role = "reader_" + fresh[-6:]
    fleet.query(fresh, f"CREATE ROLE {role} LOGIN PASSWORD 'reader-secret'")
    for database in (fresh, migrated):
        fleet.query(database, f"GRANT CONNECT ON DATABASE {database} TO {role}")
        fleet.query(database, f"REVOKE CREATE ON SCHEMA public FROM {role}, PUBLIC")
    fleet.query(migrated, f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    before = {db: _catalog(fleet, db) for db in (fresh, migrated)}
    fleet.write_env(
        [
            {"id": "fresh", "dsn": fleet.dsn(fresh, user=role, password="reader-secret")},
            {"id": "migrated", "dsn": fleet.dsn(migrated, user=role, password="reader-secret")},
        ]
    )

    result = fleet.cli("plan", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    rows = {r["target"]: r for r in json.loads(result.stdout)["results"]}
    assert rows["fresh"]["initialized"] is False
    assert rows["fresh"]["pending"] == ["001-create-person", "002-add-address", "003-create-order"]
    assert rows["migrated"]["initialized"] is True
    assert rows["migrated"]["applied_before"] == ["001-create-person"]
    assert rows["migrated"]["pending"] == ["002-add-address", "003-create-order"]
    assert {db: _catalog(fleet, db) for db in (fresh, migrated)} == before
    assert "reader-secret" not in result.output


def test_plan_as_superuser_creates_no_table_and_takes_no_lock(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    commits_before = fleet.query(name, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")

    result = fleet.cli("plan", "--env", "test")

    assert result.exit_code == EXIT_OK
    assert "never migrated" in result.stdout
    assert fleet.tables(name) == set()
    # Every transaction the plan opened was read-only and rolled back.
    writes = fleet.query(
        name, "SELECT tup_inserted + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = current_database()"
    )
    assert writes == [(0,)]
    assert commits_before  # the statistics view was readable


def test_plan_detailed_exitcode_tells_pending_from_nothing_to_do(fleet: Fleet) -> None:
    fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    fleet.write_env()

    pending = fleet.cli("plan", "--env", "test", "--detailed-exitcode")
    plain = fleet.cli("plan", "--env", "test")
    assert pending.exit_code == EXIT_PENDING
    assert plain.exit_code == EXIT_OK
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    done = fleet.cli("plan", "--env", "test", "--detailed-exitcode", "--format", "json")
    assert done.exit_code == EXIT_OK
    assert json.loads(done.stdout)["totals"]["migrations_pending"] == 0


def test_status_shows_applied_migrations_and_the_lock_holder(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(name, "INSERT INTO yoyo_lock VALUES (1, now(), 31337)")

    result = fleet.cli("status", "--env", "test", "--format", "json")
    text = fleet.cli("status", "--env", "test")

    assert result.exit_code == EXIT_OK
    (row,) = json.loads(result.stdout)["results"]
    assert row["applied_before"] == ["001-create-person", "002-add-address", "003-create-order"]
    assert row["lock_holder"]["pid"] == 31337
    assert row["lock_holder"]["run_id"] is None  # a plain yoyo row: nobody can tell whether it is alive
    assert row["lock_holder"]["alive"] is None
    assert "locked by yoyo pid 31337" in text.stdout


def test_json_report_shape_is_pinned(fleet: Fleet) -> None:
    fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()

    report = json.loads(fleet.cli("apply", "--env", "test", "--format", "json").stdout)

    assert report["schema"] == "fanout/report/v1"
    assert set(report) == {
        "schema", "run_id", "command", "mode", "environment", "services", "started_at", "finished_at",
        "duration_seconds", "exit_code", "interrupted", "resumed_from", "slice", "parts", "missing_slices",
        "rollout", "totals", "source", "results", "inspection", "not_stored", "rollback", "warnings",
    }  # fmt: skip
    assert set(report["rollout"]) == {
        "concurrency", "per_server", "waves", "max_failures", "waves_run", "waves_planned", "stop_reason",
        "peak_in_flight", "peak_per_server", "connections_opened",
    }  # fmt: skip
    assert set(report["totals"]) == {
        "targets", "results", "by_status", "migrations_applied", "migrations_pending", "migrations_rolled_back",
    }  # fmt: skip
    assert set(report["totals"]["by_status"]) == {
        "up-to-date", "pending", "applied", "failed", "drifted", "in-doubt", "skipped", "rolled-back",
    }  # fmt: skip
    assert set(report["results"][0]) == {
        "target", "service", "status", "server", "database", "schema", "tenants", "initialized",
        "applied_before", "ran", "pending", "lock_holder", "broken_lock", "retries", "error", "seconds",
        "drift", "unverified", "rolled_back", "to_roll_back", "in_doubt", "invalid_indexes",
    }  # fmt: skip
    assert set(report["source"]["sets"][0]) == {
        "service", "url", "manifest", "release", "files", "paths", "unpublished", "unpublished_policy",
    }  # fmt: skip
    assert set(report["source"]["sets"][0]["files"][0]) == {"name", "sha256", "size", "etag", "version_id"}
    assert report["exit_code"] == 0
    # A stored report reads back into the same model (report merge relies on it).
    assert to_dict(from_dict(report)) == report
