"""Tenant schemas of one database share connections (issue 18): a target that ends cleanly hands
its connection to the next target of the same database, in a fresh session, with no lock left.

The per-schema lock, exactly-once recording and each migration's clean session hold as with a
connection per target; a connection that failed is closed, never handed on.
"""

from __future__ import annotations

import json
import time

from conftest import Fleet, unique

from fanout.errors import EXIT_OK, EXIT_TARGETS_FAILED


def _schemas(fleet: Fleet, database: str, names: list[str]) -> list[dict[str, str]]:
    fleet.query(database, ";".join(f'CREATE SCHEMA "{name}"' for name in names))
    return [{"id": name, "dsn": fleet.dsn(database), "schema": name} for name in names]


def _run(fleet: Fleet, command: str, *args: str, expect: int = EXIT_OK) -> dict:  # type: ignore[type-arg]
    result = fleet.cli(command, "--env", "test", "--format", "json", "--concurrency", "1", *args)
    assert result.exit_code == expect, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _sessions(fleet: Fleet, database: str) -> int:
    return int(fleet.query("postgres", "SELECT sessions FROM pg_stat_database WHERE datname = %s", (database,))[0][0])


def test_second_schema_gets_the_first_ones_connection_in_a_fresh_session_with_its_own_lock(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    weak = unique("weak")
    fleet.query("postgres", f"CREATE ROLE {weak} NOLOGIN")
    first, second = unique("tenant_a"), unique("tenant_b")
    targets = _schemas(fleet, database, [first, second])
    # The migration leaves behind all a session can carry: a role, a search_path, a temp table,
    # a setting. Each must be gone when the same connection serves the next schema.
    fleet.publish(
        {
            "001-dirty.sql": (
                "CREATE TABLE account (id INT);\n"
                "CREATE TEMPORARY TABLE account_scratch (id INT);\n"
                "SET search_path TO pg_catalog;\n"
                "SET application_name = 'dirty';\n"
                f"SET ROLE {weak};"
            ),
            "002-after.sql": (
                "-- depends: 001-dirty\n"
                "CREATE TABLE seen AS SELECT current_user::text AS who, current_schema()::text AS schema_, "
                "(SELECT count(*) FROM pg_catalog.pg_class WHERE relname = 'account_scratch') AS temp_tables, "
                "current_setting('application_name') AS app;"
            ),
        }
    )
    fleet.write_env(targets)
    before = _sessions(fleet, database)

    report = _run(fleet, "apply")

    assert report["rollout"]["connections_opened"] == 1
    assert _sessions(fleet, database) - before == 1  # the server agrees: one session for both schemas
    for schema in (first, second):
        assert [r["status"] for r in report["results"] if r["target"] == schema] == ["applied"]
        rows = fleet.query(database, f'SELECT who, schema_, temp_tables, app FROM "{schema}".seen')
        who, schema_, temp_tables, app = rows[0]
        assert (who, schema_, temp_tables) == ("postgres", schema, 0)
        assert app != "dirty"
        assert fleet.query(database, f'SELECT migration_id FROM "{schema}"._yoyo_migration ORDER BY 1') == [
            ("001-dirty",),
            ("002-after",),
        ]
        assert fleet.query(database, f'SELECT count(*) FROM "{schema}".yoyo_lock') == [(0,)]
        assert fleet.query(database, f'SELECT count(*) FROM "{schema}".fanout_lock') == [(0,)]
    # Each schema was locked on its own: nothing of either lock survives the run.
    assert fleet.query(database, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]
    fleet.query("postgres", f"DROP ROLE IF EXISTS {weak}")

    plan = _run(fleet, "plan")
    assert plan["rollout"]["connections_opened"] == 1
    assert {r["status"] for r in plan["results"]} == {"up-to-date"}


def test_a_schema_held_by_another_runner_waits_while_the_shared_connection_serves_the_rest(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    first, second = unique("tenant_a"), unique("tenant_b")
    targets = _schemas(fleet, database, [first, second])
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);"})
    fleet.write_env(targets)
    _run(fleet, "apply")
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);", "002-u.sql": "-- depends: 001-t\nCREATE TABLE u (id INT);"})
    # A plain yoyo's lock row on the first schema only (the lock is per schema, not per connection).
    fleet.query(database, f'INSERT INTO "{first}".yoyo_lock (locked, ctime, pid) VALUES (1, now(), 1)')
    report = _run(fleet, "apply", "--lock-wait", "0.5", expect=EXIT_TARGETS_FAILED)
    by_target = {r["target"]: r for r in report["results"]}
    assert by_target[first]["status"] == "failed" and by_target[first]["error"]["kind"] == "locked"
    assert by_target[second]["status"] == "applied"
    assert fleet.query(database, f'SELECT count(*) FROM "{second}"._yoyo_migration') == [(2,)]
    assert fleet.query(database, f'SELECT count(*) FROM "{first}"._yoyo_migration') == [(1,)]
    # The failed target's connection was closed, not handed on: a second one served the other schema.
    assert report["rollout"]["connections_opened"] == 2


def _plan_view(report: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    """What a plan says of each target, without its timing."""
    return {r["target"]: {k: v for k, v in r.items() if k != "seconds"} for r in report["results"]}


def _plan(fleet: Fleet) -> dict:  # type: ignore[type-arg]
    """A plan's report, whatever its exit code (this test compares what it says)."""
    result = fleet.cli("plan", "--env", "test", "--format", "json", "--concurrency", "1")
    assert "results" in result.stdout, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _transactions(fleet: Fleet, database: str) -> tuple[int, int]:
    """The database's (commits, rollbacks), once no session of it is left to report them."""
    for _ in range(100):
        if fleet.query("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)) == [(0,)]:
            break
        time.sleep(0.05)
    commits, rollbacks = fleet.query(
        "postgres", "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s", (database,)
    )[0]
    return int(commits), int(rollbacks)


def test_plan_over_schemas_of_every_shape_says_what_a_plan_of_each_alone_says(fleet: Fleet) -> None:
    """The plan reads a tenant schema in one message when it holds the tables the previous one
    held; whatever the next schema holds (nothing, a lock row, no checksums, a drifted checksum,
    a newer migration), the answer is the one a plan of that schema alone gives."""
    (database,) = fleet.add_databases(1)
    names = [
        unique(f"tenant_{shape}") for shape in ("a", "b", "new", "c", "locked", "yoyo_only", "drift", "ahead", "d")
    ]
    a, b, new, c, locked, yoyo_only, drift, ahead, d = names
    targets = _schemas(fleet, database, names)
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);"})
    fleet.write_env([t for t in targets if t["id"] != new])
    _run(fleet, "apply")
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);", "002-u.sql": "-- depends: 001-t\nCREATE TABLE u (id INT);"})
    fleet.write_env([t for t in targets if t["id"] == ahead])
    _run(fleet, "apply")
    fleet.query(database, f'INSERT INTO "{locked}".yoyo_lock (locked, ctime, pid) VALUES (1, now(), 1)')
    fleet.query(database, f'DROP TABLE "{yoyo_only}".fanout_checksums, "{yoyo_only}".fanout_lock')
    fleet.query(database, f"UPDATE \"{drift}\".fanout_checksums SET sha256 = repeat('0', 64)")

    alone = {}
    for target in targets:
        fleet.write_env([target])
        alone.update(_plan_view(_plan(fleet)))
    fleet.write_env(targets)
    together = _plan(fleet)

    assert together["rollout"]["connections_opened"] == 1
    assert _plan_view(together) == alone
    assert {alone[name]["status"] for name in (a, b, c, d, new, locked)} == {"pending"}
    assert alone[ahead]["status"] == "up-to-date" and alone[drift]["status"] == "drifted"
    assert alone[locked]["lock_holder"]["pid"] == 1 and alone[a]["lock_holder"] is None
    assert alone[new]["initialized"] is False and alone[new]["pending"] == ["001-t", "002-u"]
    assert alone[yoyo_only]["unverified"] == ["001-t"] and alone[a]["unverified"] == []


def test_plan_reads_schemas_shaped_like_the_last_in_one_implicit_transaction(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    names = [unique("tenant") for _ in range(12)]
    targets = _schemas(fleet, database, names)
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);"})
    fleet.write_env(targets)
    _run(fleet, "apply")
    before = _transactions(fleet, database)

    plan = _run(fleet, "plan")

    commits, rollbacks = (now - then for now, then in zip(_transactions(fleet, database), before, strict=True))
    assert {r["status"] for r in plan["results"]} == {"up-to-date"}
    # The first schema is read the long way (BEGIN READ ONLY ... ROLLBACK): nothing to guess from.
    # Every other one is a single message: its implicit transaction commits, nothing is rolled back.
    assert rollbacks == 1
    assert commits >= len(names) - 1
