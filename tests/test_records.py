"""Exit codes never lie about records: work done but not stored is exit 6, records are atomic, resume falls back to S3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import MIGRATIONS, Fleet

from fanout import runs
from fanout.errors import EXIT_NOT_STORED, EXIT_OK, EXIT_TARGETS_FAILED

APPLIED = ["001-create-person", "002-add-address", "003-create-order"]
FULL_DISK = "/dev/full"  # every write fails with ENOSPC, as on a full disk


def _folder_source(fleet: Fleet) -> str:
    """A local migrations folder instead of S3: the run record then has one place to go."""
    folder = fleet.root / "migrations" / "app" / "test"
    folder.mkdir(parents=True)
    for name, body in MIGRATIONS.items():
        (folder / name).write_text(body)
    return f'[source]\nfolder = "{fleet.root / "migrations"}"\n'


def test_a_report_that_cannot_be_stored_after_a_completed_apply_exits_6_not_a_nothing_touched_code(
    fleet: Fleet,
) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()

    result = fleet.cli("apply", "--env", "test", "--format", "json", "--output", FULL_DISK)

    assert result.exit_code == EXIT_NOT_STORED, result.output
    assert fleet.applied(shard) == APPLIED  # the work is done
    assert "the report was not stored" in result.stderr and "No space left on device" in result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == EXIT_NOT_STORED
    assert report["not_stored"] == [FULL_DISK]


def test_a_failed_target_keeps_exit_5_when_the_report_cannot_be_stored_too(fleet: Fleet) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env([{"id": shard, "dsn": fleet.dsn(shard, password="wrong")}])

    result = fleet.cli("apply", "--env", "test", "--output", FULL_DISK)

    assert result.exit_code == EXIT_TARGETS_FAILED, result.output
    assert "the report was not stored" in result.stderr


def test_an_unwritable_step_summary_is_exit_6_with_the_report_printed_not_an_internal_error(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", FULL_DISK)

    result = fleet.cli("apply", "--env", "test")

    assert result.exit_code == EXIT_NOT_STORED, result.output
    assert "internal error" not in result.output
    assert "the step summary was not written" in result.stderr
    assert "applied" in result.stdout and "not stored: $GITHUB_STEP_SUMMARY" in result.stdout
    assert fleet.applied(shard) == APPLIED


def test_a_run_record_stored_nowhere_is_exit_6_because_resume_is_impossible(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.write_env(source=_folder_source(fleet))
    blocker = fleet.root / "runs-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("FANOUT_RUNS_DIR", str(blocker))

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_NOT_STORED, result.output
    assert fleet.applied(shard) == APPLIED
    assert json.loads(result.stdout)["not_stored"] == ["run record"]
    assert "no copy of the run record was written" in result.stderr


def test_a_run_record_kept_in_s3_only_is_a_warning_and_resume_still_works(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    fleet.write_env([{"id": good, "dsn": fleet.dsn(good)}, {"id": bad, "dsn": fleet.dsn(bad, password="wrong")}])
    blocker = fleet.root / "runs-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("FANOUT_RUNS_DIR", str(blocker))

    first = fleet.cli("apply", "--env", "test", "--format", "json")
    assert first.exit_code == EXIT_TARGETS_FAILED, first.output
    assert "could not write the run record" in first.stderr
    assert json.loads(first.stdout)["not_stored"] == []

    fleet.write_env([{"id": good, "dsn": fleet.dsn(good)}, {"id": bad, "dsn": fleet.dsn(bad)}])
    resumed = fleet.cli("apply", "--env", "test", "--resume", json.loads(first.stdout)["run_id"], "--format", "json")
    assert resumed.exit_code == EXIT_OK, resumed.output
    assert fleet.applied(bad) == APPLIED


def test_resume_reads_the_s3_copy_when_the_local_record_is_truncated(fleet: Fleet, runs_dir: Path) -> None:
    good, bad = fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    fleet.write_env([{"id": good, "dsn": fleet.dsn(good)}, {"id": bad, "dsn": fleet.dsn(bad, password="wrong")}])
    first = fleet.cli("apply", "--env", "test", "--format", "json")
    run_id = json.loads(first.stdout)["run_id"]
    local = runs_dir / "test" / f"{run_id}.json"
    local.write_bytes(local.read_bytes()[:200])  # what a full disk left behind before writes were atomic

    fleet.write_env([{"id": good, "dsn": fleet.dsn(good)}, {"id": bad, "dsn": fleet.dsn(bad)}])
    resumed = fleet.cli("apply", "--env", "test", "--resume", run_id, "--format", "json")

    assert resumed.exit_code == EXIT_OK, resumed.output
    assert "using the copy in S3" in resumed.stderr
    assert [r["target"] for r in json.loads(resumed.stdout)["results"]] == [bad]


def test_resume_names_a_truncated_local_record_when_there_is_no_s3_copy(fleet: Fleet, runs_dir: Path) -> None:
    (shard,) = fleet.add_databases(1)
    fleet.write_env(source=_folder_source(fleet))
    record = runs_dir / "test" / "20261121T000000Z-abcdef.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"schema": "fanout/report/v1", "run_id": ')

    result = fleet.cli("apply", "--env", "test", "--resume", "20261121T000000Z-abcdef")

    assert result.exit_code == 2, result.output
    assert "is not a fanout report" in result.stderr and str(record) in result.stderr
    assert fleet.applied(shard) == []


def test_a_record_write_that_fails_half_way_leaves_the_old_record_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "runs" / "test" / "run.json"
    runs.write_atomically(path, b'{"complete": true}')

    def disk_full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        runs.write_atomically(path, b'{"complete": tr')

    assert path.read_bytes() == b'{"complete": true}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]


def test_with_log_format_json_what_was_not_stored_is_a_json_event(fleet: Fleet) -> None:
    fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    stored = fleet.root / "reports" / "plan.md"

    result = fleet.cli("--log-format", "json", "plan", "--env", "test", "--output", str(stored), "--output", FULL_DISK)

    assert result.exit_code == EXIT_NOT_STORED, result.output
    events = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert any(e["event"] == "stored" and e["where"] == str(stored) for e in events)
    (failure,) = [e for e in events if e.get("event") == "error"]
    assert failure["kind"] == "not-stored" and failure["where"] == FULL_DISK
