"""Beyond one machine: `--slice K/N` partitions the fleet, `report merge` puts it back together."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import MIGRATIONS, Fleet

from fanout.errors import EXIT_CONFIG, EXIT_OK, EXIT_TARGETS_FAILED, ConfigError
from fanout.rollout import Slice

SLOW = dict(MIGRATIONS)
SLOW["002-add-address.sql"] = (
    "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT; SELECT pg_sleep(0.1);"
)
# With ids t0..t7, slice 1/2 is t0-t3 and 2/2 is t4-t7; of 3 slices, 2/3 is t6 alone.
IDS = [f"t{n}" for n in range(8)]


def numbered_fleet(fleet: Fleet, count: int) -> dict[str, str]:
    """`count` shards with ids t0.. (slices are then known in advance); returns id -> database."""
    databases = dict(zip(IDS, fleet.add_databases(count), strict=False))
    fleet.write_env([{"id": target, "dsn": fleet.dsn(database)} for target, database in databases.items()])
    return databases


def test_slices_partition_any_fleet_and_a_target_keeps_its_slice() -> None:
    ids = [f"tenant-{n}" for n in range(2000)]
    for count in (1, 2, 3, 7):
        owners = Counter(k for target in ids for k in range(1, count + 1) if Slice(k, count).contains(target))
        assert sum(owners.values()) == len(ids)  # every target in exactly one slice
        assert all(abs(n - len(ids) / count) < len(ids) / count * 0.15 for n in owners.values()), owners
    # Pinned: the hash must not change between versions, or a rerun would move targets between runners.
    assert [k for k in range(1, 5) if Slice(k, 4).contains("tenant-acme")] == [1]
    assert [k for k in range(1, 5) if Slice(k, 4).contains("shared-1")] == [2]


@pytest.mark.parametrize("text", ["0/4", "5/4", "2", "a/b", "1/0", "-1/2", "2/4/8", ""])
def test_a_bad_slice_is_a_usage_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--slice"):
        Slice.parse(text)


def test_bad_slice_on_the_command_line_exits_2_before_touching_anything(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    result = fleet.cli("apply", "--env", "test", "--slice", "3/2")
    assert result.exit_code == EXIT_CONFIG
    assert "--slice: '3/2': K must be between 1 and N" in result.output
    assert fleet.applied(name) == []


def test_two_runners_on_different_slices_never_touch_the_same_target_and_merge_to_the_fleet(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.publish(SLOW)
    databases = numbered_fleet(fleet, 8)
    reports = tmp_path / "reports"
    runners = [
        fleet.spawn("apply", "--env", "test", "--slice", f"{k}/2", "--output", str(reports / f"slice-{k}.json"))
        for k in (1, 2)
    ]
    for runner in runners:
        runner.communicate(timeout=120)
    assert [r.returncode for r in runners] == [EXIT_OK, EXIT_OK]

    parts = [json.loads((reports / f"slice-{k}.json").read_text()) for k in (1, 2)]
    targets = [{r["target"] for r in part["results"]} for part in parts]
    assert targets == [{"t0", "t1", "t2", "t3"}, {"t4", "t5", "t6", "t7"}]
    assert all(part["slice"] == f"{k}/2" for k, part in zip((1, 2), parts, strict=True))
    for part in parts:
        for result in part["results"]:
            assert result["status"] == "applied"
            database = databases[result["target"]]
            assert fleet.query(database, "SELECT count(*) FROM _yoyo_log WHERE operation = 'apply'") == [(3,)]

    merged = fleet.cli("report", "merge", str(reports), "--format", "json")
    assert merged.exit_code == EXIT_OK, merged.output
    fleet_report = json.loads(merged.stdout)
    assert fleet_report["totals"]["targets"] == 8
    assert fleet_report["totals"]["migrations_applied"] == 24
    assert [p["slice"] for p in fleet_report["parts"]] == ["1/2", "2/2"]
    assert [p["run_id"] for p in fleet_report["parts"]] == [part["run_id"] for part in parts]
    assert fleet_report["missing_slices"] == []
    assert {r["target"] for r in fleet_report["results"]} == set(IDS)
    text = fleet.cli("report", "merge", str(reports / "slice-1.json"), str(reports / "slice-2.json"))
    assert text.exit_code == EXIT_OK
    assert "merged 2 slice(s): 1/2 run" in text.output


def test_two_runners_on_the_same_slice_are_serialized_by_the_locks(fleet: Fleet) -> None:
    fleet.publish(SLOW)
    databases = numbered_fleet(fleet, 6)
    runners = [fleet.spawn("apply", "--env", "test", "--slice", "1/2", "--format", "json") for _ in range(2)]
    outputs = [r.communicate(timeout=120) for r in runners]
    assert [r.returncode for r in runners] == [EXIT_OK, EXIT_OK], [err for _, err in outputs]

    reports = [json.loads(out) for out, _ in outputs]
    for report in reports:
        assert {r["target"] for r in report["results"]} == {"t0", "t1", "t2", "t3"}
    assert sum(r["totals"]["migrations_applied"] for r in reports) == 3 * 4
    for target, database in databases.items():
        if target in ("t0", "t1", "t2", "t3"):
            rows = fleet.query(
                database, "SELECT migration_id, count(*) FROM _yoyo_log WHERE operation = 'apply' GROUP BY 1"
            )
            assert sorted(rows) == [("001-create-person", 1), ("002-add-address", 1), ("003-create-order", 1)]
        else:
            assert fleet.applied(database) == []  # the other slice was never touched


def test_a_slice_composes_with_waves_and_caps(fleet: Fleet) -> None:
    fleet.publish(MIGRATIONS)
    numbered_fleet(fleet, 6)
    result = fleet.cli(
        "apply", "--env", "test", "--slice", "2/2", "--waves", "1,100%", "--per-server", "1", "--format", "json"
    )
    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert {r["target"] for r in report["results"]} == {"t4", "t5"}
    assert report["totals"]["targets"] == 2
    assert (report["rollout"]["waves_planned"], report["rollout"]["waves_run"]) == (2, 2)  # the canary, then the rest
    assert report["rollout"]["peak_per_server"] == 1


def test_merge_reports_a_missing_slice_and_refuses_reports_that_do_not_belong_together(
    fleet: Fleet, tmp_path: Path
) -> None:
    fleet.publish(MIGRATIONS)
    numbered_fleet(fleet, 8)
    out = tmp_path / "out"
    for k in (1, 2):
        done = fleet.cli("plan", "--env", "test", "--slice", f"{k}/3", "--output", str(out / f"{k}.json"))
        assert done.exit_code == EXIT_OK
    whole = fleet.cli("plan", "--env", "test", "--output", str(tmp_path / "whole.json"))
    assert whole.exit_code == EXIT_OK

    missing = fleet.cli("report", "merge", str(out), "--format", "json")
    assert missing.exit_code == EXIT_TARGETS_FAILED
    assert json.loads(missing.stdout)["missing_slices"] == ["3/3"]

    twice = fleet.cli("report", "merge", str(out / "1.json"), str(out / "1.json"))
    assert twice.exit_code == EXIT_CONFIG
    assert "slice 1/3 appears twice" in twice.output

    unsliced = fleet.cli("report", "merge", str(out / "1.json"), str(tmp_path / "whole.json"))
    assert unsliced.exit_code == EXIT_CONFIG
    assert "covered the whole fleet" in unsliced.output

    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"schema": "something/else"}')
    not_a_report = fleet.cli("report", "merge", str(garbage))
    assert not_a_report.exit_code == EXIT_CONFIG
    assert f"{garbage} is not a fanout report" in not_a_report.output

    other = json.loads((out / "2.json").read_text())
    other["source"]["sets"][0]["files"][0]["sha256"] = "0" * 64
    (tmp_path / "changed.json").write_text(json.dumps(other))
    changed = fleet.cli("report", "merge", str(out / "1.json"), str(tmp_path / "changed.json"))
    assert changed.exit_code == EXIT_CONFIG
    assert "different migration sets" in changed.output


def test_reports_stored_in_s3_merge_from_their_prefix(fleet: Fleet) -> None:
    fleet.publish(MIGRATIONS)
    numbered_fleet(fleet, 8)
    prefix = f"s3://{fleet.bucket}/releases/r42/"
    for k in (1, 2):
        done = fleet.cli("apply", "--env", "test", "--slice", f"{k}/2", "--report-to", f"{prefix}slice-{k}.json")
        assert done.exit_code == EXIT_OK, done.output
        assert f"report written to {prefix}slice-{k}.json" in done.stderr

    merged = fleet.cli("report", "merge", "--env", "test", prefix, "--format", "json")
    assert merged.exit_code == EXIT_OK, merged.output
    assert json.loads(merged.stdout)["totals"]["targets"] == 8

    nothing = fleet.cli("report", "merge", "--env", "test", f"s3://{fleet.bucket}/releases/none/")
    assert nothing.exit_code == 3
    assert "no .json object under" in nothing.output
