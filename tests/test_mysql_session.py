"""The MySQL/MariaDB engine's sessions (fanout/engines/mysql) against the suite's real MariaDB.

What the runner drives through the engine contract: the read-only session (as a
SELECT-only user: creates nothing, takes no lock), checksums and the log written with
yoyo's rows, statements in doubt as the report's InDoubt, rollback statement by
statement, post-apply hooks, accept/baseline and mark/unmark, KILL QUERY from the run's
watchdog, the classification of errors, unlock and bootstrap.
"""

from __future__ import annotations

import json
import os
import secrets
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymysql
import pytest
from yoyo import read_migrations

from fanout import checksums, engines
from fanout.directory import Target
from fanout.engines import ChecksumChange, EngineError, SettleItem, in_doubt_error
from fanout.engines.mysql import (
    MySQLSession,
    ReadOnlySession,
    Settings,
    Watching,
    ensure_database,
    settings_from,
    unlock_database,
)
from fanout.engines.mysql.core import Timeouts
from fanout.engines.mysql.watch import session_alive
from fanout.errors import TargetFailed
from fanout.interrupt import Interrupt
from fanout.locking import Owner, UnlockOutcome
from fanout.report import ErrorKind, InDoubt, _in_doubt_dict, _in_doubt_from_dict


def Recording(sha256: str) -> engines.Recording:
    return engines.Recording(sha256, "app", "test")


@pytest.fixture
def database(mariadb: Any) -> Iterator[str]:
    name = f"shard_{uuid.uuid4().hex[:12]}"
    mariadb.create_database(name)
    yield name
    mariadb.drop_database(name)


def target(mariadb: Any, database: str, *, user: str | None = None, password: str | None = None) -> Target:
    from urllib.parse import quote

    user = user or mariadb.user
    password = password if password is not None else mariadb.password.reveal()
    dsn = f"mysql://{quote(user, safe='')}:{quote(password, safe='')}@{mariadb.host}:{mariadb.port}/{database}"
    return Target.from_dsn("t", dsn)


def applying(mariadb: Any, database: str, run_id: str = "run-1", **kwargs: Any) -> MySQLSession:
    return MySQLSession(target(mariadb, database), Owner(pid=os.getpid(), run_id=run_id), **kwargs)


def query(mariadb: Any, database: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with mariadb.admin() as admin, admin.cursor() as cursor:
        cursor.execute(f"USE `{database}`")
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def tables(mariadb: Any, database: str) -> set[str]:
    rows = query(
        mariadb, database, "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (database,)
    )
    return {r[0] for r in rows}


def write(folder: Path, files: dict[str, str]) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (folder / name).write_text(textwrap.dedent(body))
    return read_migrations(str(folder))


def by_id(migrations: Any) -> dict[str, Any]:
    return {m.id: m for m in migrations}


def test_a_read_only_session_as_a_select_only_user_creates_nothing_and_reads_the_lock_holder(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    migrations = by_id(write(tmp_path / "m", {"001-a.sql": "CREATE TABLE a (id INT);\nCREATE TABLE b (id INT);\n"}))
    reader, password = f"reader_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(12)
    with mariadb.admin() as admin, admin.cursor() as cursor:
        cursor.execute(f"CREATE USER '{reader}'@'%%' IDENTIFIED BY %s", (password,))
        cursor.execute(f"GRANT SELECT ON `{database}`.* TO '{reader}'@'%'")
    try:
        fresh = ReadOnlySession(target(mariadb, database, user=reader, password=password))
        try:
            assert not fresh.initialized
            with fresh.lock(5) as (holder, broken):
                assert (holder, broken) == (None, None)
            assert fresh.applied() == {} and fresh.recorded_checksums() == {} and fresh.marks_and_invalid() == ({}, ())
            assert fresh.apply(migrations["001-a"], Recording("x")) is False
        finally:
            fresh.close()
        assert tables(mariadb, database) == set()  # nothing created, not even yoyo's tables

        writer = applying(mariadb, database)
        try:
            with writer.lock(5):
                writer.apply(migrations["001-a"], Recording("sha-a"))
                before = tables(mariadb, database)
                reading = ReadOnlySession(target(mariadb, database, user=reader, password=password))
                try:
                    with reading.lock(5) as (holder, _):
                        assert holder is not None and holder.run_id == "run-1" and holder.alive is True
                    assert set(reading.applied().values()) == {"001-a"}
                    assert reading.recorded_checksums()["001-a"].sha256 == "sha-a"
                finally:
                    reading.close()
                assert tables(mariadb, database) == before
        finally:
            writer.close()
    finally:
        with mariadb.admin() as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP USER '{reader}'@'%'")


def test_checksums_are_recorded_with_yoyos_rows_and_compare_as_on_postgresql(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    migrations = by_id(
        write(
            tmp_path / "m",
            {"001-ddl.sql": "CREATE TABLE t (id INT PRIMARY KEY);\n", "002-dml.sql": "INSERT INTO t VALUES (1);\n"},
        )
    )
    opened = applying(mariadb, database)
    try:
        with opened.lock(5):
            opened.apply(migrations["001-ddl"], Recording("sha-1"))
            opened.apply(migrations["002-dml"], Recording("sha-2"))
            recorded = opened.recorded_checksums()
            applied = set(opened.applied().values())
    finally:
        opened.close()
    assert recorded == {
        "001-ddl": checksums.Recorded("001-ddl", "sha-1", "app", "test", "applied"),
        "002-dml": checksums.Recorded("002-dml", "sha-2", "app", "test", "applied"),
    }
    drift, unverified = checksums.compare(
        recorded, service="app", environment="test", applied_ids=applied, current={"001-ddl": "sha-1", "002-dml": "new"}
    )
    assert [(d.migration, d.kind.value) for d in drift] == [("002-dml", "changed")] and unverified == []
    assert query(mariadb, database, "SELECT COUNT(*) FROM fanout_progress") == [(0,)]


def test_a_failed_dml_migration_records_neither_its_rows_nor_its_checksum(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    query(mariadb, database, "CREATE TABLE t (id INT PRIMARY KEY)")
    migrations = by_id(
        write(tmp_path / "m", {"001-rows.sql": "INSERT INTO t VALUES (1);\nINSERT INTO t VALUES (1);\n"})
    )
    opened = applying(mariadb, database)
    try:
        with opened.lock(5), pytest.raises(EngineError) as raised:
            opened.apply(migrations["001-rows"], Recording("sha"))
        assert raised.value.kind is ErrorKind.MIGRATION and "(1062)" in str(raised.value)
        assert opened.recorded_checksums() == {} and opened.applied() == {}
    finally:
        opened.close()
    assert query(mariadb, database, "SELECT COUNT(*) FROM t") == [(0,)]


def test_a_statement_in_doubt_is_a_mark_whose_in_doubt_names_the_statement_in_every_format(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    migrations = by_id(
        write(tmp_path / "m", {"001-a.sql": "CREATE TABLE a (id INT);\n-- the second\nALTER TABLE a ADD b INT;\n"})
    )
    migration = migrations["001-a"]
    opened = applying(mariadb, database)
    try:
        with opened.lock(5):
            opened.applied()
        query(
            mariadb, database,
            "INSERT INTO fanout_progress (migration_id, statement, sha256, first_line, state, run_id, host, pid, "
            "updated_at) VALUES (%s, 2, 'x', 'ALTER TABLE a ADD b INT;', 'started', 'run-0', 'box', 7, "
            "UTC_TIMESTAMP(6))",
            (migration.id,),
        )  # fmt: skip
        with opened.lock(5):
            marks, invalid = opened.marks_and_invalid()
            assert set(marks) == {"001-a"} and invalid == ()
            doubt, repaired = opened.in_doubt(migration, marks["001-a"], repair=True)
            with pytest.raises(EngineError) as raised:
                opened.apply(migration, Recording("sha"))
    finally:
        opened.close()
    assert repaired is None and doubt is not None
    assert (doubt.statement, doubt.statement_text, doubt.run_id, doubt.operation) == (
        2, "ALTER TABLE a ADD b INT;", "run-0", "apply",
    )  # fmt: skip
    assert "statement 2 (ALTER TABLE a ADD b INT;)" in doubt.describe()
    assert raised.value.kind is ErrorKind.IN_DOUBT
    assert raised.value.in_doubt.statement == 2  # type: ignore[attr-defined]
    encoded = json.loads(json.dumps(_in_doubt_dict(doubt)))
    assert (encoded["statement"], encoded["statement_text"]) == (2, "ALTER TABLE a ADD b INT;")
    assert _in_doubt_from_dict(encoded) == doubt
    plain = InDoubt("m", "apply", "r", "h", 1, datetime.now(UTC).replace(tzinfo=None))
    assert _in_doubt_dict(plain)["statement"] is None  # PostgreSQL's marks name no statement


def test_rollback_runs_its_statements_then_unrecords_as_yoyo_does(mariadb: Any, database: str, tmp_path: Path) -> None:
    migrations = by_id(
        write(
            tmp_path / "m",
            {
                "001-a.sql": "CREATE TABLE a (id INT);\nCREATE TABLE b (id INT);\n",
                "001-a.rollback.sql": "DROP TABLE b;\nDROP TABLE a;\n",
            },
        )
    )
    migration = migrations["001-a"]
    opened = applying(mariadb, database)
    try:
        with opened.lock(5):
            opened.apply(migration, Recording("sha-a"))
            # A rollback killed after its first statement: the migration is still recorded, half undone.
            opened._run_statement(migration, opened_rollback(migration)[0], "rollback")
            marks, _ = opened.marks_and_invalid()
            assert marks["001-a"].operation == "rollback"
            doubt, _ = opened.in_doubt(migration, marks["001-a"], repair=False)
            assert doubt is not None and doubt.statement is None
            assert doubt.statement_text == "its rollback stopped after statement 1 of 2 (DROP TABLE b;)"
            assert "fanout unmark" in in_doubt_error(doubt).message
            assert opened.rollback(migration, Recording("sha-a"), "bad release") is True  # continues at statement 2
            assert opened.applied() == {} and opened.recorded_checksums() == {}
            assert opened.marks_and_invalid() == ({}, ())
    finally:
        opened.close()
    assert not {"a", "b"} & tables(mariadb, database)
    log = query(mariadb, database, "SELECT migration_id, operation FROM _yoyo_log ORDER BY created_at_utc, id")
    assert [row[1] for row in log] == ["apply", "rollback"]
    assert query(mariadb, database, "SELECT action, reason FROM fanout_checksum_log") == [
        ("rolled-back", "bad release")
    ]


def opened_rollback(migration: Any) -> Any:
    from fanout.engines.mysql.base import _rollback_statements

    return _rollback_statements(migration)


def test_hooks_are_logged_as_yoyo_logs_them_and_a_failed_one_stays_due(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    (hook,) = write(tmp_path / "h", {"post-apply.sql": "CREATE TABLE IF NOT EXISTS hooked (id INT);\n"}).post_apply
    opened = applying(mariadb, database)
    try:
        with opened.lock(5):
            opened.applied()
            opened.note_hook("post-apply", "sha", failed=True, reason="boom")
            assert opened.failed_hooks() == {"post-apply"}
            opened.run_hook(hook)
            opened.note_hook("post-apply", "sha", failed=False, reason=None)
            assert opened.failed_hooks() == set()
    finally:
        opened.close()
    assert "hooked" in tables(mariadb, database)
    assert query(mariadb, database, "SELECT migration_id, operation FROM _yoyo_log") == [("post-apply", "apply")]
    assert query(mariadb, database, "SELECT COUNT(*) FROM _yoyo_migration") == [(0,)]  # hooks are never marked


def test_adopt_mark_and_unmark_record_and_log_as_on_postgresql(mariadb: Any, database: str, tmp_path: Path) -> None:
    migrations = by_id(
        write(tmp_path / "m", {"001-a.sql": "CREATE TABLE a (id INT);\n", "002-b.sql": "CREATE TABLE b (id INT);\n"})
    )
    opened = applying(mariadb, database)
    try:
        with opened.lock(5):
            opened.apply(migrations["001-a"], Recording("old"))
            opened.adopt([ChecksumChange("001-a", "old", "new", "app", checksums.How.ACCEPTED)], "test", "reviewed")
            assert opened.recorded_checksums()["001-a"].sha256 == "new"
            # 002 stopped after its only statement was marked started: mark records it, clearing the progress.
            opened._run_statement(migrations["002-b"], opened_statements(migrations["002-b"])[0])
            query(mariadb, database, "UPDATE fanout_progress SET state = 'started'")
            settled = opened.settle(
                [SettleItem(migrations["002-b"], Recording("sha-b"))],
                record=True,
                reason="checked by hand",
                force=False,
            )
            assert (settled.changed, settled.refused) == (("002-b",), False)
            assert "recorded as applied" in settled.notes[0]
            assert set(opened.applied().values()) == {"001-a", "002-b"} and opened.progress() == []
            settled = opened.settle(
                [SettleItem(migrations["001-a"], Recording("new"))], record=False, reason="run again", force=False
            )
            assert settled.changed == ("001-a",) and set(opened.applied().values()) == {"002-b"}
            assert "001-a" not in opened.recorded_checksums()
    finally:
        opened.close()
    assert query(mariadb, database, "SELECT operation FROM _yoyo_log ORDER BY created_at_utc, id") == [
        ("apply",), ("mark",), ("unmark",),
    ]  # fmt: skip
    assert [r[0] for r in query(mariadb, database, "SELECT action FROM fanout_checksum_log ORDER BY id")] == [
        "accepted", "marked", "unmarked",
    ]  # fmt: skip


def opened_statements(migration: Any) -> Any:
    from fanout.engines.mysql import migration_statements

    return migration_statements(migration)


def test_the_watchdog_kills_a_statement_past_the_targets_deadline(mariadb: Any, database: str, tmp_path: Path) -> None:
    query(mariadb, database, "CREATE TABLE t (id INT PRIMARY KEY, x INT)")
    query(mariadb, database, "INSERT INTO t VALUES (1, 0)")
    migrations = by_id(write(tmp_path / "m", {"001-u.sql": "UPDATE t SET x = 1 WHERE id = 1;\n"}))
    blocker = pymysql.connect(
        **target(mariadb, database).mysql_kwargs(connect_timeout=5, read_timeout=30, write_timeout=5)
    )
    interrupt = Interrupt()
    try:
        with blocker.cursor() as cursor:
            cursor.execute("START TRANSACTION")
            cursor.execute("SELECT * FROM t WHERE id = 1 FOR UPDATE")  # the migration's row waits on this
        opened = applying(
            mariadb, database, settings=Settings(innodb_lock_wait_timeout=60),
            timeouts=Timeouts(read=None), watching=Watching(interrupt, time.monotonic() + 2.0, 2.0),
        )  # fmt: skip
        try:
            with opened.lock(5):
                started = time.monotonic()
                with pytest.raises(EngineError) as raised:
                    opened.apply(migrations["001-u"], Recording("sha"))
                took = time.monotonic() - started
                assert opened.applied() == {}
        finally:
            opened.close()
    finally:
        blocker.close()
    assert raised.value.kind is ErrorKind.TARGET_TIMEOUT, raised.value
    assert "KILL QUERY" in str(raised.value)
    assert took < 15


def test_liveness_sees_a_running_statement_and_not_a_gone_session(mariadb: Any, database: str) -> None:
    kwargs = target(mariadb, database).mysql_kwargs(connect_timeout=5, read_timeout=30, write_timeout=5)
    busy = pymysql.connect(**kwargs)
    try:
        thread_id = busy.thread_id()
        worker = threading.Thread(target=lambda: busy.cursor().execute("SELECT SLEEP(3)"))
        worker.start()
        time.sleep(0.5)
        assert session_alive(kwargs, thread_id) is True
        worker.join()
    finally:
        busy.close()
    time.sleep(0.3)
    assert session_alive(kwargs, thread_id) is False


@pytest.mark.parametrize(
    ("change", "kind", "retryable"),
    [
        ({"password": "wrong-Sekr3t"}, ErrorKind.AUTHENTICATION, False),
        ({"database": "no_such_db"}, ErrorKind.DATABASE, False),
        ({"port": "closed"}, ErrorKind.UNREACHABLE, True),
    ],
)
def test_connection_errors_are_classified_without_the_password(
    mariadb: Any, database: str, change: dict[str, str], kind: ErrorKind, retryable: bool
) -> None:
    import socket

    chosen = target(mariadb, change.get("database", database), password=change.get("password"))
    if change.get("port"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        chosen = Target.from_dsn("t", f"mysql://{mariadb.user}:wrong-Sekr3t@127.0.0.1:{port}/{database}")
    with pytest.raises(EngineError) as raised:
        applying_target(chosen)
    assert raised.value.kind is kind, raised.value
    assert raised.value.retryable is retryable  # type: ignore[attr-defined]
    assert "Sekr3t" not in str(raised.value) and mariadb.password.reveal() not in str(raised.value)


def applying_target(chosen: Target) -> None:
    MySQLSession(chosen, Owner(pid=os.getpid(), run_id="r"), timeouts=Timeouts(connect=3)).close()


def test_a_lock_wait_timeout_is_a_retryable_lock_timeout_and_leaves_no_doubt(
    mariadb: Any, database: str, tmp_path: Path
) -> None:
    query(mariadb, database, "CREATE TABLE t (id INT PRIMARY KEY, x INT)")
    query(mariadb, database, "INSERT INTO t VALUES (1, 0)")
    migrations = by_id(write(tmp_path / "m", {"001-alter.sql": "ALTER TABLE t ADD COLUMN y INT;\n"}))
    blocker = pymysql.connect(
        **target(mariadb, database).mysql_kwargs(connect_timeout=5, read_timeout=30, write_timeout=5)
    )
    try:
        with blocker.cursor() as cursor:
            cursor.execute("START TRANSACTION")
            cursor.execute("SELECT * FROM t")  # a metadata lock the ALTER must wait for
        opened = applying(mariadb, database, settings=settings_from("1s", None))
        try:
            with opened.lock(5):
                with pytest.raises(EngineError) as raised:
                    opened.apply(migrations["001-alter"], Recording("sha"))
                assert opened.marks_and_invalid() == ({}, ())  # refused whole: nothing in doubt
        finally:
            opened.close()
    finally:
        blocker.close()
    assert raised.value.kind is ErrorKind.LOCK_TIMEOUT and "(1205)" in str(raised.value)
    assert raised.value.retryable is True  # type: ignore[attr-defined]


def test_session_limits_come_from_the_environments_postgresql_durations() -> None:
    assert settings_from("1500ms", "2min") == Settings(2, 2, 120.0)
    assert settings_from(None, "0") == Settings()
    with pytest.raises(ValueError, match="not a duration"):
        settings_from("soon", None)


def test_unlock_refuses_a_live_holder_terminates_it_on_request_and_releases_a_dead_ones(
    mariadb: Any, database: str
) -> None:
    chosen = target(mariadb, database)
    holder = applying(mariadb, database, run_id="run-live")
    try:
        with holder.lock(5):
            refused = unlock_database(chosen, force=False, terminate=None)
            assert refused.outcome is UnlockOutcome.REFUSED and "alive" in refused.reason
            ended = unlock_database(chosen, force=False, terminate="stuck migration, ticket 42")
            assert ended.outcome is UnlockOutcome.TERMINATED and ended.rows_deleted == 1
    finally:
        holder.close()
    assert unlock_database(chosen, force=False, terminate=None).outcome is UnlockOutcome.NOT_LOCKED
    log = query(mariadb, database, "SELECT action, run_id, reason FROM fanout_lock_log")
    assert log == [("terminated", "run-live", "stuck migration, ticket 42")]
    # A plain yoyo row with no other session connected: provably gone.
    query(mariadb, database, "INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, UTC_TIMESTAMP(), 4242)")
    released = unlock_database(chosen, force=False, terminate=None)
    assert released.outcome is UnlockOutcome.RELEASED, released.reason


def test_bootstrap_creates_a_missing_database_once_and_refuses_an_unquotable_name(mariadb: Any) -> None:
    name = f"boot_{uuid.uuid4().hex[:10]}"
    chosen = target(mariadb, name)
    try:
        assert ensure_database(chosen) is True
        assert ensure_database(chosen) is False
    finally:
        mariadb.drop_database(name)
    with pytest.raises(TargetFailed, match="not a name fanout quotes safely"):
        ensure_database(target(mariadb, "bad`name"))


def test_a_killed_statement_that_answers_normally_is_not_recorded(mariadb: Any, database: str, tmp_path: Path) -> None:
    # KILL QUERY makes SLEEP return 1 instead of failing: only the watchdog's verdict tells.
    migrations = by_id(write(tmp_path / "m", {"001-wait.sql": "SELECT SLEEP(30);\n"}))
    opened = applying(
        mariadb, database, timeouts=Timeouts(read=None), watching=Watching(Interrupt(), time.monotonic() + 1.5, 1.5)
    )
    try:
        with opened.lock(5):
            started = time.monotonic()
            with pytest.raises(EngineError) as raised:
                opened.apply(migrations["001-wait"], Recording("sha"))
            took = time.monotonic() - started
            assert opened.applied() == {} and opened.recorded_checksums() == {}
    finally:
        opened.close()
    assert raised.value.kind is ErrorKind.TARGET_TIMEOUT, raised.value
    assert took < 15
