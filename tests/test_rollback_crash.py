"""Exactly-once rollback: SIGKILL `fanout rollback` at random moments; shards stay consistent and a re-run converges.

Each round applies a set to fresh shards, starts a real `fanout rollback` process and
kills it with SIGKILL at a random moment while it works. Then, on every shard, a
migration's effect, yoyo's `_yoyo_migration` row and fanout's checksum row must be all
there or all gone (never rolled back but still recorded, or unrecorded but not rolled
back), and a plain re-run of the rollback must finish the job with no manual step.

The quick form (6 rounds) runs in `make test`; the long form (marked slow, run by `make test-long`)
does 20, FANOUT_ROLLBACK_KILL_ROUNDS sets another count; FANOUT_KILL_SEED replays a failing round's timing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
from conftest import Fleet

from fanout.errors import EXIT_OK

ROUNDS = 6
LONG_ROUNDS = int(os.environ.get("FANOUT_ROLLBACK_KILL_ROUNDS", "20"))
SEED = int(os.environ.get("FANOUT_KILL_SEED", str(int(time.time()))))
SHARDS_PER_ROUND = 3

CRASH_SET = {
    "001-create-person.sql": "CREATE TABLE person (id SERIAL PRIMARY KEY, name TEXT NOT NULL);",
    "001-create-person.rollback.sql": "DROP TABLE person;",
    "002-add-address.sql": "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT;",
    "002-add-address.rollback.sql": "ALTER TABLE person DROP COLUMN address;\nSELECT pg_sleep(0.03);",
    "003-backfill.sql": """\
        -- depends: 002-add-address
        INSERT INTO person (name, address) SELECT 'p' || g, 'street ' || g FROM generate_series(1, 2000) g;
        CREATE INDEX person_name ON person (name);
        """,
    "003-backfill.rollback.sql": "DROP INDEX person_name;\nSELECT pg_sleep(0.03);\nDELETE FROM person;",
    "004-create-order.sql": """\
        -- depends: 003-backfill
        CREATE TABLE customer_order (id SERIAL PRIMARY KEY, person_id INT REFERENCES person (id));
        """,
    "004-create-order.rollback.sql": "SELECT pg_sleep(0.02);\nDROP TABLE customer_order;",
}
IDS = ["001-create-person", "002-add-address", "003-backfill", "004-create-order"]
EFFECTS = {
    "002-add-address": """SELECT CASE WHEN EXISTS (SELECT 1 FROM information_schema.columns
                          WHERE table_name = 'person' AND column_name = 'address') THEN 'all' ELSE 'none' END""",
    "003-backfill": """SELECT CASE
                         WHEN (SELECT count(*) FROM person) = 2000 AND to_regclass('person_name') IS NOT NULL THEN 'all'
                         WHEN (SELECT count(*) FROM person) = 0 AND to_regclass('person_name') IS NULL THEN 'none'
                         ELSE 'partial' END""",
    "004-create-order": "SELECT CASE WHEN to_regclass('customer_order') IS NULL THEN 'none' ELSE 'all' END",
}


def shard_state(fleet: Fleet, database: str) -> tuple[list[str], list[str], list[str]]:
    """(yoyo's records, fanout's checksum rows, effects present); raises on a half-rolled-back migration."""
    recorded = sorted(fleet.applied(database))
    checksummed = sorted(r[0] for r in fleet.query(database, "SELECT migration_id FROM fanout_checksums"))
    present = ["001-create-person"]  # never rolled back here: --to 001
    for migration_id, probe in EFFECTS.items():
        (effect,) = fleet.query(database, probe)[0]
        assert effect != "partial", f"{database}: {migration_id} is half rolled back"
        if effect == "all":
            present.append(migration_id)
    return recorded, checksummed, present


def rollback_sessions(fleet: Fleet, names: list[str]) -> bool:
    rows = fleet.query(
        names[0],
        "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'fanout rollback %%' AND datname = ANY(%s)",
        (names,),
    )
    return bool(rows)


def kill_rounds(fleet: Fleet, rounds: int) -> dict[str, int]:
    rng = random.Random(SEED)
    fleet.publish(CRASH_SET)
    outcomes = {"partial": 0, "untouched": 0, "complete": 0, "stale_locks_broken": 0}
    for round_number in range(rounds):
        shards = fleet.add_databases(SHARDS_PER_ROUND)
        fleet.write_env([{"id": name, "dsn": fleet.dsn(name)} for name in shards])
        assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
        process = fleet.spawn("rollback", "--env", "test", "--to", "001-create-person", "--concurrency", "3")
        deadline = time.monotonic() + 20
        while not rollback_sessions(fleet, shards) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.15))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        context = f"seed {SEED}, round {round_number}"
        deadline = time.monotonic() + 15
        while rollback_sessions(fleet, shards):
            assert time.monotonic() < deadline, f"{context}: the killed runner's sessions did not end"
            time.sleep(0.01)

        for name in shards:
            recorded, checksummed, present = shard_state(fleet, name)
            assert recorded == present, f"{context}: {name}: recorded {recorded} but present {present}"
            assert checksummed == present, f"{context}: {name}: checksums {checksummed} but present {present}"
            kind = "complete" if present == IDS[:1] else "untouched" if present == IDS else "partial"
            outcomes[kind] += 1

        rerun = fleet.cli("rollback", "--env", "test", "--to", "001-create-person", "--lock-wait", "30",
                          "--format", "json")  # fmt: skip
        assert rerun.exit_code == EXIT_OK, f"{context}: {rerun.output}"
        report = json.loads(rerun.stdout)
        outcomes["stale_locks_broken"] += sum(1 for r in report["results"] if r["broken_lock"])
        for name in shards:
            recorded, checksummed, present = shard_state(fleet, name)
            assert recorded == checksummed == present == IDS[:1], context
            assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)], context
            logged = fleet.query(name, "SELECT count(*) FROM _yoyo_log WHERE operation = 'rollback'")
            assert logged == [(len(IDS) - 1,)], f"{context}: {name}: a rollback was logged twice"
            unlogged = fleet.query(name, "SELECT count(*) FROM fanout_checksum_log WHERE action = 'rolled-back'")
            assert unlogged == [(len(IDS) - 1,)], context
    return outcomes


def test_sigkill_during_rollback_never_splits_a_rollback_from_its_records(fleet: Fleet) -> None:
    outcomes = kill_rounds(fleet, ROUNDS)
    # The kills must have landed mid-run, not only before or after it.
    assert outcomes["partial"] + outcomes["stale_locks_broken"] > 0, outcomes
    print(f"\n{ROUNDS} SIGKILLs of rollback (seed {SEED}): shard states at kill time {outcomes}")


@pytest.mark.slow
@pytest.mark.timeout(120 + 30 * LONG_ROUNDS)  # about 12 s a round on 2 shared cores
def test_sigkill_during_rollback_long_form(fleet: Fleet) -> None:
    outcomes = kill_rounds(fleet, LONG_ROUNDS)
    assert outcomes["partial"] > 0 and outcomes["stale_locks_broken"] > 0, outcomes
    print(f"\n{LONG_ROUNDS} SIGKILLs of rollback (seed {SEED}): shard states at kill time {outcomes}")


NON_TRANSACTIONAL_SET = {
    "001-create-person.sql": "CREATE TABLE person (id SERIAL PRIMARY KEY, name TEXT NOT NULL);",
    "001-create-person.rollback.sql": "DROP TABLE person;",
    "002-indexes.sql": "-- transactional: false\nCREATE INDEX CONCURRENTLY person_name ON person (name);\n"
    "CREATE INDEX CONCURRENTLY person_id_name ON person (id, name);",
    "002-indexes.rollback.sql": "DROP INDEX CONCURRENTLY person_id_name;\nSELECT pg_sleep(0.1);\n"
    "DROP INDEX CONCURRENTLY person_name;\nSELECT pg_sleep(0.05);",
}


def test_sigkill_during_a_non_transactional_rollback_is_reported_in_doubt_never_silently_wrong(fleet: Fleet) -> None:
    """Killed midway, a non-transactional rollback is either whole (and recorded so), or marked in doubt."""
    rng = random.Random(SEED)
    fleet.publish(NON_TRANSACTIONAL_SET)
    outcomes = {"in_doubt": 0, "rolled_back": 0, "untouched": 0}
    for round_number in range(4):
        shards = fleet.add_databases(2)
        fleet.write_env([{"id": name, "dsn": fleet.dsn(name)} for name in shards])
        assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
        process = fleet.spawn("rollback", "--env", "test", "--to", "001-create-person", "--concurrency", "2")
        deadline = time.monotonic() + 20
        while not rollback_sessions(fleet, shards) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        context = f"seed {SEED}, round {round_number}"
        deadline = time.monotonic() + 15
        while rollback_sessions(fleet, shards):
            assert time.monotonic() < deadline, context
            time.sleep(0.01)
        doubtful = []
        for name in shards:
            indexes = list(fleet.query(name, "SELECT to_regclass('person_name') IS NOT NULL, "
                                             "to_regclass('person_id_name') IS NOT NULL")[0])  # fmt: skip
            marked = fleet.query(name, "SELECT count(*) FROM fanout_in_doubt")[0][0]
            has = "002-indexes" in fleet.applied(name)
            if marked:
                doubtful.append(name)
                outcomes["in_doubt"] += 1
                assert has, f"{context}: {name}: unrecorded yet still marked"
            elif has:
                assert indexes == [True, True], f"{context}: {name}: recorded but indexes {indexes}"
                outcomes["untouched"] += 1
            else:
                assert indexes == [False, False], f"{context}: {name}: unrecorded but indexes {indexes}"
                outcomes["rolled_back"] += 1
        rerun = fleet.cli("rollback", "--env", "test", "--to", "001-create-person", "--lock-wait", "30",
                          "--format", "json")  # fmt: skip
        results = {r["target"]: r for r in json.loads(rerun.stdout)["results"]}
        for name in shards:
            if name in doubtful:
                assert results[name]["status"] == "in-doubt", f"{context}: {rerun.stdout}"
                # Settled by hand: finish the rollback, then say so.
                fleet.query(name, "DROP INDEX IF EXISTS person_id_name")
                fleet.query(name, "DROP INDEX IF EXISTS person_name")
                done = fleet.cli("unmark", "--env", "test", "--migration", "002-indexes", "--target", name,
                                 "--reason", "finished by hand")  # fmt: skip
                assert done.exit_code == EXIT_OK, done.output
            else:
                assert results[name]["status"] in ("rolled-back", "up-to-date"), f"{context}: {rerun.stdout}"
            assert fleet.applied(name) == ["001-create-person"], context
            assert fleet.query(name, "SELECT count(*) FROM fanout_in_doubt") == [(0,)], context
    print(f"\nnon-transactional rollback SIGKILLs (seed {SEED}): {outcomes}")
