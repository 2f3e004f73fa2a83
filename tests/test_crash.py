"""Exactly-once apply: SIGKILL the runner at random moments; a plain re-run always converges.

Each round migrates fresh shards with a real `fanout apply` process, kills it with
SIGKILL at a random moment while it works, checks every shard for a change applied
but unrecorded (or recorded but not applied), then re-runs apply as a user would and
checks that it converges with no manual step: every migration recorded once, every
effect present, no lock left.

The quick form (4 rounds) runs in `make test`; the long form (marked slow, run by `make test-long`)
does 20, and the storm is the same body with more: `FANOUT_KILL_ROUNDS=200 pytest -m slow
tests/test_crash.py` (FANOUT_KILL_SEED replays).
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

QUICK_ROUNDS = 4
LONG_ROUNDS = int(os.environ.get("FANOUT_KILL_ROUNDS", "20"))
SEED = int(os.environ.get("FANOUT_KILL_SEED", str(int(time.time()))))
SHARDS_PER_ROUND = 3

CRASH_SET = {
    "001-create-person.sql": "CREATE TABLE person (id SERIAL PRIMARY KEY, name TEXT NOT NULL); SELECT pg_sleep(0.02);",
    "002-add-address.sql": """\
        -- depends: 001-create-person
        ALTER TABLE person ADD COLUMN address TEXT;
        SELECT pg_sleep(0.03);
        """,
    "003-backfill.sql": """\
        -- depends: 002-add-address
        INSERT INTO person (name, address) SELECT 'p' || g, 'street ' || g FROM generate_series(1, 2000) g;
        SELECT pg_sleep(0.03);
        CREATE INDEX person_name ON person (name);
        """,
    "004-create-order.sql": """\
        -- depends: 003-backfill
        CREATE TABLE customer_order (id SERIAL PRIMARY KEY, person_id INT REFERENCES person (id));
        SELECT pg_sleep(0.02);
        """,
}
IDS = ["001-create-person", "002-add-address", "003-backfill", "004-create-order"]

# Per migration: a query that says whether its whole effect is there ('all'), none of it ('none'), or a part.
EFFECTS = {
    "001-create-person": "SELECT CASE WHEN to_regclass('person') IS NULL THEN 'none' ELSE 'all' END",
    "002-add-address": """SELECT CASE WHEN EXISTS (SELECT 1 FROM information_schema.columns
                          WHERE table_name = 'person' AND column_name = 'address') THEN 'all' ELSE 'none' END""",
    # Only run once person exists (a query naming a missing table does not parse).
    "003-backfill": """SELECT CASE
                         WHEN (SELECT count(*) FROM person) = 2000 AND to_regclass('person_name') IS NOT NULL THEN 'all'
                         WHEN (SELECT count(*) FROM person) = 0 AND to_regclass('person_name') IS NULL THEN 'none'
                         ELSE 'partial' END""",
    "004-create-order": "SELECT CASE WHEN to_regclass('customer_order') IS NULL THEN 'none' ELSE 'all' END",
}


def shard_state(fleet: Fleet, database: str) -> tuple[list[str], list[str]]:
    """(recorded migration ids, migration ids whose effect is present); raises on a partial effect."""
    recorded = fleet.applied(database)
    present = []
    for migration_id, probe in EFFECTS.items():
        if migration_id != "001-create-person" and "001-create-person" not in present:
            continue
        (effect,) = fleet.query(database, probe)[0]
        assert effect != "partial", f"{database}: {migration_id} is half-applied"
        if effect == "all":
            present.append(migration_id)
    return recorded, present


def running_sessions(fleet: Fleet, database: str) -> bool:
    rows = fleet.query(
        database,
        "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'fanout apply %%' AND datname = %s",
        (database,),
    )
    return bool(rows)


def kill_rounds(fleet: Fleet, rounds: int) -> dict[str, int]:
    """Kill `rounds` runs at random moments, re-run each; how the shards stood at the kills."""
    rng = random.Random(SEED)
    fleet.publish(CRASH_SET)
    outcomes = {"partial": 0, "untouched": 0, "complete": 0, "stale_locks_broken": 0}

    for round_number in range(rounds):
        shards = fleet.add_databases(SHARDS_PER_ROUND)
        fleet.write_env([{"id": name, "dsn": fleet.dsn(name)} for name in shards])
        process = fleet.spawn("apply", "--env", "test", "--concurrency", str(SHARDS_PER_ROUND))
        deadline = time.monotonic() + 20
        while not running_sessions(fleet, shards[0]) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        context = f"seed {SEED}, round {round_number}"
        # The server finishes the query it already received (a whole migration and its record
        # travel as one message), then notices the dead client: judge the state after that.
        deadline = time.monotonic() + 15
        while any(running_sessions(fleet, name) for name in shards):
            assert time.monotonic() < deadline, f"{context}: the killed runner's sessions did not end"
            time.sleep(0.01)

        for name in shards:
            recorded, present = shard_state(fleet, name)
            assert recorded == present, f"{context}: {name}: recorded {recorded} but applied {present}"
            kind = "complete" if len(recorded) == len(IDS) else "untouched" if not recorded else "partial"
            outcomes[kind] += 1

        rerun = fleet.cli("apply", "--env", "test", "--lock-wait", "30", "--format", "json")

        assert rerun.exit_code == EXIT_OK, f"{context}: {rerun.output}"
        report = json.loads(rerun.stdout)
        outcomes["stale_locks_broken"] += sum(1 for r in report["results"] if r["broken_lock"])
        for name in shards:
            recorded, present = shard_state(fleet, name)
            assert recorded == IDS == present, context
            assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)], context
            logged = fleet.query(name, "SELECT count(*) FROM _yoyo_log WHERE operation = 'apply'")
            assert logged == [(len(IDS),)], f"{context}: {name}: a migration was logged twice"
    print(f"\n{rounds} SIGKILLs (seed {SEED}): shard states at kill time {outcomes}")
    return outcomes


@pytest.mark.timeout(120 + 15 * QUICK_ROUNDS)
def test_sigkill_at_random_moments_then_a_plain_rerun_converges(fleet: Fleet) -> None:
    outcomes = kill_rounds(fleet, QUICK_ROUNDS)
    # At least one kill must have landed mid-run (few rounds: either sign of it will do).
    assert outcomes["partial"] + outcomes["stale_locks_broken"] > 0, outcomes


@pytest.mark.slow
@pytest.mark.timeout(120 + 15 * LONG_ROUNDS)  # a round takes 1.5-5 s on 2 cores, more when they are shared
def test_sigkill_storm_leaves_every_shard_converged_and_breaks_stale_locks(fleet: Fleet) -> None:
    outcomes = kill_rounds(fleet, LONG_ROUNDS)
    # The kills must have landed mid-run, not only before or after it.
    assert outcomes["partial"] > 0, outcomes
    assert outcomes["stale_locks_broken"] > 0, outcomes
