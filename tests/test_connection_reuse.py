"""Tenant schemas of one database share connections (issue 18): a target that ends cleanly hands
its connection to the next target of the same database, in a fresh session, with no lock left.

The per-schema lock, exactly-once recording and each migration's clean session hold as with a
connection per target; a connection that failed is closed, never handed on.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import Fleet, unique

from fanout.directory import Target
from fanout.engines.connections import Connections, Fact
from fanout.engines.postgres import indoubt
from fanout.errors import EXIT_OK, EXIT_TARGETS_FAILED
from fanout.options import RunOptions
from fanout.report import Mode


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
    """The database's (commits, rollbacks), once no session of it is left to report them.

    PostgreSQL 15+ writes a session's counts to shared memory before its pg_stat_activity row
    goes: when no row is left, the counts are complete.
    """
    for _ in range(200):
        if fleet.query("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)) == [(0,)]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"sessions of {database} still open after 10 s")
    commits, rollbacks = fleet.query(
        "postgres", "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s", (database,)
    )[0]
    return int(commits), int(rollbacks)


SHAPES = (
    "a",
    "b",
    "drift",
    "invalid",
    "new",
    "new_2",
    "c",
    "locked",
    "yoyo_only",
    "ahead",
    "d",
    "marks",
    "marks_2",
    "marked",
    "old",
)


def _every_shape(fleet: Fleet) -> tuple[str, dict[str, str], list[dict[str, str]]]:
    """One database of tenant schemas in every state a plan tells apart, by the name of their state."""
    (database,) = fleet.add_databases(1)
    names = {shape: unique(f"tenant_{shape}") for shape in SHAPES}
    targets = _schemas(fleet, database, list(names.values()))
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);"})
    fleet.write_env([t for t in targets if t["id"] not in (names["new"], names["new_2"], names["old"])])
    _run(fleet, "apply")
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);", "002-u.sql": "-- depends: 001-t\nCREATE TABLE u (id INT);"})
    fleet.write_env([t for t in targets if t["id"] == names["ahead"]])
    _run(fleet, "apply")
    n = {shape: f'"{name}"' for shape, name in names.items()}
    fleet.query(database, f"UPDATE {n['drift']}.fanout_checksums SET sha256 = repeat('0', 64)")
    fleet.query(database, f"CREATE INDEX t_id ON {n['invalid']}.t (id)")
    fleet.query(database, f"UPDATE pg_index SET indisvalid = false WHERE indexrelid = '{n['invalid']}.t_id'::regclass")
    fleet.query(database, f"INSERT INTO {n['locked']}.yoyo_lock (locked, ctime, pid) VALUES (1, now(), 1)")
    fleet.query(database, f"DROP TABLE {n['yoyo_only']}.fanout_checksums, {n['yoyo_only']}.fanout_lock")
    for shape in ("marks", "marks_2", "marked"):  # the marks table stays once a run created it
        fleet.query(database, indoubt.create_sql(names[shape]))
    fleet.query(
        database,
        f"INSERT INTO {n['marked']}.fanout_in_doubt VALUES ('002-u', 'apply', 'dead-run', 'ci-7', 4242, 99, now(), '{{}}')",
    )
    # What a yoyo older than 6 leaves: ids, no hashes, no version table.
    fleet.query(
        database, f"CREATE TABLE {n['old']}._yoyo_migration (id VARCHAR(191) NOT NULL PRIMARY KEY, ctime TIMESTAMP)"
    )
    fleet.query(database, f"INSERT INTO {n['old']}._yoyo_migration VALUES ('001-t', '2020-01-01 00:00:00')")
    return database, names, targets


def test_plan_over_schemas_of_every_shape_says_what_a_plan_of_each_alone_says(fleet: Fleet) -> None:
    """The plan reads a tenant schema in one message when it holds the tables the previous one
    held; whatever the next schema holds (nothing, a lock row, no checksums, a drifted checksum,
    an INVALID index, marks, an older yoyo's table, a newer migration), the answer is the one a
    plan of that schema alone gives."""
    _database, names, targets = _every_shape(fleet)

    alone = {}
    for target in targets:
        fleet.write_env([target])
        alone.update(_plan_view(_plan(fleet)))
    fleet.write_env(targets)
    together = _plan(fleet)

    # One connection served them all up to the schema in doubt, a target with an error: its
    # connection is closed, not handed on, and the last schema gets a new one.
    assert together["rollout"]["connections_opened"] == 2
    assert _plan_view(together) == alone
    said = {shape: alone[name] for shape, name in names.items()}
    assert {said[shape]["status"] for shape in ("a", "b", "c", "d", "new", "locked", "invalid", "marks")} == {"pending"}
    assert said["ahead"]["status"] == "up-to-date" and said["drift"]["status"] == "drifted"
    assert said["locked"]["lock_holder"]["pid"] == 1 and said["a"]["lock_holder"] is None
    assert said["new"]["initialized"] is False and said["new"]["pending"] == ["001-t", "002-u"]
    assert said["yoyo_only"]["unverified"] == ["001-t"] and said["a"]["unverified"] == []
    assert said["invalid"]["invalid_indexes"] == [f"{names['invalid']}.t_id"] and said["a"]["invalid_indexes"] == []
    assert said["marked"]["status"] == "in-doubt" and said["marks"]["in_doubt"] is None
    assert said["old"]["applied_before"] == ["001-t"]


def test_plan_reads_a_schema_shaped_like_the_one_before_in_one_implicit_transaction(fleet: Fleet) -> None:
    """Read the long way, a schema costs BEGIN READ ONLY ... ROLLBACK; read in one message, its
    implicit transaction commits. Whatever a schema holds, when the one before it on the
    connection held the same tables it is read in one message, unless it holds a lock row or a
    mark (then the long way reads who holds it, or what is in doubt)."""
    database, names, targets = _every_shape(fleet)
    by_name = {t["id"]: t for t in targets}

    def rollbacks_reading(first: str, then: str) -> int:
        fleet.write_env([by_name[names[first]], by_name[names[then]]])
        before = _transactions(fleet, database)
        _plan(fleet)
        return _transactions(fleet, database)[1] - before[1]

    # The first of the two has nothing to guess from: one ROLLBACK is its own.
    for first, then in [("a", "b"), ("a", "drift"), ("a", "invalid"), ("ahead", "d"), ("marks", "marks_2")]:
        assert rollbacks_reading(first, then) == 1, (first, then)
    for first, then in [("a", "locked"), ("marks", "marked")]:
        assert rollbacks_reading(first, then) == 2, (first, then)
    # A guess naming a table the schema lacks fails (one more rollback) and reads it the long way.
    assert rollbacks_reading("a", "yoyo_only") == 3
    assert rollbacks_reading("a", "new") == 3
    # Two never-migrated schemas: the second is read in one message of the probe alone.
    assert rollbacks_reading("new", "new_2") == 1


def _invalid_index(fleet: Fleet, database: str, schema: str, name: str) -> None:
    """An INVALID index, as a failed CREATE INDEX CONCURRENTLY leaves one."""
    fleet.query(database, f'CREATE INDEX "{name}" ON "{schema}".t (id)')
    fleet.query(
        database, f'UPDATE pg_index SET indisvalid = false WHERE indexrelid = \'"{schema}"."{name}"\'::regclass'
    )


def _pg_index_scans(fleet: Fleet, database: str) -> int:
    _transactions(fleet, database)  # waits until the run's sessions have reported their counts
    return int(fleet.query(database, "SELECT seq_scan FROM pg_stat_sys_tables WHERE relname = 'pg_index'")[0][0])


@pytest.mark.parametrize(
    ("others", "database_wide"),
    [
        # One session reads the whole database's (at a concurrency of 8, the others start
        # together with it) for the 100 schemas of the plan, and shares it.
        (97, 1),
        # A plan of a few schemas reads each one's own, by index lookups.
        (0, 0),
    ],
)
def test_plan_gives_each_schema_its_invalid_indexes_in_order_read_once_for_many_schemas(
    fleet: Fleet, others: int, database_wide: int
) -> None:
    """A plan over many tenant schemas of a database reads its INVALID indexes in one query shared
    by its sessions, not once per schema; each schema is told its own, sorted by name, as the
    per-schema query (apply's, and a small plan's) says."""
    (database,) = fleet.add_databases(1)
    first, second, clean = unique("tenant_a"), unique("tenant_b"), unique("tenant_c")
    targets = _schemas(fleet, database, [first, second, clean, *(unique("tenant_o") for _ in range(others))])
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);"})
    fleet.write_env(targets)
    fleet.query(database, ";".join(f'CREATE TABLE "{schema}".t (id INT)' for schema in (first, second)))
    # Created in the reverse of their order by name: the order they are told in is the names'.
    for schema, name in [(first, "t_zz"), (first, "t_aa"), (second, "t_mm")]:
        _invalid_index(fleet, database, schema, name)
    # The server says which reads it ran: every statement of this database's new sessions is logged.
    fleet.query("postgres", f"ALTER DATABASE \"{database}\" SET log_statement = 'all'")
    log = fleet.postgres.log_path
    logged_before = log.stat().st_size

    result = fleet.cli("plan", "--env", "test", "--format", "json", "--concurrency", "8")

    with log.open("rb") as file:
        file.seek(logged_before)
        logged = file.read().decode(errors="replace")
    assert logged.count(indoubt.INVALID_BY_SCHEMA_SQL) == database_wide
    if not database_wide:
        assert logged.count("FROM pg_catalog.pg_depend d") == 3  # each schema's own
    told = {r["target"]: r["invalid_indexes"] for r in json.loads(result.stdout)["results"]}
    assert len(told) == 3 + others
    assert {target: invalid for target, invalid in told.items() if invalid} == {
        first: [f"{first}.t_aa", f"{first}.t_zz"],
        second: [f"{second}.t_mm"],
    }
    # What the per-schema query and the whole database's say (`query` passes parameters: a % is written %%).
    assert fleet.query(database, indoubt.invalid_sql(first).replace("%", "%%")) == [
        ([f"{first}.t_aa", f"{first}.t_zz"],)
    ]
    every = fleet.query(database, indoubt.invalid_sql(None).replace("%", "%%"))[0][0]
    assert every == sorted(every) and set(every) == {f"{first}.t_aa", f"{first}.t_zz", f"{second}.t_mm"}


def test_one_session_at_a_time_reads_a_databases_fact_and_another_takes_over_if_it_gives_up() -> None:
    """`Connections.claim`: the sessions of a database that start together do not each read what
    one read shares; a claim given back (the session failed) lets the next one read it."""
    one, two = (Target.from_dsn(f"s{i}", "postgresql://u@h/db", schema=f"s{i}") for i in (1, 2))
    elsewhere = Target.from_dsn("x", "postgresql://u@h/other", schema="s1")
    connections = Connections([one, two, elsewhere], RunOptions(mode=Mode.PLAN), key=lambda t: t.dbname)
    fact: Fact[tuple[str, ...]] = Fact("test: names")
    assert connections.targets_of(one) == 2 and connections.targets_of(elsewhere) == 1

    assert connections.claim(one, fact) and not connections.claim(two, fact)
    assert connections.claim(elsewhere, fact)  # another database: a fact of its own
    connections.unclaim(one, fact)
    assert connections.claim(two, fact)
    connections.learn(two, fact, ("a", "b"))
    assert connections.fact(one, fact) == ("a", "b") and connections.fact(elsewhere, fact) is None
    assert not connections.claim(one, fact)  # known: nobody reads it again
