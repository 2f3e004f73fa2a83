"""Non-transactional migrations converge: marked before they run, in doubt when interrupted, settled by hand or repaired.

A `-- transactional: false` migration (CREATE INDEX CONCURRENTLY) that is killed, times
out or fails midway leaves its shard anywhere between before and after. fanout marks it
as started before it runs; a run that finds the mark reports the shard `in-doubt` with
what it finds, never records a migration while an index it builds is INVALID, and the
operator settles it with `fanout mark` / `fanout unmark` or `apply --repair-invalid`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from typing import Any

import psycopg2
import pytest
from conftest import MIGRATIONS, Fleet

from fanout.engines.postgres import indoubt
from fanout.errors import EXIT_CONFIG, EXIT_OK, EXIT_TARGETS_FAILED
from fanout.report import from_dict, to_dict

QUICK_ROUNDS = 3
LONG_ROUNDS = int(os.environ.get("FANOUT_IN_DOUBT_ROUNDS", "8"))
SEED = int(os.environ.get("FANOUT_KILL_SEED", str(int(time.time()))))

PLAIN = "CREATE INDEX CONCURRENTLY big_k ON big (k);"
UNIQUE_IF_NOT_EXISTS = "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS big_k ON big (k);"


def index_migration(statement: str, migration_id: str = "004-index") -> dict[str, str]:
    return {f"{migration_id}.sql": f"-- transactional: false\n-- depends: 003-create-order\n{statement}"}


def migrated_with_big_table(fleet: Fleet, rows: int, extra: str = "") -> str:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env(extra=extra)
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(name, "CREATE TABLE big (id BIGINT PRIMARY KEY, k BIGINT NOT NULL, pad TEXT)")
    fleet.query(name, "INSERT INTO big SELECT g, g, repeat('x', 40) FROM generate_series(1, %s) g", (rows,))
    return name


def json_of(fleet: Fleet, *args: str) -> tuple[int, dict[str, Any]]:
    result = fleet.cli(*args, "--format", "json")
    return result.exit_code, json.loads(result.stdout)


def index_state(fleet: Fleet, database: str, index: str = "big_k") -> bool | None:
    """True VALID, False INVALID, None absent."""
    rows = fleet.query(database, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (index,))
    return rows[0][0] if rows else None


def marks(fleet: Fleet, database: str) -> list[str]:
    if "fanout_in_doubt" not in fleet.tables(database):
        return []
    return [r[0] for r in fleet.query(database, "SELECT migration_id FROM fanout_in_doubt")]


def test_a_statement_timeout_during_an_index_build_leaves_it_in_doubt_until_repaired(fleet: Fleet) -> None:
    name = migrated_with_big_table(fleet, 200_000, '[runner]\nstatement_timeout = "50ms"\n')
    fleet.publish(index_migration(PLAIN))

    failed, first = json_of(fleet, "apply", "--env", "test")
    again, second = json_of(fleet, "apply", "--env", "test")
    plan_code, plan = json_of(fleet, "plan", "--env", "test")
    verify_code, verify = json_of(fleet, "verify", "--env", "test")

    assert failed == EXIT_TARGETS_FAILED
    (row,) = first["results"]
    assert row["error"]["kind"] == "statement-timeout"
    assert row["error"]["invalid_indexes"] == ["public.big_k"]
    assert "marked in doubt" in row["error"]["message"]
    assert row["retries"] == []
    assert index_state(fleet, name) is False and marks(fleet, name) == ["004-index"]
    assert "004-index" not in fleet.applied(name)
    # The next runs do not run it blindly again (it would fail on "already exists" forever): in doubt.
    assert again == EXIT_TARGETS_FAILED
    (row,) = second["results"]
    assert row["status"] == "in-doubt"
    assert row["error"]["kind"] == "in-doubt" and row["error"]["migration"] == "004-index"
    assert row["in_doubt"]["migration"] == "004-index"
    assert row["in_doubt"]["invalid_indexes"] == ["public.big_k"]
    assert row["in_doubt"]["run_id"] == first["run_id"]
    assert row["invalid_indexes"] == ["public.big_k"]
    assert to_dict(from_dict(second)) == second  # in_doubt and invalid_indexes read back as written
    assert plan_code == EXIT_TARGETS_FAILED and plan["results"][0]["status"] == "in-doubt"
    assert plan["results"][0]["invalid_indexes"] == ["public.big_k"]
    assert verify_code == EXIT_TARGETS_FAILED and verify["results"][0]["invalid_indexes"] == ["public.big_k"]

    fleet.write_env()  # no statement_timeout any more
    repaired, third = json_of(fleet, "apply", "--env", "test", "--repair-invalid")
    verified, _ = json_of(fleet, "verify", "--env", "test")

    assert repaired == EXIT_OK, third
    (row,) = third["results"]
    assert [m["id"] for m in row["ran"]] == ["004-index"]
    assert "dropped INVALID index public.big_k" in row["retries"][0]["reason"]
    assert index_state(fleet, name) is True and marks(fleet, name) == []
    assert fleet.applied(name)[-1] == "004-index"
    assert verified == EXIT_OK


def test_if_not_exists_over_an_invalid_index_is_never_recorded_and_repair_builds_it(fleet: Fleet) -> None:
    name = migrated_with_big_table(fleet, 1000)
    fleet.query(name, "UPDATE big SET k = 1 WHERE id = 2")  # a duplicate: the unique build fails, INVALID
    with pytest.raises(Exception, match="could not create unique index"):
        fleet.query(name, "CREATE UNIQUE INDEX CONCURRENTLY big_k ON big (k)")
    fleet.query(name, "UPDATE big SET k = 2 WHERE id = 2")
    status_code, status = json_of(fleet, "status", "--env", "test")
    verify_code, verify = json_of(fleet, "verify", "--env", "test")
    fleet.publish(index_migration(UNIQUE_IF_NOT_EXISTS))

    skipped, first = json_of(fleet, "apply", "--env", "test")
    text = fleet.cli("status", "--env", "test")

    assert status_code == EXIT_OK and status["results"][0]["invalid_indexes"] == ["public.big_k"]
    assert verify_code == EXIT_TARGETS_FAILED and verify["results"][0]["status"] == "up-to-date"
    # yoyo would record it: IF NOT EXISTS skips the INVALID index, and uniqueness is not enforced.
    assert skipped == EXIT_TARGETS_FAILED
    (row,) = first["results"]
    assert row["status"] == "in-doubt"
    assert "not recorded as applied" in row["error"]["message"]
    assert row["in_doubt"]["invalid_indexes"] == ["public.big_k"]
    assert "004-index" not in fleet.applied(name)
    assert "in-doubt" in text.stdout and "INVALID" in text.stdout

    repaired, second = json_of(fleet, "apply", "--env", "test", "--repair-invalid")

    assert repaired == EXIT_OK, second
    assert index_state(fleet, name) is True and marks(fleet, name) == []
    assert fleet.applied(name)[-1] == "004-index"
    with pytest.raises(Exception, match="duplicate key"):
        fleet.query(name, "INSERT INTO big VALUES (0, 5, '')")  # uniqueness is enforced now
    assert json_of(fleet, "verify", "--env", "test")[0] == EXIT_OK


def test_mark_refuses_while_an_index_is_invalid_and_unmark_lets_it_run_again(fleet: Fleet) -> None:
    name = migrated_with_big_table(fleet, 1000)
    fleet.query(name, "UPDATE big SET k = 1 WHERE id = 2")
    fleet.publish(index_migration(UNIQUE_IF_NOT_EXISTS.replace(" IF NOT EXISTS", "")))
    failed, _ = json_of(fleet, "apply", "--env", "test")
    assert failed == EXIT_TARGETS_FAILED and marks(fleet, name) == ["004-index"]

    refused, refusal = json_of(fleet, "mark", "--env", "test", "--migration", "004-index", "--reason", "looks done")
    unknown = fleet.cli("mark", "--env", "test", "--migration", "004-indx", "--reason", "typo")
    fleet.query(name, "UPDATE big SET k = 2 WHERE id = 2")
    fleet.query(name, "DROP INDEX CONCURRENTLY big_k")
    unmarked, unmarking = json_of(
        fleet, "unmark", "--env", "test", "--migration", "004-index", "--reason", "dropped the INVALID index"
    )
    applied = fleet.cli("apply", "--env", "test")

    assert refused == EXIT_TARGETS_FAILED
    assert refusal[0]["refused"] and "INVALID index public.big_k" in refusal[0]["message"]
    assert unknown.exit_code == EXIT_CONFIG and "no migration '004-indx'" in unknown.stderr
    assert unmarked == EXIT_OK and unmarking[0]["changed"] == ["004-index"]
    assert applied.exit_code == EXIT_OK, applied.output
    assert index_state(fleet, name) is True and fleet.applied(name)[-1] == "004-index"

    # unmark of an applied migration removes the record: the next apply runs it again.
    fleet.query(name, "DROP INDEX big_k")
    assert json_of(fleet, "unmark", "--env", "test", "--migration", "004-index", "--reason", "rebuild")[0] == EXIT_OK
    assert "004-index" not in fleet.applied(name)
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    assert index_state(fleet, name) is True
    logged = fleet.query(
        name, "SELECT action, reason FROM fanout_checksum_log WHERE migration_id = '004-index' ORDER BY id"
    )
    assert logged == [("unmarked", "dropped the INVALID index"), ("unmarked", "rebuild")]
    assert fleet.query(
        name, "SELECT operation FROM _yoyo_log WHERE migration_id = '004-index' ORDER BY created_at_utc"
    )[-2:] == [("unmark",), ("apply",)]


def test_a_valid_index_of_an_unrecorded_migration_is_in_doubt_until_marked(fleet: Fleet) -> None:
    name = migrated_with_big_table(fleet, 1000)
    fleet.publish(index_migration(PLAIN))
    fleet.query(name, "CREATE INDEX big_k ON big (k)")  # what a run killed after the build, before the record, leaves
    fleet.query(name, indoubt.create_sql("public"))  # fanout creates the marks table with a run's first mark
    fleet.query(
        name,
        "INSERT INTO fanout_in_doubt VALUES ('004-index', 'apply', 'dead-run', 'ci-7', 4242, 99, now(), '{}')",
    )

    code, first = json_of(fleet, "apply", "--env", "test", "--repair-invalid")
    marked, marking = json_of(
        fleet, "mark", "--env", "test", "--migration", "004-index", "--reason", "index VALID, checked by hand"
    )

    assert code == EXIT_TARGETS_FAILED
    (row,) = first["results"]
    assert row["status"] == "in-doubt"  # VALID without IF NOT EXISTS: a repair would fail on "already exists"
    assert row["in_doubt"]["valid_indexes"] == ["public.big_k"] and row["in_doubt"]["run_id"] == "dead-run"
    assert "fanout mark --migration 004-index" in row["error"]["message"]
    assert marked == EXIT_OK and marking[0]["changed"] == ["004-index"]
    assert fleet.applied(name)[-1] == "004-index" and marks(fleet, name) == []
    assert fleet.query(name, "SELECT how FROM fanout_checksums WHERE migration_id = '004-index'") == [("marked",)]
    assert fleet.query(name, "SELECT action, reason FROM fanout_checksum_log WHERE migration_id = '004-index'") == [
        ("marked", "index VALID, checked by hand")
    ]
    assert json_of(fleet, "verify", "--env", "test")[0] == EXIT_OK
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK


def fanout_sessions(fleet: Fleet, database: str) -> bool:
    return bool(
        fleet.query(
            database,
            "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'fanout apply %%' AND datname = %s",
            (database,),
        )
    )


def build_seconds(fleet: Fleet, database: str) -> float:
    started = time.monotonic()
    fleet.query(database, "CREATE INDEX CONCURRENTLY calibrate ON big (k)")
    seconds = time.monotonic() - started
    fleet.query(database, "DROP INDEX calibrate")
    return seconds


def kill_index_builds(fleet: Fleet, rounds: int) -> dict[str, int]:
    """Kill `rounds` applies of a CREATE INDEX CONCURRENTLY, settle each; how the shard stood at the kills."""
    rng = random.Random(SEED)
    # Big enough that the build outlasts client_connection_check_interval (1 s): a kill mid-build then
    # leaves the index INVALID, while a kill near its end leaves it VALID and unrecorded.
    name = migrated_with_big_table(fleet, 600_000)
    build = build_seconds(fleet, name)
    # One moment in each of `rounds` equal slices of 1.5 builds, in random order: even a few rounds
    # then land before, inside and after the build, where independent draws could all miss it.
    moments = [(slot + rng.random()) * build * 1.5 / rounds for slot in range(rounds)]
    rng.shuffle(moments)
    outcomes: dict[str, int] = {}
    for round_number, moment in enumerate(moments):
        statement = PLAIN if round_number % 2 == 0 else UNIQUE_IF_NOT_EXISTS
        fleet.publish(index_migration(statement))
        context = f"seed {SEED}, round {round_number} ({statement})"
        process = fleet.spawn("apply", "--env", "test")
        deadline = time.monotonic() + 30
        while not fanout_sessions(fleet, name) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(moment)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        deadline = time.monotonic() + 20
        while fanout_sessions(fleet, name):  # the server cancels the dead client's build within a second
            assert time.monotonic() < deadline, f"{context}: the killed runner's session did not end"
            time.sleep(0.01)

        recorded = "004-index" in fleet.applied(name)
        state, marked = index_state(fleet, name), marks(fleet, name) == ["004-index"]
        assert not (recorded and state is not True), f"{context}: recorded with the index {state}"
        assert not (recorded and marked), f"{context}: recorded and still marked"
        if not recorded and state is not None:
            assert marked, f"{context}: an index is there ({state}) but nothing says the migration is in doubt"
        kind = "recorded" if recorded else f"in-doubt, index {state}" if marked else "untouched"
        outcomes[kind] = outcomes.get(kind, 0) + 1

        code, rerun = json_of(fleet, "apply", "--env", "test")
        (row,) = rerun["results"]
        if marked:
            assert code == EXIT_TARGETS_FAILED and row["status"] == "in-doubt", f"{context}: {row}"
            code, rerun = json_of(fleet, "apply", "--env", "test", "--repair-invalid")
            if code != EXIT_OK:  # VALID, unrecorded, no IF NOT EXISTS: only the operator can say it is done
                assert state is True and statement == PLAIN, f"{context}: {rerun['results'][0]}"
                assert (
                    fleet.cli("mark", "--env", "test", "--migration", "004-index", "--reason", "VALID").exit_code == 0
                )
        else:
            assert code == EXIT_OK, f"{context}: {row}"
        assert index_state(fleet, name) is True, context
        assert json_of(fleet, "verify", "--env", "test")[0] == EXIT_OK, context
        # Back to before the migration for the next round.
        fleet.query(name, "DROP INDEX big_k")
        unmark = fleet.cli("unmark", "--env", "test", "--migration", "004-index", "--reason", f"round {round_number}")
        assert unmark.exit_code == EXIT_OK, unmark.output

    print(f"\n{rounds} SIGKILLs during CREATE INDEX CONCURRENTLY (seed {SEED}, build {build:.2f}s): {outcomes}")
    return outcomes


def test_sigkill_during_a_concurrent_index_build_ends_applied_or_in_doubt_never_recorded_invalid(fleet: Fleet) -> None:
    outcomes = kill_index_builds(fleet, QUICK_ROUNDS)
    assert any(kind.startswith("in-doubt") for kind in outcomes), outcomes


@pytest.mark.slow
def test_sigkill_storm_during_concurrent_index_builds_never_records_an_invalid_index(fleet: Fleet) -> None:
    outcomes = kill_index_builds(fleet, LONG_ROUNDS)
    assert any(kind.startswith("in-doubt") for kind in outcomes), outcomes


def test_a_lock_timeout_midway_through_an_index_build_is_not_retried_blindly(fleet: Fleet) -> None:
    """CREATE INDEX CONCURRENTLY waits for writers after it has made its (INVALID) index: a lock timeout there."""
    name = migrated_with_big_table(fleet, 1000, '[runner]\nlock_timeout = "300ms"\nretries = 2\nretry_backoff = 0.05\n')
    fleet.publish(index_migration(PLAIN))
    writer = psycopg2.connect(**fleet.postgres.connect_kwargs(name))
    try:
        with writer.cursor() as cursor:
            cursor.execute("UPDATE big SET pad = pad WHERE id = 1")  # an open transaction that wrote to big
            code, first = json_of(fleet, "apply", "--env", "test")
    finally:
        writer.close()
    again, second = json_of(fleet, "apply", "--env", "test", "--repair-invalid")

    assert code == EXIT_TARGETS_FAILED
    (row,) = first["results"]
    assert row["error"]["kind"] == "lock-timeout", row["error"]
    assert row["retries"] == []  # a retry would fail on "already exists": the migration is in doubt instead
    assert row["error"]["invalid_indexes"] == ["public.big_k"]
    assert again == EXIT_OK, second  # the writer is gone: the repair drops the INVALID index and builds it
    assert index_state(fleet, name) is True and marks(fleet, name) == []


def test_a_tenant_schemas_invalid_index_is_its_own_and_no_other_tenants(fleet: Fleet) -> None:
    # Schema targets look their INVALID indexes up by the schema's own relations (pg_depend),
    # not by scanning pg_index: the index a failed build left in one tenant is that tenant's alone.
    (database,) = fleet.add_databases(1)
    for schema in ("tenant_a", "tenant_b", 'tenant_"c'):
        fleet.query(database, f'CREATE SCHEMA "{schema.replace(chr(34), chr(34) * 2)}"')
    fleet.publish(
        {
            "001-person.sql": "CREATE TABLE person (name TEXT);\nINSERT INTO person VALUES ('same'), ('same');",
            "002-index.sql": "-- transactional: false\n-- depends: 001-person\n"
            "CREATE UNIQUE INDEX CONCURRENTLY person_name ON person (name);",
        }
    )
    fleet.write_env(
        extra="[directory.schemas]\nquery = \"SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant%'\"\n"
    )
    text = (fleet.environments_dir / "test.toml").read_text()
    head, targets = text.split("[[directory.targets]]", 1)  # [directory.schemas] belongs before the targets
    targets_block, schemas_block = targets.split("[directory.schemas]")
    (fleet.environments_dir / "test.toml").write_text(
        head + "[directory.schemas]" + schemas_block + "[[directory.targets]]" + targets_block
    )
    fleet.query(database, "CREATE TABLE tenant_b.person (name TEXT)")  # tenant_b's 001 fails: no index there

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED, result.output
    errors = {r["schema"]: r["error"] for r in json.loads(result.stdout)["results"]}
    assert errors["tenant_a"]["invalid_indexes"] == ["tenant_a.person_name"]
    assert errors['tenant_"c']["invalid_indexes"] == ['"tenant_""c".person_name']
    assert errors["tenant_b"]["kind"] == "migration" and errors["tenant_b"]["invalid_indexes"] == []
