"""SIGINT/SIGTERM end a run cleanly; `apply --resume` finishes what it left, and only that."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

from conftest import MIGRATIONS, Fleet
from test_locks import wait_for

from fanout.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOURCE, EXIT_TARGETS_FAILED


def slow_migrations(seconds: float) -> dict[str, str]:
    slow = dict(MIGRATIONS)
    slow["002-add-address.sql"] = (
        f"-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT; SELECT pg_sleep({seconds});"
    )
    return slow


def wait_until_sleeping(fleet: Fleet, database: str) -> None:
    """Until the slow migration is in flight on `database`."""
    wait_for(
        lambda: fleet.query(
            database,
            "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%%pg_sleep%%' AND pid <> pg_backend_pid()",
        )
    )


def interrupted_run(fleet: Fleet, shards: int, sleep: float) -> tuple[list[str], int, str, str]:
    """An apply over `shards` new shards, one at a time, sent SIGTERM mid-migration on the first."""
    names = fleet.add_databases(shards)
    fleet.publish(slow_migrations(sleep))
    fleet.write_env()
    process = fleet.spawn("apply", "--env", "test", "--concurrency", "1", "--format", "json")
    wait_until_sleeping(fleet, names[0])
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    return names, process.returncode, stdout, stderr


def no_lock_left(fleet: Fleet, names: list[str]) -> bool:
    return all(
        "yoyo_lock" not in fleet.tables(n) or fleet.query(n, "SELECT count(*) FROM yoyo_lock") == [(0,)] for n in names
    )


def test_sigterm_lets_the_migration_in_flight_finish_then_reports_and_exits_130(fleet: Fleet) -> None:
    names, returncode, stdout, stderr = interrupted_run(fleet, shards=5, sleep=1.5)

    assert returncode == EXIT_INTERRUPTED, stderr
    assert "SIGTERM" in stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True
    assert report["exit_code"] == EXIT_INTERRUPTED
    first, *rest = report["results"]
    assert first["status"] == "skipped" and first["error"]["kind"] == "interrupted"
    assert [m["id"] for m in first["ran"]] == ["001-create-person", "002-add-address"]  # in flight: finished
    assert first["pending"] == ["003-create-order"]
    assert fleet.applied(names[0]) == ["001-create-person", "002-add-address"]
    for row in rest:
        assert row["status"] == "skipped" and row["error"]["message"] == "not started: interrupted"
    assert no_lock_left(fleet, names)


def test_a_second_signal_cancels_the_migration_in_flight_and_still_releases_the_lock(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(slow_migrations(60))
    fleet.write_env()
    process = fleet.spawn("apply", "--env", "test", "--format", "json")
    wait_until_sleeping(fleet, name)

    process.send_signal(signal.SIGINT)
    assert process.stderr is not None
    first_warning = process.stderr.readline()  # the first signal was handled
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=20)  # far less than the 60 s migration
    stderr = first_warning + stderr
    assert "starting no new target" in first_warning
    assert "again: cancelling in-flight migrations" in stderr

    assert process.returncode == EXIT_INTERRUPTED, stderr
    (row,) = json.loads(stdout)["results"]
    assert row["status"] == "skipped"
    assert row["error"]["kind"] == "interrupted"
    assert fleet.applied(name) == ["001-create-person"]  # the cancelled one rolled back, unrecorded
    columns = fleet.query(name, "SELECT column_name FROM information_schema.columns WHERE table_name = 'person'")
    assert ("address",) not in columns
    assert no_lock_left(fleet, [name])


def test_resume_retries_only_what_an_interrupted_run_left(fleet: Fleet, runs_dir: Path) -> None:
    names, _, stdout, _ = interrupted_run(fleet, shards=4, sleep=1.0)
    run_id = json.loads(stdout)["run_id"]
    assert (runs_dir / "test" / f"{run_id}.json").is_file()

    result = fleet.cli("apply", "--env", "test", "--resume", run_id, "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert report["resumed_from"] == run_id
    assert [r["target"] for r in report["results"]] == names  # the first was stopped half-way: it is resumed too
    assert [m["id"] for m in report["results"][0]["ran"]] == ["003-create-order"]
    for name in names:
        assert fleet.applied(name) == ["001-create-person", "002-add-address", "003-create-order"]


def test_resume_retries_the_failed_targets_only_and_reads_the_record_from_s3(fleet: Fleet, runs_dir: Path) -> None:
    good, bad = fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    targets = [{"id": good, "dsn": fleet.dsn(good)}, {"id": bad, "dsn": fleet.dsn(bad, password="wrong")}]
    fleet.write_env(targets)
    first = fleet.cli("apply", "--env", "test", "--format", "json")
    assert first.exit_code == EXIT_TARGETS_FAILED
    run_id = json.loads(first.stdout)["run_id"]
    shutil.rmtree(runs_dir)  # another machine: only the S3 copy is left
    fleet.write_env([{"id": good, "dsn": fleet.dsn(good)}, {"id": bad, "dsn": fleet.dsn(bad)}])  # credential fixed

    result = fleet.cli("apply", "--env", "test", "--resume", run_id, "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    (row,) = json.loads(result.stdout)["results"]
    assert row["target"] == bad
    assert row["status"] == "applied"


def test_resume_refuses_a_changed_migration_set_and_an_unknown_run(fleet: Fleet) -> None:
    fleet.add_databases(1)
    targets = [{"id": "broken", "dsn": fleet.dsn(fleet.databases[0], password="wrong")}]
    fleet.publish(MIGRATIONS)
    fleet.write_env(targets)
    run_id = json.loads(fleet.cli("apply", "--env", "test", "--format", "json").stdout)["run_id"]
    fleet.publish({"004-more.sql": "-- depends: 003-create-order\nSELECT 1;"})

    changed = fleet.cli("apply", "--env", "test", "--resume", run_id)
    unknown = fleet.cli("apply", "--env", "test", "--resume", "20990101T000000Z-ffffff")

    assert changed.exit_code == EXIT_SOURCE
    assert "changed since run" in changed.stderr and "004-more.sql" in changed.stderr
    assert unknown.exit_code == 2
    assert "no record of run '20990101T000000Z-ffffff'" in unknown.stderr
