"""Bad input: one readable line, a documented exit code, and nothing touched."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import MIGRATIONS, Fleet

from fanout.config import load_environment
from fanout.errors import EXIT_CONFIG, EXIT_DIRECTORY, EXIT_SOURCE, ConfigError


def _assert_one_line_error(output: str, *fragments: str) -> None:
    lines = [line for line in output.strip().splitlines() if line]
    assert len(lines) == 1, output
    assert lines[0].startswith("fanout: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("mutation", "fragments"),
    [
        (lambda text: text.replace("[directory]", "[directory"), ("not valid TOML",)),
        (lambda text: text + "\n[runner]\nconcurency = 4\n", ("runner.concurency", "unknown key")),
        (lambda text: text.replace('kind = "static"', 'kind = "static"\nwat = 1'), ("directory.wat", "unknown key")),
        (
            lambda text: text.replace("${FANOUT_TEST_PG_PASSWORD}", "${FANOUT_NOT_SET_ANYWHERE}"),
            ("FANOUT_NOT_SET_ANYWHERE is not set", "directory.targets[0].dsn"),
        ),
        (lambda text: text + "\n[runner]\nconcurrency = 0\n", ("runner.concurrency", "greater than or equal to 1")),
        (lambda text: text.replace('services = ["app"]', "services = []"), ("services",)),
        (lambda text: text.replace("postgresql://", "oracle://"), ("must start with postgresql:// or mysql://",)),
    ],
    ids=[
        "malformed-toml",
        "unknown-key",
        "unknown-nested-key",
        "missing-variable",
        "bad-value",
        "no-services",
        "bad-dsn",
    ],
)
def test_bad_environment_file_is_a_config_error_that_touches_nothing(fleet: Fleet, mutation, fragments) -> None:  # type: ignore[no-untyped-def]
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    path = fleet.write_env()
    path.write_text(mutation(path.read_text()))

    result = fleet.cli("apply", "--env", "test")

    assert result.exit_code == EXIT_CONFIG
    _assert_one_line_error(result.stderr, *fragments)
    assert result.stdout == ""
    assert fleet.tables(name) == set()


def test_unknown_environment_lists_the_known_ones(fleet: Fleet) -> None:
    fleet.write_env([{"id": "x", "dsn": "postgresql://u@h/db"}])
    result = fleet.cli("plan", "--env", "nope")
    assert result.exit_code == EXIT_CONFIG
    _assert_one_line_error(result.stderr, "unknown environment 'nope'", "known: test")


def test_unknown_service_names_the_environment_services(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(MIGRATIONS)
    fleet.write_env()
    result = fleet.cli("apply", "--env", "test", "--service", "billing")
    assert result.exit_code == EXIT_CONFIG
    _assert_one_line_error(result.stderr, "unknown service 'billing'", "it has: app")
    assert fleet.tables(name) == set()


def test_service_without_migrations_in_s3_is_a_source_error(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.write_env()
    result = fleet.cli("apply", "--env", "test")
    assert result.exit_code == EXIT_SOURCE
    _assert_one_line_error(
        result.stderr, "no migrations for service 'app'", f"s3://{fleet.bucket}/migrations/app/test/"
    )
    assert fleet.tables(name) == set()


def test_missing_bucket_and_unreachable_s3_are_source_errors(fleet: Fleet) -> None:
    fleet.add_databases(1)
    path = fleet.write_env()
    path.write_text(path.read_text().replace(fleet.bucket, "no-such-bucket-here"))
    missing = fleet.cli("plan", "--env", "test")
    assert missing.exit_code == EXIT_SOURCE
    _assert_one_line_error(missing.stderr, "bucket 'no-such-bucket-here' does not exist")

    path.write_text(path.read_text().replace(fleet.s3.endpoint_url, "http://127.0.0.1:9"))
    unreachable = fleet.cli("plan", "--env", "test")
    assert unreachable.exit_code == EXIT_SOURCE
    _assert_one_line_error(unreachable.stderr, "cannot reach the S3 endpoint")


def test_broken_migration_set_stops_the_run_before_any_shard_is_touched(fleet: Fleet) -> None:
    (name,) = fleet.add_databases(1)
    fleet.publish(
        {"001-a.sql": "CREATE TABLE a (id INT);", "002-b.sql": "-- depends: 000-missing\nCREATE TABLE b (id INT);"}
    )
    fleet.write_env()
    result = fleet.cli("apply", "--env", "test")
    assert result.exit_code == EXIT_SOURCE
    _assert_one_line_error(result.stderr, "lint error", "002-b.sql", "000-missing")
    assert fleet.tables(name) == set()


def test_duplicate_migration_ids_across_services_are_refused(fleet: Fleet) -> None:
    fleet.add_databases(1)
    fleet.services = ("one", "two")
    fleet.publish({"001-init.sql": "CREATE TABLE one (id INT);"}, service="one")
    fleet.publish({"001-init.sql": "CREATE TABLE two (id INT);"}, service="two")
    fleet.write_env()
    result = fleet.cli("plan", "--env", "test")
    assert result.exit_code == EXIT_SOURCE
    _assert_one_line_error(result.stderr, "migration id '001-init' exists in services 'one' and 'two'")


def test_variables_are_interpolated_and_dollar_dollar_escapes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "x.toml"
    path.write_text(
        'services = ["s"]\n[source]\nbucket = "b-${SUFFIX}"\nprefix = "p$${LITERAL}"\n'
        '[directory]\nkind = "static"\ntargets = [{ id = "t", dsn = "postgresql://u:${PW}@h:${PORT}/d" }]\n'
    )
    env = load_environment(str(path), variables={"SUFFIX": "prod", "PW": "s3cret-pw", "PORT": "6543"})
    assert env.source.bucket == "b-prod"  # type: ignore[union-attr]
    assert env.source.prefix == "p${LITERAL}"  # type: ignore[union-attr]
    assert env.name == "x"
    assert "s3cret-pw" not in repr(env)
    # An unset variable of [directory] is an error when the directory is read, not before.
    partial = load_environment(str(path), variables={"SUFFIX": "x", "PW": "y"})
    assert partial.source.bucket == "b-x"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"directory\.targets\[0\]\.dsn: environment variable PORT is not set"):
        partial.directory  # noqa: B018
    with pytest.raises(ConfigError, match=r"services\[0\]: environment variable NOPE is not set"):
        path.write_text(path.read_text().replace('["s"]', '["${NOPE}"]'))
        load_environment(str(path), variables={"SUFFIX": "x", "PW": "y", "PORT": "1"})


def test_an_environment_without_targets_is_refused(fleet: Fleet) -> None:
    path = fleet.write_env([])
    result = fleet.cli("shards", "--env", "test")
    assert result.exit_code == EXIT_CONFIG
    _assert_one_line_error(result.stderr, "directory.targets")
    assert path.exists()
    assert EXIT_DIRECTORY != EXIT_CONFIG


def test_every_example_environment_file_is_valid() -> None:
    from conftest import REPO

    from fanout.config import HttpDirectoryConfig, PgCatDirectoryConfig, SqlDirectoryConfig, StaticDirectoryConfig

    variables = {name: "x" for name in ("FANOUT_DEMO_S3_ENDPOINT", "FANOUT_DEMO_PG_PASSWORD", "FANOUT_S3_ENDPOINT",
                 "SHARD_PASSWORD", "STAGING_SHARD_PASSWORD", "SHARDING_TOKEN", "CATALOG_PASSWORD", "CITUS_PASSWORD")}  # fmt: skip
    variables["FANOUT_DEMO_PG_PORT"] = "5432"
    kinds = {}
    for path in sorted((REPO / "environments").glob("*.toml")):
        env = load_environment(str(path), variables=variables)
        kinds[path.stem] = type(env.directory)
    assert kinds["production"] is HttpDirectoryConfig
    assert kinds["catalog"] is SqlDirectoryConfig
    assert kinds["pgcat"] is PgCatDirectoryConfig
    assert kinds["citus"] is StaticDirectoryConfig
    from fanout.directory.pgcat import PgCatDirectory

    env = load_environment(str(REPO / "environments" / "pgcat.toml"), variables=variables)
    assert isinstance(env.directory, PgCatDirectoryConfig)
    targets = PgCatDirectory(env.directory).targets()
    assert [(t.id, t.host, t.dbname, t.user) for t in targets] == [
        ("sharded_db/shard-0", "shard-0.internal", "shard0", "migrator"),
        ("sharded_db/shard-1", "shard-1.internal", "shard1", "migrator"),
    ]


def test_publish_and_report_merge_need_only_the_variables_of_the_source(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    monkeypatch.setenv("FANOUT_TEST_SHARD_SECRET", fleet.postgres.password.reveal())
    fleet.write_env([{"id": n, "dsn": fleet.dsn(n, password="${FANOUT_TEST_SHARD_SECRET}")} for n in names])
    reports = f"s3://{fleet.bucket}/reports/"
    for k in (1, 2):
        sliced = fleet.cli("plan", "--env", "test", "--slice", f"{k}/2", "--report-to", f"{reports}{k}.json")
        assert sliced.exit_code == 10 or sliced.exit_code == 0, sliced.output
    monkeypatch.delenv("FANOUT_TEST_SHARD_SECRET")
    folder = tmp_path / "local" / "app" / "test"
    folder.mkdir(parents=True)
    for name, body in MIGRATIONS.items():
        (folder / name).write_text(textwrap.dedent(body))

    published = fleet.cli("publish", "--env", "test", "--migrations-dir", str(tmp_path / "local"))
    merged = fleet.cli("report", "merge", "--env", "test", reports, "--format", "json")
    planned = fleet.cli("plan", "--env", "test")

    assert published.exit_code == 0, published.output
    assert "_manifest.json" in published.stdout
    assert merged.exit_code == 0, merged.output
    assert json.loads(merged.stdout)["totals"]["targets"] == 2
    # A command that reads the shard directory still needs the variable, and says which.
    assert planned.exit_code == EXIT_CONFIG
    _assert_one_line_error(
        planned.stderr, "directory.targets[0].dsn", "environment variable FANOUT_TEST_SHARD_SECRET is not set"
    )
    assert all(fleet.tables(n) == set() for n in names)


def test_listing_shards_needs_no_variable_of_the_source(fleet: Fleet) -> None:
    fleet.add_databases(1)
    path = fleet.write_env()
    path.write_text(path.read_text().replace(fleet.s3.endpoint_url, "${FANOUT_TEST_UNSET_ENDPOINT}"))

    listed = fleet.cli("shards", "--env", "test")
    published = fleet.cli("publish", "--env", "test", "--dry-run")

    assert listed.exit_code == 0, listed.output
    assert "1 targets" in listed.stdout
    assert published.exit_code == EXIT_CONFIG
    _assert_one_line_error(published.stderr, "source.endpoint_url", "FANOUT_TEST_UNSET_ENDPOINT is not set")


def test_a_file_names_its_environment_and_a_bare_path_says_which_name_it_took(fleet: Fleet, tmp_path: Path) -> None:
    fleet.add_databases(1)
    text = fleet.write_env().read_text()
    unnamed = tmp_path / "x.toml"
    unnamed.write_text(text)
    named = tmp_path / "y.toml"
    named.write_text('name = "production"\n' + text)

    from_file_name = fleet.cli("shards", "--env", str(unnamed))
    from_key = fleet.cli("shards", "--env", str(named))

    assert from_file_name.exit_code == 0, from_file_name.output
    assert from_file_name.stderr.splitlines() == [
        f"fanout: environment 'x', from the file name of {unnamed} (set name = \"...\" in it)"
    ]
    assert from_key.exit_code == 0 and from_key.stderr == ""
    assert load_environment(str(named)).name == "production"
    assert load_environment(str(unnamed)).name == "x"


@pytest.mark.parametrize(
    ("name", "asked", "fragment"),
    [
        ("production", "test", "the file names environment 'production', not 'test'"),
        ("prod/eu", "test", "'prod/eu' is not a valid environment name"),
        ("", "test", "'' is not a valid environment name"),
    ],
    ids=["differs-from-the-name-asked", "slash", "empty"],
)
def test_a_bad_or_contradicting_environment_name_is_refused(fleet: Fleet, name: str, asked: str, fragment: str) -> None:
    path = fleet.write_env([{"id": "x", "dsn": "postgresql://u@h/db"}])
    path.write_text(f"name = {json.dumps(name)}\n" + path.read_text())
    result = fleet.cli("shards", "--env", asked)
    assert result.exit_code == EXIT_CONFIG
    _assert_one_line_error(result.stderr, fragment)
