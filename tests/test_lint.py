"""Lint against yoyo itself: one row per kind of set; the real `yoyo apply` decides what is an error.

Each row's folder is linted by fanout and applied by the real yoyo 9 CLI to a fresh
database. A set fanout lets through must apply with yoyo (no lint error <=> yoyo exits 0),
except where an environment's policy refuses what yoyo would run (Python migrations).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import MIGRATIONS, Fleet, unique

from fanout.config import load_environment
from fanout.embedded import EmbeddedPostgres
from fanout.errors import EXIT_CONFIG, EXIT_OK, EXIT_SOURCE
from fanout.lint import ERROR_RULES, WARNING_RULES, Rule, Severity, lint

YOYO = str(Path(sys.executable).parent / "yoyo")
PY_STEP = "from yoyo import step\n\nsteps = [step('CREATE TABLE {0} (id INT)', 'DROP TABLE {0}')]\n"


@dataclass(frozen=True)
class Case:
    name: str
    files: dict[str, str | bytes]
    findings: set[tuple[str, Rule]] = field(default_factory=set)  # (file, rule): exactly what lint says
    yoyo_applies: bool = True
    python: bool = False
    folders: tuple[str, ...] = ()


CASES = [
    Case("yoyo new names, two on one day",
         {"20240101_01_abcde-create-a.sql": "CREATE TABLE a (id INT);",
          "20240101_02_fghij-create-b.sql": "CREATE TABLE b (id INT);"}),
    Case("a branch merge: two migrations share a number",
         {"003-a.sql": "CREATE TABLE a (id INT);", "003-b.sql": "CREATE TABLE b (id INT);"},
         {("003-b.sql", Rule.SAME_NUMBER)}),
    Case("an empty migration", {"001-a.sql": ""}, {("001-a.sql", Rule.EMPTY_MIGRATION)}),
    Case("a comment-only migration", {"001-a.sql": "-- nothing yet\n\n-- really\n"},
         {("001-a.sql", Rule.EMPTY_MIGRATION)}),
    Case("header comments such as -- Requires:",
         {"001-a.sql": "-- Requires: nothing\n-- Author: someone\nCREATE TABLE a (id INT);"}),
    Case("an orphan rollback", {"001-a.sql": "CREATE TABLE a (id INT);", "002-b.rollback.sql": "DROP TABLE b;"},
         {("002-b.rollback.sql", Rule.ORPHAN_ROLLBACK)}),
    Case("a nested folder", {"001-a.sql": "CREATE TABLE a (id INT);"}, {("old/", Rule.NESTED_FOLDER)},
         folders=("old",)),
    Case(".SQL and .sql.bak files",
         {"001-a.sql": "CREATE TABLE a (id INT);", "002-b.SQL": "CREATE TABLE b (id INT);", "003-c.sql.bak": "x"},
         {("002-b.SQL", Rule.IGNORED_FILE), ("003-c.sql.bak", Rule.IGNORED_FILE)}),
    Case("a README and yoyo new's editor file",
         {"001-a.sql": "CREATE TABLE a (id INT);", "README.md": "docs", "_tmp_yoyonew_x.py": "this is not python"},
         {("README.md", Rule.IGNORED_FILE), ("_tmp_yoyonew_x.py", Rule.IGNORED_FILE)}),
    Case("a directive in capitals is a comment to yoyo",
         {"001-a.sql": "-- Depends: 002-b\nCREATE TABLE a (id INT);", "002-b.sql": "CREATE TABLE b (id INT);"},
         {("001-a.sql", Rule.MISSPELT_DIRECTIVE)}),
    Case("a directive after the first statement",
         {"001-a.sql": "CREATE TABLE a (id INT);\n-- depends: 002-b\nCREATE TABLE c (id INT);",
          "002-b.sql": "CREATE TABLE b (id INT);"},
         {("001-a.sql", Rule.MISSPELT_DIRECTIVE)}),
    Case("ids equal but for case", {"001-a.sql": "CREATE TABLE a (id INT);", "001-A.sql": "CREATE TABLE b (id INT);"},
         {("001-a.sql", Rule.CASE_COLLISION), ("001-a.sql", Rule.SAME_NUMBER)}),
    Case("comments between and after statements on their line",
         {"001-a.sql": "CREATE TABLE a (id INT);\n-- then\nCREATE TABLE b (id INT); -- done"}),
    Case("a final chunk that is only a comment",
         {"001-a.sql": "CREATE TABLE a (id INT);\n-- the end\n"}, {("001-a.sql", Rule.EMPTY_STATEMENT)},
         yoyo_applies=False),
    Case("a final block comment", {"001-a.sql": "CREATE TABLE a (id INT);\n/* the end */\n"},
         {("001-a.sql", Rule.EMPTY_STATEMENT)}, yoyo_applies=False),
    Case("a lone semicolon", {"001-a.sql": "CREATE TABLE a (id INT);\n;\n"}, {("001-a.sql", Rule.EMPTY_STATEMENT)},
         yoyo_applies=False),
    Case("a trailing comment in a non-transactional migration",
         {"001-a.sql": "-- transactional: false\nCREATE TABLE a (id INT);\n-- the end\n"},
         {("001-a.sql", Rule.EMPTY_STATEMENT)}, yoyo_applies=False),
    Case("-- transactional: maybe", {"001-a.sql": "-- transactional: maybe\nCREATE TABLE a (id INT);"},
         {("001-a.sql", Rule.BAD_TRANSACTIONAL)}, yoyo_applies=False),
    Case("-- transactional: false with a trailing space",
         {"001-a.sql": "-- transactional: false \nCREATE TABLE a (id INT);"},
         {("001-a.sql", Rule.BAD_TRANSACTIONAL)}, yoyo_applies=False),
    Case("-- depends: on an unknown id", {"001-a.sql": "-- depends: 000-x\nCREATE TABLE a (id INT);"},
         {("001-a.sql", Rule.UNKNOWN_DEPENDENCY)}, yoyo_applies=False),
    Case("a file that is not UTF-8", {"001-a.sql": b"\xff\xfe CREATE TABLE a (id INT);"},
         {("001-a.sql", Rule.NOT_UTF8)}, yoyo_applies=False),
    Case("NAME.sql and NAME.py", {"001-a.sql": "CREATE TABLE a (id INT);", "001-a.py": PY_STEP.format("b")},
         {("001-a.sql", Rule.DUPLICATE_ID)}, yoyo_applies=False, python=True),
    Case("Python steps and -- depends: across .py and .sql",
         {"001-a.py": "from yoyo import step\n__depends__ = {'002-b'}\nsteps = [step('CREATE TABLE a (id INT)')]\n",
          "002-b.sql": "CREATE TABLE b (id INT);", "003-c.sql": "-- depends: 001-a\nCREATE TABLE c (id INT);"},
         python=True),
    Case("a Python migration where the environment does not allow them",
         {"001-a.py": PY_STEP.format("a")}, {("001-a.py", Rule.PYTHON_DISABLED)}),
]  # fmt: skip


def write(folder: Path, case: Case) -> None:
    folder.mkdir(parents=True)
    for name, body in case.files.items():
        (folder / name).write_bytes(body if isinstance(body, bytes) else textwrap.dedent(body).encode())
    for nested in case.folders:
        (folder / nested).mkdir()
        (folder / nested / "009-deep.sql").write_text("CREATE TABLE deep (id INT);")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_lint_errors_are_exactly_what_yoyo_fails_on(case: Case, postgres: EmbeddedPostgres, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    write(folder, case)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    problems = lint(files, folders=[f + "/" for f in case.folders], python=case.python)

    assert {(p.file, p.rule) for p in problems} == case.findings, [str(p) for p in problems]
    for p in problems:
        assert p.severity is (Severity.ERROR if p.rule in ERROR_RULES else Severity.WARNING)
        assert p.file in str(p) and p.rule.value in str(p)

    database = unique("lint")
    postgres.create_databases([database])
    try:
        yoyo = subprocess.run(
            [YOYO, "apply", "--batch", "--no-config-file", "--database", postgres.dsn(database), str(folder)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        postgres.drop_databases([database])
    assert (yoyo.returncode == 0) is case.yoyo_applies, yoyo.stderr[-2000:]
    policy_only = {Rule.PYTHON_DISABLED}
    fanout_refuses = any(p.severity is Severity.ERROR and p.rule not in policy_only for p in problems)
    assert fanout_refuses is not case.yoyo_applies


def test_an_environment_raises_chosen_warnings_to_errors(fleet: Fleet) -> None:
    files = {"003-a.sql": b"CREATE TABLE a (id INT);", "003-b.sql": b"CREATE TABLE b (id INT);"}
    (same_number,) = lint(files, errors=["same-number"])
    assert (same_number.rule, same_number.severity) == (Rule.SAME_NUMBER, Severity.ERROR)

    target = [{"id": "unused", "dsn": fleet.dsn("unused")}]
    fleet.write_env(target, extra='[lint]\nerrors = ["same-number", "empty-migration"]\n')
    env = load_environment("test", search_dir=fleet.environments_dir)
    assert env.rules.lint_errors == {"same-number", "empty-migration"}
    for bad, why in (("same-numbr", "no such rule"), ("empty-statement", "an error already")):
        fleet.write_env(target, extra=f'[lint]\nerrors = ["{bad}"]\n')
        result = fleet.cli("plan", "--env", "test")
        assert result.exit_code == EXIT_CONFIG
        assert f"lint.errors: '{bad}' is {why}" in result.output


def test_every_rule_is_either_an_error_or_a_warning() -> None:
    assert set(Rule) == ERROR_RULES | WARNING_RULES and not ERROR_RULES & WARNING_RULES


def test_read_only_commands_report_lint_problems_and_still_show_the_fleet(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(
        {
            **MIGRATIONS,
            "004-tail.sql": "CREATE TABLE tail (id INT);\n-- the end\n",
            "005-x.sql": "-- nothing yet\n",
            "006-y.SQL": "CREATE TABLE y (id INT);",
        }
    )
    fleet.write_env()
    import json

    plan = fleet.cli("plan", "--env", "test", "--format", "json")
    assert plan.exit_code == EXIT_SOURCE, plan.output
    report = json.loads(plan.stdout)
    assert {(w["file"], w["rule"], w["severity"]) for w in report["warnings"]} == {
        ("004-tail.sql", "empty-statement", "error"),
        ("005-x.sql", "empty-migration", "warning"),
        ("006-y.SQL", "ignored-file", "warning"),
    }
    (result,) = report["results"]
    assert result["pending"] == [*(m.removesuffix(".sql") for m in MIGRATIONS if "rollback" not in m), "004-tail",
                                 "005-x"]  # fmt: skip
    text = fleet.cli("status", "--env", "test")
    assert text.exit_code == EXIT_SOURCE
    assert "error [empty-statement] app: 004-tail.sql" in text.stdout
    assert name in text.stdout

    applied = fleet.cli("apply", "--env", "test")
    assert applied.exit_code == EXIT_SOURCE
    assert "004-tail.sql: the last statement is only a comment" in applied.output
    assert fleet.applied(name) == []

    fleet.s3.client().delete_object(Bucket=fleet.bucket, Key="migrations/app/test/004-tail.sql")
    applied = fleet.cli("apply", "--env", "test", "--format", "json")
    assert applied.exit_code == EXIT_OK, applied.output
    assert {w["rule"] for w in json.loads(applied.stdout)["warnings"]} == {"empty-migration", "ignored-file"}
    assert fleet.applied(name)[-1] == "005-x"
