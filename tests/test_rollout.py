"""Waves, the failure budget and caps per server: the policy alone, then through real shards."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
from conftest import MIGRATIONS, Fleet

from fanout.errors import EXIT_CONFIG, EXIT_OK, EXIT_TARGETS_FAILED, ConfigError
from fanout.rollout import FailureBudget, Limits, Waves, schedule


@pytest.mark.parametrize(
    ("text", "total", "sizes"),
    [
        ("1,10%,100%", 50, [1, 4, 45]),
        ("1,10%", 50, [1, 4, 45]),  # the final 100% is implied
        ("1,10%,100%", 5, [1, 4]),  # 10% of 5 rounds up to 1: an empty wave is dropped
        ("2,5,100%", 10, [2, 3, 5]),
        ("100%", 3, [3]),
        ("25%,50%,75%", 8, [2, 2, 2, 2]),
        ("10", 4, [4]),
    ],
)
def test_waves_are_cumulative_boundaries(text: str, total: int, sizes: list[int]) -> None:
    assert Waves.parse(text).sizes(total) == sizes


@pytest.mark.parametrize("text", ["0", "1,x", "150%", "1.5", "-1", "", "50%,10%", "10,5", "2,2,100%"])
def test_bad_waves_are_refused_with_the_step_named(text: str) -> None:
    with pytest.raises(ConfigError, match="--waves"):
        Waves.parse(text)


def test_failure_budget_counts_and_ratios() -> None:
    assert FailureBudget.parse("0").exceeded(1, 100)
    assert not FailureBudget.parse("2").exceeded(2, 100)
    assert FailureBudget.parse("2").exceeded(3, 100)
    assert not FailureBudget.parse("5%").exceeded(5, 100)
    assert FailureBudget.parse("5%").exceeded(6, 100)
    assert not FailureBudget().exceeded(10**6, 10)
    with pytest.raises(ConfigError, match="--max-failures"):
        FailureBudget.parse("lots")


def test_schedule_never_exceeds_the_caps_and_reaches_them() -> None:
    running: Counter[str] = Counter()
    peaks: Counter[str] = Counter()
    total_peak = 0
    guard = threading.Lock()

    def work(item: tuple[str, int]) -> bool:
        nonlocal total_peak
        server, _ = item
        with guard:
            running[server] += 1
            peaks[server] = max(peaks[server], running[server])
            total_peak = max(total_peak, sum(running.values()))
        time.sleep(0.03)
        with guard:
            running[server] -= 1
        return False

    items = [(server, i) for i in range(12) for server in ("db-1:5432", "db-2:5432", "db-3:5432")]
    outcome = schedule(
        items, work, server_of=lambda item: item[0], failed=bool, limits=Limits(concurrency=5, per_server=2)
    )

    assert all(result is False for result in outcome.results)
    assert dict(peaks) == {"db-1:5432": 2, "db-2:5432": 2, "db-3:5432": 2}
    assert total_peak == 5
    assert (outcome.peak_in_flight, max(outcome.peak_per_server.values())) == (5, 2)


def test_canary_failure_stops_the_rollout_and_the_rest_is_reported_skipped(fleet: Fleet) -> None:
    names = fleet.add_databases(6)
    targets = [{"id": "canary", "dsn": fleet.dsn(names[0], password="wrong")}]
    targets += [{"id": name, "dsn": fleet.dsn(name)} for name in names[1:]]
    fleet.publish(MIGRATIONS)
    fleet.write_env(targets)

    result = fleet.cli("apply", "--env", "test", "--waves", "1,50%,100%", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    report = json.loads(result.stdout)
    by_target = {r["target"]: r for r in report["results"]}
    assert by_target["canary"]["status"] == "failed"
    assert len(by_target) == 6  # never silently dropped
    for name in names[1:]:
        assert by_target[name]["status"] == "skipped"
        assert by_target[name]["error"]["kind"] == "not-started"
        assert "failure budget exceeded" in by_target[name]["error"]["message"]
        assert fleet.tables(name) == set()  # not touched
    assert report["rollout"]["waves_run"] == 1
    assert report["rollout"]["waves_planned"] == 3
    assert report["rollout"]["max_failures"] == "0"
    assert "stopped after wave 1 of 3" in fleet.cli("apply", "--env", "test", "--waves", "1,50%").stdout


def test_waves_run_one_after_another_when_each_succeeds(fleet: Fleet) -> None:
    fleet.add_databases(5)
    fleet.publish(MIGRATIONS)
    fleet.write_env()

    result = fleet.cli("apply", "--env", "test", "--waves", "1,40%,100%", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert report["rollout"]["waves_run"] == report["rollout"]["waves_planned"] == 3
    assert {r["status"] for r in report["results"]} == {"applied"}
    # The canary had finished before any target of the next wave started.
    first, *others = fleet.databases
    canary_done = fleet.query(first, "SELECT max(created_at_utc) FROM _yoyo_log")[0][0]
    for name in others:
        assert fleet.query(name, "SELECT min(created_at_utc) FROM _yoyo_log")[0][0] > canary_done


def test_failure_budget_stops_scheduling_once_exceeded(fleet: Fleet) -> None:
    names = fleet.add_databases(6)
    targets = [{"id": f"broken-{i}", "dsn": fleet.dsn(names[i], password="wrong")} for i in range(3)]
    targets += [{"id": name, "dsn": fleet.dsn(name)} for name in names[3:]]
    fleet.publish(MIGRATIONS)
    fleet.write_env(targets)

    result = fleet.cli("apply", "--env", "test", "--max-failures", "1", "--concurrency", "1", "--format", "json")

    assert result.exit_code == EXIT_TARGETS_FAILED
    report = json.loads(result.stdout)
    statuses = [(r["target"], r["status"]) for r in report["results"]]
    assert (
        statuses
        == [
            ("broken-0", "failed"),
            ("broken-1", "failed"),  # the second failure exceeds a budget of 1
            ("broken-2", "skipped"),
            *[(name, "skipped") for name in names[3:]],
        ]
    )
    assert report["rollout"]["stop_reason"] == "failure budget exceeded: 2 failed, 1 allowed"


def test_max_failures_as_a_ratio_lets_a_few_failures_through(fleet: Fleet) -> None:
    names = fleet.add_databases(5)
    targets = [{"id": "broken", "dsn": fleet.dsn(names[0], password="wrong")}]
    targets += [{"id": name, "dsn": fleet.dsn(name)} for name in names[1:]]
    fleet.publish(MIGRATIONS)
    fleet.write_env(targets)

    result = fleet.cli("apply", "--env", "test", "--max-failures", "20%", "--waves", "1,100%", "--format", "json")

    report = json.loads(result.stdout)
    assert result.exit_code == EXIT_TARGETS_FAILED
    assert [r["status"] for r in report["results"]] == ["failed", "applied", "applied", "applied", "applied"]
    assert report["rollout"]["stop_reason"] is None


def test_per_server_cap_and_connection_budget_hold_on_real_servers(fleet: Fleet) -> None:
    names = fleet.add_databases(8)
    slow = dict(MIGRATIONS)
    slow["002-add-address.sql"] = (
        "-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address TEXT; SELECT pg_sleep(0.3);"
    )
    fleet.publish(slow)
    port = fleet.postgres.port
    password = "${FANOUT_TEST_PG_PASSWORD}"
    # One PostgreSQL, named two ways: fanout sees two servers of four databases each.
    hosts = {name: ("127.0.0.1" if i % 2 else "localhost") for i, name in enumerate(names)}
    fleet.write_env([{"id": n, "dsn": f"postgresql://postgres:{password}@{hosts[n]}:{port}/{n}"} for n in names])
    samples: list[Counter[str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rows = fleet.query(
                "postgres",
                "SELECT datname FROM pg_stat_activity WHERE application_name LIKE 'fanout apply %%' "
                "AND datname = ANY(%s)",
                (names,),
            )
            samples.append(Counter(hosts[row[0]] for row in rows))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fleet.cli("apply", "--env", "test", "--concurrency", "8", "--per-server", "2", "--format", "json")
    finally:
        done.set()
        sampler.join()

    assert result.exit_code == EXIT_OK, result.output
    rollout = json.loads(result.stdout)["rollout"]
    assert (rollout["peak_per_server"], rollout["peak_in_flight"]) == (2, 4)
    assert rollout["connections_opened"] == 8  # one connection per target, nothing else
    assert max(max(s.values(), default=0) for s in samples) <= 2  # seen by the server itself
    assert max(sum(s.values()) for s in samples) <= 4
    assert max(sum(s.values()) for s in samples) >= 2  # the sampler did see the run


def test_environment_file_sets_rollout_defaults_and_rejects_bad_ones(fleet: Fleet) -> None:
    fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    fleet.write_env(extra='[runner]\nwaves = "1,100%"\nmax_failures = "0"\nper_server = 1\n')

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    rollout = json.loads(result.stdout)["rollout"]
    assert (rollout["waves"], rollout["max_failures"], rollout["per_server"]) == ("1,100%", "0", 1)

    fleet.write_env(extra='[runner]\nwaves = "1,lots"\n')
    bad = fleet.cli("plan", "--env", "test")
    assert bad.exit_code == EXIT_CONFIG
    assert "[runner] waves: 'lots'" in bad.stderr
