"""Shard directories against real servers of their kind, and bootstrap."""

from __future__ import annotations

import json
import socket
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import MIGRATIONS, PASSWORD_VARIABLE, Fleet
from sharding_service import ShardingService

from fanout.errors import EXIT_CONFIG, EXIT_DIRECTORY, EXIT_OK

TOKEN = "directory-token-0123456789"
# SQL that PostgreSQL and MySQL/MariaDB read alike.
PORTABLE = {
    "001-person.sql": "CREATE TABLE person (id INT PRIMARY KEY, name VARCHAR(100) NOT NULL);\n",
    "002-email.sql": "-- depends: 001-person\nALTER TABLE person ADD COLUMN email VARCHAR(200);\n",
}


@pytest.fixture
def sharding() -> Iterator[ShardingService]:
    with ShardingService() as service:
        yield service


def _answer(fleet: Fleet, database: str, **overrides: object) -> dict[str, object]:
    answer: dict[str, object] = {
        "host": fleet.postgres.host,
        "port": fleet.postgres.port,
        "flavor": "postgres",
        "user": "postgres",
        "password": fleet.postgres.password.reveal(),
        "database": database,
    }
    answer.update(overrides)
    return answer


def _http_env(fleet: Fleet, sharding: ShardingService, extra: str = "") -> None:
    source = textwrap.dedent(f"""\
        [source]
        bucket = "{fleet.bucket}"
        prefix = "migrations"
        endpoint_url = "{fleet.s3.endpoint_url}"
        """)
    directory = f'[directory]\nkind = "http"\nendpoint = "{sharding.url}"\ntoken = "${{SHARDING_TOKEN}}"\n{extra}'
    fleet.environments_dir.mkdir(exist_ok=True)
    (fleet.environments_dir / "test.toml").write_text(f'services = ["app"]\n{source}\n{directory}\n')


def _error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line]
    assert len(lines) == 1, output
    return lines[0]


def test_http_directory_follows_pages_and_collapses_tenants_sharing_a_database(
    fleet: Fleet, sharding: ShardingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, big = fleet.add_databases(2)
    monkeypatch.setenv("SHARDING_TOKEN", TOKEN)
    sharding.state.token = TOKEN
    sharding.state.pages = [["small-1", "small-2"], [{"id": "small-3"}, "bigco", "small-1"]]
    for tenant in ("small-1", "small-2", "small-3"):
        sharding.state.databases[tenant] = _answer(fleet, shared)
    sharding.state.databases["bigco"] = _answer(fleet, big)
    fleet.publish(MIGRATIONS)
    _http_env(fleet, sharding)

    listed = fleet.cli("shards", "--env", "test", "--format", "json")
    assert listed.exit_code == EXIT_OK, listed.output
    targets = {t["database"]: t for t in json.loads(listed.stdout)}
    assert set(targets) == {shared, big}
    assert targets[shared]["tenants"] == ["small-1", "small-2", "small-3"]
    assert targets[big]["tenants"] == ["bigco"]
    assert fleet.postgres.password.reveal() not in listed.output + TOKEN
    assert TOKEN not in listed.output
    # The duplicate "small-1" was resolved once.
    assert sharding.requests_matching(lambda p: p == "/write/small-1") == 1

    applied = fleet.cli("apply", "--env", "test", "--format", "json")
    assert applied.exit_code == EXIT_OK, applied.output
    assert json.loads(applied.stdout)["totals"]["targets"] == 2
    assert len(fleet.applied(shared)) == len(fleet.applied(big)) == 3


def test_http_directory_retries_server_errors_and_bounds_concurrency(
    fleet: Fleet, sharding: ShardingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    (database,) = fleet.add_databases(1)
    monkeypatch.setenv("SHARDING_TOKEN", TOKEN)
    tenants = [f"tenant-{i}" for i in range(1000)]
    sharding.state.pages = [tenants[i : i + 250] for i in range(0, 1000, 250)]
    sharding.state.databases = {t: _answer(fleet, database, schema=None) for t in tenants}
    sharding.state.failures_before_success = 1  # every path fails once with 503 first
    _http_env(fleet, sharding, "concurrency = 8\nretries = 2\n")

    result = fleet.cli("shards", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    (target,) = json.loads(result.stdout)
    assert len(target["tenants"]) == 1000
    assert sharding.state.max_in_flight <= 8
    assert sharding.requests_matching(lambda p: p.startswith("/write/")) == 2000  # one retry each


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda s, f: s.state.raw_resolve.update({"t1": b"{not json"}), "malformed JSON for tenant 't1'"),
        (lambda s, f: s.state.databases["t1"].pop("host"), "tenant 't1': the sharding service's answer lacks host"),
        (lambda s, f: s.state.databases["t1"].update(flavor="oracle"), "tenant 't1': flavor 'oracle' is neither"),
        (
            lambda s, f: s.state.databases["t1"].update(flavor="mariadb", schema="tenant_1"),
            "tenant 't1': a mariadb database has no schema",
        ),
        (lambda s, f: s.state.databases.pop("t1"), "sharding service has no tenant 't1'"),
        (lambda s, f: s.state.pages.__setitem__(0, []), "the shard directory lists no target"),
        (lambda s, f: setattr(s.state, "token", "another-token"), "refused the token"),
        (lambda s, f: s.state.pages.__setitem__(0, [None]), "not a tenant id"),
    ],
    ids=[
        "malformed-json",
        "missing-field",
        "wrong-flavor",
        "mysql-schema",
        "unknown-tenant",
        "empty",
        "bad-token",
        "bad-entry",
    ],
)
def test_http_directory_bad_answers_are_directory_errors(  # type: ignore[no-untyped-def]
    fleet: Fleet, sharding: ShardingService, monkeypatch: pytest.MonkeyPatch, setup, message
) -> None:
    (database,) = fleet.add_databases(1)
    monkeypatch.setenv("SHARDING_TOKEN", TOKEN)
    sharding.state.pages = [["t1"]]
    sharding.state.databases["t1"] = _answer(fleet, database)
    setup(sharding, fleet)
    fleet.publish(MIGRATIONS)
    _http_env(fleet, sharding)

    for command in ("shards", "apply"):
        result = fleet.cli(command, "--env", "test")
        assert result.exit_code == EXIT_DIRECTORY, result.output
        assert message in _error_line(result.stderr)
    assert fleet.tables(database) == set()


def test_http_directory_mysql_and_mariadb_flavors_are_mysql_targets_beside_postgresql_ones(
    fleet: Fleet, sharding: ShardingService, monkeypatch: pytest.MonkeyPatch
) -> None:
    (database,) = fleet.add_databases(1)
    monkeypatch.setenv("SHARDING_TOKEN", TOKEN)
    sharding.state.pages = [["pg", "my", "maria", "maria-2"]]
    sharding.state.databases["pg"] = _answer(fleet, database)
    mysql = {"host": "my-db", "user": "migrator", "password": "my-Sekr3t-pw"}
    sharding.state.databases["my"] = {**mysql, "port": 3306, "flavor": "MySQL", "database": "tenant_my"}
    sharding.state.databases["maria"] = {**mysql, "port": 3307, "flavor": "mariadb", "database": "tenant_maria"}
    sharding.state.databases["maria-2"] = {**mysql, "port": "3307", "flavor": "mariadb", "database": "tenant_maria"}
    _http_env(fleet, sharding)

    listed = fleet.cli("shards", "--env", "test", "--format", "json")

    assert listed.exit_code == EXIT_OK, listed.output
    targets = {t["database"]: t for t in json.loads(listed.stdout)}
    assert targets[database]["dsn"].startswith("postgresql://postgres@")
    assert targets["tenant_my"]["dsn"] == "mysql://migrator@my-db:3306/tenant_my"
    assert targets["tenant_my"]["server"] == "my-db:3306"
    assert (targets["tenant_my"]["engine"], targets[database]["engine"]) == ("mysql", "postgresql")
    # mariadb is the mysql engine (the server's flavor is read when connecting); one database, two tenants.
    assert targets["tenant_maria"]["dsn"] == "mysql://migrator@my-db:3307/tenant_maria"
    assert targets["tenant_maria"]["tenants"] == ["maria", "maria-2"]
    assert "Sekr3t" not in listed.output


def test_unreachable_directory_is_a_directory_error(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDING_TOKEN", TOKEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fleet.environments_dir.mkdir(exist_ok=True)
    (fleet.environments_dir / "test.toml").write_text(
        f'services = ["app"]\n[source]\nbucket = "{fleet.bucket}"\n'
        f'[directory]\nkind = "http"\nendpoint = "http://127.0.0.1:{port}"\nretries = 1\ntimeout = 1\n'
    )
    result = fleet.cli("shards", "--env", "test")
    assert result.exit_code == EXIT_DIRECTORY
    assert "sharding service unreachable for the tenant list" in _error_line(result.stderr)


def _catalog(fleet: Fleet, rows: list[tuple[str, str]]) -> str:
    (catalog,) = fleet.add_databases(1)
    fleet.query(
        catalog, "CREATE TABLE shards (shard_id TEXT, env TEXT, host TEXT, port INT, dbname TEXT, tenants TEXT[])"
    )
    for shard_id, database in rows:
        fleet.query(
            catalog,
            "INSERT INTO shards VALUES (%s, 'test', %s, %s, %s, ARRAY['x-' || %s])",
            (shard_id, fleet.postgres.host, fleet.postgres.port, database, shard_id),
        )
    fleet.query(catalog, "INSERT INTO shards VALUES ('other-env', 'prod', 'prod-host', 5432, 'prod', NULL)")
    return catalog


def _sql_env(fleet: Fleet, catalog: str, query: str) -> None:
    fleet.environments_dir.mkdir(exist_ok=True)
    (fleet.environments_dir / "test.toml").write_text(
        f'services = ["app"]\n[source]\nbucket = "{fleet.bucket}"\nprefix = "migrations"\n'
        f'endpoint_url = "{fleet.s3.endpoint_url}"\n'
        f'[directory]\nkind = "sql"\ndsn = "{fleet.dsn(catalog)}"\nquery = "{query}"\n'
        f'user = "postgres"\npassword = "${{{PASSWORD_VARIABLE}}}"\n'
    )


def test_catalog_directory_reads_the_environment_rows_read_only(fleet: Fleet) -> None:
    one, two = fleet.add_databases(2)
    catalog = _catalog(fleet, [("s1", one), ("s2", two)])
    fleet.publish(MIGRATIONS)
    _sql_env(fleet, catalog, "SELECT shard_id, host, port, dbname, tenants FROM shards WHERE env = %(env)s ORDER BY 1")

    listed = fleet.cli("shards", "--env", "test", "--format", "json")
    applied = fleet.cli("apply", "--env", "test")

    assert listed.exit_code == EXIT_OK, listed.output
    assert [(t["id"], t["database"], t["tenants"]) for t in json.loads(listed.stdout)] == [
        ("s1", one, ["x-s1"]),
        ("s2", two, ["x-s2"]),
    ]
    assert applied.exit_code == EXIT_OK, applied.output
    assert len(fleet.applied(one)) == len(fleet.applied(two)) == 3
    assert fleet.tables(catalog) == {"shards"}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT shard_id, host, port, dbname FROM shards WHERE env = 'nowhere'", "lists no target"),
        ("SELECT shard_id, host FROM shards WHERE env = %(env)s", "missing column or value: port, dbname"),
        ("SELECT * FROM no_such_table", "the catalog query failed"),
        ("DELETE FROM shards RETURNING shard_id, host, port, dbname", "read-only transaction"),
    ],
    ids=["empty", "missing-columns", "bad-query", "write-refused"],
)
def test_catalog_directory_errors(fleet: Fleet, query: str, message: str) -> None:
    (one,) = fleet.add_databases(1)
    catalog = _catalog(fleet, [("s1", one)])
    _sql_env(fleet, catalog, query)
    result = fleet.cli("shards", "--env", "test")
    assert result.exit_code == EXIT_DIRECTORY, result.output
    assert message in _error_line(result.stderr)
    assert fleet.query(catalog, "SELECT count(*) FROM shards") == [(2,)]  # nothing deleted


def _flavored_catalog(fleet: Fleet, rows: list[tuple[str, int, str, str | None, str | None]]) -> str:
    """A catalog with a `flavor` column: rows of (shard_id, port, dbname, flavor, schema) on the suite's host."""
    (catalog,) = fleet.add_databases(1)
    fleet.query(
        catalog,
        "CREATE TABLE shards (shard_id TEXT, env TEXT, host TEXT, port INT, dbname TEXT, flavor TEXT, schema TEXT)",
    )
    for shard_id, port, database, flavor, schema in rows:
        fleet.query(
            catalog,
            "INSERT INTO shards VALUES (%s, 'test', %s, %s, %s, %s, %s)",
            (shard_id, fleet.postgres.host, port, database, flavor, schema),
        )
    return catalog


FLAVORED_QUERY = "SELECT shard_id, host, port, dbname, flavor, schema FROM shards WHERE env = %(env)s ORDER BY 1"


def test_catalog_flavor_column_makes_mysql_and_mariadb_rows_mysql_targets_beside_postgresql_ones(
    fleet: Fleet,
) -> None:
    (database,) = fleet.add_databases(1)
    port = fleet.postgres.port
    catalog = _flavored_catalog(
        fleet,
        [
            ("a-pg", port, database, "postgresql", None),
            ("b-null", port, database, None, "tenant_b"),  # NULL is PostgreSQL, as an absent column is
            ("c-my", 3306, "tenant_my", "MySQL", None),
            ("d-maria", 3307, "tenant_maria", "mariadb", None),
        ],
    )
    _sql_env(fleet, catalog, FLAVORED_QUERY)

    listed = fleet.cli("shards", "--env", "test", "--format", "json")

    assert listed.exit_code == EXIT_OK, listed.output
    host = fleet.postgres.host
    assert {t["id"]: t["dsn"] for t in json.loads(listed.stdout)} == {
        "a-pg": f"postgresql://postgres@{host}:{port}/{database}",
        "b-null": f"postgresql://postgres@{host}:{port}/{database}#tenant_b",
        # mysql and mariadb are one engine (the server's flavor is read when connecting).
        "c-my": f"mysql://postgres@{host}:3306/tenant_my",
        "d-maria": f"mysql://postgres@{host}:3307/tenant_maria",
    }
    assert fleet.postgres.password.reveal() not in listed.output


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (("s1", 3306, "tenant_x", "oracle", None), "catalog row 1 (shard s1): flavor 'oracle' is neither PostgreSQL"),
        (("s1", 3306, "tenant_x", "mariadb", "app"), "a mariadb database takes no schema (got schema 'app')"),
    ],
    ids=["unknown-flavor", "mysql-with-schema"],
)
def test_catalog_flavor_errors_are_one_line_and_nothing_runs(
    fleet: Fleet, row: tuple[str, int, str, str | None, str | None], message: str
) -> None:
    catalog = _flavored_catalog(fleet, [row])
    fleet.publish(MIGRATIONS)
    _sql_env(fleet, catalog, FLAVORED_QUERY)
    for command in ("shards", "apply"):
        result = fleet.cli(command, "--env", "test")
        assert result.exit_code == EXIT_DIRECTORY, result.output
        assert message in _error_line(result.stderr)


def test_a_catalog_listing_postgresql_and_mariadb_rows_is_one_mixed_fleet_migrated_by_one_apply(
    fleet: Fleet, mariadb: Any
) -> None:
    (pg,) = fleet.add_databases(1)
    maria = f"maria_{uuid.uuid4().hex[:10]}"
    mariadb.create_database(maria)
    try:
        (catalog,) = fleet.add_databases(1)
        fleet.query(
            catalog,
            "CREATE TABLE shards (shard_id TEXT, host TEXT, port INT, dbname TEXT, flavor TEXT, "
            '"user" TEXT, password TEXT)',
        )
        fleet.query(
            catalog,
            "INSERT INTO shards VALUES ('pg', %s, %s, %s, NULL, NULL, NULL), ('maria', %s, %s, %s, 'mariadb', %s, %s)",
            (fleet.postgres.host, fleet.postgres.port, pg, mariadb.host, mariadb.port, maria, mariadb.user,
             mariadb.password.reveal()),
        )  # fmt: skip
        fleet.publish(PORTABLE)
        _sql_env(fleet, catalog, 'SELECT shard_id, host, port, dbname, flavor, \\"user\\", password FROM shards')

        applied = fleet.cli("apply", "--env", "test", "--format", "json")

        assert applied.exit_code == EXIT_OK, applied.output
        assert {r["target"]: r["status"] for r in json.loads(applied.stdout)["results"]} == {
            "pg": "applied",
            "maria": "applied",
        }
        assert fleet.applied(pg) == ["001-person", "002-email"]
        with mariadb.admin() as admin, admin.cursor() as cursor:
            cursor.execute(f"SELECT migration_id FROM `{maria}`._yoyo_migration ORDER BY migration_id")
            assert [r[0] for r in cursor.fetchall()] == ["001-person", "002-email"]
        assert mariadb.password.reveal() not in applied.output
    finally:
        mariadb.drop_database(maria)


def test_pgcat_directory_migrates_primaries_never_replicas(fleet: Fleet) -> None:
    shard0, shard1, replica = fleet.add_databases(3)
    host, port = fleet.postgres.host, fleet.postgres.port
    (fleet.root / "pgcat.toml").write_text(
        textwrap.dedent(f"""\
        [general]
        host = "0.0.0.0"
        port = 6432

        [pools.sharded_db]
        pool_mode = "transaction"
        default_role = "any"

        [pools.sharded_db.users.0]
        username = "postgres"
        password = "{fleet.postgres.password.reveal()}"
        pool_size = 5

        [pools.sharded_db.shards.0]
        servers = [["{host}", {port}, "primary"], ["{host}", {port}, "replica"]]
        database = "{shard0}"

        [pools.sharded_db.shards.1]
        servers = [["{host}", {port}, "replica"], ["{host}", {port}, "primary"]]
        database = "{shard1}"
        """)
    )
    fleet.publish(MIGRATIONS)
    fleet.write_env(source=None)
    path = fleet.environments_dir / "test.toml"
    text = path.read_text()
    path.write_text(text[: text.index("[directory]")] + '[directory]\nkind = "pgcat"\nconfig = "../pgcat.toml"\n')

    listed = fleet.cli("shards", "--env", "test", "--format", "json")
    applied = fleet.cli("apply", "--env", "test")

    assert listed.exit_code == EXIT_OK, listed.output
    assert [(t["id"], t["database"]) for t in json.loads(listed.stdout)] == [
        ("sharded_db/shard-0", shard0),
        ("sharded_db/shard-1", shard1),
    ]
    assert applied.exit_code == EXIT_OK, applied.output
    assert len(fleet.applied(shard0)) == len(fleet.applied(shard1)) == 3
    assert fleet.tables(replica) == set()
    # A shard without a primary is refused.
    pgcat = (
        (fleet.root / "pgcat.toml")
        .read_text()
        .replace('"primary"]]\ndatabase = "' + shard1, '"replica"]]\ndatabase = "' + shard1)
    )
    (fleet.root / "pgcat.toml").write_text(pgcat)
    broken = fleet.cli("shards", "--env", "test")
    assert broken.exit_code == EXIT_DIRECTORY
    assert "pools.sharded_db.shards.1: expected exactly one primary server, found 0" in broken.stderr


def test_schema_per_tenant_discovery_applies_inside_each_schema(fleet: Fleet) -> None:
    (database,) = fleet.add_databases(1)
    for schema in ("tenant_a", "tenant_b", "Tenant-3", "internal"):
        fleet.query(database, f'CREATE SCHEMA "{schema}"')
    fleet.publish(MIGRATIONS)
    fleet.write_env(
        extra="[directory.schemas]\nquery = \"SELECT nspname FROM pg_namespace WHERE nspname ILIKE 'tenant%' ORDER BY 1\"\n"
    )
    text = (fleet.environments_dir / "test.toml").read_text()
    # [directory.schemas] must follow the [directory] table's keys, before [[directory.targets]].
    head, targets = text.split("[[directory.targets]]", 1)
    targets_block, schemas_block = targets.split("[directory.schemas]")
    (fleet.environments_dir / "test.toml").write_text(
        head + "[[directory.targets]]" + targets_block + "[directory.schemas]" + schemas_block
    )

    result = fleet.cli("apply", "--env", "test", "--format", "json")

    assert result.exit_code == EXIT_OK, result.output
    ids = sorted(r["target"] for r in json.loads(result.stdout)["results"])
    assert ids == sorted(f"{database}/{s}" for s in ("Tenant-3", "tenant_a", "tenant_b"))
    for schema in ("tenant_a", "tenant_b", "Tenant-3"):
        assert {"person", "_yoyo_migration"} <= fleet.tables(database, schema)
    assert fleet.tables(database, "internal") == set()


def test_bootstrap_creates_and_migrates_an_unlisted_shard_idempotently(fleet: Fleet) -> None:
    (listed,) = fleet.add_databases(1)
    fleet.services = ("people", "billing")
    fleet.publish(MIGRATIONS, service="people")
    fleet.publish(
        {"101-invoice.sql": "CREATE TABLE invoice (person_id INT REFERENCES person (id));"}, service="billing"
    )
    fleet.write_env()
    new_database = listed + "_new"
    fleet.databases.append(new_database)
    dsn = fleet.dsn(new_database)  # ${FANOUT_TEST_PG_PASSWORD} is resolved by fanout

    first = fleet.cli("bootstrap", "--env", "test", "--target", dsn, "--create-database", "--format", "json")
    second = fleet.cli("bootstrap", "--env", "test", "--target", dsn, "--create-database", "--format", "json")

    assert first.exit_code == EXIT_OK, first.output
    report = json.loads(first.stdout)
    assert [(r["service"], r["status"]) for r in report["bootstrap"]["results"]] == [
        ("people", "applied"),
        ("billing", "applied"),
    ]
    assert {r["status"] for r in report["status"]["results"]} == {"up-to-date"}
    assert fleet.applied(new_database) == ["001-create-person", "002-add-address", "003-create-order", "101-invoice"]
    assert second.exit_code == EXIT_OK
    assert json.loads(second.stdout)["bootstrap"]["totals"]["migrations_applied"] == 0
    assert fleet.applied(listed) == []  # only the named shard was touched
    assert fleet.postgres.password.reveal() not in first.output

    by_id = fleet.cli("bootstrap", "--env", "test", "--target", listed)
    assert by_id.exit_code == EXIT_OK, by_id.output
    assert len(fleet.applied(listed)) == 4
    unknown = fleet.cli("bootstrap", "--env", "test", "--target", "nope")
    assert unknown.exit_code == EXIT_CONFIG
    assert "no target 'nope'" in unknown.stderr
