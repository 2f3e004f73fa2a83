"""Where a service's files are (layouts, merged paths), migrations uploaded outside publish, Python migrations."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import MIGRATIONS, Fleet

from fanout.errors import EXIT_CONFIG, EXIT_OK, EXIT_PENDING, EXIT_SOURCE, EXIT_TARGETS_FAILED

YOYO = str(Path(sys.executable).parent / "yoyo")
IDS = ["001-create-person", "002-add-address", "003-create-order"]


def put(fleet: Fleet, files: dict[str, str], prefix: str) -> None:
    client = fleet.s3.client()
    for name, body in files.items():
        client.put_object(Bucket=fleet.bucket, Key=prefix + name, Body=textwrap.dedent(body).encode())


def local(tmp_path: Path, files: dict[str, str], service: str = "app") -> Path:
    root = tmp_path / "local"
    folder = root / service / "test"
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (folder / name).write_text(textwrap.dedent(body))
    return root


def run(fleet: Fleet, *args: str) -> tuple[int, dict]:
    result = fleet.cli(*args, "--format", "json")
    try:
        return result.exit_code, json.loads(result.stdout)
    except ValueError:
        raise AssertionError(result.output) from None


# ---- any bucket layout ----------------------------------------------------------------------


def test_a_yoyo_cloud_bucket_at_one_prefix_is_read_published_and_pinned_where_it_is(
    fleet: Fleet, tmp_path: Path
) -> None:
    (name,) = fleet.add_databases(1)
    put(fleet, MIGRATIONS, "migrations/")  # s3://bucket/migrations/, as yoyo-cloud's paths=[...] had it
    fleet.write_env(source_extra='layout = "migrations"\n')

    code, report = run(fleet, "apply", "--env", "test")
    assert code == EXIT_OK, report
    assert fleet.applied(name) == IDS
    (source,) = report["source"]["sets"]
    assert source["url"] == f"s3://{fleet.bucket}/migrations/"
    assert report["warnings"] == []  # the run record under migrations/_runs/ is fanout's own

    root = local(tmp_path, {**MIGRATIONS, "004-more.sql": "CREATE TABLE more (id INT);"})
    published = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert published.exit_code == EXIT_OK, published.output
    keys = {o["Key"] for o in fleet.s3.client().list_objects_v2(Bucket=fleet.bucket)["Contents"]}
    assert {"migrations/004-more.sql", "migrations/_manifest.json"} <= keys
    code, report = run(fleet, "apply", "--env", "test")
    assert code == EXIT_OK, report
    assert report["source"]["sets"][0]["manifest"] == f"s3://{fleet.bucket}/migrations/_manifest.json"
    assert fleet.applied(name) == [*IDS, "004-more"]


def test_a_bucket_laid_out_env_first(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    put(fleet, MIGRATIONS, "test/people/")
    put(fleet, {"100-invoice.sql": "CREATE TABLE invoice (id INT);"}, "test/billing/")
    fleet.write_env(services=["people", "billing"], source_extra='layout = "{env}/{service}"\n')

    code, report = run(fleet, "apply", "--env", "test")
    assert code == EXIT_OK, report
    assert fleet.applied(name) == [*IDS, "100-invoice"]
    assert [s["url"] for s in report["source"]["sets"]] == [
        f"s3://{fleet.bucket}/test/people/",
        f"s3://{fleet.bucket}/test/billing/",
    ]


def test_merged_paths_apply_in_yoyos_order_and_publish_pins_them_all(fleet: Fleet, tmp_path: Path) -> None:
    twin, name = fleet.add_databases(2)
    legacy = {"001-a.sql": "CREATE TABLE a (id INT);", "003-c.sql": "CREATE TABLE c (id INT);"}
    current = {"002-b.sql": "CREATE TABLE b (id INT);"}
    put(fleet, legacy, "legacy/app/")
    put(fleet, current, "test/app/")
    fleet.write_env(
        [{"id": "one", "dsn": fleet.dsn(name)}], source_extra='[source.paths]\napp = ["legacy/app", "{env}/app/"]\n'
    )

    code, report = run(fleet, "apply", "--env", "test")
    assert code == EXIT_OK, report
    # yoyo's read_migrations(path1, path2) (and yoyo-cloud's paths=[...]): the first path, then the next.
    folders = []
    for index, files in enumerate((legacy, current)):
        folders.append(tmp_path / f"path{index}")
        folders[-1].mkdir()
        for file, body in files.items():
            (folders[-1] / file).write_text(body)
    yoyo = subprocess.run(
        [YOYO, "apply", "--batch", "--no-config-file", "--database", fleet.postgres.dsn(twin), *map(str, folders)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert yoyo.returncode == 0, yoyo.stderr
    assert fleet.applied(name) == fleet.applied(twin) == ["001-a", "003-c", "002-b"]
    assert report["source"]["sets"][0]["paths"] == [
        f"s3://{fleet.bucket}/legacy/app/",
        f"s3://{fleet.bucket}/test/app/",
    ]

    root = local(tmp_path, {**current, "004-d.sql": "CREATE TABLE d (id INT);"})
    published = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert published.exit_code == EXIT_OK, published.output
    manifest = json.loads(
        fleet.s3.client().get_object(Bucket=fleet.bucket, Key="legacy/app/_manifest.json")["Body"].read()
    )
    assert {f["key"] for f in manifest["files"]} == {
        "test/app/002-b.sql", "test/app/004-d.sql", "legacy/app/001-a.sql", "legacy/app/003-c.sql"
    }  # fmt: skip
    code, report = run(fleet, "apply", "--env", "test")
    assert code == EXIT_OK, report
    assert report["source"]["sets"][0]["unpublished"] == []
    assert fleet.applied(name) == ["001-a", "003-c", "002-b", "004-d"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('layout = "{prefix}/{environment}/{service}"\n', "unknown placeholder {environment}"),
        ('layout = "{prefix}/{}/{env}"\n', "unknown placeholder {}"),
        ('layout = "{prefix}/{env"\n', "unbalanced braces"),
        ('layout = "{prefix}/{env}"\n', "has no {service}"),
        ('[source.paths]\nnope = ["x/"]\n', "'nope' is not a service"),
        ('[source.paths]\napp = ["{service}/{stage}/"]\n', "source.paths.app: unknown placeholder {stage}"),
        ('unpublished = "sometimes"\n', "source.unpublished: Input should be 'refuse', 'report' or 'apply'"),
        ("python_migrations = 1\n", "source.python_migrations"),
    ],
)
def test_a_bad_layout_is_a_configuration_error_naming_it(fleet: Fleet, extra: str, message: str) -> None:
    fleet.write_env([{"id": "unused", "dsn": fleet.dsn("unused")}], services=["app", "other"], source_extra=extra)
    result = fleet.cli("plan", "--env", "test")
    assert result.exit_code == EXIT_CONFIG
    assert message in result.output


# ---- nothing skipped silently ------------------------------------------------------------------


@pytest.mark.parametrize("policy", [None, "report", "apply"])
def test_a_migration_uploaded_outside_publish_is_never_skipped_silently(
    fleet: Fleet, tmp_path: Path, policy: str | None
) -> None:
    (name,) = fleet.add_databases(1)
    fleet.write_env(source_extra=f'unpublished = "{policy}"\n' if policy else "")
    root = local(tmp_path, MIGRATIONS)
    assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(root)).exit_code == EXIT_OK
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    fleet.publish({"004-by-hand.sql": "CREATE TABLE by_hand (id INT);"})  # a plain PUT into the prefix

    plan_code, plan = run(fleet, "plan", "--env", "test", "--detailed-exitcode")
    verify_code, verify = run(fleet, "verify", "--env", "test")
    for report in (plan, verify):
        (source,) = report["source"]["sets"]
        assert (source["unpublished"], source["unpublished_policy"]) == (["004-by-hand.sql"], policy or "refuse")
    apply = fleet.cli("apply", "--env", "test", "--format", "json")
    if policy is None:  # the default refuses: every gate fails, apply touches nothing
        assert (plan_code, verify_code, apply.exit_code) == (EXIT_SOURCE, EXIT_SOURCE, EXIT_SOURCE)
        assert "004-by-hand.sql in the bucket but not in release" in apply.output
        assert "nothing was applied" in apply.output
        assert fleet.cli("plan", "--env", "test").exit_code == EXIT_OK  # a plain plan only reports
    elif policy == "report":  # the release is applied without it, and every gate still fails
        assert (plan_code, verify_code, apply.exit_code) == (EXIT_SOURCE, EXIT_SOURCE, EXIT_OK)
        assert json.loads(apply.stdout)["source"]["sets"][0]["unpublished"] == ["004-by-hand.sql"]
    else:  # applied like a published one, and still listed
        assert (plan_code, verify_code, apply.exit_code) == (EXIT_PENDING, EXIT_TARGETS_FAILED, EXIT_OK)
        assert plan["results"][0]["pending"] == ["004-by-hand"]
        assert run(fleet, "verify", "--env", "test")[0] == EXIT_OK
    assert ("by_hand" in fleet.tables(name)) is (policy == "apply")


# ---- Python migrations --------------------------------------------------------------------------

PYTHON_SET = {
    "001-create-person.sql": MIGRATIONS["001-create-person.sql"],
    "002-py-backfill.py": """\
        from yoyo import step

        __depends__ = {"001-create-person"}


        def backfill(connection):
            cursor = connection.cursor()
            cursor.execute("INSERT INTO person (name) VALUES ('from python')")


        steps = [step("ALTER TABLE person ADD COLUMN nick TEXT", "ALTER TABLE person DROP COLUMN nick"), step(backfill)]
        """,
    "003-after.sql": "-- depends: 002-py-backfill\nCREATE TABLE after_py (id INT);",
    "004-nontx.py": """\
        from yoyo import step

        __depends__ = {"003-after"}
        __transactional__ = False
        steps = [step("CREATE INDEX CONCURRENTLY person_nick ON person (nick)")]
        """,
}
PY_IDS = ["001-create-person", "002-py-backfill", "003-after", "004-nontx"]


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_python_migrations_are_applied_recorded_and_checksummed_where_allowed(
    fleet: Fleet, tmp_path: Path, where: str
) -> None:
    (name,) = fleet.add_databases(1)
    if where == "s3":
        fleet.publish(PYTHON_SET)
        fleet.write_env(source_extra="python_migrations = true\n")
    else:
        root = local(tmp_path, PYTHON_SET)
        fleet.write_env(source=f'[source]\nfolder = "{root}"\npython_migrations = true\n')

    code, report = run(fleet, "apply", "--env", "test")
    assert code == EXIT_OK, report
    assert fleet.applied(name) == PY_IDS
    assert fleet.query(name, "SELECT name FROM person") == [("from python",)]
    assert "after_py" in fleet.tables(name)
    assert fleet.query(name, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'person_nick'::regclass") == [(True,)]
    import hashlib

    recorded = dict(fleet.query(name, "SELECT migration_id, sha256 FROM fanout_checksums"))
    assert (
        recorded["002-py-backfill"]
        == hashlib.sha256(textwrap.dedent(PYTHON_SET["002-py-backfill.py"]).encode()).hexdigest()
    )
    code, again = run(fleet, "verify", "--env", "test")
    assert code == EXIT_OK, again


def test_python_migrations_are_refused_where_not_allowed_and_never_imported(fleet: Fleet, tmp_path: Path) -> None:
    (name,) = fleet.add_databases(1)
    marker = tmp_path / "imported"
    fleet.publish({**PYTHON_SET, "005-side-effect.py": f"open({str(marker)!r}, 'w').close()\nsteps = []\n"})
    fleet.write_env()

    applied = fleet.cli("apply", "--env", "test")
    assert applied.exit_code == EXIT_SOURCE
    for file in ("002-py-backfill.py", "004-nontx.py", "005-side-effect.py"):
        assert f"{file}: Python migration" in applied.output
    assert fleet.applied(name) == []
    code, plan = run(fleet, "plan", "--env", "test")
    assert code == EXIT_SOURCE
    assert {w["file"] for w in plan["warnings"] if w["rule"] == "python-disabled"} == {
        "002-py-backfill.py", "004-nontx.py", "005-side-effect.py"
    }  # fmt: skip
    assert plan["results"][0]["pending"] == [*PY_IDS, "005-side-effect"]  # still shown
    assert not marker.exists()  # no code from the bucket ran in the runner


def test_a_shard_where_yoyo_applied_a_python_migration_is_not_drifted(fleet: Fleet, tmp_path: Path) -> None:
    (name,) = fleet.add_databases(1)
    folder = tmp_path / "set"
    folder.mkdir()
    for file, body in PYTHON_SET.items():
        (folder / file).write_text(textwrap.dedent(body))
    yoyo = subprocess.run(
        [YOYO, "apply", "--batch", "--no-config-file", "--database", fleet.postgres.dsn(name), str(folder)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert yoyo.returncode == 0, yoyo.stderr
    fleet.publish(PYTHON_SET)
    fleet.write_env(source_extra="python_migrations = true\n")

    code, report = run(fleet, "status", "--env", "test")
    assert code == EXIT_OK, report
    (result,) = report["results"]
    assert (result["status"], result["drift"], result["pending"]) == ("up-to-date", [], [])
    assert result["unverified"] == PY_IDS  # plain yoyo records no checksum: fanout baseline adopts them
