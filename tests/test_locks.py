"""Shard locks that cannot get stuck: stale fanout locks are broken, live ones never, plain yoyo's by hand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import MIGRATIONS, Fleet
from yoyo import get_backend

from fanout.engines.postgres import locking
from fanout.engines.postgres.locking import PAUSE_VARIABLE
from fanout.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_TARGETS_FAILED
from fanout.report import from_dict, to_dict

SLOW = {
    "001-create-person.sql": "CREATE TABLE person (id SERIAL PRIMARY KEY, name TEXT NOT NULL);",
    "002-slow.sql": "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT; SELECT pg_sleep(%s);",
}


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def lock_owner(fleet: Fleet, database: str) -> tuple[Any, ...] | None:
    if "fanout_lock" not in fleet.tables(database):
        return None
    rows = fleet.query(database, "SELECT run_id, pid, host FROM fanout_lock")
    return rows[0] if rows else None


def slow_set(seconds: float) -> dict[str, str]:
    return {name: body.replace("%s", str(seconds)) for name, body in SLOW.items()}


def test_lock_of_a_killed_fanout_is_broken_by_the_next_run_and_the_report_says_so(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(slow_set(30))
    fleet.write_env()
    victim = fleet.spawn("apply", "--env", "test")
    run_id, pid, _host = wait_for(lambda: lock_owner(fleet, name))
    wait_for(lambda: fleet.query(name, "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%%pg_sleep(30)%%' "
                                       "AND pid <> pg_backend_pid()"))  # fmt: skip
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert fleet.query(name, "SELECT pid FROM yoyo_lock") == [(pid,)]  # left behind, as yoyo would

    fleet.publish(slow_set(0))  # same ids; yoyo hashes ids, not content
    result = fleet.cli("apply", "--env", "test", "--lock-wait", "20", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    (row,) = json.loads(result.stdout)["results"]
    assert row["broken_lock"]["run_id"] == run_id
    assert row["broken_lock"]["pid"] == pid
    assert row["status"] == "applied"
    assert [m["id"] for m in row["ran"]] == ["002-slow"]  # the killed migration was rolled back, not recorded
    assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)]
    assert fleet.query(name, "SELECT count(*) FROM fanout_lock") == [(0,)]


def test_a_live_fanout_lock_is_never_broken_and_its_owner_is_shown(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(slow_set(8))  # room for three CLI calls while it holds the lock, even on a loaded machine
    fleet.write_env()
    holder = fleet.spawn("apply", "--env", "test", "--format", "json")
    run_id, pid, host = wait_for(lambda: lock_owner(fleet, name))

    blocked = fleet.cli("apply", "--env", "test", "--lock-wait", "0.5", "--format", "json")
    status = fleet.cli("status", "--env", "test", "--format", "json")
    refused = fleet.cli("unlock", "--env", "test")

    assert blocked.exit_code == EXIT_TARGETS_FAILED
    (row,) = json.loads(blocked.stdout)["results"]
    assert row["error"]["kind"] == "locked"
    assert run_id in row["error"]["message"]
    status_report = json.loads(status.stdout)
    assert to_dict(from_dict(status_report)) == status_report  # a lock holder reads back as written
    (seen,) = status_report["results"]
    assert seen["lock_holder"] == {
        "pid": pid,
        "since": seen["lock_holder"]["since"],
        "host": host,
        "run_id": run_id,
        "alive": True,
    }
    assert seen["lock_holder"]["since"]
    assert refused.exit_code == EXIT_TARGETS_FAILED
    assert "refused" in refused.stdout and "alive" in refused.stdout
    stdout, _ = holder.communicate(timeout=60)
    assert holder.returncode == EXIT_OK
    assert json.loads(stdout)["totals"]["migrations_applied"] == 2


def test_a_plain_yoyo_lock_is_never_broken_automatically(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    backend = get_backend(fleet.dsn(name, password=fleet.postgres.password.reveal()))
    try:
        with backend.lock():  # a real yoyo process, holding its lock
            result = fleet.cli("apply", "--env", "test", "--lock-wait", "0.5", "--format", "json")
            refused = fleet.cli("unlock", "--env", "test", "--format", "json")
            assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(1,)]
    finally:
        backend.connection.close()

    assert result.exit_code == EXIT_TARGETS_FAILED
    (row,) = json.loads(result.stdout)["results"]
    assert row["error"]["kind"] == "locked"
    assert "yoyo pid" in row["error"]["message"]
    assert refused.exit_code == EXIT_TARGETS_FAILED
    (entry,) = json.loads(refused.stdout)
    assert entry["outcome"] == "refused"
    assert "other session" in entry["message"]
    assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)]  # yoyo released it itself


def test_unlock_removes_a_dead_yoyo_lock_and_refuses_a_live_one_unless_forced(fleet: Fleet) -> None:
    dead, live = fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    for name in (dead, live):
        fleet.query(
            name,
            "CREATE TABLE yoyo_lock (locked INT DEFAULT 1, ctime TIMESTAMP, pid INT NOT NULL, PRIMARY KEY (locked))",
        )
        fleet.query(name, "INSERT INTO yoyo_lock VALUES (1, now(), 424242)")
    with fleet.postgres.connect(live):  # someone is connected: the holder may be alive
        refused = fleet.cli("unlock", "--env", "test", "--target", live)
        forced = fleet.cli("unlock", "--env", "test", "--target", live, "--force")
    released = fleet.cli("unlock", "--env", "test", "--target", dead)
    again = fleet.cli("unlock", "--env", "test")

    assert refused.exit_code == EXIT_TARGETS_FAILED
    assert "refused" in refused.stdout
    assert forced.exit_code == EXIT_OK and "forced" in forced.stdout
    assert released.exit_code == EXIT_OK and "released" in released.stdout
    assert again.exit_code == EXIT_OK
    assert again.stdout.count("not-locked") == 2
    for name in (dead, live):
        assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)]
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK


def test_unlock_names_an_unknown_target(fleet: Fleet) -> None:
    fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()

    result = fleet.cli("unlock", "--env", "test", "--target", "nope")

    assert result.exit_code == 2
    assert "no target 'nope'" in result.stderr


def test_fanout_and_plain_yoyo_exclude_each_other(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(slow_set(2))
    fleet.write_env()
    holder = fleet.spawn("apply", "--env", "test")
    wait_for(lambda: lock_owner(fleet, name))
    backend = get_backend(fleet.dsn(name, password=fleet.postgres.password.reveal()))
    started = time.monotonic()
    try:
        with backend.lock(timeout=30):
            waited = time.monotonic() - started
            assert fleet.query(name, "SELECT count(*) FROM fanout_lock") == [(0,)]
    finally:
        backend.connection.close()
    holder.communicate(timeout=60)

    assert holder.returncode == EXIT_OK
    assert waited > 0.5  # yoyo waited for fanout to finish the slow migration


def test_owner_liveness_is_read_right_for_a_schema_whose_hash_is_negative(fleet: Fleet) -> None:
    """The liveness probe compares hashtext() (an int4, here negative) with pg_locks' oid columns."""
    (name,) = fleet.add_databases(1)
    candidates = [f"tenant_{i}" for i in range(20)]
    rows = fleet.query(name, "SELECT s FROM unnest(%s::text[]) AS s WHERE hashtext(s) < 0", (candidates,))
    schema = rows[0][0]
    fleet.publish(slow_set(4))
    fleet.write_env([{"id": "tenant", "dsn": fleet.dsn(name), "schema": schema}])
    holder = fleet.spawn("apply", "--env", "test")
    wait_for(
        lambda: "fanout_lock" in fleet.tables(name, schema) and fleet.query(name, f"SELECT 1 FROM {schema}.fanout_lock")
    )

    status = fleet.cli("status", "--env", "test", "--format", "json")
    holder.communicate(timeout=60)

    (row,) = json.loads(status.stdout)["results"]
    assert row["schema"] == schema
    assert row["lock_holder"]["alive"] is True
    assert holder.returncode == EXIT_OK


RACE_ROUNDS = int(os.environ.get("FANOUT_LOCK_RACE_ROUNDS", "10"))
# A real yoyo taking and releasing its lock in a loop. Inside its lock it opens a witness row, looks
# for a fanout lock row (there must be none), and closes the witness; fanout's migration looks for an
# open witness (there must be none). Either sighting means both held the lock at once.
YOYO_LOOP = """\
import os, random, sys, time
import psycopg2
from yoyo import get_backend

dsn, stop = sys.argv[1], sys.argv[2]
backend = get_backend(dsn)
witness = psycopg2.connect(dsn)
witness.autocommit = True
cursor = witness.cursor()
rng = random.Random(os.getpid())
while not os.path.exists(stop):
    with backend.lock(timeout=120):
        cursor.execute("INSERT INTO witness (saw_fanout) VALUES ((SELECT count(*) > 0 FROM fanout_lock)) RETURNING id")
        (row,) = cursor.fetchone()
        time.sleep(rng.uniform(0, 0.08))
        cursor.execute(
            "UPDATE witness SET saw_fanout = saw_fanout OR (SELECT count(*) > 0 FROM fanout_lock), ended = true "
            "WHERE id = %s", (row,))
    time.sleep(rng.uniform(0, 0.3))
"""


def test_fanout_and_a_real_yoyo_never_both_hold_the_lock_with_a_pause_between_every_message(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every message of fanout's acquisition and release is delayed, so a looping yoyo lands in every gap."""
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(name, "CREATE TABLE witness (id SERIAL PRIMARY KEY, saw_fanout BOOLEAN NOT NULL, ended BOOLEAN)")
    script, stop = tmp_path / "yoyo_loop.py", tmp_path / "stop"
    script.write_text(YOYO_LOOP)
    dsn = fleet.dsn(name, password=fleet.postgres.password.reveal())
    yoyo = subprocess.Popen([sys.executable, str(script), dsn, str(stop)], stderr=subprocess.PIPE, text=True)
    monkeypatch.setenv(PAUSE_VARIABLE, "0.1")
    outcomes: dict[str, int] = {"applied": 0, "locked": 0}
    previous = "003-create-order"
    try:
        wait_for(lambda: fleet.query(name, "SELECT 1 FROM witness"))
        for round_number in range(RACE_ROUNDS):
            migration = f"{round_number + 100:03d}-round"
            check = "DO $$ BEGIN IF EXISTS (SELECT 1 FROM witness WHERE ended IS NULL) THEN " \
                    "RAISE EXCEPTION 'a plain yoyo holds the lock too'; END IF; END $$;"  # fmt: skip
            fleet.publish({f"{migration}.sql": f"-- depends: {previous}\n{check}\nSELECT pg_sleep(0.1);\n{check}"})
            process = fleet.spawn("apply", "--env", "test", "--lock-wait", "15", "--format", "json")
            stdout, stderr = process.communicate(timeout=120)
            (row,) = json.loads(stdout)["results"]
            assert row["status"] in ("applied", "failed"), stderr
            if row["status"] == "failed":
                assert row["error"]["kind"] == "locked", row["error"]
                outcomes["locked"] += 1
                fleet.s3.client().delete_object(
                    Bucket=fleet.bucket, Key=f"migrations/app/test/{migration}.sql"
                )  # fanout never got in: take the next round without it
            else:
                outcomes["applied"] += 1
                previous = migration
    finally:
        stop.touch()
        yoyo.communicate(timeout=180)

    assert yoyo.returncode == 0
    witnessed = fleet.query(name, "SELECT count(*), count(*) FILTER (WHERE saw_fanout) FROM witness")
    (yoyo_holds, both) = witnessed[0]
    print(f"\n{RACE_ROUNDS} rounds against a looping yoyo: fanout {outcomes}, yoyo held the lock {yoyo_holds} times")
    assert both == 0, "yoyo saw fanout's lock row while it held its own"
    assert outcomes["applied"] > 0 and yoyo_holds > RACE_ROUNDS
    assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)]


def test_unlock_never_calls_a_yoyo_holder_gone_while_another_roles_session_is_hidden(fleet: Fleet) -> None:
    """Without pg_read_all_stats, pg_stat_activity hides what other roles' sessions are: they still count."""
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    suffix = name.rsplit("_", 2)[-2] + "_" + name.rsplit("_", 1)[-1]
    unlocker, holder_role, password = f"unlocker_{suffix}", f"yoyo_{suffix}", "role-pw-7"
    for role in (unlocker, holder_role):
        fleet.query("postgres", f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    fleet.query(
        name, "CREATE TABLE yoyo_lock (locked INT DEFAULT 1, ctime TIMESTAMP, pid INT NOT NULL, PRIMARY KEY (locked))"
    )
    fleet.query(name, "INSERT INTO yoyo_lock VALUES (1, now(), 515151)")
    fleet.query(name, f"GRANT SELECT, DELETE ON yoyo_lock TO {unlocker}")
    fleet.write_env([{"id": name, "dsn": fleet.dsn(name, user=unlocker, password=password)}])
    try:
        with fleet.postgres.connect(name, user=holder_role, password=password):  # the yoyo holder, another role
            refused = fleet.cli("unlock", "--env", "test", "--format", "json")
        released = fleet.cli("unlock", "--env", "test", "--format", "json")
    finally:
        for role in (unlocker, holder_role):
            fleet.query(name, f"DROP OWNED BY {role}")
            fleet.query("postgres", f"DROP ROLE {role}")

    assert refused.exit_code == EXIT_TARGETS_FAILED, refused.output
    (entry,) = json.loads(refused.stdout)
    assert entry["outcome"] == "refused"
    assert entry["hidden_sessions"] == 1 and entry["rows_deleted"] == 0
    assert "cannot see" in entry["message"] and "pg_read_all_stats" in entry["message"]
    assert released.exit_code == EXIT_OK, released.output  # the holder disconnected: now nobody is there
    (entry,) = json.loads(released.stdout)
    assert entry["outcome"] == "released" and entry["rows_deleted"] == 1
    assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)]


def test_a_session_holding_the_advisory_lock_is_freed_only_by_terminate_and_unlock_says_so(fleet: Fleet) -> None:
    """A half-open holder (its client gone, its server session idle) keeps fanout's advisory lock."""
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.publish({"004-more.sql": "-- depends: 003-create-order\nSELECT 1;"})
    with fleet.postgres.connect(name) as half_open:
        held = locking.try_acquire(half_open, locking.Owner(pid=777777, run_id="half-open-run"), "public")
        assert held.taken
        backend_pid = half_open.get_backend_pid()

        refused = fleet.cli("unlock", "--env", "test", "--format", "json")
        forced = fleet.cli("unlock", "--env", "test", "--force", "--format", "json")
        blocked = fleet.cli("apply", "--env", "test", "--lock-wait", "0.5", "--format", "json")
        no_reason = fleet.cli("unlock", "--env", "test", "--terminate")
        terminated = fleet.cli(
            "unlock", "--env", "test", "--terminate", "--reason", "runner host lost", "--format", "json"
        )
        with pytest.raises(psycopg2.OperationalError):
            half_open.cursor().execute("SELECT 1")
    applied = fleet.cli("apply", "--env", "test")

    (entry,) = json.loads(refused.stdout)
    assert refused.exit_code == EXIT_TARGETS_FAILED and entry["outcome"] == "refused"
    assert entry["advisory_lock_held_by"] == backend_pid and "alive" in entry["message"]
    (entry,) = json.loads(forced.stdout)
    assert forced.exit_code == EXIT_TARGETS_FAILED  # --force did not free the shard, and says so
    assert entry["outcome"] == "still-held" and entry["rows_deleted"] == 1
    assert entry["advisory_lock_held_by"] == backend_pid and "stays locked" in entry["message"]
    assert blocked.exit_code == EXIT_TARGETS_FAILED
    assert json.loads(blocked.stdout)["results"][0]["error"]["kind"] == "locked"
    assert no_reason.exit_code == 2 and "--reason" in no_reason.stderr
    (entry,) = json.loads(terminated.stdout)
    assert terminated.exit_code == EXIT_OK, terminated.output
    assert entry["outcome"] == "terminated" and entry["terminated"] == backend_pid
    assert entry["advisory_lock_held_by"] is None
    assert applied.exit_code == EXIT_OK, applied.output
    logged = fleet.query(
        name, "SELECT action, holder_pid, terminated_backend_pid, reason FROM fanout_lock_log ORDER BY id"
    )
    assert logged == [("forced", 777777, None, None), ("terminated", None, backend_pid, "runner host lost")]


def test_unlock_force_behind_a_row_lock_gives_up_within_lock_timeout_instead_of_waiting_forever(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env(extra='[runner]\nlock_timeout = "1s"\n')
    fleet.query(
        name, "CREATE TABLE yoyo_lock (locked INT DEFAULT 1, ctime TIMESTAMP, pid INT NOT NULL, PRIMARY KEY (locked))"
    )
    fleet.query(name, "INSERT INTO yoyo_lock VALUES (1, now(), 424242)")
    # A session that stopped mid-transaction (a half-open client) keeps its row lock on the lock row.
    with fleet.postgres.connect(name) as holder, holder.cursor() as cursor:
        cursor.execute("BEGIN; SELECT * FROM yoyo_lock FOR UPDATE")
        process = fleet.spawn("unlock", "--env", "test", "--force", "--format", "json")
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail("unlock --force waited on the row lock without a bound")
        cursor.execute("ROLLBACK")
    assert process.returncode == EXIT_TARGETS_FAILED, (out, err)
    (entry,) = json.loads(out)
    assert "lock timeout" in entry["message"], entry
    assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(1,)]  # nothing half-done


def test_unmark_waiting_for_a_held_lock_stops_on_sigint_with_exit_130(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(name, "INSERT INTO yoyo_lock VALUES (1, now(), 424242)")  # a plain yoyo holds the shard
    process = fleet.spawn(
        "unmark", "--env", "test", "--migration", "001-create-person", "--reason", "r", "--lock-wait", "120"
    )
    deadline = time.monotonic() + 20
    while (
        time.monotonic() < deadline
        and not fleet.query(name, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'fanout%%'")[0][0]
    ):
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("unmark kept waiting for the lock after SIGINT")
    assert process.returncode == EXIT_INTERRUPTED, (out, err)
    assert "Traceback" not in err and "Aborted" not in err, err
    assert fleet.applied(name) == ["001-create-person", "002-add-address", "003-create-order"]  # nothing unmarked


@pytest.mark.parametrize(
    "command",
    [
        ("accept", "--migration", "001-create-person", "--reason", "r"),
        ("baseline",),
    ],
    ids=["accept", "baseline"],
)
def test_accept_and_baseline_waiting_for_a_held_lock_stop_on_sigint_with_exit_130(
    fleet: Fleet, command: tuple[str, ...]
) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK

    def logged() -> int:  # the log table is created with its first row
        if "fanout_checksum_log" not in fleet.tables(name):
            return 0
        return int(fleet.query(name, "SELECT count(*) FROM fanout_checksum_log")[0][0])

    before = logged()
    fleet.query(name, "INSERT INTO yoyo_lock VALUES (1, now(), 424242)")  # a plain yoyo holds the shard
    process = fleet.spawn(*command, "--env", "test", "--lock-wait", "120")
    deadline = time.monotonic() + 20
    while (
        time.monotonic() < deadline
        and not fleet.query(name, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'fanout%%'")[0][0]
    ):
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"{command[0]} kept waiting for the lock after SIGINT")
    assert process.returncode == EXIT_INTERRUPTED, (out, err)
    assert "Traceback" not in err and "Aborted" not in err, err
    assert logged() == before  # nothing recorded
