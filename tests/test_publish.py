"""publish (immutability, dry run, manifest), lint, and runs pinned to the published release."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from conftest import MIGRATIONS, Fleet

from fanout.errors import EXIT_CONFIG, EXIT_OK, EXIT_SOURCE
from fanout.lint import Severity, lint

PREFIX = "migrations/app/test/"


def local_folder(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "migrations"
    folder = root / "app" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (folder / name).write_text(textwrap.dedent(body))
    return root


def keys(fleet: Fleet) -> dict[str, int]:
    """Object key -> number of versions."""
    versions = fleet.s3.client().list_object_versions(Bucket=fleet.bucket, Prefix=PREFIX).get("Versions", [])
    counts: dict[str, int] = {}
    for version in versions:
        counts[version["Key"][len(PREFIX) :]] = counts.get(version["Key"][len(PREFIX) :], 0) + 1
    return counts


def manifest(fleet: Fleet) -> dict:
    body = fleet.s3.client().get_object(Bucket=fleet.bucket, Key=PREFIX + "_manifest.json")["Body"].read()
    return json.loads(body)


@pytest.fixture
def versioned(fleet: Fleet) -> Fleet:
    fleet.s3.client().put_bucket_versioning(Bucket=fleet.bucket, VersioningConfiguration={"Status": "Enabled"})
    fleet.write_env([{"id": "unused", "dsn": fleet.dsn("unused")}])  # publish never connects to a shard
    return fleet


def test_publish_adds_new_files_writes_a_manifest_and_republishing_is_a_noop(versioned: Fleet, tmp_path: Path) -> None:
    fleet = versioned
    root = local_folder(tmp_path, MIGRATIONS)
    dry = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root), "--dry-run")
    assert dry.exit_code == EXIT_OK, dry.output
    assert "would publish" in dry.stdout and dry.stdout.count("  add ") == 4
    assert keys(fleet) == {}  # a dry run writes nothing

    done = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert done.exit_code == EXIT_OK, done.output
    assert keys(fleet) == {**{name: 1 for name in MIGRATIONS}, "_manifest.json": 1}
    published = manifest(fleet)
    assert published["schema"] == "fanout/manifest/v1"
    assert (published["service"], published["environment"], published["forced"]) == ("app", "test", [])
    files = {f["name"]: f for f in published["files"]}
    assert set(files) == set(MIGRATIONS)
    for name, body in MIGRATIONS.items():
        assert files[name]["sha256"] == hashlib.sha256(textwrap.dedent(body).encode()).hexdigest()
        assert files[name]["version_id"] and files[name]["etag"]

    again = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert again.exit_code == EXIT_OK
    assert "4 unchanged" in again.stdout and "  add " not in again.stdout
    assert {k: v for k, v in keys(fleet).items() if k != "_manifest.json"} == {name: 1 for name in MIGRATIONS}
    assert manifest(fleet)["release"] == published["release"]  # same files, same release id

    (root / "app" / "test" / "004-add-phone.sql").write_text(
        "-- depends: 003-create-order\nALTER TABLE person ADD phone TEXT;"
    )
    added = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert added.exit_code == EXIT_OK
    assert "  add     004-add-phone.sql" in added.stdout
    assert manifest(fleet)["release"] != published["release"]


def test_publish_refuses_to_change_or_delete_a_published_file_unless_forced_with_a_reason(
    versioned: Fleet, tmp_path: Path
) -> None:
    fleet = versioned
    root = local_folder(tmp_path, MIGRATIONS)
    assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(root)).exit_code == EXIT_OK
    before = keys(fleet)
    edited = root / "app" / "test" / "002-add-address.sql"
    edited.write_text("-- depends: 001-create-person\nALTER TABLE person ADD COLUMN address VARCHAR(80);\n")

    refused = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert refused.exit_code == EXIT_SOURCE
    assert "refusing to change published migrations: 002-add-address.sql (content differs)" in refused.output
    assert keys(fleet) == before  # nothing written, not even the manifest

    dry = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root), "--dry-run")
    assert dry.exit_code == EXIT_SOURCE  # a dry run says what a real one would do

    (root / "app" / "test" / "003-create-order.sql").unlink()
    gone = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert gone.exit_code == EXIT_SOURCE
    assert f"003-create-order.sql (not in {root})" in gone.output

    no_reason = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root), "--force")
    assert no_reason.exit_code == EXIT_CONFIG
    assert "--force needs --reason" in no_reason.output

    forced = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root), "--force", "--reason", "INC-42")
    assert forced.exit_code == EXIT_OK, forced.output
    assert "  change  002-add-address.sql" in forced.stdout and "  delete  003-create-order.sql" in forced.stdout
    assert (
        "003-create-order.sql"
        not in fleet.s3.client().list_objects_v2(Bucket=fleet.bucket, Prefix=PREFIX).get("Contents", []).__repr__()
    )
    record = {f["file"]: f for f in manifest(fleet)["forced"]}
    assert record["002-add-address.sql"]["reason"] == "INC-42"
    assert (
        record["002-add-address.sql"]["old_sha256"]
        == hashlib.sha256(textwrap.dedent(MIGRATIONS["002-add-address.sql"]).encode()).hexdigest()
    )
    assert record["003-create-order.sql"]["change"] == "removed"


def test_publish_stops_on_lint_errors_naming_the_file(versioned: Fleet, tmp_path: Path) -> None:
    fleet = versioned
    root = local_folder(tmp_path, MIGRATIONS)
    assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(root)).exit_code == EXIT_OK
    (root / "app" / "test" / "004-tail.sql").write_text("CREATE TABLE tail (id INT);\n-- the end\n")
    (root / "app" / "test" / "005-maybe.sql").write_text("-- transactional: maybe\nCREATE TABLE maybe (id INT);")

    result = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert result.exit_code == EXIT_SOURCE
    assert "2 lint error(s)" in result.output
    assert "004-tail.sql: the last statement is only a comment" in result.output
    assert "005-maybe.sql: '-- transactional: 'maybe'': must be exactly true or false" in result.output
    assert "004-tail.sql" not in keys(fleet)


def test_warnings_do_not_stop_publish_unless_the_environment_raises_them(versioned: Fleet, tmp_path: Path) -> None:
    fleet = versioned
    root = local_folder(tmp_path, MIGRATIONS)
    assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(root)).exit_code == EXIT_OK
    # A branch merged late: its migration sorts before one already published. yoyo applies it fine.
    (root / "app" / "test" / "000-early.sql").write_text("CREATE TABLE early (id INT);")
    (root / "app" / "test" / "005-empty.sql").write_text("-- nothing yet\n")
    unused = [{"id": "unused", "dsn": fleet.dsn("unused")}]
    fleet.write_env(unused, extra='[lint]\nerrors = ["out-of-order"]\n')
    strict = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert strict.exit_code == EXIT_SOURCE
    assert "000-early.sql: new, but sorts before 003-create-order, which is already published" in strict.output
    assert "[out-of-order]" in strict.output and "005-empty.sql" not in strict.output.split("lint error")[1]

    fleet.write_env(unused)
    relaxed = fleet.cli("publish", "--env", "test", "--migrations-dir", str(root))
    assert relaxed.exit_code == EXIT_OK, relaxed.output
    assert "warning" in relaxed.stderr and "[empty-migration]" in relaxed.stderr
    assert "000-early.sql" in keys(fleet)


def test_a_run_applies_the_published_version_even_after_an_overwrite(versioned: Fleet, tmp_path: Path) -> None:
    fleet = versioned
    (name,) = fleet.add_databases(1)
    fleet.write_env(source_extra='unpublished = "report"\n')
    root = local_folder(tmp_path, MIGRATIONS)
    assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(root)).exit_code == EXIT_OK
    # Someone uploads over a published file by hand, and adds one, both outside fanout publish.
    fleet.publish({"003-create-order.sql": "-- depends: 002-add-address\nCREATE TABLE hijacked (id INT);",
                   "004-sneaky.sql": "CREATE TABLE sneaky (id INT);"})  # fmt: skip

    result = fleet.cli("apply", "--env", "test", "--format", "json")
    assert result.exit_code == EXIT_OK, result.output
    tables = fleet.tables(name)
    assert "customer_order" in tables and "hijacked" not in tables and "sneaky" not in tables
    (summary,) = json.loads(result.stdout)["source"]["sets"]
    published = manifest(fleet)
    assert summary["release"] == published["release"]
    assert summary["manifest"] == f"s3://{fleet.bucket}/{PREFIX}_manifest.json"
    pinned = {f["name"]: f["version_id"] for f in published["files"]}
    assert {f["name"]: f["version_id"] for f in summary["files"]} == pinned
    assert summary["unpublished"] == ["004-sneaky.sql"] and summary["unpublished_policy"] == "report"
    assert "not in release" in result.stderr


def test_without_versioning_an_overwrite_after_publish_stops_the_run(fleet: Fleet, tmp_path: Path) -> None:
    (name,) = fleet.add_databases(1)
    fleet.write_env()
    root = local_folder(tmp_path, MIGRATIONS)
    assert fleet.cli("publish", "--env", "test", "--migrations-dir", str(root)).exit_code == EXIT_OK
    assert all(f["version_id"] is None for f in manifest(fleet)["files"])
    fleet.publish({"003-create-order.sql": "-- depends: 002-add-address\nCREATE TABLE hijacked (id INT);"})

    result = fleet.cli("apply", "--env", "test")
    assert result.exit_code == EXIT_SOURCE
    assert "changed since it was listed or published" in result.output
    assert fleet.applied(name) == []


def test_apply_stops_on_lint_errors_before_touching_a_shard(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish({**MIGRATIONS, "004-forgotten.SQL": "CREATE TABLE forgotten (id INT);",
                   "nested/005-deep.sql": "CREATE TABLE deep (id INT);",
                   "006-tail.sql": "CREATE TABLE tail (id INT);\n-- the end",
                   "007-odd.sql": "-- depends: 000-gone\nCREATE TABLE odd (id INT);"})  # fmt: skip
    fleet.write_env()
    result = fleet.cli("apply", "--env", "test")
    assert result.exit_code == EXIT_SOURCE
    assert "2 lint error(s)" in result.output
    assert "006-tail.sql: the last statement is only a comment" in result.output
    assert "007-odd.sql: '-- depends: 000-gone': no such migration [unknown-dependency]" in result.output
    # What yoyo itself ignores is a warning, not a refusal.
    assert "004-forgotten.SQL: not a migration: yoyo does not read it" in result.output
    assert "nested/: nested folder: yoyo does not read what is inside" in result.output
    assert fleet.applied(name) == []


# ---- the lint rules, one by one ----------------------------------------------------------------


def messages(files: dict[str, str], **kwargs: object) -> list[str]:
    found = lint({k: v.encode() for k, v in files.items()}, **kwargs)  # type: ignore[arg-type]
    return [str(p) for p in found if p.severity is Severity.ERROR]


def test_lint_accepts_a_clean_set() -> None:
    assert messages({k: textwrap.dedent(v) for k, v in MIGRATIONS.items()}) == []


def test_lint_order_against_what_is_published_and_nested_folders() -> None:
    found = lint({"001-a.sql": b"SELECT 1;", "002-b.sql": b"SELECT 1;"}, published=["003-c"], folders=["old/"])
    assert [(p.file, p.rule.value, p.severity) for p in found] == [
        ("old/", "nested-folder", Severity.WARNING),
        ("001-a.sql", "out-of-order", Severity.WARNING),
        ("002-b.sql", "out-of-order", Severity.WARNING),
    ]
    assert "001-a.sql: new, but sorts before 003-c, which is already published" in str(found[1])
    assert lint({"001-a.sql": b"SELECT 1;", "004-d.sql": b"SELECT 1;"}, published=["001-a", "003-c"]) == []
    readme = lint({"001-a.sql": b"SELECT 1;", "README.md": b"docs"})
    assert [(p.file, p.severity) for p in readme] == [("README.md", Severity.WARNING)]
