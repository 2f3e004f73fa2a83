"""Fleet rollback: what each shard rolls back, the one-transaction guarantee, refusals, rollout, yoyo interop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import Fleet

from fanout.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PENDING, EXIT_SOURCE, EXIT_TARGETS_FAILED

# 004 depends on 002 only: `--migration 002` takes 004 and 002, and leaves 003.
SET = {
    "001-create-person.sql": "CREATE TABLE person (id SERIAL PRIMARY KEY, name TEXT NOT NULL);",
    "001-create-person.rollback.sql": "DROP TABLE person;",
    "002-add-address.sql": "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT;",
    "002-add-address.rollback.sql": "ALTER TABLE person DROP COLUMN address;",
    "003-create-order.sql": """\
        -- depends: 001-create-person
        CREATE TABLE customer_order (id SERIAL PRIMARY KEY, person_id INT REFERENCES person (id));
        CREATE INDEX customer_order_person ON customer_order (person_id);
        """,
    "003-create-order.rollback.sql": "DROP INDEX customer_order_person;\nDROP TABLE customer_order;",
    "004-address-index.sql": "-- depends: 002-add-address\nCREATE INDEX person_address ON person (address);",
    "004-address-index.rollback.sql": "DROP INDEX person_address;",
}
IDS = ["001-create-person", "002-add-address", "003-create-order", "004-address-index"]
PROBES = {
    "001-create-person": "SELECT to_regclass('person') IS NOT NULL",
    "002-add-address": "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
    "WHERE table_name = 'person' AND column_name = 'address')",
    "003-create-order": "SELECT to_regclass('customer_order') IS NOT NULL",
    "004-address-index": "SELECT to_regclass('person_address') IS NOT NULL",
}


def first(ids: int) -> dict[str, str]:
    """The set's first `ids` migrations with their rollback files."""
    keep = IDS[:ids]
    return {name: body for name, body in SET.items() if name.removesuffix(".sql").removesuffix(".rollback") in keep}


def present(fleet: Fleet, database: str) -> list[str]:
    return [m for m in IDS if fleet.query(database, PROBES[m])[0][0]]


def recorded(fleet: Fleet, database: str) -> list[str]:
    return sorted(fleet.applied(database))


def checksummed(fleet: Fleet, database: str) -> list[str]:
    return sorted(r[0] for r in fleet.query(database, "SELECT migration_id FROM fanout_checksums"))


def consistent(fleet: Fleet, database: str) -> list[str]:
    """The shard's migrations; asserts its effects, yoyo's rows and fanout's checksums agree."""
    have = present(fleet, database)
    assert recorded(fleet, database) == have, database
    assert checksummed(fleet, database) == have, database
    return have


def run_json(fleet: Fleet, *args: str) -> tuple[int, dict[str, Any]]:
    result = fleet.cli(*args, "--format", "json")
    assert result.stdout.startswith("{"), result.output
    return result.exit_code, json.loads(result.stdout)


def by_target(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["target"]: r for r in report["results"]}


def skewed_fleet(fleet: Fleet) -> list[str]:
    """Three shards at 2, 3 and 4 migrations of the same set."""
    shards = fleet.add_databases(3)
    for count, upto in ((2, 0), (3, 1), (4, 2)):
        fleet.publish(first(count))
        fleet.write_env([{"id": name, "dsn": fleet.dsn(name)} for name in shards[upto:]])
        assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.write_env([{"id": name, "dsn": fleet.dsn(name)} for name in shards])
    return shards


def test_rollback_to_converges_a_skewed_fleet_and_the_next_apply_reapplies_without_drift(fleet: Fleet) -> None:
    shards = skewed_fleet(fleet)
    assert [len(consistent(fleet, s)) for s in shards] == [2, 3, 4]

    code, dry = run_json(fleet, "rollback", "--env", "test", "--to", "002-add-address", "--dry-run")
    assert code == EXIT_OK
    assert [by_target(dry)[s]["to_roll_back"] for s in shards] == [
        [], ["003-create-order"], ["004-address-index", "003-create-order"],
    ]  # fmt: skip
    assert [len(consistent(fleet, s)) for s in shards] == [2, 3, 4]  # the dry run changed nothing
    assert fleet.cli("rollback", "--env", "test", "--to", "002-add-address", "--dry-run",
                     "--detailed-exitcode").exit_code == EXIT_PENDING  # fmt: skip

    code, report = run_json(
        fleet, "rollback", "--env", "test", "--to", "002-add-address", "--reason", "release 7 broke invoices"
    )
    assert code == EXIT_OK
    assert report["command"] == "rollback" and report["mode"] == "rollback"
    assert report["rollback"]["to"] == ["002-add-address"]
    results = by_target(report)
    assert [results[s]["status"] for s in shards] == ["up-to-date", "rolled-back", "rolled-back"]
    assert [[m["id"] for m in results[s]["rolled_back"]] for s in shards] == [
        [], ["003-create-order"], ["004-address-index", "003-create-order"],
    ]  # fmt: skip
    assert report["totals"]["migrations_rolled_back"] == 3
    for shard in shards:
        assert consistent(fleet, shard) == IDS[:2]
        assert fleet.query(shard, "SELECT count(*) FROM yoyo_lock") == [(0,)]
    # yoyo's log, as `yoyo rollback` writes it; fanout's checksum log, with the reason.
    last = shards[2]
    assert fleet.query(last, "SELECT migration_id FROM _yoyo_log WHERE operation = 'rollback' ORDER BY created_at_utc") \
        == [("004-address-index",), ("003-create-order",)]  # fmt: skip
    logged = fleet.query(last, "SELECT migration_id, action, reason FROM fanout_checksum_log ORDER BY id")
    assert logged == [
        ("004-address-index", "rolled-back", "release 7 broke invoices"),
        ("003-create-order", "rolled-back", "release 7 broke invoices"),
    ]

    # status and verify agree with the shards; verify can be told the level the fleet is meant to be at.
    code, status = run_json(fleet, "status", "--env", "test")
    assert {tuple(r["pending"]) for r in status["results"]} == {("003-create-order", "004-address-index")}
    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_TARGETS_FAILED
    code, at = run_json(fleet, "verify", "--env", "test", "--at", "002-add-address")
    assert code == EXIT_OK, at
    assert fleet.cli("verify", "--env", "test", "--at", "003-create-order").exit_code == EXIT_TARGETS_FAILED

    # The files are still published: the next apply re-applies them, no drift, no accept step.
    code, again = run_json(fleet, "apply", "--env", "test")
    assert code == EXIT_OK, again
    for shard in shards:
        assert consistent(fleet, shard) == IDS
    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_OK
    code, at = run_json(fleet, "verify", "--env", "test", "--at", "002-add-address")
    assert code == EXIT_TARGETS_FAILED
    assert by_target(at)[shards[0]]["to_roll_back"] == ["004-address-index", "003-create-order"]


def test_rollback_of_a_migration_takes_its_dependents_first_and_nothing_else(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    code, report = run_json(fleet, "rollback", "--env", "test", "--migration", "002-add-address")
    assert code == EXIT_OK
    assert [m["id"] for m in report["results"][0]["rolled_back"]] == ["004-address-index", "002-add-address"]
    assert consistent(fleet, shard) == ["001-create-person", "003-create-order"]
    # Rolled back again: nothing left to do.
    code, again = run_json(fleet, "rollback", "--env", "test", "--migration", "002-add-address")
    assert code == EXIT_OK and again["results"][0]["status"] == "up-to-date"


def test_a_missing_rollback_file_is_refused_before_any_shard_is_touched(fleet: Fleet) -> None:
    shards = fleet.add_databases(2)
    files = dict(SET)
    del files["003-create-order.rollback.sql"], files["004-address-index.rollback.sql"]
    fleet.publish(files)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    logs = [fleet.query(s, "SELECT count(*) FROM _yoyo_log") for s in shards]

    refused = fleet.cli("rollback", "--env", "test", "--to", "001-create-person")
    assert refused.exit_code == EXIT_SOURCE
    assert "app/003-create-order.rollback.sql" in refused.stderr
    assert "app/004-address-index.rollback.sql" in refused.stderr
    assert "002-add-address" not in refused.stderr
    for shard, before in zip(shards, logs, strict=True):
        assert consistent(fleet, shard) == IDS
        assert fleet.query(shard, "SELECT count(*) FROM _yoyo_log") == before
    # Only what the request selects needs a rollback file.
    assert fleet.cli("rollback", "--env", "test", "--migration", "003-create-order").exit_code == EXIT_SOURCE
    assert fleet.cli("rollback", "--env", "test", "--to", "003-create-order").exit_code == EXIT_SOURCE
    assert fleet.cli("rollback", "--env", "test", "--migration", "nope").exit_code == 2


def test_a_failing_rollback_leaves_its_shard_where_it_was_and_the_others_go_on(fleet: Fleet) -> None:
    shards = fleet.add_databases(3)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    bad = shards[1]
    fleet.query(bad, "CREATE VIEW order_view AS SELECT * FROM customer_order")  # DROP TABLE now fails there

    code, report = run_json(fleet, "rollback", "--env", "test", "--to", "002-add-address")
    assert code == EXIT_TARGETS_FAILED
    results = by_target(report)
    failed = results[bad]
    assert failed["status"] == "failed"
    assert failed["error"]["kind"] == "migration"
    assert failed["error"]["migration"] == "003-create-order"
    assert failed["error"]["file"] == "003-create-order.rollback.sql"
    assert [m["id"] for m in failed["rolled_back"]] == ["004-address-index"]  # the one before it is done
    assert failed["to_roll_back"] == ["003-create-order"]
    # 003's rollback failed as a whole: its index, its table, yoyo's row and the checksum are all still there.
    assert consistent(fleet, bad) == ["001-create-person", "002-add-address", "003-create-order"]
    assert fleet.query(bad, "SELECT to_regclass('customer_order_person') IS NOT NULL") == [(True,)]
    assert fleet.query(bad, "SELECT count(*) FROM _yoyo_log WHERE migration_id = '003-create-order' "
                            "AND operation = 'rollback'") == [(0,)]  # fmt: skip
    for shard in (shards[0], shards[2]):
        assert results[shard]["status"] == "rolled-back"
        assert consistent(fleet, shard) == IDS[:2]

    # After the fix, --resume retries only the failed shard, with the same request.
    fleet.query(bad, "DROP VIEW order_view")
    code, resumed = run_json(fleet, "rollback", "--env", "test", "--resume", report["run_id"])
    assert code == EXIT_OK, resumed
    assert [r["target"] for r in resumed["results"]] == [bad]
    assert resumed["rollback"]["to"] == ["002-add-address"]
    assert consistent(fleet, bad) == IDS[:2]


def test_a_drifted_shard_is_refused_unless_the_operator_accepts_the_drift(fleet: Fleet) -> None:
    shards = fleet.add_databases(2)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(shards[0], "UPDATE fanout_checksums SET sha256 = 'edited' WHERE migration_id = '003-create-order'")

    code, report = run_json(fleet, "rollback", "--env", "test", "--migration", "003-create-order")
    assert code == EXIT_TARGETS_FAILED
    assert by_target(report)[shards[0]]["error"]["kind"] == "drift"
    assert consistent(fleet, shards[0]) == IDS
    assert consistent(fleet, shards[1]) == ["001-create-person", "002-add-address", "004-address-index"]

    code, report = run_json(fleet, "rollback", "--env", "test", "--migration", "003-create-order", "--accept-drift")
    assert code == EXIT_OK, report
    assert consistent(fleet, shards[0]) == ["001-create-person", "002-add-address", "004-address-index"]
    logged = fleet.query(shards[0], "SELECT old_sha256 FROM fanout_checksum_log WHERE action = 'rolled-back'")
    assert logged == [("edited",)]


def test_a_canary_that_fails_its_rollback_stops_the_waves(fleet: Fleet) -> None:
    shards = fleet.add_databases(4)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(shards[0], "CREATE VIEW order_view AS SELECT * FROM customer_order")

    code, report = run_json(
        fleet, "rollback", "--env", "test", "--to", "002-add-address", "--waves", "1,100%", "--per-server", "2"
    )
    assert code == EXIT_TARGETS_FAILED
    results = by_target(report)
    assert results[shards[0]]["status"] == "failed"
    assert all(results[s]["error"]["kind"] == "not-started" for s in shards[1:])
    assert report["rollout"]["waves_run"] == 1 and report["rollout"]["stop_reason"]
    for shard in shards[1:]:
        assert consistent(fleet, shard) == IDS  # never touched

    # With a budget of one failure the rest of the fleet goes on.
    code, report = run_json(fleet, "rollback", "--env", "test", "--to", "002-add-address", "--max-failures", "1")
    assert code == EXIT_TARGETS_FAILED
    assert [by_target(report)[s]["status"] for s in shards] == ["failed"] + ["rolled-back"] * 3


def test_two_rollbacks_at_once_roll_back_each_migration_once(fleet: Fleet) -> None:
    shards = fleet.add_databases(3)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    runs = [fleet.spawn("rollback", "--env", "test", "--to", "001-create-person", "--format", "json") for _ in "ab"]
    outputs = [p.communicate(timeout=120) for p in runs]
    assert [p.returncode for p in runs] == [EXIT_OK, EXIT_OK], outputs
    reports = [json.loads(out) for out, _ in outputs]
    total = sum(r["totals"]["migrations_rolled_back"] for r in reports)
    assert total == 3 * len(shards)
    for shard in shards:
        assert consistent(fleet, shard) == ["001-create-person"]
        counts = fleet.query(shard, "SELECT count(*) FROM _yoyo_log WHERE operation = 'rollback' GROUP BY migration_id")
        assert sorted(c for (c,) in counts) == [1, 1, 1]


def test_a_rollback_racing_an_apply_leaves_every_shard_consistent(fleet: Fleet) -> None:
    shards = fleet.add_databases(4)
    fleet.publish(first(2))
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.publish(SET)
    apply = fleet.spawn("apply", "--env", "test", "--format", "json", "--concurrency", "2")
    undo = fleet.spawn("rollback", "--env", "test", "--to", "001-create-person", "--format", "json",
                       "--concurrency", "2")  # fmt: skip
    for process in (apply, undo):
        _, err = process.communicate(timeout=120)
        assert process.returncode == EXIT_OK, err
    for shard in shards:
        have = consistent(fleet, shard)
        # Whichever got the lock first, the other then saw its result: either order is a valid end state.
        assert have in (["001-create-person"], IDS, ["001-create-person", "003-create-order"]), (shard, have)
        assert fleet.query(shard, "SELECT count(*) FROM yoyo_lock") == [(0,)]


def test_reapply_rolls_back_and_applies_again_under_one_lock(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    hook = "CREATE TABLE IF NOT EXISTS hook_runs (n INT);\nINSERT INTO hook_runs VALUES (1);"
    fleet.publish({**SET, "post-apply-count.sql": hook})
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(shard, "COMMENT ON INDEX person_address IS 'tampered'")  # 004's effect changed by hand

    code, report = run_json(fleet, "reapply", "--env", "test", "--migration", "004-address-index")
    assert code == EXIT_OK, report
    (result,) = report["results"]
    assert report["command"] == "reapply" and result["status"] == "applied"
    assert [m["id"] for m in result["rolled_back"]] == ["004-address-index"]
    assert [m["id"] for m in result["ran"]] == ["004-address-index"]
    assert consistent(fleet, shard) == IDS
    assert fleet.query(shard, "SELECT obj_description('person_address'::regclass)") == [(None,)]  # made anew
    ops = fleet.query(shard, "SELECT operation FROM _yoyo_log WHERE migration_id = '004-address-index' "
                             "ORDER BY created_at_utc")  # fmt: skip
    assert ops == [("apply",), ("rollback",), ("apply",)]
    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_OK
    assert fleet.query(shard, "SELECT count(*) FROM hook_runs") == [(2,)]  # after apply, and after reapply
    assert fleet.cli("rollback", "--env", "test", "--migration", "004-address-index").exit_code == EXIT_OK
    assert fleet.query(shard, "SELECT count(*) FROM hook_runs") == [(2,)]  # a rollback runs no hook


def test_a_non_transactional_rollback_runs_outside_a_transaction(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(
        {
            **first(1),
            "002-name-index.sql": "-- transactional: false\nCREATE INDEX CONCURRENTLY person_name ON person (name);",
            "002-name-index.rollback.sql": "-- transactional: false\nDROP INDEX CONCURRENTLY person_name;",
        }
    )
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    code, report = run_json(fleet, "rollback", "--env", "test", "--to", "001-create-person")
    assert code == EXIT_OK, report
    assert fleet.query(shard, "SELECT to_regclass('person_name')") == [(None,)]
    assert recorded(fleet, shard) == checksummed(fleet, shard) == ["001-create-person"]


def test_rollback_reports_in_every_format_say_what_was_rolled_back_where(fleet: Fleet, tmp_path: Path) -> None:
    shards = skewed_fleet(fleet)
    html, markdown = tmp_path / "r.html", tmp_path / "r.md"
    result = fleet.cli("rollback", "--env", "test", "--to", "002-add-address", "--output", str(html),
                       "--output", str(markdown))  # fmt: skip
    assert result.exit_code == EXIT_OK, result.output
    assert "rolled back 004-address-index, 003-create-order" in result.stdout
    assert "rollback --to 002-add-address" in result.stdout
    page = html.read_text()
    assert page.count("data-state=rolled-back") == 3
    assert "data-migration='003-create-order' data-state=rolled-back" in page
    assert "rolled back 004-address-index, 003-create-order" in markdown.read_text()
    dry = fleet.cli("rollback", "--env", "test", "--to", "001-create-person", "--dry-run", "--format", "html")
    assert dry.stdout.count("data-state=to-roll-back") == 3  # 002 on each shard, marked "would roll back"
    junit = fleet.cli("rollback", "--env", "test", "--to", "002-add-address", "--format", "junit")
    assert junit.exit_code == EXIT_OK and "<failure" not in junit.stdout
    assert len(shards) == 3


def yoyo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("yoyo")), *args, "--batch", "--no-config-file"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60, env=dict(os.environ))


def test_interoperable_with_plain_yoyo_both_ways(fleet: Fleet, tmp_path: Path) -> None:
    by_fanout, by_yoyo = fleet.add_databases(2)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    folder = tmp_path / "migrations"
    folder.mkdir()
    for name, body in SET.items():
        (folder / name).write_text(textwrap.dedent(body))
    password = fleet.postgres.password.reveal()

    # yoyo rolls back one twin, fanout the other: the same schema and the same yoyo rows.
    done = yoyo("rollback", "-d", fleet.dsn(by_yoyo, password=password), "-r", "003-create-order", str(folder),
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    code, report = run_json(fleet, "rollback", "--env", "test", "--migration", "003-create-order")
    # Only the shard that still had it rolls it back: fanout sees yoyo's rollback.
    assert code == EXIT_OK, report
    assert by_target(report)[by_fanout]["status"] == "rolled-back"
    assert by_target(report)[by_yoyo]["status"] == "up-to-date"
    for shard in (by_fanout, by_yoyo):
        assert present(fleet, shard) == recorded(fleet, shard) == ["001-create-person", "002-add-address",
                                                                    "004-address-index"]  # fmt: skip
        ops = fleet.query(shard, "SELECT operation FROM _yoyo_log WHERE migration_id = '003-create-order' "
                                 "ORDER BY created_at_utc")  # fmt: skip
        assert ops == [("apply",), ("rollback",)]
    # fanout sees yoyo's rollback correctly: pending, no drift, and apply reapplies with no accept.
    code, status = run_json(fleet, "status", "--env", "test")
    assert all(r["pending"] == ["003-create-order"] and r["drift"] == [] for r in status["results"]), status
    # plain yoyo sees fanout's rollback correctly: it lists 003 as not applied and re-applies it.
    listed = yoyo("list", "-d", fleet.dsn(by_fanout, password=password), str(folder), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines() if "003-create-order" in line] == ["U"]
    done = yoyo("apply", "-d", fleet.dsn(by_fanout, password=password), str(folder), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert present(fleet, by_fanout) == recorded(fleet, by_fanout) == IDS
    code, again = run_json(fleet, "apply", "--env", "test")
    assert code == EXIT_OK, again
    assert [m["id"] for m in by_target(again)[by_yoyo]["ran"]] == ["003-create-order"]
    for shard in (by_fanout, by_yoyo):
        assert present(fleet, shard) == recorded(fleet, shard) == IDS


def test_release_pipeline_canary_fails_and_the_release_is_rolled_back(fleet: Fleet, tmp_path: Path) -> None:
    shards = fleet.add_databases(3)
    fleet.write_env()
    root = tmp_path / "src"
    folder = root / "app" / "test"
    folder.mkdir(parents=True)

    def publish(files: dict[str, str]) -> None:
        for name, body in files.items():
            (folder / name).write_text(textwrap.dedent(body))
        assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(root)).exit_code == EXIT_OK

    publish(first(2))
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    # Release 2 adds 003 and 004; 004 cannot be built on the canary (a duplicate index name there).
    publish(SET)
    fleet.query(shards[0], "CREATE INDEX person_address ON person (name)")
    code, applied = run_json(fleet, "apply", "--env", "test", "--waves", "1,100%")
    assert code == EXIT_TARGETS_FAILED
    assert by_target(applied)[shards[0]]["error"]["migration"] == "004-address-index"
    assert [m["id"] for m in by_target(applied)[shards[0]]["ran"]] == ["003-create-order"]
    release = applied["source"]["sets"][0]["release"]
    fleet.query(shards[0], "DROP INDEX person_address")

    code, dry = run_json(fleet, "rollback", "--env", "test", "--release", release, "--dry-run")
    assert code == EXIT_OK
    assert [by_target(dry)[s]["to_roll_back"] for s in shards] == [["003-create-order"], [], []]
    code, undone = run_json(fleet, "rollback", "--env", "test", "--release", release, "--waves", "1,100%")
    assert code == EXIT_OK, undone
    assert undone["rollback"]["release"] == release
    assert [m["id"] for m in by_target(undone)[shards[0]]["rolled_back"]] == ["003-create-order"]
    for shard in shards:
        assert consistent(fleet, shard) == IDS[:2]
    assert fleet.cli("verify", "--env", "test", "--at", "002-add-address").exit_code == EXIT_OK
    assert fleet.cli("rollback", "--env", "test", "--release", "0000000000000000").exit_code == 2


def test_a_dry_run_works_as_a_role_that_can_only_read(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    role = "reader_" + shard[-6:]
    fleet.query(shard, f"CREATE ROLE {role} LOGIN PASSWORD 'reader-secret'")
    fleet.query(shard, f"GRANT CONNECT ON DATABASE {shard} TO {role}")
    fleet.query(shard, f"REVOKE CREATE ON SCHEMA public FROM {role}, PUBLIC")
    fleet.query(shard, f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    fleet.write_env([{"id": "reader", "dsn": fleet.dsn(shard, user=role, password="reader-secret")}])

    code, dry = run_json(fleet, "rollback", "--env", "test", "--migration", "002-add-address", "--dry-run")
    assert code == EXIT_OK, dry
    assert dry["mode"] == "plan" and dry["results"][0]["to_roll_back"] == ["004-address-index", "002-add-address"]
    assert consistent(fleet, shard) == IDS


def test_slices_of_a_rollback_cover_the_fleet_once(fleet: Fleet, tmp_path: Path) -> None:
    shards = fleet.add_databases(4)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    seen = []
    for index, part in enumerate(("1/2", "2/2")):
        output = tmp_path / f"slice-{index}.json"
        code, report = run_json(
            fleet, "rollback", "--env", "test", "--to", "003-create-order", "--slice", part, "--output", str(output)
        )
        assert code == EXIT_OK and report["slice"] == part
        seen += [r["target"] for r in report["results"] if r["rolled_back"]]
    assert sorted(seen) == sorted(shards)
    code, merged = run_json(fleet, "report", "merge", str(tmp_path / "slice-0.json"), str(tmp_path / "slice-1.json"))
    assert code == EXIT_OK, merged
    assert merged["rollback"]["to"] == ["003-create-order"]
    assert merged["totals"]["migrations_rolled_back"] == len(shards)
    for shard in shards:
        assert consistent(fleet, shard) == IDS[:3]


def test_sigterm_stops_a_rollback_cleanly_and_resume_finishes_it(fleet: Fleet) -> None:
    shards = fleet.add_databases(3)
    files = dict(SET)
    files["004-address-index.rollback.sql"] = "DROP INDEX person_address;\nSELECT pg_sleep(1.5);"
    fleet.publish(files)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    process = fleet.spawn("rollback", "--env", "test", "--to", "002-add-address", "--concurrency", "1",
                          "--format", "json")  # fmt: skip
    deadline = time.monotonic() + 30
    while not fleet.query(shards[0], "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%%pg_sleep%%' "
                                     "AND pid <> pg_backend_pid()"):  # fmt: skip
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    report = json.loads(stdout)
    first_result = by_target(report)[shards[0]]
    assert first_result["status"] == "skipped" and first_result["error"]["kind"] == "interrupted"
    assert [m["id"] for m in first_result["rolled_back"]] == ["004-address-index"]  # in flight: finished
    assert first_result["to_roll_back"] == ["003-create-order"]
    assert consistent(fleet, shards[0]) == IDS[:3]
    for shard in shards:
        assert fleet.query(shard, "SELECT count(*) FROM yoyo_lock") == [(0,)]
    for shard in shards[1:]:
        assert consistent(fleet, shard) == IDS

    code, resumed = run_json(fleet, "rollback", "--env", "test", "--resume", report["run_id"])
    assert code == EXIT_OK, resumed
    assert resumed["resumed_from"] == report["run_id"]
    for shard in shards:
        assert consistent(fleet, shard) == IDS[:2]


ORACLE_CASES = {
    "dependents-first": (SET, "002-add-address"),
    "several-statements-and-data": (
        {
            "001-create-account.sql": "CREATE TABLE account (id INT PRIMARY KEY, plan TEXT);",
            "001-create-account.rollback.sql": "DROP TABLE account;",
            "002-seed.sql": """\
                -- depends: 001-create-account
                INSERT INTO account VALUES (1, 'free'), (2, 'pro');
                CREATE TABLE plan (name TEXT PRIMARY KEY);
                INSERT INTO plan VALUES ('free'), ('pro');
                """,
            "002-seed.rollback.sql": "DROP TABLE plan;\nDELETE FROM account WHERE id IN (1, 2);",
            "003-fk.sql": "-- depends: 002-seed\nALTER TABLE account ADD FOREIGN KEY (plan) REFERENCES plan (name);",
            "003-fk.rollback.sql": "ALTER TABLE account DROP CONSTRAINT account_plan_fkey;",
        },
        "002-seed",
    ),
    "non-transactional": (
        {
            "001-create-person.sql": SET["001-create-person.sql"],
            "001-create-person.rollback.sql": SET["001-create-person.rollback.sql"],
            "002-name-index.sql": "-- transactional: false\nCREATE INDEX CONCURRENTLY person_name ON person (name);",
            "002-name-index.rollback.sql": "-- transactional: false\nDROP INDEX CONCURRENTLY person_name;",
        },
        "002-name-index",
    ),
}


@pytest.mark.parametrize("case", sorted(ORACLE_CASES))
def test_fanout_rolls_back_what_yoyo_rolls_back(fleet: Fleet, tmp_path: Path, case: str) -> None:
    """yoyo is the oracle: `yoyo rollback -r ID` on one twin, `fanout rollback --migration ID` on the other."""
    from test_yoyo_parity import _bookkeeping, _dump

    files, migration = ORACLE_CASES[case]
    files = {name: textwrap.dedent(body) for name, body in files.items()}
    by_yoyo, by_fanout = fleet.add_databases(2)
    folder = tmp_path / "set"
    folder.mkdir()
    for name, body in files.items():
        (folder / name).write_text(body)
    url = fleet.dsn(by_yoyo, password=fleet.postgres.password.reveal())
    assert yoyo("apply", "-d", url, str(folder), cwd=tmp_path).returncode == 0
    fleet.publish(files)
    fleet.write_env([{"id": "twin", "dsn": fleet.dsn(by_fanout)}])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    done = yoyo("rollback", "-d", url, "-r", migration, str(folder), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    code, report = run_json(fleet, "rollback", "--env", "test", "--migration", migration)
    assert code == EXIT_OK, report
    assert report["results"][0]["rolled_back"], "nothing rolled back: the row tests nothing"

    assert _dump(fleet, by_fanout, "--schema-only") == _dump(fleet, by_yoyo, "--schema-only")
    assert _dump(fleet, by_fanout, "--data-only") == _dump(fleet, by_yoyo, "--data-only")
    theirs, ours = _bookkeeping(fleet, by_yoyo, None), _bookkeeping(fleet, by_fanout, None)
    for table in theirs:
        assert ours[table] == theirs[table], table


def test_several_services_are_rolled_back_in_reverse_service_order(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.services = ("people", "billing")
    fleet.publish(first(2), service="people")
    fleet.publish(
        {
            "b001-invoice.sql": "CREATE TABLE invoice (id INT PRIMARY KEY, person_id INT REFERENCES person (id));",
            "b001-invoice.rollback.sql": "DROP TABLE invoice;",
            "b002-invoice-address.sql": "-- depends: b001-invoice\nALTER TABLE invoice ADD COLUMN address TEXT;",
            "b002-invoice-address.rollback.sql": "ALTER TABLE invoice DROP COLUMN address;",
        },
        service="billing",
    )
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    # Rolling people back to nothing would fail while billing's invoice references person: billing goes first.
    code, report = run_json(
        fleet, "rollback", "--env", "test", "--migration", "001-create-person", "--migration", "b001-invoice"
    )
    assert code == EXIT_OK, report
    assert [(r["service"], [m["id"] for m in r["rolled_back"]]) for r in report["results"]] == [
        ("billing", ["b002-invoice-address", "b001-invoice"]),
        ("people", ["002-add-address", "001-create-person"]),
    ]
    logged = fleet.query(
        shard, "SELECT migration_id FROM _yoyo_log WHERE operation = 'rollback' ORDER BY created_at_utc"
    )
    assert [m for (m,) in logged] == ["b002-invoice-address", "b001-invoice", "002-add-address", "001-create-person"]
    assert fleet.applied(shard) == [] and checksummed(fleet, shard) == []
    assert fleet.query(shard, "SELECT to_regclass('invoice'), to_regclass('person')") == [(None, None)]


def test_a_rollback_behind_a_long_transaction_is_retried_and_succeeds_once_it_ends(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(SET)
    fleet.write_env(extra='[runner]\nlock_timeout = "200ms"\nretries = 8\nretry_backoff = 0.1\n')
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    blocker = psycopg2.connect(**fleet.postgres.connect_kwargs(shard))
    blocker.cursor().execute("SELECT count(*) FROM customer_order")

    def release_after_the_first_timeout() -> None:
        seen_waiting, deadline = False, time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = fleet.query(
                shard,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%%customer_order%%'",
            )
            if seen_waiting and not waiting:
                break
            seen_waiting = seen_waiting or bool(waiting)
            time.sleep(0.005)
        blocker.rollback()

    release = threading.Thread(target=release_after_the_first_timeout)
    release.start()
    try:
        code, report = run_json(fleet, "rollback", "--env", "test", "--migration", "003-create-order")
    finally:
        release.join()
        blocker.close()
    assert code == EXIT_OK, report
    (row,) = report["results"]
    assert row["status"] == "rolled-back"
    assert row["retries"] and all(r["migration"] == "003-create-order" and "55P03" in r["reason"]
                                  for r in row["retries"])  # fmt: skip
    assert consistent(fleet, shard) == ["001-create-person", "002-add-address", "004-address-index"]


def test_an_older_release_is_found_in_the_kept_manifests(fleet: Fleet, tmp_path: Path) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.write_env()
    root = tmp_path / "src"
    folder = root / "app" / "test"
    folder.mkdir(parents=True)
    releases = []
    for count in (2, 3, 4):  # three releases: 001+002, then 003, then 004
        for name, body in first(count).items():
            (folder / name).write_text(textwrap.dedent(body))
        assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(root)).exit_code == EXIT_OK
        code, plan = run_json(fleet, "plan", "--env", "test")
        releases.append(plan["source"]["sets"][0]["release"])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    # The middle release added 003 alone; 004 (the current release) depends on 002, not on 003.
    code, report = run_json(fleet, "rollback", "--env", "test", "--release", releases[1])
    assert code == EXIT_OK, report
    assert [m["id"] for m in report["results"][0]["rolled_back"]] == ["003-create-order"]
    assert consistent(fleet, shard) == ["001-create-person", "002-add-address", "004-address-index"]
    # The first release's migrations are what everything else depends on.
    code, dry = run_json(fleet, "rollback", "--env", "test", "--release", releases[0], "--dry-run")
    assert dry["results"][0]["to_roll_back"] == ["004-address-index", "002-add-address", "001-create-person"]


def test_lint_warns_that_yoyo_reads_transactional_false_from_the_migration_not_its_rollback_file() -> None:
    from fanout.lint import Severity, lint

    mismatched = lint({"001-a.sql": b"CREATE TABLE a (id INT);",
                       "001-a.rollback.sql": b"-- transactional: false\nDROP TABLE a;"})  # fmt: skip
    assert [(p.file, p.severity) for p in mismatched] == [("001-a.rollback.sql", Severity.WARNING)]
    assert "runs inside a transaction" in mismatched[0].message
    matched = {"001-a.sql": b"-- transactional: false\nCREATE INDEX CONCURRENTLY i ON a (id);",
               "001-a.rollback.sql": b"-- transactional: false\nDROP INDEX CONCURRENTLY i;"}  # fmt: skip
    assert lint(matched) == []


def test_selection_is_newest_first_with_dependents_before_what_they_depend_on() -> None:
    from fanout.report import RollbackRequest
    from fanout.rollback import Graph, candidates, on_shard

    graph = Graph(
        service="app",
        order=("a", "b", "c", "d"),
        depends={"b": frozenset({"a"}), "c": frozenset({"a"}), "d": frozenset({"b"})},
        rollback_files=frozenset("abcd"),
        release="r2",
        added=frozenset({"c"}),
    )
    assert candidates(RollbackRequest(to=("b",)), [graph]) == {"app": ("d", "c")}
    assert candidates(RollbackRequest(migrations=("b",)), [graph]) == {"app": ("d", "b")}
    assert candidates(RollbackRequest(migrations=("a",)), [graph]) == {"app": ("d", "c", "b", "a")}
    assert candidates(RollbackRequest(release="r2"), [graph]) == {"app": ("c",)}
    assert on_shard(("d", "c", "b", "a"), {"a", "b", "c"}) == ("c", "b", "a")  # a shard behind: only what it has


def test_a_rollback_past_the_target_timeout_is_cancelled_and_leaves_its_shard_as_it_was(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    files = dict(SET)
    files["003-create-order.rollback.sql"] = "DROP INDEX customer_order_person;\nSELECT pg_sleep(30);"
    fleet.publish(files)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    started = time.monotonic()
    code, report = run_json(fleet, "rollback", "--env", "test", "--to", "002-add-address", "--target-timeout", "2")
    assert time.monotonic() - started < 20
    assert code == EXIT_TARGETS_FAILED
    (row,) = report["results"]
    assert row["error"]["kind"] == "target-timeout", row["error"]
    assert [m["id"] for m in row["rolled_back"]] == ["004-address-index"]
    assert consistent(fleet, shard) == IDS[:3]  # 003's rollback was cancelled as a whole
    assert fleet.query(shard, "SELECT to_regclass('customer_order_person') IS NOT NULL") == [(True,)]
    assert fleet.query(shard, "SELECT count(*) FROM yoyo_lock") == [(0,)]


def test_a_schema_per_tenant_target_is_rolled_back_inside_its_schema(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(SET)
    fleet.write_env([{"id": "tenant", "dsn": fleet.dsn(database), "schema": "Tenant-3"}])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    code, report = run_json(fleet, "rollback", "--env", "test", "--to", "002-add-address")
    assert code == EXIT_OK, report
    assert [m["id"] for m in report["results"][0]["rolled_back"]] == ["004-address-index", "003-create-order"]
    tables = fleet.tables(database, "Tenant-3")
    assert "customer_order" not in tables and "person" in tables
    rows = fleet.query(database, 'SELECT migration_id FROM "Tenant-3"._yoyo_migration ORDER BY 1')
    assert rows == [("001-create-person",), ("002-add-address",)]
    sums = fleet.query(database, 'SELECT migration_id FROM "Tenant-3".fanout_checksums ORDER BY 1')
    assert sums == rows
    assert fleet.tables(database) == set()  # nothing leaked into public


def test_a_non_transactional_rollback_stopped_midway_leaves_the_migration_in_doubt_until_settled(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(
        {
            **first(1),
            "002-indexes.sql": "-- transactional: false\nCREATE INDEX CONCURRENTLY person_name ON person (name);\n"
            "CREATE INDEX CONCURRENTLY person_id_name ON person (id, name);",
            # The second statement fails after the first has dropped an index: the shard is between states.
            "002-indexes.rollback.sql": "DROP INDEX CONCURRENTLY person_id_name;\nDROP INDEX CONCURRENTLY no_such_index;",
        }
    )
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    code, report = run_json(fleet, "rollback", "--env", "test", "--to", "001-create-person")
    assert code == EXIT_TARGETS_FAILED
    (row,) = report["results"]
    assert row["error"]["kind"] == "migration" and "marked in doubt" in row["error"]["message"]
    assert fleet.applied(shard) == ["001-create-person", "002-indexes"]  # still recorded: not rolled back whole
    marks = fleet.query(shard, "SELECT migration_id, operation FROM fanout_in_doubt")
    assert marks == [("002-indexes", "rollback")]

    # The next rollback does not run it blindly again: the shard is in doubt until an operator settles it.
    code, again = run_json(fleet, "rollback", "--env", "test", "--to", "001-create-person")
    assert code == EXIT_TARGETS_FAILED
    (row,) = again["results"]
    assert row["status"] == "in-doubt" and row["error"]["kind"] == "in-doubt"
    assert "rollback of 002-indexes" in row["error"]["message"]
    assert fleet.query(shard, "SELECT to_regclass('person_name') IS NOT NULL") == [(True,)]  # untouched

    # The operator finishes the rollback by hand and says so: the record goes, the mark with it.
    fleet.query(shard, "DROP INDEX person_name")
    settled = fleet.cli("unmark", "--env", "test", "--migration", "002-indexes", "--reason", "dropped by hand")
    assert settled.exit_code == EXIT_OK, settled.output
    assert fleet.query(shard, "SELECT count(*) FROM fanout_in_doubt") == [(0,)]
    code, done = run_json(fleet, "rollback", "--env", "test", "--to", "001-create-person")
    assert code == EXIT_OK and done["results"][0]["status"] == "up-to-date"
    assert recorded(fleet, shard) == checksummed(fleet, shard) == ["001-create-person"]


def test_a_non_transactional_rollback_whose_first_statement_fails_is_not_in_doubt(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(
        {
            **first(1),
            "002-name-index.sql": "-- transactional: false\nCREATE INDEX CONCURRENTLY person_name ON person (name);",
            "002-name-index.rollback.sql": "DROP INDEX CONCURRENTLY no_such_index;",
        }
    )
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    code, report = run_json(fleet, "rollback", "--env", "test", "--to", "001-create-person")
    assert code == EXIT_TARGETS_FAILED
    assert report["results"][0]["error"]["kind"] == "migration"
    assert "in doubt" not in report["results"][0]["error"]["message"]
    assert fleet.query(shard, "SELECT count(*) FROM fanout_in_doubt") == [(0,)]
    assert recorded(fleet, shard) == ["001-create-person", "002-name-index"]


def test_a_reapply_that_failed_on_one_shard_is_resumed_there_only(fleet: Fleet) -> None:
    shards = fleet.add_databases(2)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(shards[1], "CREATE VIEW order_view AS SELECT * FROM customer_order")  # its rollback fails there

    code, report = run_json(fleet, "reapply", "--env", "test", "--migration", "003-create-order")
    assert code == EXIT_TARGETS_FAILED
    assert [by_target(report)[s]["status"] for s in shards] == ["applied", "failed"]
    assert consistent(fleet, shards[1]) == IDS  # where it failed, nothing changed
    fleet.query(shards[1], "DROP VIEW order_view")
    code, resumed = run_json(fleet, "reapply", "--env", "test", "--migration", "003-create-order",
                             "--resume", report["run_id"])  # fmt: skip
    assert code == EXIT_OK, resumed
    assert [r["target"] for r in resumed["results"]] == [shards[1]]
    for shard in shards:
        assert consistent(fleet, shard) == IDS
        ops = fleet.query(shard, "SELECT operation FROM _yoyo_log WHERE migration_id = '003-create-order' "
                                 "ORDER BY created_at_utc")  # fmt: skip
        assert ops == [("apply",), ("rollback",), ("apply",)]


def test_a_rollback_left_in_doubt_is_reported_by_plan_verify_and_apply_not_up_to_date(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(
        {
            **first(1),
            "002-indexes.sql": "-- transactional: false\nCREATE INDEX CONCURRENTLY person_name ON person (name);\n"
            "CREATE INDEX CONCURRENTLY person_id_name ON person (id, name);",
            "002-indexes.rollback.sql": "DROP INDEX CONCURRENTLY person_id_name;\nDROP INDEX CONCURRENTLY no_such_index;",
        }
    )
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    code, _ = run_json(fleet, "rollback", "--env", "test", "--to", "001-create-person")
    assert code == EXIT_TARGETS_FAILED
    assert fleet.query(shard, "SELECT operation FROM fanout_in_doubt") == [("rollback",)]

    # 002 is still recorded but half rolled back (person_id_name is gone): no command may call it up to date.
    for command in ("plan", "verify", "apply"):
        code, report = run_json(fleet, command, "--env", "test")
        assert code == EXIT_TARGETS_FAILED, (command, report)
        (row,) = report["results"]
        assert row["status"] == "in-doubt" and row["error"]["kind"] == "in-doubt", (command, row)
        message = row["error"]["message"]
        assert "002-indexes was started (rollback)" in message and "its rollback is complete" in message, message
    # apply left the mark for the operator
    assert fleet.query(shard, "SELECT operation FROM fanout_in_doubt") == [("rollback",)]
    assert recorded(fleet, shard) == ["001-create-person", "002-indexes"]


def test_a_real_rollback_with_detailed_exitcode_exits_0_not_pending_once_done(fleet: Fleet) -> None:
    # --detailed-exitcode speaks of a dry run ("would be rolled back"); a rollback that did its work must not
    # exit 10 because the rolled-back migrations are now pending.
    (shard,) = fleet.add_databases(1)
    fleet.publish(SET)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    done = fleet.cli("rollback", "--env", "test", "--to", "002-add-address", "--detailed-exitcode")
    assert done.exit_code == EXIT_OK, done.output
    assert consistent(fleet, shard) == IDS[:2]


def test_a_non_transactional_rollback_shorter_than_its_migration_is_not_in_doubt_when_its_first_statement_fails(
    fleet: Fleet,
) -> None:
    # yoyo pairs apply and rollback statements (zip_longest): the apply's extra ANALYZE has no rollback, and
    # skipping it must not count as a rollback statement that ran.
    (shard,) = fleet.add_databases(1)
    fleet.publish(
        {
            **first(1),
            "002-name-index.sql": "-- transactional: false\nCREATE INDEX CONCURRENTLY person_name ON person (name);\n"
            "ANALYZE person;",
            "002-name-index.rollback.sql": "DROP INDEX CONCURRENTLY no_such_index;",
        }
    )
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    code, report = run_json(fleet, "rollback", "--env", "test", "--to", "001-create-person")
    assert code == EXIT_TARGETS_FAILED
    assert report["results"][0]["error"]["kind"] == "migration"
    assert "in doubt" not in report["results"][0]["error"]["message"]
    assert fleet.query(shard, "SELECT count(*) FROM fanout_in_doubt") == [(0,)]
    assert recorded(fleet, shard) == ["001-create-person", "002-name-index"]


def test_a_post_apply_hook_failing_after_a_reapply_is_a_hook_failure_and_stays_due(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish({**SET, "post-apply-count.sql": "INSERT INTO hook_runs VALUES (1);"})
    fleet.write_env()
    fleet.query(shard, "CREATE TABLE hook_runs (n INT)")
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(shard, "DROP TABLE hook_runs")  # the hook fails from now on

    code, report = run_json(fleet, "reapply", "--env", "test", "--migration", "004-address-index")
    assert code == EXIT_TARGETS_FAILED
    (row,) = report["results"]
    assert row["error"]["kind"] == "hook" and row["error"]["migration"] == "post-apply-count", row["error"]
    assert consistent(fleet, shard) == IDS  # the reapply itself is done and recorded

    fleet.query(shard, "CREATE TABLE hook_runs (n INT)")  # the operator fixes the cause
    code, applied = run_json(fleet, "apply", "--env", "test")  # nothing to apply: the hook is still due
    assert code == EXIT_OK, applied
    assert fleet.query(shard, "SELECT count(*) FROM hook_runs") == [(1,)]
