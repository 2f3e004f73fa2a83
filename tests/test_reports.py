"""Reports people and CI read: every format on a fleet with mixed outcomes, progress, redaction."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import MIGRATIONS, Fleet

from fanout.errors import EXIT_OK, EXIT_TARGETS_FAILED

WRONG_PASSWORD = "hunter2-never-printed-7Qx"
FORMAT_FILES = {"text": "report.txt", "json": "report.json", "markdown": "report.md", "junit": "report.xml",
                "html": "report.html"}  # fmt: skip
IDS = ["001-create-person", "002-add-address", "003-create-order"]


def mixed_fleet(fleet: Fleet) -> dict[str, str]:
    """Eight targets, in this order, for one apply at concurrency 1 with a budget of 3 failures:
    applied, up-to-date, bad password, a failing migration, drifted, locked, then two never started."""
    names = dict(zip(["fresh", "current", "badauth", "broken", "drifted", "locked", "late-1", "late-2"],
                     fleet.add_databases(8), strict=True))  # fmt: skip
    fleet.publish(MIGRATIONS)
    fleet.write_env([{"id": t, "dsn": fleet.dsn(d)} for t, d in names.items() if t in ("current", "drifted")])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(names["drifted"], "UPDATE fanout_checksums SET sha256 = repeat('0', 64) WHERE migration_id = %s",
                (IDS[0],))  # fmt: skip
    fleet.query(names["broken"], "CREATE TABLE customer_order (id INT)")  # 003 will fail on it
    fleet.query(names["locked"], 'CREATE TABLE yoyo_lock ("locked" INT DEFAULT 1, ctime TIMESTAMP, pid INT NOT NULL, '
                                 'PRIMARY KEY ("locked"))')  # fmt: skip
    fleet.query(names["locked"], "INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now(), 4242)")
    targets = []
    for target, database in names.items():
        dsn = fleet.dsn(database, password=WRONG_PASSWORD) if target == "badauth" else fleet.dsn(database)
        targets.append({"id": target, "dsn": dsn, "tenants": [f"{target}-tenant"]})
    fleet.write_env(targets)
    return names


def run_all_formats(fleet: Fleet, tmp_path: Path, *args: str) -> tuple[int, dict[str, str], str]:
    out = tmp_path / args[0]
    outputs = [a for fmt, name in FORMAT_FILES.items() for a in ("--output", str(out / name))]
    result = fleet.cli(*args, *outputs)
    rendered = {fmt: (out / name).read_text() for fmt, name in FORMAT_FILES.items()}
    return result.exit_code, rendered, result.stdout + result.stderr


class MatrixParser(HTMLParser):
    """The fleet view's matrix as {target: (status, {migration: state})}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, tuple[str, dict[str, str]]] = {}
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-target"):
            self._current = a["data-target"]
            self.rows[self._current] = (a["data-status"] or "", {})
        elif tag == "td" and self._current and a.get("data-migration"):
            self.rows[self._current][1][a["data-migration"] or ""] = a["data-state"] or ""


def test_every_format_on_a_fleet_with_mixed_outcomes(fleet: Fleet, tmp_path: Path) -> None:
    names = mixed_fleet(fleet)
    code, apply_formats, apply_output = run_all_formats(
        fleet, tmp_path, "apply", "--env", "test", "--concurrency", "1", "--max-failures", "3", "--lock-wait", "0.5"
    )
    assert code == EXIT_TARGETS_FAILED
    code, plan_formats, plan_output = run_all_formats(fleet, tmp_path, "plan", "--env", "test")
    assert code == EXIT_TARGETS_FAILED  # the drifted shard

    # Secrets: no password, wrong or right, in any format, on stdout or on stderr.
    real_password = fleet.postgres.password.reveal()
    for text in [*apply_formats.values(), *plan_formats.values(), apply_output, plan_output]:
        assert WRONG_PASSWORD not in text and real_password not in text

    # HTML: the matrix cells say what happened to each migration on each shard.
    parser = MatrixParser()
    parser.feed(apply_formats["html"])
    rows = parser.rows
    assert rows["fresh"] == ("applied", dict.fromkeys(IDS, "ran"))
    assert rows["current"] == ("up-to-date", dict.fromkeys(IDS, "applied"))
    assert rows["badauth"] == ("failed", dict.fromkeys(IDS, "unknown"))
    assert rows["broken"] == ("failed", {IDS[0]: "ran", IDS[1]: "ran", IDS[2]: "failed"})
    assert rows["drifted"] == ("failed", {IDS[0]: "drift", IDS[1]: "applied", IDS[2]: "applied"})
    assert rows["locked"] == ("failed", dict.fromkeys(IDS, "unknown"))
    assert rows["late-1"] == rows["late-2"] == ("skipped", dict.fromkeys(IDS, "unknown"))
    assert list(rows)[:4] == ["badauth", "broken", "drifted", "locked"]  # what needs attention comes first
    assert "id=q type=search" in apply_formats["html"] and "<script>" in apply_formats["html"]  # filterable
    assert "http" not in apply_formats["html"].split("<body>")[1].split("<script")[0]  # self-contained
    plan_rows = MatrixParser()
    plan_rows.feed(plan_formats["html"])
    assert plan_rows.rows["late-1"] == ("pending", dict.fromkeys(IDS, "pending"))
    assert plan_rows.rows["drifted"][0] == "drifted"

    # JUnit: one case per target and service; failures and skips where CI shows them.
    suites = ET.fromstring(apply_formats["junit"])
    assert suites.tag == "testsuites"
    (suite,) = suites.findall("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("8", "4", "2")
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert set(cases) == set(names)
    assert cases["broken"].find("failure").get("type") == "migration"  # type: ignore[union-attr]
    assert "003-create-order.sql" in cases["broken"].find("failure").text  # type: ignore[union-attr,operator]
    assert cases["drifted"].find("failure").get("type") == "drift"  # type: ignore[union-attr]
    assert cases["locked"].find("failure").get("type") == "locked"  # type: ignore[union-attr]
    assert cases["badauth"].find("failure").get("type") == "authentication"  # type: ignore[union-attr]
    assert cases["late-1"].find("skipped") is not None
    assert cases["fresh"].find("failure") is None and cases["fresh"].find("skipped") is None
    for case in cases.values():
        float(case.get("time") or "x")

    # Markdown: a header, the skew table, and every problem in the attention table.
    markdown = apply_formats["markdown"]
    assert markdown.startswith("### ❌ fanout apply · `test` · exit 5")
    assert "| service | last applied migration | shards | |" in markdown
    attention = markdown.split("**Needs attention (6)**")[1].split("<details>")[0]
    rows_md = [line for line in attention.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {line.split(" | ")[0].strip("| ") for line in rows_md} == {"badauth", "broken", "drifted", "locked",
                                                                       "late-1", "late-2"}  # fmt: skip
    assert all(line.count(" | ") == 3 for line in rows_md)  # four columns, pipes in messages escaped

    # JSON and text are the same model.
    report = json.loads(apply_formats["json"])
    assert report["totals"]["by_status"] == {"up-to-date": 1, "pending": 0, "applied": 1, "rolled-back": 0,
                                             "failed": 4, "drifted": 0,
                                             "in-doubt": 0, "skipped": 2}  # fmt: skip
    assert "locked" in apply_formats["text"] and "lock held by yoyo pid 4242" in apply_formats["text"]


def test_status_shows_version_skew_and_locks_at_a_glance(fleet: Fleet) -> None:
    names = fleet.add_databases(4)
    fleet.publish({k: v for k, v in MIGRATIONS.items() if not k.startswith("003")})
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.publish(MIGRATIONS)
    fleet.write_env([{"id": f"t{n}", "dsn": fleet.dsn(d)} for n, d in enumerate(names[:2])])
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.query(names[3], "INSERT INTO yoyo_lock (locked, ctime, pid) VALUES (1, now(), 777)")
    fleet.write_env([{"id": f"t{n}", "dsn": fleet.dsn(d)} for n, d in enumerate(names)])

    status = fleet.cli("status", "--env", "test")
    assert status.exit_code == EXIT_OK
    skew = status.stdout.split("version skew")[1]
    assert "003-create-order" in skew and "2 shard(s)  current" in skew
    assert "002-add-address" in skew and "2 shard(s)  behind by 1" in skew
    assert "locked: 1: t3" in skew


def test_progress_is_line_oriented_without_a_terminal_and_json_on_request(fleet: Fleet) -> None:
    fleet.add_databases(3)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    text = fleet.cli("apply", "--env", "test")
    assert text.exit_code == EXIT_OK
    assert "progress: 3/3 targets, 0 failed, wave 1/1" in text.stderr
    assert "\x1b" not in text.stderr  # no control characters in CI logs

    result = fleet.cli("--log-format", "json", "plan", "--env", "test", "--format", "json")
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert (events[0]["event"], events[0]["targets"]) == ("start", 3)
    assert events[-1]["event"] == "finish"
    results = [e for e in events if e["event"] == "result"]
    assert len(results) == 3 and results[-1]["done"] == 3 and results[-1]["total"] == 3
    assert json.loads(result.stdout)["schema"] == "fanout/report/v1"  # stdout stays the report alone


def test_the_markdown_report_goes_to_the_github_step_summary(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier steps\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    written = summary.read_text()
    assert written.startswith("# earlier steps\n### ✅ fanout apply · `test` · exit 0")  # appended, not replaced


def test_a_progress_bar_on_a_terminal_is_erased_before_the_report() -> None:
    """On a TTY rich draws a transient bar on stderr; finish() must leave no bar behind."""
    import io

    from fanout.progress import Progress
    from fanout.report import Status, TargetResult

    stream = io.StringIO()
    progress = Progress(stream=stream, live=True)
    progress.start(2, [1, 1])
    for target in ("a", "b"):
        progress.result(TargetResult(target=target, service="app", status=Status.APPLIED, server="s", database="d"))
    progress.finish()
    drawn = stream.getvalue()
    assert "2/2" in drawn and "wave 2/2" in drawn  # targets done/total and the current wave
    assert drawn.endswith("\x1b[2K")  # transient: the last thing written erases the bar


def test_progress_counts_skipped_and_drifted_targets_apart_from_failed_ones() -> None:
    import io

    from fanout.progress import Progress
    from fanout.report import ErrorKind, Status, TargetError, TargetResult

    def result(target: str, status: Status, service: str = "app") -> TargetResult:
        error = TargetError(ErrorKind.NOT_STARTED, "not started") if status is Status.SKIPPED else None
        return TargetResult(target=target, service=service, status=status, server="s", database="d", error=error)

    for log_format in ("text", "json"):
        stream = io.StringIO()
        progress = Progress(stream=stream, live=False, log_format=log_format)
        progress.start(4)
        progress.result(result("a", Status.FAILED))
        progress.result(result("a", Status.SKIPPED, service="billing"))  # after its own failure: still one failed
        progress.result(result("b", Status.SKIPPED))
        progress.result(result("c", Status.SKIPPED))
        progress.result(result("d", Status.APPLIED))
        progress.finish()
        last = stream.getvalue().strip().splitlines()[-1]
        if log_format == "json":
            finish = json.loads(last)
            assert (finish["failed"], finish["skipped"], finish["drifted"]) == (1, 2, 0)
        else:
            assert "4/4 targets, 1 failed, 2 skipped," in last


def test_text_summarizes_a_large_fleet_but_lists_every_failure() -> None:
    from datetime import UTC, datetime

    from fanout.formats import render
    from fanout.report import ErrorKind, Mode, RunReport, Status, TargetError, TargetResult

    results = [
        TargetResult(target=f"ok-{n}", service="app", status=Status.UP_TO_DATE, server="s", database="d")
        for n in range(100)
    ] + [
        TargetResult(target=f"bad-{n}", service="app", status=Status.FAILED, server="s", database="d",
                     error=TargetError(ErrorKind.UNREACHABLE, f"connection refused {n}"))
        for n in range(45)
    ]  # fmt: skip
    now = datetime.now(UTC)
    report = RunReport(run_id="r", command="apply", mode=Mode.APPLY, environment="prod", services=("app",),
                       started_at=now, finished_at=now, results=tuple(results), target_count=145)  # fmt: skip
    text = render(report, "text")
    assert "(145 results; only failed, drifted and skipped ones are listed)" in text
    assert all(f"connection refused {n}" in text for n in range(45))  # more than the 40-row limit, all there
    assert "ok-1 " not in text


def test_lint_warnings_and_unpublished_migrations_are_in_every_format(fleet: Fleet, tmp_path: Path) -> None:
    from fanout.report import from_dict, to_dict

    (name,) = fleet.add_databases(1)
    fleet.s3.client().put_bucket_versioning(Bucket=fleet.bucket, VersioningConfiguration={"Status": "Enabled"})
    fleet.write_env(source_extra='unpublished = "report"\n')
    local = tmp_path / "local" / "app" / "test"
    local.mkdir(parents=True)
    for file, body in {**MIGRATIONS, "004-later.sql": "-- nothing yet\n"}.items():
        (local / file).write_text(body)
    assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(tmp_path / "local")).exit_code == EXIT_OK
    fleet.publish({"005-by-hand.sql": "CREATE TABLE by_hand (id INT);"})  # a plain PUT, outside publish

    code, formats, _ = run_all_formats(fleet, tmp_path, "plan", "--env", "test")
    assert code == EXIT_OK  # plan without --detailed-exitcode only reports
    for fmt, text in formats.items():
        assert "empty-migration" in text and "004-later.sql" in text, fmt
        assert "005-by-hand.sql" in text and "unpublished" in text, fmt
    report = json.loads(formats["json"])
    assert report["warnings"] == [
        {"service": "app", "file": "004-later.sql", "rule": "empty-migration", "severity": "warning",
         "message": "empty: no SQL statement (yoyo records it as applied and runs nothing)"}
    ]  # fmt: skip
    (source,) = report["source"]["sets"]
    assert (source["unpublished"], source["unpublished_policy"]) == (["005-by-hand.sql"], "report")
    assert source["paths"] == [f"s3://{fleet.bucket}/migrations/app/test/"]
    assert to_dict(from_dict(report)) == report
    suites = ET.fromstring(formats["junit"])
    (set_case,) = [c for c in suites.iter("testcase") if c.get("name") == "migration-set"]
    assert "005-by-hand.sql" in (set_case.find("failure").text or "")  # type: ignore[union-attr]
    assert fleet.applied(name) == []


def test_json_is_indented_up_to_the_limit_and_one_line_beyond_and_run_records_are_one_line(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from fanout import runs
    from fanout.config import Environment, FolderLocation, RunnerSettings, StaticDirectoryConfig
    from fanout.formats import render
    from fanout.report import JSON_INDENT_LIMIT, Mode, RunReport, Status, TargetResult, from_dict, to_dict

    def report(count: int) -> RunReport:
        now = datetime.now(UTC)
        results = tuple(
            TargetResult(target=f"t-{n}", service="app", status=Status.APPLIED, server="s", database="d")
            for n in range(count)
        )
        return RunReport(run_id=f"r{count}", command="apply", mode=Mode.APPLY, environment="prod", services=("app",),
                         started_at=now, finished_at=now, results=results, target_count=count)  # fmt: skip

    small, large = report(JSON_INDENT_LIMIT), report(JSON_INDENT_LIMIT + 1)
    assert render(small, "json").startswith('{\n  "schema": "fanout/report/v1",')
    one_line = render(large, "json")
    assert "\n" not in one_line and one_line.startswith('{"schema":"fanout/report/v1",')
    for each in (small, large):
        assert json.loads(render(each, "json")) == to_dict(each)  # the same document either way
    env = Environment(name="prod", path=tmp_path / "prod.toml", services=("app",), source_table=FolderLocation(tmp_path),
                      directory_table=StaticDirectoryConfig(()), runner=RunnerSettings())  # fmt: skip
    (stored,) = runs.save(env, small, tmp_path / "runs")
    text = Path(stored).read_text()
    assert "\n" not in text and from_dict(json.loads(text)) == small  # compact, and it reads back whole
