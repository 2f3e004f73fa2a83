"""Each migration starts from the session a fresh connection would have (issue 13, point 1).

yoyo gives every migration a new connection; fanout keeps one per target (the connection
budget and the advisory lock depend on it) and restores the session instead. What one
migration does to its session (search_path, role, temporary tables, settings, an open
transaction) must reach neither the next migration nor fanout's own bookkeeping.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from conftest import Fleet, unique

from fanout.errors import EXIT_CONFIG, EXIT_OK, EXIT_TARGETS_FAILED


@pytest.fixture
def weak_role(fleet: Fleet) -> Iterator[str]:
    """A role with no rights on anything fanout or yoyo writes."""
    role = unique("weak")
    fleet.query("postgres", f"CREATE ROLE {role} NOLOGIN")
    yield role
    fleet.query("postgres", f"DROP ROLE IF EXISTS {role}")


def _apply(fleet: Fleet, *args: str) -> dict:  # type: ignore[type-arg]
    result = fleet.cli("apply", "--env", "test", "--format", "json", *args)
    assert result.exit_code == EXIT_OK, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _lock_rows(fleet: Fleet, database: str, schema: str = "public") -> list[tuple[int, ...]]:
    return fleet.query(
        database, f'SELECT (SELECT count(*) FROM "{schema}".yoyo_lock), (SELECT count(*) FROM "{schema}".fanout_lock)'
    )


def test_search_path_set_by_a_migration_does_not_move_the_next_migrations_table(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "001-elsewhere.sql": "CREATE SCHEMA elsewhere;\nSET search_path TO elsewhere;\nCREATE TABLE first (id INT);",
            "002-next.sql": "-- depends: 001-elsewhere\nCREATE TABLE second (id INT);",
        }
    )
    fleet.write_env()

    _apply(fleet)

    assert fleet.tables(database, "elsewhere") == {"first"}  # the migration itself ran as it asked
    assert "second" in fleet.tables(database, "public")
    assert fleet.applied(database) == ["001-elsewhere", "002-next"]
    assert not {"_yoyo_migration", "_yoyo_log"} & fleet.tables(database, "elsewhere")


def test_set_role_to_a_role_without_rights_does_not_break_recording_or_the_next_migration(
    fleet: Fleet, weak_role: str
) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "001-become-weak.sql": f"CREATE TABLE before_switch (id INT);\nSET ROLE {weak_role};",
            "002-as-owner.sql": "-- depends: 001-become-weak\nCREATE TABLE after_switch (id INT);",
        }
    )
    fleet.write_env()

    report = _apply(fleet)

    assert report["totals"]["migrations_applied"] == 2
    assert fleet.applied(database) == ["001-become-weak", "002-as-owner"]
    owners = fleet.query(database, "SELECT tableowner FROM pg_tables WHERE tablename = 'after_switch'")
    assert owners == [("postgres",)]
    assert fleet.query(database, "SELECT count(*) FROM _yoyo_log WHERE operation = 'apply'") == [(2,)]
    assert _lock_rows(fleet, database) == [(0, 0)]


def test_two_migrations_that_create_the_same_temporary_table_both_apply(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    backfill = (
        "CREATE TEMP TABLE batch AS SELECT generate_series(1, 3) AS id;\n"
        "INSERT INTO filled SELECT '{name}', count(*) FROM batch;"
    )
    fleet.publish(
        {
            "001-filled.sql": "CREATE TABLE filled (migration TEXT, rows INT);",
            "002-backfill-a.sql": "-- depends: 001-filled\n" + backfill.format(name="a"),
            "003-backfill-b.sql": "-- depends: 002-backfill-a\n" + backfill.format(name="b"),
        }
    )
    fleet.write_env()

    _apply(fleet)

    assert fleet.query(database, "SELECT migration, rows FROM filled ORDER BY 1") == [("a", 3), ("b", 3)]


PG_DUMP_BASELINE = """\
--
-- PostgreSQL database dump
--

SET statement_timeout = 0;
SET lock_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET client_min_messages = warning;

CREATE TABLE public.person (
    id integer NOT NULL,
    name text NOT NULL
);

CREATE SEQUENCE public.person_id_seq AS integer START WITH 1 INCREMENT BY 1 NO MINVALUE NO MAXVALUE CACHE 1;

ALTER SEQUENCE public.person_id_seq OWNED BY public.person.id;

ALTER TABLE ONLY public.person ALTER COLUMN id SET DEFAULT nextval('public.person_id_seq'::regclass);

ALTER TABLE ONLY public.person
    ADD CONSTRAINT person_pkey PRIMARY KEY (id);
"""


def test_pg_dump_baseline_applies_and_bootstraps_a_new_shard(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "0001-baseline.sql": PG_DUMP_BASELINE,
            # Written the usual way, unqualified: it must land in public, not fail on an empty search_path.
            "0002-address.sql": "-- depends: 0001-baseline\nCREATE TABLE address (person_id INT REFERENCES person);",
        }
    )
    fleet.write_env()
    new_database = database + "_new"
    fleet.databases.append(new_database)

    _apply(fleet)
    boot = fleet.cli(
        "bootstrap", "--env", "test", "--target", fleet.dsn(new_database), "--create-database", "--format", "json"
    )

    assert boot.exit_code == EXIT_OK, boot.output
    for shard in (database, new_database):
        assert fleet.applied(shard) == ["0001-baseline", "0002-address"]
        assert {"person", "address", "_yoyo_migration"} <= fleet.tables(shard, "public")
        assert _lock_rows(fleet, shard) == [(0, 0)]


def test_non_transactional_migration_that_changes_role_is_recorded_and_leaves_no_lock(
    fleet: Fleet, weak_role: str
) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "001-person.sql": "CREATE TABLE person (id INT, name TEXT);",
            "002-index.sql": (
                "-- depends: 001-person\n-- transactional: false\n"
                "CREATE INDEX CONCURRENTLY person_name ON person (name);\n"
                f"SET ROLE {weak_role};\nSET search_path TO pg_catalog;"
            ),
            "003-after.sql": "-- depends: 002-index\nCREATE TABLE after_index (id INT);",
        }
    )
    fleet.write_env()

    _apply(fleet)

    assert fleet.applied(database) == ["001-person", "002-index", "003-after"]
    assert "after_index" in fleet.tables(database, "public")
    assert _lock_rows(fleet, database) == [(0, 0)]
    checksummed = fleet.query(database, "SELECT migration_id FROM fanout_checksums ORDER BY 1")
    assert checksummed == [("001-person",), ("002-index",), ("003-after",)]


def test_settings_a_migration_changes_are_back_to_fanouts_for_the_next_one(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "001-loosen.sql": (
                "CREATE TABLE seen (migration TEXT, lock_timeout TEXT, statement_timeout TEXT, work_mem TEXT);\n"
                "SET lock_timeout = 0;\nSET statement_timeout = 0;\nSET work_mem = '77MB';\nPREPARE leftover AS SELECT 1;"
            ),
            "002-look.sql": (
                "-- depends: 001-loosen\nPREPARE leftover AS SELECT 2;\n"
                "INSERT INTO seen VALUES ('002', current_setting('lock_timeout'), current_setting('statement_timeout'), "
                "current_setting('work_mem'));"
            ),
        }
    )
    fleet.write_env(extra='[runner]\nlock_timeout = "4s"\nstatement_timeout = "10min"\n')

    _apply(fleet)

    [(fresh_work_mem,)] = fleet.query(database, "SELECT current_setting('work_mem')")  # a new session's
    assert fresh_work_mem != "77MB"
    seen = fleet.query(database, "SELECT lock_timeout, statement_timeout, work_mem FROM seen")
    assert seen == [("4s", "10min", fresh_work_mem)]


def test_each_tenant_schema_keeps_its_tables_when_a_migration_changes_the_search_path(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "001-account.sql": "CREATE TABLE account (id INT);\nSET search_path TO public;",
            "002-invoice.sql": "-- depends: 001-account\nCREATE TABLE invoice (id INT);",
        }
    )
    dsn = fleet.dsn(database)
    fleet.write_env([{"id": "a", "dsn": dsn, "schema": "tenant_a"}, {"id": "b", "dsn": dsn, "schema": "tenant_b"}])

    report = _apply(fleet)

    assert report["totals"]["migrations_applied"] == 4
    for schema in ("tenant_a", "tenant_b"):
        assert {"account", "invoice", "_yoyo_migration", "yoyo_lock"} <= fleet.tables(database, schema)
        assert fleet.query(database, f"SELECT count(*) FROM {schema}._yoyo_migration") == [(2,)]
        assert _lock_rows(fleet, database, schema) == [(0, 0)]
    assert not {"invoice", "_yoyo_migration"} & fleet.tables(database, "public")


def test_session_settings_from_the_environment_reach_every_migration_and_plan(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    look = "INSERT INTO seen VALUES ('{id}', current_setting('fanout_test.flag'), current_setting('work_mem'));"
    fleet.publish(
        {
            "001-first.sql": "CREATE TABLE seen (migration TEXT, flag TEXT, work_mem TEXT);\n"
            + look.format(id="001")
            + "\nSET fanout_test.flag = 'changed by 001';\nSET work_mem = '1MB';",
            "002-second.sql": "-- depends: 001-first\n" + look.format(id="002"),
        }
    )
    fleet.write_env(extra='[session]\nfanout_test.flag = "from the environment"\n"work_mem" = "8MB"\n')

    plan = fleet.cli("plan", "--env", "test", "--format", "json")
    _apply(fleet)

    assert plan.exit_code == EXIT_OK, plan.output
    rows = fleet.query(database, "SELECT migration, flag, work_mem FROM seen ORDER BY 1")
    assert rows == [("001", "from the environment", "8MB"), ("002", "from the environment", "8MB")]


@pytest.mark.parametrize(
    ("session", "fragments"),
    [
        ('"work mem" = "8MB"', ["[session] 'work mem'", "not a PostgreSQL setting name"]),
        ('"1st.flag" = true', ["[session] '1st.flag'", "not a PostgreSQL setting name"]),
        ('search_path = "tenant_x"', ["[session] 'search_path'", "fanout sets this one itself", "schema"]),
        ('Lock_Timeout = "1s"', ["[session] 'Lock_Timeout'", "[runner] lock_timeout"]),
        ("default_transaction_read_only = false", ["'default_transaction_read_only'", "read-only"]),
        ("work_mem = [1, 2]", ["[session] 'work_mem'", "a string, a number or true/false"]),
    ],
    ids=["space-in-name", "leading-digit", "search-path", "lock-timeout", "read-only", "array-value"],
)
def test_a_bad_or_fanout_owned_session_setting_is_a_config_error_naming_the_key(
    fleet: Fleet, session: str, fragments: list[str]
) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);"})
    fleet.write_env(extra=f"[session]\n{session}\n")

    result = fleet.cli("apply", "--env", "test")

    assert result.exit_code == EXIT_CONFIG
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert fleet.tables(database) == set()


def test_python_migration_that_changes_role_and_search_path_is_recorded_by_yoyos_own_statements(
    fleet: Fleet, weak_role: str
) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "001-person.sql": "CREATE TABLE person (id INT);",
            # yoyo's steps record this one with yoyo's SQL templates, inside the migration's transaction.
            "002-py.py": f"""\
                from yoyo import step

                __depends__ = {{"001-person"}}

                steps = [
                    step("CREATE SCHEMA py_elsewhere"),
                    step("SET search_path TO py_elsewhere"),
                    step("SET ROLE {weak_role}"),
                ]
                """,
            "003-after.sql": "-- depends: 002-py\nCREATE TABLE after_py (id INT);",
        }
    )
    fleet.write_env(source_extra="python_migrations = true\n")

    _apply(fleet)

    assert fleet.applied(database) == ["001-person", "002-py", "003-after"]
    assert "after_py" in fleet.tables(database, "public")
    assert fleet.tables(database, "py_elsewhere") == set()
    assert _lock_rows(fleet, database) == [(0, 0)]


def test_a_session_setting_the_server_does_not_know_fails_each_target_with_the_servers_message(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish({"001-t.sql": "CREATE TABLE t (id INT);"})
    fleet.write_env(extra='[session]\nwrok_mem = "8MB"\n')

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    (failed,) = json.loads(result.stdout)["results"]
    assert 'unrecognized configuration parameter "wrok_mem"' in failed["error"]["message"]
    assert "t" not in fleet.tables(database)


def test_a_migration_that_releases_fanouts_lock_is_rolled_back_and_not_recorded(fleet: Fleet) -> None:
    # Without fanout's advisory lock, its yoyo_lock row looks stale to another runner, which
    # would break it and migrate the same shard at the same time.
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "001-person.sql": "CREATE TABLE person (id INT);",
            "002-unlocks.sql": "-- depends: 001-person\nCREATE TABLE half (id INT);\nSELECT pg_advisory_unlock_all();",
        }
    )
    fleet.write_env()

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED, result.output
    (failed,) = [r for r in json.loads(result.stdout)["results"] if r["status"] == "failed"]
    assert failed["error"]["migration"] == "002-unlocks"
    assert "released fanout's shard lock" in failed["error"]["message"]
    assert fleet.applied(database) == ["001-person"]
    assert "half" not in fleet.tables(database, "public")  # its transaction rolled back whole
    assert _lock_rows(fleet, database) == [(0, 0)]


def test_a_non_transactional_migration_that_releases_fanouts_lock_is_left_in_doubt(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    fleet.publish(
        {
            "001-person.sql": "CREATE TABLE person (id INT);",
            "002-discards.sql": "-- depends: 001-person\n-- transactional: false\nCREATE TABLE half (id INT);\nDISCARD ALL;",
        }
    )
    fleet.write_env()

    first = fleet.cli("apply", "--env", "test")
    again = fleet.cli("apply", "--env", "test", "--format", "json")

    assert first.exit_code == EXIT_TARGETS_FAILED, first.output
    assert "released fanout's shard lock" in first.output
    assert fleet.applied(database) == ["001-person"]  # ran, but never recorded
    (doubt,) = [r for r in json.loads(again.stdout)["results"] if r["status"] == "in-doubt"]
    assert doubt["in_doubt"]["migration"] == "002-discards"
