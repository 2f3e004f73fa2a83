"""MySQL/MariaDB shards through the real CLI, beside PostgreSQL ones: one environment, one run, one report.

The environment mixes the suite's embedded PostgreSQL and its own mariadbd (static
targets with postgresql:// and mysql:// DSNs); migrations come from the suite's moto S3.
Every command a shard goes through is run as a user runs it: plan, apply, status,
verify, rollback, accept, baseline, mark/unmark, resolve, unlock and bootstrap.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import Fleet
from tcp_faults import StallingProxy
from yoyo import read_migrations

from fanout.directory import Target
from fanout.engines import Resolving, mysql, postgres
from fanout.engines.mysql import MySQLSession, migration_statements
from fanout.engines.mysql.base import _rollback_statements
from fanout.engines.postgres.session import YoyoSession
from fanout.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PENDING, EXIT_TARGETS_FAILED
from fanout.locking import Owner

MARIADB_PASSWORD = "FANOUT_TEST_MARIADB_PASSWORD"
# SQL both engines read alike.
PORTABLE = {
    "001-person.sql": "CREATE TABLE person (id INT PRIMARY KEY, name VARCHAR(100) NOT NULL);\n",
    "001-person.rollback.sql": "DROP TABLE person;\n",
    "002-email.sql": "ALTER TABLE person ADD COLUMN email VARCHAR(200);\nCREATE INDEX person_email ON person (email);\n",
    "002-email.rollback.sql": "DROP INDEX person_email ON person;\nALTER TABLE person DROP COLUMN email;\n",
    "003-seed.sql": "INSERT INTO person (id, name) VALUES (1, 'ada');\nINSERT INTO person (id, name) VALUES (2, 'alan');\n",
    "003-seed.rollback.sql": "DELETE FROM person WHERE id IN (1, 2);\n",
}
PG_PORTABLE = {
    **PORTABLE,
    "002-email.rollback.sql": "DROP INDEX person_email;\nALTER TABLE person DROP COLUMN email;\n",
}


@pytest.fixture
def maria(mariadb: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv(MARIADB_PASSWORD, mariadb.password.reveal())
    made: list[str] = []

    def create(count: int) -> list[str]:
        names = [f"maria_{uuid.uuid4().hex[:10]}" for _ in range(count)]
        for name in names:
            mariadb.create_database(name)
        made.extend(names)
        return names

    mariadb.databases = create
    yield mariadb
    for name in made:
        mariadb.drop_database(name)


def mysql_dsn(mariadb: Any, database: str, scheme: str = "mysql") -> str:
    return f"{scheme}://{mariadb.user}:${{{MARIADB_PASSWORD}}}@{mariadb.host}:{mariadb.port}/{database}"


def query(mariadb: Any, database: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with mariadb.admin() as admin, admin.cursor() as cursor:
        cursor.execute(f"USE `{database}`")
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def maria_applied(mariadb: Any, database: str) -> list[str]:
    rows = query(mariadb, database, "SELECT migration_id FROM _yoyo_migration ORDER BY applied_at_utc, migration_id")
    return [r[0] for r in rows]


def mixed(fleet: Fleet, maria: Any, files: dict[str, str] = PORTABLE) -> tuple[str, list[str]]:
    (pg,) = fleet.add_databases(1)
    shards = maria.databases(2)
    fleet.publish(files)
    targets = [{"id": "pg", "dsn": fleet.dsn(pg)}, {"id": "maria-1", "dsn": mysql_dsn(maria, shards[0])},
               {"id": "maria-2", "dsn": mysql_dsn(maria, shards[1], "mariadb")}]  # fmt: skip
    fleet.write_env(targets=targets)
    return pg, shards


def by_target(output: str) -> dict[str, list[dict[str, Any]]]:
    report = json.loads(output)
    found: dict[str, list[dict[str, Any]]] = {}
    for result in report["results"]:
        found.setdefault(result["target"], []).append(result)
    return found


def test_one_run_migrates_a_mixed_fleet_into_one_report(fleet: Fleet, maria: Any) -> None:
    # One file set for both engines, so 002's rollback is PostgreSQL's; the MariaDB rollback is tested below.
    pg, shards = mixed(fleet, maria, {k: v for k, v in PORTABLE.items() if not k.endswith(".rollback.sql")})

    planned = fleet.cli("plan", "--env", "test", "--detailed-exitcode", "--format", "json")
    assert planned.exit_code == EXIT_PENDING, planned.output
    assert {t: r[0]["status"] for t, r in by_target(planned.stdout).items()} == {
        "pg": "pending", "maria-1": "pending", "maria-2": "pending",
    }  # fmt: skip
    assert query(maria, shards[0], "SHOW TABLES") == []  # plan created nothing

    applied = fleet.cli("apply", "--env", "test", "--format", "json")
    assert applied.exit_code == EXIT_OK, applied.output
    results = by_target(applied.stdout)
    assert {t: r[0]["status"] for t, r in results.items()} == {
        "pg": "applied",
        "maria-1": "applied",
        "maria-2": "applied",
    }
    assert results["maria-2"][0]["ran"] and len(results["maria-2"][0]["ran"]) == 3
    assert json.loads(applied.stdout)["totals"]["targets"] == 3
    assert fleet.applied(pg) == ["001-person", "002-email", "003-seed"]
    for shard in shards:
        assert maria_applied(maria, shard) == ["001-person", "002-email", "003-seed"]
        assert query(maria, shard, "SELECT name FROM person ORDER BY id") == [("ada",), ("alan",)]
        assert [r[0] for r in query(maria, shard, "SELECT how FROM fanout_checksums")] == ["applied"] * 3
        assert query(maria, shard, "SELECT COUNT(*) FROM fanout_progress") == [(0,)]
    assert maria.password.reveal() not in applied.output

    for command in ("status", "verify"):
        checked = fleet.cli(command, "--env", "test", "--format", "json")
        assert checked.exit_code == EXIT_OK, checked.output
        assert {r[0]["status"] for r in by_target(checked.stdout).values()} == {"up-to-date"}
    listed = fleet.cli("shards", "--env", "test")
    assert listed.exit_code == EXIT_OK and listed.output.count("mysql://") == 2, listed.output


def test_rollback_accept_baseline_and_mark_on_a_mariadb_shard(fleet: Fleet, maria: Any) -> None:
    (shard,) = maria.databases(1)
    fleet.publish(PORTABLE)
    fleet.write_env(targets=[{"id": "maria", "dsn": mysql_dsn(maria, shard)}])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    rolled = fleet.cli("rollback", "--env", "test", "--to", "001-person", "--reason", "bad email", "--format", "json")
    assert rolled.exit_code == EXIT_OK, rolled.output
    assert maria_applied(maria, shard) == ["001-person"]
    columns = query(maria, shard, "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
                                  "AND table_name = 'person' ORDER BY ordinal_position", (shard,))  # fmt: skip
    assert columns == [("id",), ("name",)]
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    fleet.publish(
        {**PORTABLE, "001-person.sql": "CREATE TABLE person (id INT PRIMARY KEY, name VARCHAR(120) NOT NULL);\n"}
    )
    drifted = fleet.cli("apply", "--env", "test", "--format", "json")
    assert drifted.exit_code == EXIT_TARGETS_FAILED and "drift" in drifted.output
    accepted = fleet.cli("accept", "--env", "test", "--migration", "001-person", "--reason", "widened by hand")
    assert accepted.exit_code == EXIT_OK, accepted.output
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    query(maria, shard, "DELETE FROM fanout_checksums")
    baselined = fleet.cli("baseline", "--env", "test")
    assert baselined.exit_code == EXIT_OK, baselined.output
    assert sorted(r[0] for r in query(maria, shard, "SELECT how FROM fanout_checksums")) == ["baselined"] * 3

    unmarked = fleet.cli("unmark", "--env", "test", "--migration", "003-seed", "--reason", "seed again")
    assert unmarked.exit_code == EXIT_OK, unmarked.output
    assert maria_applied(maria, shard) == ["001-person", "002-email"]
    marked = fleet.cli("mark", "--env", "test", "--migration", "003-seed", "--reason", "seeded by hand")
    assert marked.exit_code == EXIT_OK, marked.output
    assert maria_applied(maria, shard) == ["001-person", "002-email", "003-seed"]
    logged = [r[0] for r in query(maria, shard, "SELECT action FROM fanout_checksum_log ORDER BY id")]
    assert logged == ["rolled-back", "rolled-back", "accepted", "baselined", "baselined", "baselined", "unmarked",
                      "marked"]  # fmt: skip


def test_a_statement_in_doubt_is_reported_then_resolved_and_apply_continues(
    fleet: Fleet, maria: Any, tmp_path: Path
) -> None:
    (shard,) = maria.databases(1)
    files = {
        "001-a.sql": "CREATE TABLE a (id INT);\nALTER TABLE a ADD COLUMN b INT;\nALTER TABLE a ADD COLUMN c INT;\n"
    }
    fleet.publish(files)
    fleet.write_env(targets=[{"id": "maria", "dsn": mysql_dsn(maria, shard)}])
    (tmp_path / "001-a.sql").write_text(files["001-a.sql"])
    found = migration_statements(read_migrations(str(tmp_path))[0])
    # What a SIGKILL inside statement 2 leaves: 1 done, 2 started, and here it did take effect.
    query(maria, shard, "CREATE TABLE a (id INT, b INT)")
    mark = ("INSERT INTO fanout_progress (migration_id, statement, sha256, first_line, state, run_id, host, pid, "
            "updated_at) VALUES ('001-a', %s, %s, %s, %s, 'run-killed', 'box', 4242, UTC_TIMESTAMP(6))")  # fmt: skip
    opened = MySQLSession(Target.from_dsn("t", maria.url(shard)), Owner(pid=os.getpid(), run_id="setup"))
    opened.close()  # it made fanout's tables
    query(maria, shard, mark, (1, found[0].sha256, found[0].first_line, "done"))
    query(maria, shard, mark, (2, found[1].sha256, found[1].first_line, "started"))

    for command in ("apply", "status"):
        reported = fleet.cli(command, "--env", "test", "--format", "json")
        assert reported.exit_code == EXIT_TARGETS_FAILED, reported.output
        (result,) = by_target(reported.stdout)["maria"]
        assert result["status"] == "in-doubt"
        assert (result["in_doubt"]["statement"], result["in_doubt"]["statement_text"]) == (
            2, "ALTER TABLE a ADD COLUMN b INT;",
        )  # fmt: skip
        assert "statement 2" in result["error"]["message"] and "fanout resolve" in result["error"]["message"]
    for fmt in ("text", "markdown", "junit", "html"):
        shown = fleet.cli("status", "--env", "test", "--format", fmt)
        assert "ALTER TABLE a ADD COLUMN b INT;" in shown.output, fmt

    resolved = fleet.cli(
        "resolve", "--env", "test", "--migration", "001-a", "--took-effect", "--reason", "saw column b"
    )
    assert resolved.exit_code == EXIT_OK, resolved.output
    applied = fleet.cli("apply", "--env", "test", "--format", "json")
    assert applied.exit_code == EXIT_OK, applied.output
    assert maria_applied(maria, shard) == ["001-a"]
    columns = query(maria, shard, "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
                                  "AND table_name = 'a' ORDER BY ordinal_position", (shard,))  # fmt: skip
    assert columns == [("id",), ("b",), ("c",)]  # statement 2 was not run again, statement 3 ran
    assert query(maria, shard, "SELECT action, reason FROM fanout_checksum_log") == [("resolved-done", "saw column b")]


def test_resolve_leaves_a_postgresql_shard_alone_without_connecting_to_it(fleet: Fleet, maria: Any) -> None:
    (shard,) = maria.databases(1)
    fleet.publish(PORTABLE)
    with socket.socket() as probe:  # a port nothing listens on: resolve must not even try it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    targets = [{"id": "pg", "dsn": f"postgresql://postgres@127.0.0.1:{port}/gone"},
               {"id": "maria", "dsn": mysql_dsn(maria, shard)}]  # fmt: skip
    fleet.write_env(targets=targets)

    resolved = fleet.cli("resolve", "--env", "test", "--migration", "001-person", "--not-run", "--reason", "checked",
                         "--format", "json")  # fmt: skip

    assert resolved.exit_code == EXIT_OK, resolved.output
    settled = {r["target"]: r for r in json.loads(resolved.stdout)}
    assert settled["pg"] == {
        "target": "pg", "database": settled["pg"]["database"], "changed": [], "refused": False, "failed": False,
        "message": "PostgreSQL shard: no statement progress to resolve (`fanout mark`/`unmark` settle a migration "
        "in doubt)",
    }  # fmt: skip
    assert settled["maria"]["message"] == "001-person: no statement in doubt: nothing to do"
    assert not settled["maria"]["failed"]


def test_an_engine_says_it_resolves_exactly_when_its_apply_session_can() -> None:
    # resolve decides on the engine's word, before any session: it must match the session's capability.
    assert mysql.RESOLVING and issubclass(MySQLSession, Resolving)
    assert not postgres.RESOLVING and not issubclass(YoyoSession, Resolving)


def test_session_settings_are_named_once_for_mariadb_shards_and_still_reach_postgresql(
    fleet: Fleet, maria: Any
) -> None:
    # Portable SQL whose result shows the session's time zone: PostgreSQL stores local time, in [session] timezone.
    pg, shards = mixed(fleet, maria, {"001-seen.sql": "CREATE TABLE seen (at TIMESTAMP NULL);\n"
                                                      "INSERT INTO seen (at) VALUES (CURRENT_TIMESTAMP);\n"})  # fmt: skip
    fleet.write_env(
        targets=[{"id": "pg", "dsn": fleet.dsn(pg)}, {"id": "maria-1", "dsn": mysql_dsn(maria, shards[0])},
                 {"id": "maria-2", "dsn": mysql_dsn(maria, shards[1])}],
        extra='[session]\ntimezone = "Etc/GMT-14"\nwork_mem = "8MB"\n',
    )  # fmt: skip

    applied = fleet.cli("apply", "--env", "test", "--format", "json")

    assert applied.exit_code == EXIT_OK, applied.output
    line = "[session] timezone, work_mem: not sent to the 2 MySQL/MariaDB target(s) of this run (PostgreSQL settings)"
    assert applied.stderr.count("[session]") == 1 and line in applied.stderr, applied.stderr
    assert "Etc/GMT-14" not in applied.stderr and "8MB" not in applied.stderr  # names, never values
    json.loads(applied.stdout)  # the report itself is untouched
    utc = datetime.now(UTC).replace(tzinfo=None)
    ((pg_at,),) = fleet.query(pg, "SELECT at FROM seen")
    assert timedelta(hours=13) < pg_at - utc < timedelta(hours=15)  # UTC+14: the setting reached PostgreSQL
    for shard in shards:
        ((maria_at,),) = query(maria, shard, "SELECT at FROM seen")
        assert abs(maria_at - utc) < timedelta(hours=1)  # fanout's own UTC session, nothing of [session]

    baselined = fleet.cli("baseline", "--env", "test")  # sessions opened outside a run say it too
    assert baselined.exit_code == EXIT_OK, baselined.output
    assert baselined.stderr.count(line) == 1, baselined.stderr
    fleet.write_env(targets=[{"id": "pg", "dsn": fleet.dsn(pg)}], extra='[session]\nwork_mem = "8MB"\n')
    alone = fleet.cli("plan", "--env", "test")
    assert alone.exit_code == EXIT_OK and "[session]" not in alone.stderr, alone.stderr


def test_bootstrap_creates_a_mariadb_database(fleet: Fleet, maria: Any) -> None:
    name = f"boot_{uuid.uuid4().hex[:10]}"
    fleet.publish(PORTABLE)
    (existing,) = maria.databases(1)
    fleet.write_env(targets=[{"id": "maria", "dsn": mysql_dsn(maria, existing)}])
    dsn = mysql_dsn(maria, name).replace(f"${{{MARIADB_PASSWORD}}}", os.environ[MARIADB_PASSWORD])
    try:
        created = fleet.cli("bootstrap", "--env", "test", "--target", dsn, "--create-database")
        assert created.exit_code == EXIT_OK, created.output
        assert maria_applied(maria, name) == ["001-person", "002-email", "003-seed"]
        assert maria.password.reveal() not in created.output
    finally:
        maria.drop_database(name)


def test_schema_inspection_fails_a_mariadb_shard_cleanly_and_reads_the_postgresql_ones(
    fleet: Fleet, maria: Any
) -> None:
    mixed(fleet, maria, {k: v for k, v in PORTABLE.items() if not k.endswith(".rollback.sql")})
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    inspected = fleet.cli("inspect", "--env", "test", "--format", "json")

    assert inspected.exit_code == EXIT_TARGETS_FAILED, inspected.output
    assert "schema inspection reads PostgreSQL catalogs only" in inspected.output
    assert "internal error" not in inspected.output


def test_a_rollback_stopped_between_statements_is_in_doubt_until_rollback_continues_it(
    fleet: Fleet, maria: Any, tmp_path: Path
) -> None:
    (shard,) = maria.databases(1)
    fleet.publish(PORTABLE)
    fleet.write_env(targets=[{"id": "maria", "dsn": mysql_dsn(maria, shard)}])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    # What a kill after the first statement of 002's rollback leaves: the index dropped, the column still there.
    (tmp_path / "002-email.sql").write_text(PORTABLE["002-email.sql"])
    (tmp_path / "002-email.rollback.sql").write_text(PORTABLE["002-email.rollback.sql"])
    migration = read_migrations(str(tmp_path))[0]
    opened = MySQLSession(Target.from_dsn("t", maria.url(shard)), Owner(pid=os.getpid(), run_id="run-killed"))
    try:
        with opened.lock(5):
            opened._run_statement(migration, _rollback_statements(migration)[0], "rollback")
    finally:
        opened.close()

    status = fleet.cli("status", "--env", "test", "--format", "json")
    assert status.exit_code == EXIT_TARGETS_FAILED, status.output
    (result,) = by_target(status.stdout)["maria"]
    assert result["status"] == "in-doubt"
    assert (
        result["in_doubt"]["statement_text"]
        == "its rollback stopped after statement 1 of 2 (DROP INDEX person_email ON person;)"
    )
    assert "`fanout rollback` selecting it continues the rollback" in result["error"]["message"]

    rolled = fleet.cli("rollback", "--env", "test", "--to", "001-person", "--reason", "finish it", "--format", "json")
    assert rolled.exit_code == EXIT_OK, rolled.output
    assert maria_applied(maria, shard) == ["001-person"]
    columns = query(maria, shard, "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
                                  "AND table_name = 'person' ORDER BY ordinal_position", (shard,))  # fmt: skip
    assert columns == [("id",), ("name",)]  # the rollback's second statement ran, its first did not run twice


def test_a_second_signal_kills_the_mariadb_statement_in_flight_and_releases_the_lock(fleet: Fleet, maria: Any) -> None:
    (shard,) = maria.databases(1)
    query(maria, shard, "CREATE TABLE held (id INT PRIMARY KEY, x INT)")
    query(maria, shard, "INSERT INTO held VALUES (1, 0)")
    fleet.publish({"001-update.sql": "UPDATE held SET x = 1 WHERE id = 1;\n"})
    fleet.write_env(targets=[{"id": "maria", "dsn": mysql_dsn(maria, shard)}], extra='[runner]\nlock_timeout = "60s"\n')
    with maria.admin() as blocker, blocker.cursor() as cursor:
        cursor.execute(f"USE `{shard}`")
        cursor.execute("START TRANSACTION")
        cursor.execute("SELECT * FROM held WHERE id = 1 FOR UPDATE")  # the migration's UPDATE waits on this row
        process = fleet.spawn("apply", "--env", "test", "--format", "json")
        waiting = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'UPDATE held%%'"
        deadline = time.monotonic() + 60
        while query(maria, shard, waiting) == [(0,)]:
            assert time.monotonic() < deadline and process.poll() is None, "the migration never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        first_warning = process.stderr.readline()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)  # far less than the 60 s lock wait
        cursor.execute("ROLLBACK")
    assert process.returncode == EXIT_INTERRUPTED, first_warning + stderr
    (row,) = json.loads(stdout)["results"]
    assert row["status"] == "skipped" and row["error"]["kind"] == "interrupted", row
    assert query(maria, shard, "SELECT x FROM held") == [(0,)]
    assert query(maria, shard, "SELECT COUNT(*) FROM _yoyo_migration") == [(0,)]
    assert query(maria, shard, "SELECT COUNT(*) FROM yoyo_lock") == [(0,)]  # the lock was given back


def test_unlock_on_a_mariadb_shard_refuses_a_live_holder_and_terminates_it_on_request(fleet: Fleet, maria: Any) -> None:
    (shard,) = maria.databases(1)
    fleet.publish(PORTABLE)
    fleet.write_env(targets=[{"id": "maria", "dsn": mysql_dsn(maria, shard)}])
    holder = MySQLSession(Target.from_dsn("t", maria.url(shard)), Owner(pid=os.getpid(), run_id="run-stuck"))
    try:
        with holder.lock(5):
            refused = fleet.cli("unlock", "--env", "test", "--format", "json")
            assert refused.exit_code == EXIT_TARGETS_FAILED, refused.output
            assert "alive" in refused.output
            ended = fleet.cli("unlock", "--env", "test", "--terminate", "--reason", "stuck since Friday")
            assert ended.exit_code == EXIT_OK, ended.output
            assert query(maria, shard, "SELECT COUNT(*) FROM yoyo_lock") == [(0,)]
    finally:
        holder.close()
    applied = fleet.cli("apply", "--env", "test")
    assert applied.exit_code == EXIT_OK, applied.output
    assert query(maria, shard, "SELECT action, run_id, reason FROM fanout_lock_log") == [
        ("terminated", "run-stuck", "stuck since Friday"),
    ]  # fmt: skip


def test_a_lock_wait_timeout_on_mariadb_is_retried_and_the_report_says_so(fleet: Fleet, maria: Any) -> None:
    (shard,) = maria.databases(1)
    query(maria, shard, "CREATE TABLE busy (id INT PRIMARY KEY)")
    fleet.publish({"001-alter.sql": "ALTER TABLE busy ADD COLUMN note VARCHAR(20);\n"})
    fleet.write_env(
        targets=[{"id": "maria", "dsn": mysql_dsn(maria, shard)}],
        extra='[runner]\nlock_timeout = "1s"\nretries = 5\nretry_backoff = 0.5\n',
    )
    blocker = maria.admin()
    try:
        with blocker.cursor() as cursor:
            cursor.execute(f"USE `{shard}`")
            cursor.execute("START TRANSACTION")
            cursor.execute("SELECT * FROM busy")  # a metadata lock the ALTER waits for, 1 s at a time
        release = threading.Timer(2.5, blocker.rollback)
        release.start()
        applied = fleet.cli("apply", "--env", "test", "--format", "json")
        release.join()
    finally:
        blocker.close()
    assert applied.exit_code == EXIT_OK, applied.output
    (row,) = json.loads(applied.stdout)["results"]
    assert row["status"] == "applied"
    assert row["retries"] and all("(1205)" in r["reason"] for r in row["retries"]), row["retries"]
    assert query(maria, shard, "SELECT COUNT(*) FROM fanout_progress") == [(0,)]  # nothing was left in doubt


def test_a_mariadb_shard_that_stops_answering_is_found_by_the_liveness_check(fleet: Fleet, maria: Any) -> None:
    quiet, stalled = maria.databases(2)
    fleet.publish({"001-a.sql": "CREATE TABLE a (id INT);\n", "002-b.sql": "CREATE TABLE stall_here_b (id INT);\n"})
    with StallingProxy((maria.host, maria.port), b"stall_here_b") as proxy:
        proxied = f"mysql://{maria.user}:${{{MARIADB_PASSWORD}}}@127.0.0.1:{proxy.port}/{stalled}"
        targets = [{"id": "quiet", "dsn": mysql_dsn(maria, quiet)}, {"id": "stalled", "dsn": proxied}]
        fleet.write_env(targets=targets, extra="[runner]\nliveness_check = 1\n")
        started = time.monotonic()
        result = fleet.cli("apply", "--env", "test", "--format", "json")
        elapsed = time.monotonic() - started
        assert proxy.stalled.is_set()

    assert result.exit_code == EXIT_TARGETS_FAILED, result.output
    assert elapsed < 30  # the check (1 s), the proof that the session sits idle (2 s), process and imports
    rows = by_target(result.stdout)
    error = rows["stalled"][0]["error"]
    assert error["kind"] == "unresponsive", error
    assert "a second connection found the server no longer working on it" in error["message"]
    assert rows["quiet"][0]["status"] == "applied"
    assert maria_applied(maria, stalled) == ["001-a"]
