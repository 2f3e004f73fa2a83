"""yoyo is the oracle on MariaDB too: the real `yoyo` CLI on one database, `fanout apply` on its twin, then compare.

yoyo's mysql:// backend (PyMySQL, as fanout's engine) migrates database A; fanout migrates
its twin B from the same files published to S3. Then both must hold the same schema
(`mysqldump --no-data`, bookkeeping tables left out, AUTO_INCREMENT counters and dump
dates stripped), the same data in the migrations' tables, the same definitions of yoyo's
own tables, and the same rows in them: `_yoyo_migration` in applied order, `_yoyo_log` in
logged order (ids and times aside), `_yoyo_version`, and an empty `yoyo_lock`.

A new compatibility bug becomes one new row.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet

from fanout.errors import EXIT_OK

YOYO = Path(sys.executable).parent / "yoyo"
YOYO_TABLES = ("_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock")
FANOUT_TABLES = ("fanout_lock", "fanout_progress", "fanout_checksums", "fanout_checksum_log", "fanout_lock_log")
MARIADB_PASSWORD = "FANOUT_TEST_MARIADB_PASSWORD"


@dataclass(frozen=True)
class Case:
    name: str
    files: dict[str, str]


CASES = [
    Case(
        "ddl-statements-and-depends",
        {
            "20240101_01_abcde-create-person.sql": """\
                -- create person
                -- depends:

                CREATE TABLE person (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100) NOT NULL) ENGINE=InnoDB;
                CREATE INDEX person_name ON person (name);
                """,
            "20240101_01_abcde-create-person.rollback.sql": "DROP TABLE person;\n",
            "20240101_02_fghij-add-email.sql": """\
                -- depends: 20240101_01_abcde-create-person
                ALTER TABLE person ADD COLUMN email VARCHAR(200), ADD UNIQUE KEY person_email (email);
                """,
        },
    ),
    Case(
        "dml-only-and-mixed",
        {
            "0001-base.sql": "CREATE TABLE account (id INT PRIMARY KEY, balance DECIMAL(10, 2) NOT NULL DEFAULT 0);\n",
            "0002-seed.sql": """\
                INSERT INTO account (id, balance) VALUES (1, 10.50), (2, 0);
                UPDATE account SET balance = balance + 1 WHERE id = 2;
                """,
            "0003-view.sql": """\
                -- depends: 0001-base
                CREATE VIEW rich AS SELECT id FROM account WHERE balance > 5;
                INSERT INTO account (id, balance) VALUES (3, 99);
                """,
        },
    ),
    Case(
        "branches-merge",
        {
            "0001-base.sql": "CREATE TABLE t (id INT PRIMARY KEY);\n",
            "0002-b.sql": "-- depends: 0001-base\nALTER TABLE t ADD COLUMN b INT;\n",
            "0002-a.sql": "-- depends: 0001-base\nALTER TABLE t ADD COLUMN a INT;\n",
            "0003-merge.sql": "-- depends: 0002-a 0002-b\nCREATE TABLE ab (a INT, b INT);\n",
        },
    ),
    Case(
        "procedure-and-comments",
        {
            "0001-proc.sql": """\
                -- a table and a trigger, with comments between statements
                CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, note TEXT);
                /* a block comment */
                CREATE TABLE item (id INT PRIMARY KEY, price INT);
                CREATE TRIGGER item_audit AFTER INSERT ON item FOR EACH ROW INSERT INTO audit (note) VALUES ('x');
                INSERT INTO item VALUES (1, 5);
                """,
        },
    ),
]


def _dump(mariadb: Any, database: str, *what: str) -> list[str]:
    ignored = [f"--ignore-table={database}.{table}" for table in (*YOYO_TABLES, *FANOUT_TABLES)]
    done = subprocess.run(
        ["mysqldump", f"--socket={mariadb.socket}", "-u", "root", "--skip-comments", "--skip-dump-date",
         "--skip-extended-insert", "--routines", "--triggers", *what, *ignored, database],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = re.sub(r" AUTO_INCREMENT=\d+", "", done.stdout)
    return [line for line in text.splitlines() if line.strip() and not line.startswith("--")]


def _query(mariadb: Any, database: str, sql: str) -> list[tuple[Any, ...]]:
    with mariadb.admin() as admin, admin.cursor() as cursor:
        cursor.execute(f"USE `{database}`")
        cursor.execute(sql)
        return list(cursor.fetchall())


def _bookkeeping(mariadb: Any, database: str) -> dict[str, Any]:
    definitions = {}
    for table in YOYO_TABLES:
        (row,) = _query(mariadb, database, f"SHOW CREATE TABLE `{table}`")
        definitions[table] = re.sub(r" AUTO_INCREMENT=\d+", "", row[1])
    return {
        **definitions,
        "_yoyo_migration rows": _query(
            mariadb,
            database,
            "SELECT migration_hash, migration_id FROM _yoyo_migration ORDER BY applied_at_utc, migration_id",
        ),
        "_yoyo_log rows": _query(
            mariadb,
            database,
            "SELECT migration_hash, migration_id, operation, username, hostname, comment FROM _yoyo_log "
            "ORDER BY created_at_utc, migration_id",
        ),
        "_yoyo_version rows": _query(mariadb, database, "SELECT version FROM _yoyo_version ORDER BY version"),
        "yoyo_lock rows": _query(mariadb, database, "SELECT COUNT(*) FROM yoyo_lock"),
    }


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fanout_builds_on_mariadb_what_yoyo_builds(
    fleet: Fleet, mariadb: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case
) -> None:
    monkeypatch.setenv(MARIADB_PASSWORD, mariadb.password.reveal())
    by_yoyo, by_fanout = (f"twin_{uuid.uuid4().hex[:10]}" for _ in range(2))
    for database in (by_yoyo, by_fanout):
        mariadb.create_database(database)
    try:
        files = {name: textwrap.dedent(body) for name, body in case.files.items()}
        folder = tmp_path / "set"
        folder.mkdir()
        for name, body in files.items():
            (folder / name).write_text(body)
        yoyo = subprocess.run(
            [str(YOYO), "apply", "--batch", "--no-config-file", "--database", mariadb.url(by_yoyo), str(folder)],
            capture_output=True, text=True, timeout=120, env={**os.environ},
        )  # fmt: skip
        assert yoyo.returncode == 0, f"the oracle itself failed: {yoyo.stderr[-2000:]}"

        fleet.publish(files)
        dsn = f"mysql://{mariadb.user}:${{{MARIADB_PASSWORD}}}@{mariadb.host}:{mariadb.port}/{by_fanout}"
        fleet.write_env(targets=[{"id": "twin", "dsn": dsn}])
        applied = fleet.cli("apply", "--env", "test")
        assert applied.exit_code == EXIT_OK, applied.output

        assert _dump(mariadb, by_fanout, "--no-data") == _dump(mariadb, by_yoyo, "--no-data")
        assert _dump(mariadb, by_fanout, "--no-create-info") == _dump(mariadb, by_yoyo, "--no-create-info")
        theirs, ours = _bookkeeping(mariadb, by_yoyo), _bookkeeping(mariadb, by_fanout)
        for table in theirs:
            assert ours[table] == theirs[table], table
        assert theirs["_yoyo_migration rows"], "the oracle applied nothing: the row tests nothing"

        again = fleet.cli("apply", "--env", "test")
        assert again.exit_code == EXIT_OK, again.output
        assert _bookkeeping(mariadb, by_fanout)["_yoyo_migration rows"] == theirs["_yoyo_migration rows"]
    finally:
        for database in (by_yoyo, by_fanout):
            mariadb.drop_database(database)
