"""Integrity of what was applied: per-shard checksums, drift, accept, baseline, verify, pinned bytes."""

from __future__ import annotations

import hashlib
import json
import textwrap
import time
from pathlib import Path

from conftest import MIGRATIONS, Fleet
from yoyo import get_backend, read_migrations

from fanout.errors import EXIT_OK, EXIT_TARGETS_FAILED


def sha(body: str) -> str:
    return hashlib.sha256(textwrap.dedent(body).encode()).hexdigest()


def checksum_rows(fleet: Fleet, database: str) -> dict[str, tuple[str, str, str, str]]:
    rows = fleet.query(database, "SELECT migration_id, sha256, service, environment, how FROM fanout_checksums")
    return {r[0]: tuple(r[1:]) for r in rows}


def migrated(fleet: Fleet, count: int = 2) -> list[str]:
    names = fleet.add_databases(count)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    return names


def report_of(fleet: Fleet, *args: str) -> tuple[int, dict]:
    result = fleet.cli(*args, "--format", "json")
    return result.exit_code, json.loads(result.stdout)


def test_apply_records_the_checksum_of_what_it_ran_in_the_same_transaction(fleet: Fleet) -> None:
    (name,) = migrated(fleet, 1)
    rows = checksum_rows(fleet, name)
    assert rows == {
        "001-create-person": (sha(MIGRATIONS["001-create-person.sql"]), "app", "test", "applied"),
        "002-add-address": (sha(MIGRATIONS["002-add-address.sql"]), "app", "test", "applied"),
        "003-create-order": (sha(MIGRATIONS["003-create-order.sql"]), "app", "test", "applied"),
    }
    code, verified = report_of(fleet, "verify", "--env", "test")
    assert code == EXIT_OK
    assert {r["status"] for r in verified["results"]} == {"up-to-date"}
    assert all(r["drift"] == [] and r["unverified"] == [] for r in verified["results"])


def test_an_edited_applied_migration_is_drift_apply_refuses_until_it_is_accepted(fleet: Fleet) -> None:
    first, second = migrated(fleet, 2)
    edited = "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address VARCHAR(200);\n"
    fleet.publish(
        {
            "002-add-address.sql": edited,
            "004-add-phone.sql": "-- depends: 003-create-order\nALTER TABLE person ADD COLUMN phone TEXT;",
        }
    )

    code, plan = report_of(fleet, "plan", "--env", "test")
    assert code == EXIT_TARGETS_FAILED
    for row in plan["results"]:
        assert row["status"] == "drifted"
        assert row["drift"] == [
            {
                "migration": "002-add-address",
                "kind": "changed",
                "recorded": sha(MIGRATIONS["002-add-address.sql"]),
                "current": sha(edited),
                "detail": f"applied as {sha(MIGRATIONS['002-add-address.sql'])[:12]}, the set now has {sha(edited)[:12]}",
            }
        ]
        assert row["pending"] == ["004-add-phone"]
    text = fleet.cli("status", "--env", "test")
    assert "drift: 002-add-address changed" in text.stdout
    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_TARGETS_FAILED

    code, refused = report_of(fleet, "apply", "--env", "test")
    assert code == EXIT_TARGETS_FAILED
    for row in refused["results"]:
        assert row["status"] == "failed"
        assert row["error"]["kind"] == "drift"
        assert "fanout accept --migration ID" in row["error"]["message"]
    assert "004-add-phone" not in fleet.applied(first)  # nothing ran on a drifted shard

    accepted = fleet.cli("accept", "--env", "test", "--migration", "002-add-address", "--target", first,
                         "--reason", "widened in review, PR #812", "--format", "json")  # fmt: skip
    assert accepted.exit_code == EXIT_OK, accepted.output
    assert json.loads(accepted.stdout)[0]["recorded"] == ["002-add-address"]
    assert checksum_rows(fleet, first)["002-add-address"] == (sha(edited), "app", "test", "accepted")
    log = fleet.query(first, "SELECT migration_id, old_sha256, new_sha256, action, reason FROM fanout_checksum_log")
    assert log == [("002-add-address", sha(MIGRATIONS["002-add-address.sql"]), sha(edited), "accepted",
                    "widened in review, PR #812")]  # fmt: skip

    code, after = report_of(fleet, "apply", "--env", "test")
    assert code == EXIT_TARGETS_FAILED  # the second shard was not accepted and still refuses
    status = {r["target"]: r["status"] for r in after["results"]}
    assert status == {first: "applied", second: "failed"}
    assert fleet.applied(first)[-1] == "004-add-phone"
    again = fleet.cli(
        "accept", "--env", "test", "--migration", "002-add-address", "--reason", "same", "--format", "json"
    )
    assert [r["recorded"] for r in json.loads(again.stdout)] == [[], ["002-add-address"]]  # idempotent on the first
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_OK


def test_a_migration_gone_from_the_set_or_from_another_environment_is_drift(fleet: Fleet) -> None:
    (name,) = migrated(fleet, 1)
    fleet.s3.client().delete_object(Bucket=fleet.bucket, Key="migrations/app/test/003-create-order.sql")
    code, plan = report_of(fleet, "plan", "--env", "test")
    assert code == EXIT_TARGETS_FAILED
    ((drift,),) = [r["drift"] for r in plan["results"]]
    assert (drift["migration"], drift["kind"], drift["current"]) == ("003-create-order", "missing", None)

    retired = fleet.cli("accept", "--env", "test", "--migration", "003-create-order", "--reason", "squashed")
    assert retired.exit_code == EXIT_OK
    assert checksum_rows(fleet, name)["003-create-order"][3] == "retired"
    assert report_of(fleet, "plan", "--env", "test")[0] == EXIT_OK

    # The same shard listed in another environment, whose set has the same ids.
    fleet.env_name = "other"
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    code, other = report_of(fleet, "plan", "--env", "other")
    assert code == EXIT_TARGETS_FAILED
    kinds = {d["migration"]: d["kind"] for r in other["results"] for d in r["drift"]}
    assert kinds == {"001-create-person": "foreign", "002-add-address": "foreign"}


def test_baseline_adopts_a_shard_migrated_by_plain_yoyo_without_running_anything(fleet: Fleet, tmp_path: Path) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    local = tmp_path / "yoyo"
    local.mkdir()
    for file, body in MIGRATIONS.items():
        (local / file).write_text(textwrap.dedent(body))
    (local / "099-hotfix.sql").write_text("CREATE TABLE hotfix (id INT);")
    backend = get_backend(fleet.dsn(name, password=fleet.postgres.password.reveal()))
    with backend.lock():
        backend.apply_migrations(backend.to_apply(read_migrations(str(local))))
    backend.connection.close()

    code, plan = report_of(fleet, "plan", "--env", "test")
    (row,) = plan["results"]
    assert row["unverified"] == ["001-create-person", "002-add-address", "003-create-order"]
    # yoyo applied a migration that no set of the environment has: that is drift too.
    assert [(d["migration"], d["kind"]) for d in row["drift"]] == [("099-hotfix", "missing")]
    assert code == EXIT_TARGETS_FAILED
    assert fleet.cli("accept", "--env", "test", "--migration", "099-hotfix", "--reason", "hand hotfix").exit_code == 0

    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_TARGETS_FAILED  # applied, but unverified
    before = fleet.query(name, "SELECT count(*) FROM _yoyo_log")
    done = fleet.cli("baseline", "--env", "test", "--format", "json")
    assert done.exit_code == EXIT_OK, done.output
    assert json.loads(done.stdout)[0]["recorded"] == ["001-create-person", "002-add-address", "003-create-order"]
    assert fleet.query(name, "SELECT count(*) FROM _yoyo_log") == before  # nothing ran
    assert {k: v[3] for k, v in checksum_rows(fleet, name).items()} == {
        "001-create-person": "baselined", "002-add-address": "baselined", "003-create-order": "baselined",
        "099-hotfix": "retired",
    }  # fmt: skip
    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_OK
    again = fleet.cli("baseline", "--env", "test", "--format", "json")
    assert json.loads(again.stdout)[0]["recorded"] == []

    fleet.publish({"001-create-person.sql": "CREATE TABLE person (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL);"})
    code, drifted = report_of(fleet, "verify", "--env", "test")
    assert code == EXIT_TARGETS_FAILED
    assert [d["kind"] for d in drifted["results"][0]["drift"]] == ["changed"]


def test_verify_fails_a_shard_that_is_behind(fleet: Fleet) -> None:
    migrated(fleet, 1)
    fleet.publish({"004-add-phone.sql": "-- depends: 003-create-order\nALTER TABLE person ADD COLUMN phone TEXT;"})
    code, report = report_of(fleet, "verify", "--env", "test")
    assert code == EXIT_TARGETS_FAILED
    assert report["results"][0]["pending"] == ["004-add-phone"]


def test_an_object_overwritten_in_s3_during_an_apply_does_not_reach_the_later_shards(fleet: Fleet) -> None:
    names = fleet.add_databases(3)
    slow = dict(MIGRATIONS)
    slow["002-add-address.sql"] = (
        "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT; SELECT pg_sleep(0.4);"
    )
    fleet.publish(slow)
    fleet.write_env()
    runner = fleet.spawn("apply", "--env", "test", "--concurrency", "1", "--format", "json")
    deadline = time.monotonic() + 30
    while not fleet.applied(names[0]) and time.monotonic() < deadline:  # the run has begun: its snapshot is taken
        time.sleep(0.02)
    fleet.publish({"003-create-order.sql": "-- depends: 002-add-address\nCREATE TABLE hijacked (id INT);"})
    stdout, stderr = runner.communicate(timeout=120)
    assert runner.returncode == EXIT_OK, stderr

    original = sha(MIGRATIONS["003-create-order.sql"])
    assert json.loads(stdout)["source"]["sets"][0]["files"][-1]["sha256"] == original
    for name in names:
        assert "customer_order" in fleet.tables(name) and "hijacked" not in fleet.tables(name)
        assert checksum_rows(fleet, name)["003-create-order"][0] == original
    # The next run sees the overwrite as what it is: drift.
    assert report_of(fleet, "plan", "--env", "test")[0] == EXIT_TARGETS_FAILED


def test_checksums_are_recorded_on_both_apply_paths_whatever_the_text_holds(fleet: Fleet) -> None:
    """The one-round-trip path and yoyo's step path (non-transactional) both record; % is only text."""
    (name,) = fleet.add_databases(1)
    files = {
        **MIGRATIONS,
        "004-seed-50%.sql": "-- depends: 003-create-order\nINSERT INTO person (name) VALUES ('100%'), ('%(x)s');",
        "005-index-%s.sql": "-- depends: 004-seed-50%\n-- transactional: false\n"
        "CREATE INDEX CONCURRENTLY person_name_idx ON person (name);",
    }
    fleet.publish(files)
    fleet.write_env()
    result = fleet.cli("apply", "--env", "test")
    assert result.exit_code == EXIT_OK, result.output
    rows = checksum_rows(fleet, name)
    assert rows["004-seed-50%"][0] == sha(files["004-seed-50%.sql"])
    assert rows["005-index-%s"][0] == sha(files["005-index-%s.sql"])
    assert fleet.query(name, "SELECT name FROM person ORDER BY name") == [("%(x)s",), ("100%",)]
    assert fleet.cli("verify", "--env", "test").exit_code == EXIT_OK
