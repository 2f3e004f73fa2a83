"""The migration source: fetched once per run, pinned, yoyo-cloud compatible."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import MIGRATIONS, Fleet

from fanout.errors import EXIT_OK


def test_each_object_is_fetched_once_per_run_whatever_the_number_of_shards(fleet: Fleet) -> None:
    fleet.add_databases(20)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    fleet.s3.requests.reset()

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    seen = fleet.s3.requests.snapshot()  # counted by the S3 server, not by fanout
    assert seen["LIST"] == 1
    assert seen["GET"] == len(MIGRATIONS)
    assert seen["PUT"] == 1  # the run record, next to the migrations
    assert sum(seen.values()) == 1 + len(MIGRATIONS) + 1
    report = json.loads(result.stdout)
    assert (report["source"]["s3_list_requests"], report["source"]["s3_get_requests"]) == (1, len(MIGRATIONS))
    assert report["totals"]["migrations_applied"] == 20 * 3


def test_yoyo_cloud_bucket_conventions_are_kept(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(
        {
            **MIGRATIONS,
            "README.md": "not a migration",
            "post-apply-stats.sql": "CREATE TABLE IF NOT EXISTS hook (id INT);",
        }
    )
    fleet.write_env()

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    assert fleet.applied(name) == ["001-create-person", "002-add-address", "003-create-order"]
    assert "hook" in fleet.tables(name)
    files = {f["name"]: f for f in json.loads(result.stdout)["source"]["sets"][0]["files"]}
    assert set(files) == {*MIGRATIONS, "post-apply-stats.sql"}
    import hashlib

    expected = hashlib.sha256(MIGRATIONS["001-create-person.sql"].encode()).hexdigest()
    assert files["001-create-person.sql"]["sha256"] == expected
    assert files["001-create-person.sql"]["etag"]


def test_rollback_file_is_paired_with_its_migration(fleet: Fleet) -> None:
    """yoyo reads NAME.rollback.sql beside NAME.sql from the snapshot; a rollback runs it."""
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    assert fleet.cli("apply", "--env", "test").exit_code == EXIT_OK
    from yoyo import read_migrations

    folder = fleet.root / "snapshot"
    folder.mkdir()
    for file_name, body in MIGRATIONS.items():
        (folder / file_name).write_text(body)
    migration = next(m for m in read_migrations(str(folder)) if m.id == "001-create-person")
    migration.load()
    assert migration.steps[0].step._rollback.strip() == "DROP TABLE person;"  # type: ignore[index]
    assert fleet.applied(name)[0] == "001-create-person"


def test_local_folder_source_for_development(fleet: Fleet, tmp_path: Path) -> None:
    (name,) = fleet.add_databases(1)
    folder = tmp_path / "migrations" / "app" / "test"
    folder.mkdir(parents=True)
    for file_name, body in MIGRATIONS.items():
        (folder / file_name).write_text(body)
    fleet.write_env(source=f'[source]\nfolder = "{tmp_path / "migrations"}"\n')

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    assert fleet.applied(name) == ["001-create-person", "002-add-address", "003-create-order"]
    assert json.loads(result.stdout)["source"]["sets"][0]["url"].endswith("migrations/app/test/")
