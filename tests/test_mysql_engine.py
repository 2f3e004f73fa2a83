"""The MySQL/MariaDB engine (fanout/engines/mysql.py) against a real MariaDB started by the suite.

The runner does not use this engine yet; these tests pin its pieces: connection and
settings, yoyo's tables exactly as yoyo creates them, the lock shared with plain yoyo and
recovered after a dead fanout, and statement-by-statement progress with its in-doubt state.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from yoyo import read_migrations

from fanout.engines import EngineError
from fanout.engines.mysql import (
    Endpoint,
    Flavor,
    InDoubtError,
    MySQLSession,
    Settings,
    flavor_of,
    migration_statements,
    settings_sql,
)
from fanout.locking import Owner
from fanout.report import ErrorKind
from fanout.secret import Secret

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def database(mariadb: Any) -> Iterator[str]:
    name = f"shard_{uuid.uuid4().hex[:12]}"
    mariadb.create_database(name)
    yield name
    mariadb.drop_database(name)


def endpoint(mariadb: Any, database: str) -> Endpoint:
    return Endpoint(mariadb.host, database, mariadb.user, Secret(mariadb.password.reveal()), mariadb.port)


def session(mariadb: Any, database: str, run_id: str = "run-1", **kwargs: Any) -> MySQLSession:
    return MySQLSession(endpoint(mariadb, database), Owner(pid=os.getpid(), run_id=run_id), **kwargs)


def query(mariadb: Any, database: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with mariadb.admin() as admin, admin.cursor() as cursor:
        cursor.execute(f"USE `{database}`")
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def write(folder: Path, files: dict[str, str]) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (folder / name).write_text(textwrap.dedent(body))
    return read_migrations(str(folder))


def yoyo(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "yoyo"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_flavor_decides_the_statement_time_limit_setting() -> None:
    assert flavor_of("10.11.19-MariaDB-0+deb12u1") is Flavor.MARIADB
    assert flavor_of("8.0.36") is Flavor.MYSQL
    limits = Settings(lock_wait_timeout=5, innodb_lock_wait_timeout=3, statement_timeout=1.5)
    assert "SET SESSION max_statement_time = 1.5" in settings_sql(Flavor.MARIADB, limits)
    assert "SET SESSION max_execution_time = 1500" in settings_sql(Flavor.MYSQL, limits)
    assert settings_sql(Flavor.MYSQL, Settings()) == ["SET SESSION time_zone = '+00:00'"]


def test_endpoint_parses_a_url_and_never_shows_its_password() -> None:
    parsed = Endpoint.from_url("mariadb://app:s3cr%40t@db.example:3307/tenant_1")
    assert (parsed.host, parsed.port, parsed.user, parsed.database) == ("db.example", 3307, "app", "tenant_1")
    assert parsed.password is not None and parsed.password.reveal() == "s3cr@t"
    assert "s3cr" not in repr(parsed)
    with pytest.raises(ValueError) as raised:
        Endpoint.from_url("postgresql://app:hunter2@db/x")
    assert "hunter2" not in str(raised.value)


def test_session_applies_limits_and_detects_mariadb(mariadb: Any, database: str) -> None:
    opened = session(
        mariadb, database, settings=Settings(lock_wait_timeout=7, innodb_lock_wait_timeout=4, statement_timeout=2)
    )
    try:
        assert opened.flavor is Flavor.MARIADB
        with opened._connection.cursor() as cursor:
            cursor.execute(
                "SELECT @@session.lock_wait_timeout, @@session.innodb_lock_wait_timeout, @@session.max_statement_time"
            )
            assert cursor.fetchone() == (7, 4, 2.0)
    finally:
        opened.close()


def test_statement_time_limit_fails_a_long_statement_as_statement_timeout(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    migrations = write(tmp_path / "m", {"001-slow.sql": "SELECT SLEEP(5);"})
    opened = session(mariadb, database, settings=Settings(statement_timeout=0.5))
    try:
        with opened.lock(wait=5), pytest.raises(EngineError) as raised:
            opened.apply(migrations[0])
        assert raised.value.kind is ErrorKind.STATEMENT_TIMEOUT
    finally:
        opened.close()


def test_wrong_password_is_an_authentication_error_without_the_password(mariadb: Any, database: str) -> None:
    wrong = Endpoint(mariadb.host, database, mariadb.user, Secret("not-the-password-x9"), mariadb.port)
    with pytest.raises(EngineError) as raised:
        MySQLSession(wrong, Owner(pid=os.getpid(), run_id="r"))
    assert raised.value.kind is ErrorKind.AUTHENTICATION
    assert "not-the-password-x9" not in str(raised.value)


def _ddl(mariadb: Any, database: str) -> dict[str, str]:
    rows = query(
        mariadb, database, "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (database,)
    )
    tables = {}
    for (table,) in rows:
        if table.startswith(("_yoyo", "yoyo_")):
            tables[table] = query(mariadb, database, f"SHOW CREATE TABLE `{table}`")[0][1]
    return tables


def test_yoyo_tables_are_exactly_those_yoyo_creates(mariadb: Any, database: str, tmp_path: Path) -> None:
    twin = database + "_yoyo"
    mariadb.create_database(twin)
    try:
        files = {"001-a.sql": "CREATE TABLE a (id INT PRIMARY KEY);"}
        migrations = write(tmp_path / "m", files)
        done = yoyo("apply", "--batch", "--database", mariadb.url(twin), str(tmp_path / "m"))
        assert done.returncode == 0, done.stderr
        opened = session(mariadb, database)
        try:
            with opened.lock(wait=5):
                assert opened.applied() == {}
                opened.apply(migrations[0])
                assert opened.applied() == {migrations[0].hash: "001-a"}
        finally:
            opened.close()
        assert _ddl(mariadb, database) == _ddl(mariadb, twin)
        for table, columns in (("_yoyo_migration", "migration_hash, migration_id"), ("_yoyo_version", "version")):
            assert query(mariadb, database, f"SELECT {columns} FROM {table}") == query(
                mariadb, twin, f"SELECT {columns} FROM {table}"
            )
        log_columns = "migration_hash, migration_id, operation"
        assert query(mariadb, database, f"SELECT {log_columns} FROM _yoyo_log") == query(
            mariadb, twin, f"SELECT {log_columns} FROM _yoyo_log"
        )
        # And plain yoyo sees fanout's work as applied: nothing left to do.
        listed = yoyo("list", "--database", mariadb.url(database), str(tmp_path / "m"))
        assert listed.returncode == 0 and "A" in listed.stdout.split("001-a")[0].splitlines()[-1], listed.stdout
    finally:
        mariadb.drop_database(twin)


def test_second_session_waits_for_the_lock_and_gives_up_as_locked(mariadb: Any, database: str) -> None:
    first, second = session(mariadb, database, "run-a"), session(mariadb, database, "run-b")
    try:
        with first.lock(wait=5):
            with pytest.raises(EngineError) as raised, second.lock(wait=1):
                pass
            assert raised.value.kind is ErrorKind.LOCKED
            assert "fanout run run-a" in str(raised.value)
        with second.lock(wait=1) as (_, broken):
            assert broken is None
    finally:
        first.close()
        second.close()


def test_a_dead_fanouts_lock_is_broken_automatically(mariadb: Any, database: str) -> None:
    dead = session(mariadb, database, "run-dead")
    assert dead.try_lock().taken
    dead._connection.close()  # the session ends without releasing anything: GET_LOCK goes with it
    alive = session(mariadb, database, "run-next")
    try:
        with alive.lock(wait=10) as (_, broken):
            assert broken is not None and broken.run_id == "run-dead"
            assert query(mariadb, database, "SELECT run_id FROM fanout_lock") == [("run-next",)]
    finally:
        alive.close()


def test_the_holder_is_alive_exactly_while_its_session_lasts(mariadb: Any, database: str) -> None:
    holder, observer = session(mariadb, database, "run-h"), session(mariadb, database, "run-o")
    try:
        assert holder.try_lock().taken
        seen = observer.holder()
        assert seen is not None and (seen.run_id, seen.alive) == ("run-h", True)
        holder._connection.close()
        deadline = time.monotonic() + 10
        while (seen := observer.holder()) is not None and seen.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen is not None and (seen.run_id, seen.alive) == ("run-h", False)
        assert "session gone" in seen.describe()
    finally:
        observer.close()


def test_a_plain_yoyo_lock_row_is_never_broken(mariadb: Any, database: str) -> None:
    opened = session(mariadb, database)
    try:
        query(mariadb, database, "INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, NOW(), 4242)")
        attempt = opened.try_lock()
        assert not attempt.taken and attempt.holder is not None and attempt.holder.run_id is None
        assert attempt.holder.pid == 4242
    finally:
        opened.close()


def test_fanout_and_plain_yoyo_exclude_each_other(mariadb: Any, database: str, tmp_path: Path) -> None:
    from yoyo import get_backend
    from yoyo.exceptions import LockTimeout

    write(tmp_path / "m", {"001-a.sql": "CREATE TABLE a (id INT PRIMARY KEY);"})
    opened = session(mariadb, database)
    plain = get_backend(mariadb.url(database))  # yoyo's own MySQL backend, through PyMySQL
    try:
        with opened.lock(wait=5), pytest.raises(LockTimeout), plain.lock(timeout=1):
            pass
        with plain.lock(timeout=5):
            attempt = opened.try_lock()
            assert not attempt.taken and attempt.holder is not None and attempt.holder.run_id is None
        done = yoyo("apply", "--batch", "--database", mariadb.url(database), str(tmp_path / "m"))
        assert done.returncode == 0, done.stderr
    finally:
        plain.connection.close()
        opened.close()


def test_a_ddl_migration_records_each_statement_and_clears_its_progress(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    migrations = write(
        tmp_path / "m",
        {
            "001-a.sql": """\
                CREATE TABLE a (id INT PRIMARY KEY);
                INSERT INTO a VALUES (1);
                ALTER TABLE a ADD COLUMN b INT;
                """
        },
    )
    opened = session(mariadb, database)
    try:
        with opened.lock(wait=5):
            opened.apply(migrations[0])
        assert query(mariadb, database, "SELECT id, b FROM a") == [(1, None)]
        assert opened.progress() == []
        assert query(mariadb, database, "SELECT migration_id FROM _yoyo_migration") == [("001-a",)]
    finally:
        opened.close()


def test_a_statement_started_and_never_done_is_in_doubt_until_resolved(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    migrations = write(
        tmp_path / "m",
        {
            "001-a.sql": """\
                CREATE TABLE a (id INT PRIMARY KEY);
                ALTER TABLE a ADD COLUMN b INT;
                ALTER TABLE a ADD COLUMN c INT;
                """
        },
    )
    migration = migrations[0]
    found = migration_statements(migration)
    opened = session(mariadb, database)
    try:
        # What a kill during statement 2 leaves: 1 done, 2 started (and here it did take effect).
        with opened.lock(wait=5):
            opened._run_statement(migration, found[0])
        query(mariadb, database, "ALTER TABLE a ADD COLUMN b INT")
        query(
            mariadb, database,
            "INSERT INTO fanout_progress (migration_id, statement, sha256, first_line, state, run_id, host, pid, updated_at) "
            "VALUES (%s, 2, %s, 'ALTER TABLE a ADD COLUMN b INT;', 'started', 'run-0', 'h', 1, NULL)",
            (migration.id, found[1].sha256),
        )  # fmt: skip
        with opened.lock(wait=5):
            with pytest.raises(InDoubtError) as raised:
                opened.apply(migration)
            assert raised.value.kind is ErrorKind.IN_DOUBT
            assert (raised.value.doubt.number, raised.value.doubt.total) == (2, 3)
            assert "statement 2 of 3 (ALTER TABLE a ADD COLUMN b INT;)" in str(raised.value)
            assert opened.applied() == {}  # nothing was run, nothing recorded
            opened.resolve(migration, took_effect=True)
            opened.apply(migration)
        columns = query(
            mariadb,
            database,
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'a' AND table_schema = %s ORDER BY ordinal_position",
            (database,),
        )
        assert columns == [("id",), ("b",), ("c",)]
        assert opened.applied() == {migration.hash: "001-a"}
    finally:
        opened.close()


def test_resolving_as_not_taken_effect_runs_the_statement(mariadb: Any, database: str, tmp_path: Path) -> None:
    migrations = write(
        tmp_path / "m", {"001-a.sql": "CREATE TABLE a (id INT PRIMARY KEY);\nCREATE TABLE b (id INT);\n"}
    )
    migration = migrations[0]
    query(
        mariadb, database,
        "CREATE TABLE IF NOT EXISTS fanout_progress (migration_id VARCHAR(255), statement INT, sha256 CHAR(64), "
        "first_line VARCHAR(255), state VARCHAR(10), run_id VARCHAR(64), host VARCHAR(255), pid INT, "
        "updated_at TIMESTAMP(6) NULL, PRIMARY KEY (migration_id, statement))",
    )  # fmt: skip
    query(
        mariadb,
        database,
        "INSERT INTO fanout_progress VALUES (%s, 1, 'x', 'CREATE TABLE a', 'started', 'r', 'h', 1, NULL)",
        (migration.id,),
    )
    opened = session(mariadb, database)
    try:
        with opened.lock(wait=5):
            doubt = opened.resolve(migration, took_effect=False)
            assert doubt.number == 1
            opened.apply(migration)
        assert opened.applied() == {migration.hash: "001-a"}
    finally:
        opened.close()


def test_a_dml_only_migration_is_atomic_with_its_record(mariadb: Any, database: str, tmp_path: Path) -> None:
    query(mariadb, database, "CREATE TABLE t (id INT PRIMARY KEY)")
    migrations = write(tmp_path / "m", {"001-rows.sql": "INSERT INTO t VALUES (1);\nINSERT INTO t VALUES (1);\n"})
    opened = session(mariadb, database)
    try:
        with opened.lock(wait=5), pytest.raises(EngineError) as raised:
            opened.apply(migrations[0])
        assert raised.value.kind is ErrorKind.MIGRATION
        assert query(mariadb, database, "SELECT COUNT(*) FROM t") == [(0,)]  # the first INSERT was rolled back
        assert opened.applied() == {} and opened.progress() == []
    finally:
        opened.close()


def test_a_ddl_statement_the_server_refuses_unparsed_leaves_no_doubt(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    migrations = write(tmp_path / "m", {"001-a.sql": "CREATE TABLE a (id INT);\nALTER TABLE a ADD COLUMN;\n"})
    opened = session(mariadb, database)
    try:
        with opened.lock(wait=5), pytest.raises(EngineError) as raised:
            opened.apply(migrations[0])
        assert raised.value.kind is ErrorKind.MIGRATION
        assert "statement 2 (ALTER TABLE a ADD COLUMN;) failed: (1064)" in str(raised.value)
        assert [(r.number, r.state) for r in opened.progress()] == [(1, "done")]
        assert opened.statement_in_doubt(migrations[0]) is None
    finally:
        opened.close()


def test_a_multi_table_drop_failing_halfway_on_mariadb_is_left_in_doubt(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    migrations = write(tmp_path / "m", {"001-a.sql": "CREATE TABLE a (id INT);\nDROP TABLE a, missing;\n"})
    opened = session(mariadb, database)
    try:
        with opened.lock(wait=5), pytest.raises(EngineError) as raised:
            opened.apply(migrations[0])
        assert "statement 2 (DROP TABLE a, missing;)" in str(raised.value) and "left in doubt" in str(raised.value)
        # MariaDB did drop `a` before failing on `missing`: claiming "not run" would have been wrong.
        assert query(mariadb, database, "SHOW TABLES LIKE 'a'") == []
        doubt = opened.statement_in_doubt(migrations[0])
        assert doubt is not None and doubt.number == 2
    finally:
        opened.close()


def test_a_statement_changed_after_it_ran_is_refused_as_drift(mariadb: Any, database: str, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    migrations = write(folder, {"001-a.sql": "CREATE TABLE a (id INT);\nALTER TABLE a ADD COLUMN;\n"})
    opened = session(mariadb, database)
    try:
        with opened.lock(wait=5), pytest.raises(EngineError):
            opened.apply(migrations[0])
        changed = write(folder, {"001-a.sql": "CREATE TABLE a (id BIGINT);\nCREATE TABLE b (id INT);\n"})
        with opened.lock(wait=5), pytest.raises(EngineError) as raised:
            opened.apply(changed[0])
        assert raised.value.kind is ErrorKind.DRIFT
    finally:
        opened.close()


def test_mysql_errors_never_hold_a_password(mariadb: Any, database: str) -> None:
    unreachable = Endpoint("127.0.0.1", database, "u", Secret("pw-zz-123"), 1)
    with pytest.raises(EngineError) as raised:
        MySQLSession(unreachable, Owner(pid=1, run_id="r"))
    assert raised.value.kind is ErrorKind.UNREACHABLE
    assert "pw-zz-123" not in str(raised.value) and "pw-zz-123" not in repr(unreachable)


def test_pymysql_is_the_driver_yoyo_uses_for_mysql_urls() -> None:
    from yoyo.backends.core.mysql import MySQLBackend

    assert MySQLBackend.driver_module == "pymysql" and pymysql.__name__ == "pymysql"
