"""Property: whatever a credential looks like, and wherever it enters, it never comes out.

Hypothesis draws users and passwords made of the characters that break DSNs (`% / @ : ?
# =`), non-ASCII letters and ordinary ones, writes them percent-encoded or raw, and feeds
them through every entry point that takes a DSN or a credential: a static target, the
`sql` directory's `dsn`, the `http` directory's answers, a PgCat file, `bootstrap
--target`, and a `mysql://` target (static, `http` flavor `mariadb`, bootstrap, unlock). Each example runs the real CLI (`-vv`, every report format, `--output` files,
run records locally and in S3) and scans all of it for any piece of the password.
"""

from __future__ import annotations

import json
import re
import shutil
import string
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import MIGRATIONS, Fleet
from hypothesis import HealthCheck, given, settings, strategies as st
from sharding_service import ShardingService

SPECIALS = "%/@:?#="
NON_ASCII = "éüß€中ñø"
PLAIN = string.ascii_letters + string.digits + "-_.~"
EXAMPLES = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,  # the same shapes on every run; a new failing shape becomes a row of test_secrets.py
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# A password is a marker (so that a hit cannot be a coincidence) wrapped in the awkward characters.
awkward = st.text(alphabet=SPECIALS + NON_ASCII + PLAIN, min_size=0, max_size=6)
marker = st.text(alphabet=string.ascii_letters + string.digits, min_size=6, max_size=10).map(lambda s: "Zq" + s)
passwords = st.tuples(awkward, marker, awkward, st.sampled_from(SPECIALS)).map(lambda p: p[0] + p[3] + p[1] + p[2])
users = st.tuples(st.text(alphabet=PLAIN, min_size=1, max_size=5), awkward).map("".join)
encodings = st.sampled_from(["encoded", "raw"])


def _pieces(password: str) -> list[str]:
    """What must never be printed: the password in both spellings, and every long run between awkward
    characters that holds the marker (a run without it may be a word any report prints: Hypothesis
    draws text from the source's string constants, and drew "reason", which "stop_reason" holds)."""
    runs = [r for r in re.split(f"[{re.escape(SPECIALS)}]", password) if len(r) >= 6 and "Zq" in r]
    return [password, quote(password, safe=""), *runs]


def _dsn(user: str, password: str, host: str, port: int, database: str, encoding: str) -> str:
    if encoding == "encoded":
        user, password = quote(user, safe=""), quote(password, safe="")
    return f"postgresql://{user}:{password}@{host}:{port}/{database}"


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string (ASCII, \u escapes) is a TOML basic string


@pytest.fixture
def world(fleet: Fleet) -> Iterator[Fleet]:
    fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    yield fleet


def _source(fleet: Fleet) -> str:
    return (
        f'services = ["app"]\n[source]\nbucket = "{fleet.bucket}"\nprefix = "migrations"\n'
        f'region = "us-east-1"\nendpoint_url = "{fleet.s3.endpoint_url}"\n'
    )


def _write(fleet: Fleet, text: str) -> None:
    fleet.environments_dir.mkdir(exist_ok=True)
    (fleet.environments_dir / "test.toml").write_text(_source(fleet) + textwrap.dedent(text))


def _everything(fleet: Fleet, runs_dir: Path, commands: list[list[str]]) -> str:
    """Run each command line, and gather stdout, stderr, --output files and run records (local and S3)."""
    outputs = fleet.root / "outputs"
    shutil.rmtree(outputs, ignore_errors=True)
    shutil.rmtree(runs_dir, ignore_errors=True)
    texts = []
    for command in commands:
        result = fleet.cli("-vv", *command)
        assert result.exit_code in (0, 2, 4, 5), result.output  # never an internal error
        texts += [result.stdout, result.stderr]
    files = [*outputs.glob("*"), *runs_dir.rglob("*.json")]
    texts += [f.read_text() for f in files]
    client = fleet.s3.client()
    for obj in client.list_objects_v2(Bucket=fleet.bucket, Prefix="migrations/_runs/").get("Contents", []):
        texts.append(client.get_object(Bucket=fleet.bucket, Key=obj["Key"])["Body"].read().decode())
        client.delete_object(Bucket=fleet.bucket, Key=obj["Key"])
    return "\n".join(texts)


def _run_commands(fleet: Fleet) -> list[list[str]]:
    out = fleet.root / "outputs"
    env = ["--env", "test"]
    return [
        ["shards", *env, "--format", "json"],
        ["plan", *env, "--format", "html"],
        ["--log-format", "json", "apply", *env, "--format", "json", "--output", f"{out}/r.md",
         "--output", f"{out}/r.xml", "--output", f"{out}/r.html", "--output", f"{out}/r.txt"],
    ]  # fmt: skip


def _assert_never_printed(password: str, text: str) -> None:
    for piece in _pieces(password):
        assert piece not in text, f"{piece!r} of the password {password!r} was printed"


EntryPoint = Callable[[Fleet, str, str, str], list[list[str]]]


def _static(fleet: Fleet, user: str, password: str, encoding: str) -> list[list[str]]:
    shard = fleet.databases[0]
    dsn = _dsn(user, password, fleet.postgres.host, fleet.postgres.port, shard, encoding)
    _write(fleet, f'[directory]\nkind = "static"\n[[directory.targets]]\nid = "s1"\ndsn = {_toml(dsn)}\n')
    return _run_commands(fleet)


def _sql(fleet: Fleet, user: str, password: str, encoding: str) -> list[list[str]]:
    catalog = fleet.databases[1]
    dsn = _dsn(user, password, fleet.postgres.host, fleet.postgres.port, catalog, encoding)
    _write(fleet, f'[directory]\nkind = "sql"\ndsn = {_toml(dsn)}\nquery = "SELECT 1 AS shard_id"\n')
    return [["shards", "--env", "test"], ["plan", "--env", "test", "--format", "json"]]


def _pgcat(fleet: Fleet, user: str, password: str, _encoding: str) -> list[list[str]]:
    path = fleet.root / "pgcat.toml"
    path.write_text(
        f"[pools.app.users.0]\nusername = {_toml(user)}\npassword = {_toml(password)}\n"
        f'[pools.app.shards.0]\ndatabase = "{fleet.databases[0]}"\n'
        f'servers = [["{fleet.postgres.host}", {fleet.postgres.port}, "primary"]]\n'
    )
    _write(fleet, f'[directory]\nkind = "pgcat"\nconfig = "{path}"\n')
    return _run_commands(fleet)


def _bootstrap(fleet: Fleet, user: str, password: str, encoding: str) -> list[list[str]]:
    shard = fleet.databases[0]
    dsn = _dsn(user, password, fleet.postgres.host, fleet.postgres.port, shard, encoding)
    _write(fleet, f'[directory]\nkind = "static"\n[[directory.targets]]\nid = "s1"\ndsn = "{fleet.dsn(shard)}"\n')
    return [["bootstrap", "--env", "test", "--target", dsn, "--format", fmt] for fmt in ("text", "json", "markdown")]


@pytest.mark.parametrize("entry", [_static, _sql, _pgcat, _bootstrap], ids=["static", "sql", "pgcat", "bootstrap"])
@EXAMPLES
@given(user=users, password=passwords, encoding=encodings)
def test_no_piece_of_a_password_is_ever_printed(
    world: Fleet, runs_dir: Path, entry: EntryPoint, user: str, password: str, encoding: str
) -> None:
    commands = entry(world, user, password, encoding)
    _assert_never_printed(password, _everything(world, runs_dir, commands))


@EXAMPLES
@given(user=users, password=passwords)
def test_no_piece_of_a_password_from_the_sharding_service_is_ever_printed(
    world: Fleet, runs_dir: Path, user: str, password: str
) -> None:
    with ShardingService() as sharding:
        sharding.state.pages = [["acme", "globex"]]
        for tenant in ("acme", "globex"):
            sharding.state.databases[tenant] = {
                "host": world.postgres.host, "port": world.postgres.port, "flavor": "postgres", "user": user,
                "password": password, "database": world.databases[0] if tenant == "acme" else world.databases[1],
            }  # fmt: skip
        _write(world, f'[directory]\nkind = "http"\nendpoint = "{sharding.url}"\nretries = 0\n')
        _assert_never_printed(password, _everything(world, runs_dir, _run_commands(world)))


@pytest.fixture
def maria_shard(mariadb: Any) -> Iterator[tuple[Any, str]]:
    name = f"secrets_{uuid.uuid4().hex[:10]}"
    mariadb.create_database(name)
    yield mariadb, name
    mariadb.drop_database(name)


@EXAMPLES
@given(user=users, password=passwords, encoding=encodings)
def test_no_piece_of_a_mysql_password_is_ever_printed(
    world: Fleet, runs_dir: Path, maria_shard: tuple[Any, str], user: str, password: str, encoding: str
) -> None:
    mariadb, shard = maria_shard
    dsn = "mysql" + _dsn(user, password, mariadb.host, mariadb.port, shard, encoding).removeprefix("postgresql")
    _write(world, f'[directory]\nkind = "static"\n[[directory.targets]]\nid = "m1"\ndsn = {_toml(dsn)}\n')
    commands = [*_run_commands(world), ["bootstrap", "--env", "test", "--target", dsn, "--create-database"]]
    commands.append(["unlock", "--env", "test", "--force", "--format", "json"])
    _assert_never_printed(password, _everything(world, runs_dir, commands))
    with ShardingService() as sharding:
        sharding.state.pages = [["acme"]]
        sharding.state.databases["acme"] = {
            "host": mariadb.host, "port": mariadb.port, "flavor": "mariadb", "user": user, "password": password,
            "database": shard,
        }  # fmt: skip
        _write(world, f'[directory]\nkind = "http"\nendpoint = "{sharding.url}"\nretries = 0\n')
        _assert_never_printed(password, _everything(world, runs_dir, _run_commands(world)))
