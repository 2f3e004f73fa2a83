"""Every wait is bounded and signals always work: silent shards, looping directories, silent S3.

The misbehaving peers are real sockets on 127.0.0.1 (tests/tcp_faults.py); fanout runs as
a real process whenever a signal is involved.
"""

from __future__ import annotations

import json
import signal
import textwrap
import threading
import time
from pathlib import Path

import psycopg2
import pytest
from conftest import MIGRATIONS, PASSWORD_VARIABLE, Fleet, unique
from sharding_service import ShardingService
from tcp_faults import SilentBodyProxy, SilentListener, StallingProxy
from test_locks import wait_for

from fanout import source
from fanout.config import S3Location, load_environment
from fanout.directory import Target, schemas
from fanout.engines.postgres import catalog
from fanout.errors import (
    EXIT_CONFIG,
    EXIT_DIRECTORY,
    EXIT_INTERRUPTED,
    EXIT_SOURCE,
    EXIT_TARGETS_FAILED,
    Interrupted,
)
from fanout.interrupt import CANCEL_GRACE_SECONDS

MARKER = "fanout-test-stall-here"
STALLING = {
    **MIGRATIONS,
    "002-add-address.sql": f"-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT; SELECT '{MARKER}';",
}
# Process start, imports, the directory, S3 and the other shards, on a 2-core machine shared with others.
SLACK_SECONDS = 15.0


def _proxied_fleet(fleet: Fleet, proxy: StallingProxy, extra: str = "") -> tuple[list[str], str]:
    """Three shards: two reached directly, the last one through `proxy`."""
    names = fleet.add_databases(3)
    fleet.publish(STALLING)
    stalled = names[-1]
    proxied = f"postgresql://postgres:${{{PASSWORD_VARIABLE}}}@127.0.0.1:{proxy.port}/{stalled}"
    targets = [{"id": n, "dsn": fleet.dsn(n)} for n in names[:-1]] + [{"id": stalled, "dsn": proxied}]
    fleet.write_env(targets, extra=extra)
    return names, stalled


def _rows(stdout: str) -> dict[str, dict[str, object]]:
    return {row["target"]: row for row in json.loads(stdout)["results"]}


def test_a_shard_that_stops_answering_mid_apply_fails_unresponsive_while_the_fleet_finishes(
    fleet: Fleet, runs_dir: Path
) -> None:
    upstream = (fleet.postgres.host, fleet.postgres.port)
    with StallingProxy(upstream, MARKER.encode()) as proxy:
        names, stalled = _proxied_fleet(fleet, proxy, extra="[runner]\ntarget_timeout = 3\n")
        started = time.monotonic()
        process = fleet.spawn("apply", "--env", "test", "--format", "json")
        stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - started
        assert proxy.stalled.is_set()

    assert process.returncode == EXIT_TARGETS_FAILED, stderr
    assert elapsed < 3 + CANCEL_GRACE_SECONDS + SLACK_SECONDS
    rows = _rows(stdout)
    row = rows[stalled]
    assert row["status"] == "failed"
    error = row["error"]
    assert isinstance(error, dict)
    assert error["kind"] == "unresponsive"
    assert error["migration"] == "002-add-address"
    assert "stopped answering" in error["message"] and "target timeout (3s)" in error["message"]
    for name in names[:-1]:
        assert rows[name]["status"] == "applied"
        assert fleet.applied(name) == ["001-create-person", "002-add-address", "003-create-order"]
    assert fleet.applied(stalled) == ["001-create-person"]  # the stalled migration never reached the server
    run_id = json.loads(stdout)["run_id"]
    assert (runs_dir / "test" / f"{run_id}.json").is_file()


def test_without_a_target_timeout_a_liveness_check_finds_the_silent_shard_and_the_fleet_finishes(
    fleet: Fleet,
) -> None:
    upstream = (fleet.postgres.host, fleet.postgres.port)
    with StallingProxy(upstream, MARKER.encode()) as proxy:
        names, stalled = _proxied_fleet(fleet, proxy, extra="[runner]\nliveness_check = 1\n")
        started = time.monotonic()
        result = fleet.cli("apply", "--env", "test", "--format", "json")
        elapsed = time.monotonic() - started
        assert proxy.stalled.is_set()

    assert result.exit_code == EXIT_TARGETS_FAILED, result.output
    assert elapsed < 1 + 2 + SLACK_SECONDS  # the check, the proof that the session sits idle
    rows = _rows(result.stdout)
    error = rows[stalled]["error"]
    assert isinstance(error, dict)
    assert error["kind"] == "unresponsive"
    assert "a second connection found the server no longer working on it" in error["message"]
    assert all(rows[n]["status"] == "applied" for n in names[:-1])


def test_a_long_migration_passes_its_liveness_checks(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    slow = dict(MIGRATIONS)
    slow["002-add-address.sql"] = "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT; " \
        "SELECT pg_sleep(4);"  # fmt: skip
    fleet.publish(slow)
    fleet.write_env(extra="[runner]\nliveness_check = 0.5\n")

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == 0, result.output
    assert fleet.applied(name) == ["001-create-person", "002-add-address", "003-create-order"]


def test_a_target_still_working_at_its_timeout_is_cancelled_rolled_back_and_unlocked(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    slow = {**MIGRATIONS, "002-add-address.sql": "ALTER TABLE person ADD COLUMN address TEXT; SELECT pg_sleep(60);"}
    slow["002-add-address.sql"] = "-- depends: 001-create-person\n" + slow["002-add-address.sql"]
    fleet.publish(slow)
    fleet.write_env()

    started = time.monotonic()
    result = fleet.cli("apply", "--env", "test", "--target-timeout", "2", "--format", "json")
    elapsed = time.monotonic() - started

    assert result.exit_code == EXIT_TARGETS_FAILED, result.output
    assert elapsed < 2 + CANCEL_GRACE_SECONDS  # the server answered the cancel at once
    (row,) = json.loads(result.stdout)["results"]
    assert row["status"] == "failed"
    assert row["error"]["kind"] == "target-timeout"
    assert row["error"]["migration"] == "002-add-address"
    assert "target timeout (2s)" in row["error"]["message"]
    assert fleet.applied(name) == ["001-create-person"]  # rolled back, unrecorded
    assert fleet.query(name, "SELECT count(*) FROM yoyo_lock") == [(0,)]  # the lock was released
    assert fleet.query(name, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep(60)%%' "
                       "AND pid <> pg_backend_pid()") == [(0,)]  # fmt: skip


def test_two_sigterms_end_a_hung_apply_within_seconds_with_the_report_written(fleet: Fleet, runs_dir: Path) -> None:
    upstream = (fleet.postgres.host, fleet.postgres.port)
    with StallingProxy(upstream, MARKER.encode()) as proxy:
        names, stalled = _proxied_fleet(fleet, proxy)  # no target timeout: only the signals can end it
        process = fleet.spawn("apply", "--env", "test", "--format", "json")
        wait_for(proxy.stalled.is_set)
        wait_for(lambda: all(len(fleet.applied(n)) == 3 for n in names[:-1]))
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None  # the first signal waits for the migration in flight
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < CANCEL_GRACE_SECONDS + 5
    assert "SIGTERM again: cancelling in-flight migrations" in stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True
    rows = _rows(stdout)
    assert rows[stalled]["status"] == "skipped"
    error = rows[stalled]["error"]
    assert isinstance(error, dict)
    assert error["kind"] == "interrupted"
    assert "connection abandoned" in error["message"]
    assert all(rows[n]["status"] == "applied" for n in names[:-1])
    assert (runs_dir / "test" / f"{report['run_id']}.json").is_file()


def test_an_http_directory_whose_next_link_points_to_itself_is_a_directory_error(fleet: Fleet) -> None:
    with ShardingService() as sharding:
        sharding.state.pages = [["acme"]]
        sharding.state.next_is_self = True
        directory = f'[directory]\nkind = "http"\nendpoint = "{sharding.url}"\n'
        source = f'[source]\nbucket = "{fleet.bucket}"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
        fleet.environments_dir.mkdir(exist_ok=True)
        (fleet.environments_dir / "test.toml").write_text(f'services = ["app"]\n{source}\n{directory}')

        result = fleet.cli("shards", "--env", "test")

        assert sharding.requests_matching(lambda path: path.startswith("/tenants")) == 1

    assert result.exit_code == EXIT_DIRECTORY
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"fanout: error: the tenant list loops: page 1's 'next' link points back to {sharding.url}/tenants, "
        "already read"
    )


def _silent_s3_env(fleet: Fleet, listener: SilentListener, timeouts: str) -> None:
    source = textwrap.dedent(f"""\
        [source]
        bucket = "{fleet.bucket}"
        region = "us-east-1"
        endpoint_url = "http://127.0.0.1:{listener.port}"
        {timeouts}
        """)
    fleet.add_databases(1)
    fleet.write_env(source=source)


def test_an_s3_endpoint_that_never_answers_fails_the_run_within_its_timeouts(fleet: Fleet) -> None:
    with SilentListener() as listener:
        _silent_s3_env(fleet, listener, "connect_timeout = 1\nread_timeout = 1\nmax_attempts = 2")
        started = time.monotonic()
        result = fleet.cli("plan", "--env", "test")
        elapsed = time.monotonic() - started
        assert listener.connections >= 1

    assert result.exit_code == EXIT_SOURCE
    assert elapsed < 2 * (1 + 1) + 5
    assert "Read timeout" in result.stderr and result.stderr.startswith("fanout: error: ")


def test_an_s3_download_that_stalls_after_its_headers_is_a_source_error_within_read_timeout(fleet: Fleet) -> None:
    fleet.publish(MIGRATIONS)
    upstream = ("127.0.0.1", int(fleet.s3.endpoint_url.rsplit(":", 1)[1].rstrip("/")))
    with SilentBodyProxy(upstream, b"001-create-person.sql") as proxy:
        source = textwrap.dedent(f"""\
            [source]
            bucket = "{fleet.bucket}"
            prefix = "migrations"
            region = "us-east-1"
            endpoint_url = "http://127.0.0.1:{proxy.port}"
            read_timeout = 1
            max_attempts = 1
            """)
        fleet.add_databases(1)
        fleet.write_env(source=source)
        started = time.monotonic()
        result = fleet.cli("plan", "--env", "test")
        elapsed = time.monotonic() - started
        assert proxy.stalled.is_set()

    assert result.exit_code == EXIT_SOURCE, result.output
    assert elapsed < 1 + SLACK_SECONDS
    assert result.stderr.startswith(f"fanout: error: S3 request to s3://{fleet.bucket} failed: Read timeout")


def test_sigterm_while_s3_does_not_answer_exits_130_within_seconds(fleet: Fleet) -> None:
    with SilentListener() as listener:
        _silent_s3_env(fleet, listener, "read_timeout = 120")
        process = fleet.spawn("apply", "--env", "test")
        wait_for(lambda: listener.connections >= 1, timeout=30)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < 5
    assert stdout == ""
    assert "fanout: error: interrupted while reading the migrations; nothing was touched" in stderr


def test_a_sharding_service_asking_to_retry_in_an_hour_is_retried_on_fanouts_own_backoff(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    with ShardingService() as sharding:
        sharding.state.pages = [["acme"]]
        sharding.state.databases = {
            "acme": {"host": fleet.postgres.host, "port": fleet.postgres.port, "flavor": "postgresql",
                     "user": "postgres", "password": "pw", "database": database},
        }  # fmt: skip
        sharding.state.failures_before_success = 1
        sharding.state.retry_after = "3600"
        directory = f'[directory]\nkind = "http"\nendpoint = "{sharding.url}"\ntimeout = 1\nretries = 2\n'
        source = f'[source]\nbucket = "{fleet.bucket}"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
        fleet.environments_dir.mkdir(exist_ok=True)
        (fleet.environments_dir / "test.toml").write_text(f'services = ["app"]\n{source}\n{directory}')
        started = time.monotonic()
        result = fleet.cli("shards", "--env", "test")
        elapsed = time.monotonic() - started

    assert result.exit_code == 0, result.output
    assert elapsed < 5
    assert sharding.requests_matching(lambda path: path.startswith("/write/")) == 2  # the 503, then the answer


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_a_publish_waiting_on_a_silent_s3_with_exit_130(fleet: Fleet, signum: int) -> None:
    migrations = fleet.root / "migrations"
    (migrations / "app" / "test").mkdir(parents=True)
    (migrations / "app" / "test" / "001-create-person.sql").write_text(MIGRATIONS["001-create-person.sql"])
    with SilentListener() as listener:
        _silent_s3_env(fleet, listener, "read_timeout = 120")
        process = fleet.spawn("publish", "--env", "test", "--migrations-dir", str(migrations))
        wait_for(lambda: listener.connections >= 1, timeout=30)
        process.send_signal(signum)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < 5
    assert "interrupted while reading the published migrations; nothing was touched" in stderr


def test_a_stopped_publish_writes_no_further_object_and_no_manifest(fleet: Fleet) -> None:
    migrations = fleet.root / "migrations"
    (migrations / "app" / "test").mkdir(parents=True)
    for name, body in MIGRATIONS.items():
        (migrations / "app" / "test" / name).write_text(textwrap.dedent(body))
    fleet.add_databases(1)
    fleet.write_env()
    env = load_environment("test", search_dir=fleet.environments_dir)
    assert isinstance(env.source, S3Location)
    plan = source.plan_publish(env.source, migrations, "app", "test")
    stop = threading.Event()
    stop.set()

    with pytest.raises(
        Interrupted, match=rf"0 of {len(MIGRATIONS)} file change\(s\) made, no manifest written; publish again"
    ):
        source.execute_publish(env.source, plan, force_reason=None, who="test", stop=stop)

    assert fleet.s3.client().list_objects_v2(Bucket=fleet.bucket).get("KeyCount") == 0
    assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(migrations)).exit_code == 0  # then finishes


def test_sigterm_while_the_directory_does_not_answer_exits_130_within_seconds(fleet: Fleet) -> None:
    with ShardingService() as sharding:
        sharding.state.pages = [["acme"]]
        sharding.state.delay = 60
        directory = f'[directory]\nkind = "http"\nendpoint = "{sharding.url}"\ntimeout = 120\n'
        source = f'[source]\nbucket = "{fleet.bucket}"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
        fleet.environments_dir.mkdir(exist_ok=True)
        (fleet.environments_dir / "test.toml").write_text(f'services = ["app"]\n{source}\n{directory}')
        process = fleet.spawn("plan", "--env", "test")
        wait_for(lambda: sharding.state.requests, timeout=30)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < 5
    assert "interrupted while listing the shard directory; nothing was touched" in stderr


def test_sigterm_while_tenants_resolve_on_a_stalled_directory_exits_130_within_seconds(fleet: Fleet) -> None:
    with ShardingService() as sharding:
        sharding.state.pages = [["acme", "globex", "initech"]]
        sharding.state.resolve_delay = 60  # the requests in flight sit in the directory's worker pool
        directory = f'[directory]\nkind = "http"\nendpoint = "{sharding.url}"\ntimeout = 120\n'
        source = f'[source]\nbucket = "{fleet.bucket}"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
        fleet.environments_dir.mkdir(exist_ok=True)
        (fleet.environments_dir / "test.toml").write_text(f'services = ["app"]\n{source}\n{directory}')
        process = fleet.spawn("apply", "--env", "test")
        wait_for(lambda: sharding.requests_matching(lambda path: path.startswith("/write/")) == 3, timeout=30)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < 5
    assert "interrupted while listing the shard directory; nothing was touched" in stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_fanout_shards_on_a_stalled_directory_with_exit_130(fleet: Fleet, signum: int) -> None:
    with ShardingService() as sharding:
        sharding.state.pages = [["acme", "globex"]]
        sharding.state.resolve_delay = 60
        directory = f'[directory]\nkind = "http"\nendpoint = "{sharding.url}"\ntimeout = 120\n'
        source = f'[source]\nbucket = "{fleet.bucket}"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
        fleet.environments_dir.mkdir(exist_ok=True)
        (fleet.environments_dir / "test.toml").write_text(f'services = ["app"]\n{source}\n{directory}')
        process = fleet.spawn("shards", "--env", "test")
        wait_for(lambda: sharding.requests_matching(lambda path: path.startswith("/write/")) == 2, timeout=30)
        process.send_signal(signum)
        signalled = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < 5
    assert stdout == ""
    assert "interrupted while listing the shard directory; nothing was touched" in stderr


def test_a_catalog_database_that_never_answers_is_a_directory_error_within_its_timeout(fleet: Fleet) -> None:
    with SilentListener() as listener:
        source = f'[source]\nbucket = "{fleet.bucket}"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
        directory = (
            f'[directory]\nkind = "sql"\ndsn = "postgresql://reader:catalog-secret@127.0.0.1:{listener.port}/catalog"\n'
            'query = "SELECT 1"\ntimeout = 1\n'
        )
        fleet.environments_dir.mkdir(exist_ok=True)
        (fleet.environments_dir / "test.toml").write_text(f'services = ["app"]\n{source}\n{directory}')
        started = time.monotonic()
        result = fleet.cli("shards", "--env", "test")
        elapsed = time.monotonic() - started

    assert result.exit_code == EXIT_DIRECTORY
    assert elapsed < 10
    assert "cannot connect to the catalog database" in result.stderr
    assert "catalog-secret" not in result.stderr


def test_schema_discovery_on_a_database_gone_silent_is_a_directory_error_within_its_bound(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schemas, "QUERY_TIMEOUT_SECONDS", 1.0)
    upstream = (fleet.postgres.host, fleet.postgres.port)
    with StallingProxy(upstream, b"nspname LIKE") as proxy:
        (name,) = fleet.add_databases(1)
        fleet.publish(MIGRATIONS)
        where = f"127.0.0.1:{proxy.port}/{name}"
        fleet.write_env(
            [{"id": name, "dsn": f"postgresql://postgres:${{{PASSWORD_VARIABLE}}}@{where}"}],
            extra='[directory.schemas]\npattern = "tenant%"\n',
        )
        started = time.monotonic()
        result = fleet.cli("plan", "--env", "test")
        elapsed = time.monotonic() - started
        assert proxy.stalled.is_set()

    assert result.exit_code == EXIT_DIRECTORY, result.output
    assert elapsed < 1 + 1 + SLACK_SECONDS  # the bound, then the grace after the cancel request
    assert f"schema discovery on postgresql://postgres@{where}: " in result.stderr
    assert "the database stopped answering: no answer within 1s" in result.stderr


def test_inspect_abandons_a_shard_silent_past_its_statement_timeout_while_the_fleet_is_read(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog, "SILENCE_SLACK_SECONDS", 0.0)
    upstream = (fleet.postgres.host, fleet.postgres.port)
    with StallingProxy(upstream, b"BEGIN READ ONLY") as proxy:
        names, stalled = _proxied_fleet(fleet, proxy, extra='[runner]\nstatement_timeout = "500ms"\n')
        started = time.monotonic()
        result = fleet.cli("inspect", "--env", "test", "--format", "json")
        elapsed = time.monotonic() - started
        assert proxy.stalled.is_set()

    assert result.exit_code == EXIT_TARGETS_FAILED, result.output
    assert elapsed < 2 * 0.5 + CANCEL_GRACE_SECONDS + SLACK_SECONDS  # the bound, then the cancel's grace
    rows = _rows(result.stdout)
    error = rows[stalled]["error"]
    assert isinstance(error, dict)
    assert error["kind"] == "unresponsive"
    assert "no answer within 1s (twice statement_timeout, and 0s); connection abandoned" in error["message"]
    assert all(rows[n]["status"] == "pending" for n in names[:-1])  # read: nothing is applied yet


def test_two_sigterms_end_an_inspect_hung_on_a_silent_shard_within_seconds(fleet: Fleet) -> None:
    upstream = (fleet.postgres.host, fleet.postgres.port)
    with StallingProxy(upstream, b"BEGIN READ ONLY") as proxy:
        _proxied_fleet(fleet, proxy)  # no target timeout, a 60 s statement_timeout: only the signals end it soon
        process = fleet.spawn("inspect", "--env", "test", "--format", "json")
        wait_for(proxy.stalled.is_set)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None  # the first signal waits for the read in flight
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < CANCEL_GRACE_SECONDS + 5
    assert json.loads(stdout)["interrupted"] is True


def test_two_sigterms_end_an_unlock_hung_on_a_silent_shard_and_leave_the_others_as_they_were(fleet: Fleet) -> None:
    upstream = (fleet.postgres.host, fleet.postgres.port)
    with StallingProxy(upstream, b"coalesce(") as proxy:  # unlock's first statement
        silent, other = fleet.add_databases(2)
        proxied = f"postgresql://postgres:${{{PASSWORD_VARIABLE}}}@127.0.0.1:{proxy.port}/{silent}"
        fleet.write_env(
            [{"id": silent, "dsn": proxied}, {"id": other, "dsn": fleet.dsn(other)}],
            extra="[runner]\nconcurrency = 1\n",
        )
        process = fleet.spawn("unlock", "--env", "test", "--format", "json")
        wait_for(proxy.stalled.is_set)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None  # the first signal starts no other target and waits for this one
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stdout, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < CANCEL_GRACE_SECONDS + 5
    (row,) = json.loads(stdout)  # the other target was not reached: left as it was, not listed
    assert row["target"] == silent
    assert row["outcome"] == "failed"
    assert row["message"].startswith("cancelled by a second interrupt; no answer 5s after a cancel request")


def test_a_mysql_server_that_accepts_and_never_greets_fails_the_target_within_connect_timeout(fleet: Fleet) -> None:
    with SilentListener() as listener:
        fleet.publish(MIGRATIONS)
        dsn = f"mysql://root:pw@127.0.0.1:{listener.port}/db"
        fleet.write_env([{"id": "silent", "dsn": dsn}], extra="[runner]\nconnect_timeout = 1\nretries = 0\n")
        started = time.monotonic()
        result = fleet.cli("plan", "--env", "test", "--format", "json")
        elapsed = time.monotonic() - started
        assert listener.connections == 1

    assert result.exit_code == EXIT_TARGETS_FAILED, result.output
    assert elapsed < 1 + SLACK_SECONDS
    error = _rows(result.stdout)["silent"]["error"]
    assert isinstance(error, dict)
    assert error["kind"] == "unreachable"
    assert error["message"].startswith("cannot connect: no answer within 1s ((2013) Lost connection")


def test_two_sigterms_end_a_bootstrap_whose_server_goes_silent_while_it_creates_the_database(fleet: Fleet) -> None:
    upstream = (fleet.postgres.host, fleet.postgres.port)
    with StallingProxy(upstream, b"FROM pg_database WHERE datname") as proxy:
        fleet.publish(MIGRATIONS)
        fleet.add_databases(1)
        fleet.write_env()
        dsn = f"postgresql://postgres:${{{PASSWORD_VARIABLE}}}@127.0.0.1:{proxy.port}/{unique('new')}"
        process = fleet.spawn("bootstrap", "--env", "test", "--target", dsn, "--create-database")
        wait_for(proxy.stalled.is_set)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None  # the first signal lets the statement in flight finish
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < CANCEL_GRACE_SECONDS + 5
    assert "fanout: error: interrupted while creating the database (cannot create database" in stderr
    assert "cancelled by a second interrupt" in stderr


def test_two_sigterms_end_an_inspect_whose_build_reference_server_goes_silent(fleet: Fleet) -> None:
    upstream = (fleet.postgres.host, fleet.postgres.port)
    with StallingProxy(upstream, b"CREATE DATABASE") as proxy:
        (name,) = fleet.add_databases(1)
        fleet.publish(MIGRATIONS)
        # The scratch is made on the first target's server: here, through the proxy.
        fleet.write_env(
            [{"id": name, "dsn": f"postgresql://postgres:${{{PASSWORD_VARIABLE}}}@127.0.0.1:{proxy.port}/{name}"}]
        )
        process = fleet.spawn("inspect", "--env", "test", "--reference", "build")
        wait_for(proxy.stalled.is_set)
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None  # the first signal lets the statement in flight finish
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled

    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert elapsed < CANCEL_GRACE_SECONDS + 5
    assert "cannot create the scratch database" in stderr and "cancelled by a second interrupt" in stderr


def test_every_shard_connection_gets_keepalives_and_a_user_timeout_that_the_environment_sets(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.write_env(extra="[runner]\nkeepalives_idle = 5\nkeepalives_interval = 2\nkeepalives_count = 4\n"
                    "tcp_user_timeout = 7.5\n")  # fmt: skip
    from fanout.config import load_environment

    env = load_environment("test", search_dir=fleet.environments_dir)
    dsn = fleet.dsn(name).replace("${" + PASSWORD_VARIABLE + "}", fleet.postgres.password.reveal())
    kwargs = Target.from_dsn("t", dsn).libpq_kwargs(application_name="t", connect_timeout=5, tcp=env.runner.tcp)
    assert {k: kwargs[k] for k in kwargs if k.startswith(("keepalives", "tcp_"))} == {
        "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 4,
        "tcp_user_timeout": 7500,
    }  # fmt: skip
    with psycopg2.connect(**kwargs) as connection:  # libpq accepts them all
        assert connection.get_dsn_parameters()["tcp_user_timeout"] == "7500"
    own = Target.from_dsn("t", dsn + "?keepalives_idle=1").libpq_kwargs(application_name="t", connect_timeout=5)
    assert own["keepalives_idle"] == "1"  # a target's own DSN parameter wins


def test_timeout_keys_are_validated(fleet: Fleet) -> None:
    fleet.add_databases(1)
    for extra, where in (
        ("[runner]\nkeepalives_idle = 0\n", "runner.keepalives_idle"),
        ("[runner]\ntarget_timeout = -1\n", "runner.target_timeout"),
        ('[runner]\ntcp_user_timeout = "1min"\n', "runner.tcp_user_timeout"),
    ):
        fleet.write_env(extra=extra)
        result = fleet.cli("plan", "--env", "test")
        assert result.exit_code == EXIT_CONFIG
        assert where in result.stderr, result.stderr
