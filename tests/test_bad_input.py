"""The catalogue of bad input: every row drives one mistake through the real CLI.

Each row names the command line, the environment file, the exit code and the words of
the message. Every row also checks what the guarantees promise: one line on stderr (or
the failure inside the report, for mistakes that only a shard can reveal), nothing
touched on the shard (no migration, no checksum), nothing written to S3 but run
records, and no secret in any output. A new bad input found in the field becomes one
new row.
"""

from __future__ import annotations

import json
import socket
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import MIGRATIONS, PASSWORD_VARIABLE, Fleet, unique

from fanout.embedded import EmbeddedPostgres, EmbeddedS3
from fanout.errors import EXIT_CONFIG, EXIT_DIRECTORY, EXIT_SOURCE, EXIT_TARGETS_FAILED

SECRET = "Sekr3t-Catal0gue"  # written into DSNs of the rows; must never be printed
BOOKKEEPING = {
    "_yoyo_migration",
    "_yoyo_log",
    "_yoyo_version",
    "yoyo_lock",
    "fanout_lock",
    "fanout_checksums",
    "fanout_checksum_log",
    "fanout_in_doubt",
}


@dataclass
class World:
    fleet: Fleet
    shard: str
    catalog: str
    limited_role: str
    web_page: str  # an HTTP endpoint that answers every request with a web page
    closed_port: int

    def source(self, *, bucket: str | None = None, endpoint: str | None = None, prefix: str = "migrations") -> str:
        return (
            f'[source]\nbucket = "{bucket or self.fleet.bucket}"\nprefix = "{prefix}"\nregion = "us-east-1"\n'
            f'endpoint_url = "{endpoint or self.fleet.s3.endpoint_url}"\n'
        )

    def dsn(self, *, password: str | None = None, user: str = "postgres", tail: str = "") -> str:
        return self.fleet.dsn(self.shard, user=user, password=password) + tail

    def write(self, text: str) -> None:
        self.fleet.environments_dir.mkdir(exist_ok=True)
        (self.fleet.environments_dir / "test.toml").write_text(textwrap.dedent(text))

    def static(self, dsn: str | None = None, *, extra: str = "", source: str | None = None) -> None:
        """One static target (the world's shard, or `dsn`)."""
        self.write(
            f'services = ["app"]\n{source or self.source()}\n{extra}\n'
            f'[directory]\nkind = "static"\n[[directory.targets]]\nid = "s1"\ndsn = {json.dumps(dsn or self.dsn())}\n'
        )

    def directory(self, body: str) -> None:
        self.write(f'services = ["app"]\n{self.source()}\n[directory]\n{body}\n')


class _WebPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><html><body>Welcome to nginx!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def world(postgres: EmbeddedPostgres, s3: EmbeddedS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    bucket = unique("bucket").replace("_", "-")
    s3.client().create_bucket(Bucket=bucket)
    fleet = Fleet(postgres=postgres, s3=s3, root=tmp_path_factory.mktemp("bad-input"), bucket=bucket)
    shard, catalog = fleet.add_databases(2)
    fleet.publish(MIGRATIONS)
    fleet.publish(
        {"001-a.sql": "-- depends: 002-b\nSELECT 1;", "002-b.sql": "-- depends: 001-a\nSELECT 1;"}, prefix="cycle"
    )
    fleet.publish({"001-a.sql": "-- depends: 000-nothing\nSELECT 1;"}, prefix="unknown-dependency")
    fleet.publish({"001-a.sql": "-- transactional: maybe\nSELECT 1;"}, prefix="bad-transactional")
    fleet.s3.client().put_object(Bucket=bucket, Key="not-utf8/app/test/001-a.sql", Body=b"SELECT '\xff\xfe';")
    fleet.query(catalog, "CREATE TABLE shards (shard_id text, host text, port int, dbname text, sslmode text)")
    fleet.query(
        catalog,
        "INSERT INTO shards VALUES ('bad-sslmode', %s, %s, %s, 'bogus')",
        (postgres.host, postgres.port, shard),
    )
    limited = unique("limited")
    fleet.query(shard, f"CREATE ROLE {limited} LOGIN PASSWORD '{SECRET}' CONNECTION LIMIT 0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WebPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    try:
        yield World(fleet, shard, catalog, limited, f"http://127.0.0.1:{server.server_port}", closed)
    finally:
        server.shutdown()
        fleet.query(shard, f"DROP ROLE {limited}")
        postgres.drop_databases(fleet.databases)


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    code: int
    message: str
    env: Callable[[World], None] = lambda w: w.static()
    in_report: bool = False  # only a shard can tell: the message is in the report on stdout


def _pgcat(world: World, text: str) -> None:
    path = world.fleet.root / "pgcat.toml"
    path.write_text(textwrap.dedent(text))
    world.directory(f'kind = "pgcat"\nconfig = "{path}"\n')


def _file(world: World, name: str, text: str) -> str:
    path = world.fleet.root / name
    path.write_text(text)
    return str(path)


APPLY = ("apply", "--env", "test")
PLAN = ("plan", "--env", "test")
HOST = "127.0.0.1"

CASES = [
    # ---- the command line -------------------------------------------------------------
    Case("unknown command", ("frobnicate",), EXIT_CONFIG, "No such command 'frobnicate'"),
    Case("missing --env", ("apply",), EXIT_CONFIG, "Missing option '--env'"),
    Case("concurrency zero", (*APPLY, "--concurrency", "0"), EXIT_CONFIG, "'--concurrency'"),
    Case("concurrency not a number", (*APPLY, "--concurrency", "many"), EXIT_CONFIG, "'many' is not a valid integer"),
    Case("per-server zero", (*APPLY, "--per-server", "0"), EXIT_CONFIG, "'--per-server'"),
    Case("unknown format", (*PLAN, "--format", "xml"), EXIT_CONFIG, "'xml' is not one of"),
    Case(
        "shards has no markdown",
        ("shards", "--env", "test", "--format", "markdown"),
        EXIT_CONFIG,
        "'markdown' is not one of 'text', 'json'",
    ),
    Case(
        "unlock has no junit",
        ("unlock", "--env", "test", "--format", "junit"),
        EXIT_CONFIG,
        "'junit' is not one of 'text', 'json'",
    ),
    Case(
        "accept has no html",
        ("accept", "--env", "test", "--migration", "001-create-person", "--reason", "r", "--format", "html"),
        EXIT_CONFIG,
        "'html' is not one of 'text', 'json'",
    ),
    Case(
        "baseline has no markdown",
        ("baseline", "--env", "test", "--format", "markdown"),
        EXIT_CONFIG,
        "'markdown' is not one of 'text', 'json'",
    ),
    Case(
        "mark has no markdown",
        ("mark", "--env", "test", "--migration", "001-create-person", "--reason", "r", "--format", "markdown"),
        EXIT_CONFIG,
        "'markdown' is not one of 'text', 'json'",
    ),
    Case(
        "unmark has no html",
        ("unmark", "--env", "test", "--migration", "001-create-person", "--reason", "r", "--format", "html"),
        EXIT_CONFIG,
        "'html' is not one of 'text', 'json'",
    ),
    Case(
        "--output into a file as if it were a folder",
        (*APPLY, "--output", "{file:notes.json}/report.json"),
        EXIT_CONFIG,
        "is not a folder",
    ),
    Case("--output onto a folder", (*APPLY, "--output", "/tmp"), EXIT_CONFIG, "/tmp is a folder, not a file"),
    Case("--report-to without a key", (*APPLY, "--report-to", "s3://bucket"), EXIT_CONFIG, "is not an s3://bucket/key"),
    Case("--report-to not in S3", (*APPLY, "--report-to", "reports/r.json"), EXIT_CONFIG, "is not an s3://bucket/key"),
    Case("slice beyond its count", (*PLAN, "--slice", "3/2"), EXIT_CONFIG, "K must be between 1 and N"),
    Case("slice of zero", (*PLAN, "--slice", "1/0"), EXIT_CONFIG, "N must be at least 1"),
    Case("slice not K/N", (*PLAN, "--slice", "half"), EXIT_CONFIG, "'half' is not K/N"),
    Case("waves that shrink", (*APPLY, "--waves", "50%,10%"), EXIT_CONFIG, "'10%' is not more than an earlier wave"),
    Case("waves repeated", (*APPLY, "--waves", "2,2"), EXIT_CONFIG, "'2' is not more than an earlier wave"),
    Case("waves zero", (*APPLY, "--waves", "0"), EXIT_CONFIG, "not a positive count or percentage"),
    Case("waves over 100%", (*APPLY, "--waves", "1,150%"), EXIT_CONFIG, "'150%' is more than 100%"),
    Case("max-failures not a number", (*APPLY, "--max-failures", "some"), EXIT_CONFIG, "--max-failures"),
    Case(
        "fail-fast with max-failures",
        (*APPLY, "--fail-fast", "--max-failures", "3"),
        EXIT_CONFIG,
        "--fail-fast is --max-failures 0: give one or the other",
    ),
    Case("lock-wait zero", (*APPLY, "--lock-wait", "0"), EXIT_CONFIG, "'--lock-wait'"),
    Case(
        "publish --force without reason", ("publish", "--env", "test", "--force"), EXIT_CONFIG, "--force needs --reason"
    ),
    Case(
        "accept without reason",
        ("accept", "--env", "test", "--migration", "001-create-person"),
        EXIT_CONFIG,
        "Missing option '--reason'",
    ),
    Case("resume a path", (*APPLY, "--resume", "../../etc/passwd"), EXIT_CONFIG, "is not a run id"),
    Case("resume an unknown run", (*APPLY, "--resume", "20990101T000000Z-000000"), EXIT_CONFIG, "no record of run"),
    Case(
        "resume with --service",
        (*APPLY, "--resume", "20990101T000000Z-000000", "--service", "app"),
        EXIT_CONFIG,
        "drop --service",
    ),
    Case("unknown log format", ("--log-format", "xml", *PLAN), EXIT_CONFIG, "'xml' is not one of 'text', 'json'"),
    Case("unknown service", (*PLAN, "--service", "billing"), EXIT_CONFIG, "billing"),
    Case("service given twice", (*APPLY, "--service", "app", "--service", "app"), EXIT_CONFIG, "'app' is given twice"),
    Case(
        "service given twice to rollback",
        ("rollback", "--env", "test", "--to", "001-create-person", "--service", "app", "--service", "app"),
        EXIT_CONFIG,
        "Invalid value for '--service': 'app' is given twice",
    ),
    Case(
        "bootstrap an unknown target id",
        ("bootstrap", "--env", "test", "--target", "nope"),
        EXIT_CONFIG,
        "no target 'nope'",
    ),
    Case(
        "accept on an unknown target",
        ("accept", "--env", "test", "--migration", "001-create-person", "--reason", "r", "--target", "nope"),
        EXIT_CONFIG,
        "no target 'nope'",
    ),
    Case("unlock an unknown target", ("unlock", "--env", "test", "--target", "nope"), EXIT_CONFIG, "no target 'nope'"),
    Case("merge a missing report", ("report", "merge", "/nonexistent/report.json"), EXIT_CONFIG, "cannot read"),
    Case("merge what is not a report", ("report", "merge", "{file:notes.json}"), EXIT_CONFIG, "is not a fanout report"),
    Case(
        "inspect in an unknown format",
        ("inspect", "--env", "test", "--format", "bogus"),
        EXIT_CONFIG,
        "'bogus' is not one of",
    ),
    # ---- the environment file ----------------------------------------------------------
    Case("unknown environment", ("plan", "--env", "nowhere"), EXIT_CONFIG, "unknown environment 'nowhere'"),
    Case("not TOML", PLAN, EXIT_CONFIG, "test.toml", env=lambda w: w.write("services = [\n")),
    Case(
        "unknown top-level key", PLAN, EXIT_CONFIG, "servces", env=lambda w: w.write(f'servces = ["app"]\n{w.source()}')
    ),
    Case(
        "missing variable",
        PLAN,
        EXIT_CONFIG,
        "FANOUT_NOT_SET_ANYWHERE is not set",
        env=lambda w: w.static(w.dsn(password="${FANOUT_NOT_SET_ANYWHERE}")),
    ),
    Case("unknown directory kind", PLAN, EXIT_CONFIG, "directory", env=lambda w: w.directory('kind = "consul"')),
    Case(
        "duplicate target id",
        PLAN,
        EXIT_CONFIG,
        "target id 's1' is listed twice",
        env=lambda w: w.directory(
            f'kind = "static"\n[[directory.targets]]\nid = "s1"\ndsn = "{w.dsn()}"\n'
            f'[[directory.targets]]\nid = "s1"\ndsn = "{w.dsn()}"\n'
        ),
    ),
    Case(
        "runner concurrency zero",
        PLAN,
        EXIT_CONFIG,
        "concurrency",
        env=lambda w: w.static(extra="[runner]\nconcurrency = 0\n"),
    ),
    Case(
        "runner waves that shrink",
        APPLY,
        EXIT_CONFIG,
        "not more than an earlier wave",
        env=lambda w: w.static(extra='[runner]\nwaves = "50%,10%"\n'),
    ),
    Case(
        "runner max_failures not a number",
        APPLY,
        EXIT_CONFIG,
        "[runner] max_failures",
        env=lambda w: w.static(extra='[runner]\nmax_failures = "lots"\n'),
    ),
    Case(
        "runner unknown key",
        PLAN,
        EXIT_CONFIG,
        "concurency",
        env=lambda w: w.static(extra="[runner]\nconcurency = 4\n"),
    ),
    Case(
        "no services",
        PLAN,
        EXIT_CONFIG,
        "services",
        env=lambda w: w.write(
            f'services = []\n{w.source()}\n[directory]\nkind = "static"\n'
            f'[[directory.targets]]\nid = "s1"\ndsn = "{w.dsn()}"\n'
        ),
    ),
    # ---- DSNs: refused before anything runs, the password masked -----------------------
    Case(
        "DSN of another database engine",
        PLAN,
        EXIT_CONFIG,
        "DSN must start with postgresql:// or mysql:// or mariadb:// (got oracle scheme)",
        env=lambda w: w.static(f"oracle://u:{SECRET}@{HOST}/db"),  # mysql:// is a MySQL target now
    ),
    Case(
        "DSN without a database",
        PLAN,
        EXIT_CONFIG,
        "must name a host and a database",
        env=lambda w: w.static(f"postgresql://u:{SECRET}@{HOST}:5432"),
    ),
    Case(
        "DSN password with an unencoded slash",
        PLAN,
        EXIT_CONFIG,
        "must be percent-encoded",
        env=lambda w: w.static(w.dsn(password=f"ab/{SECRET}")),
    ),
    Case(
        "DSN password with an unencoded question mark",
        PLAN,
        EXIT_CONFIG,
        "must be percent-encoded",
        env=lambda w: w.static(w.dsn(password=f"ab?{SECRET}")),
    ),
    Case(
        "DSN password with an unencoded hash",
        PLAN,
        EXIT_CONFIG,
        "must be percent-encoded",
        env=lambda w: w.static(w.dsn(password=f"ab#{SECRET}")),
    ),
    Case(
        "DSN password with a stray percent",
        PLAN,
        EXIT_CONFIG,
        "does not start a %XX escape",
        env=lambda w: w.static(w.dsn(password=f"ab%zz{SECRET}")),
    ),
    Case(
        "DSN password escape that is not UTF-8",
        PLAN,
        EXIT_CONFIG,
        "not UTF-8",
        env=lambda w: w.static(w.dsn(password=f"ab%ff{SECRET}")),
    ),
    Case(
        "DSN with a malformed IPv6 host",
        PLAN,
        EXIT_CONFIG,
        "malformed host",
        env=lambda w: w.static(f"postgresql://u:{SECRET}@[::1/db"),
    ),
    Case(
        "DSN with an invalid IPv6 address",
        PLAN,
        EXIT_CONFIG,
        "malformed",
        env=lambda w: w.static(f"postgresql://u:{SECRET}@[fe80::zz]/db"),
    ),
    Case(
        "DSN port out of range",
        PLAN,
        EXIT_CONFIG,
        "invalid port",
        env=lambda w: w.static(f"postgresql://u:{SECRET}@{HOST}:70000/db"),
    ),
    Case(
        "DSN bad sslmode",
        PLAN,
        EXIT_CONFIG,
        "sslmode 'bogus' is not one of",
        env=lambda w: w.static(w.dsn(password=SECRET, tail="?sslmode=bogus")),
    ),
    Case(
        "DSN unknown option",
        PLAN,
        EXIT_CONFIG,
        "unknown connection option 'sslmdoe'",
        env=lambda w: w.static(w.dsn(password=SECRET, tail="?sslmdoe=require")),
    ),
    Case(
        "DSN password as an option",
        PLAN,
        EXIT_CONFIG,
        "put the password in the DSN's user:password@ part",
        env=lambda w: w.static(f"postgresql://u@{HOST}/db?password={SECRET}"),
    ),
    Case(
        "bootstrap DSN with an unencoded slash",
        ("bootstrap", "--env", "test", "--target", f"postgresql://postgres:ab/{SECRET}@{HOST}:5432/newshard"),
        EXIT_CONFIG,
        "must be percent-encoded",
    ),
    Case(
        "bootstrap DSN with an unset variable",
        ("bootstrap", "--env", "test", "--target", "postgresql://postgres:${FANOUT_NOT_SET_ANYWHERE}@h/db"),
        EXIT_CONFIG,
        "FANOUT_NOT_SET_ANYWHERE is not set",
    ),
    Case(
        "sql directory DSN with a stray percent",
        ("shards", "--env", "test"),
        EXIT_CONFIG,
        "does not start a %XX escape",
        env=lambda w: w.directory(
            f'kind = "sql"\nquery = "SELECT 1"\ndsn = "postgresql://reader:ab%zz{SECRET}@{HOST}:5432/c"\n'
        ),
    ),
    # ---- the migration source ------------------------------------------------------------
    Case(
        "depends cycle",
        APPLY,
        EXIT_SOURCE,
        "'-- depends:' lines form a cycle",
        env=lambda w: w.static(source=w.source(prefix="cycle")),
    ),
    Case(
        "depends on an unknown migration",
        APPLY,
        EXIT_SOURCE,
        "'-- depends: 000-nothing': no such migration",
        env=lambda w: w.static(source=w.source(prefix="unknown-dependency")),
    ),
    Case(
        "transactional directive that is neither true nor false",
        APPLY,
        EXIT_SOURCE,
        "transactional",
        env=lambda w: w.static(source=w.source(prefix="bad-transactional")),
    ),
    Case(
        "migration not UTF-8",
        APPLY,
        EXIT_SOURCE,
        "not UTF-8",
        env=lambda w: w.static(source=w.source(prefix="not-utf8")),
    ),
    Case(
        "no migrations for the service",
        PLAN,
        EXIT_SOURCE,
        "no migrations for service 'app'",
        env=lambda w: w.static(source=w.source(prefix="empty")),
    ),
    Case(
        "bucket that does not exist",
        PLAN,
        EXIT_SOURCE,
        "does not exist",
        env=lambda w: w.static(source=w.source(bucket="no-such-bucket-anywhere")),
    ),
    Case(
        "S3 endpoint that serves a web page",
        PLAN,
        EXIT_SOURCE,
        "did not answer like S3",
        env=lambda w: w.static(source=w.source(endpoint=w.web_page)),
    ),
    Case(
        "S3 endpoint that is closed",
        PLAN,
        EXIT_SOURCE,
        "cannot reach the S3 endpoint",
        env=lambda w: w.static(source=w.source(endpoint=f"http://{HOST}:{w.closed_port}")),
    ),
    Case(
        "publish to a folder source",
        ("publish", "--env", "test"),
        EXIT_CONFIG,
        "nothing to publish to",
        env=lambda w: w.static(source=f'[source]\nfolder = "{w.fleet.root}"\n'),
    ),
    # ---- the shard directory ---------------------------------------------------------------
    Case(
        "http directory that is closed",
        ("shards", "--env", "test"),
        EXIT_DIRECTORY,
        "sharding service unreachable",
        env=lambda w: w.directory(f'kind = "http"\nendpoint = "http://{HOST}:{w.closed_port}"\nretries = 0\n'),
    ),
    Case(
        "http directory that serves a web page",
        ("shards", "--env", "test"),
        EXIT_DIRECTORY,
        "malformed JSON",
        env=lambda w: w.directory(f'kind = "http"\nendpoint = "{w.web_page}"\nretries = 0\n'),
    ),
    Case(
        "pgcat file missing",
        ("shards", "--env", "test"),
        EXIT_DIRECTORY,
        "cannot read the PgCat configuration",
        env=lambda w: w.directory('kind = "pgcat"\nconfig = "/nonexistent/pgcat.toml"\n'),
    ),
    Case(
        "pgcat shard without a primary",
        ("shards", "--env", "test"),
        EXIT_DIRECTORY,
        "expected exactly one primary server, found 0",
        env=lambda w: _pgcat(
            w,
            f"""\
             [pools.app.users.0]
             username = "postgres"
             password = "{SECRET}"
             [pools.app.shards.0]
             database = "d"
             servers = [["{HOST}", 5432, "replica"]]
             """,
        ),
    ),
    Case(
        "sql directory query without a port",
        ("shards", "--env", "test"),
        EXIT_DIRECTORY,
        "missing column or value: port",
        env=lambda w: w.directory(
            f'kind = "sql"\ndsn = "{w.fleet.dsn(w.catalog)}"\n'
            'query = "SELECT shard_id, host, NULL AS port, dbname FROM shards"\n'
        ),
    ),
    Case(
        "sql directory query that fails",
        ("shards", "--env", "test"),
        EXIT_DIRECTORY,
        "the catalog query failed",
        env=lambda w: w.directory(f'kind = "sql"\ndsn = "{w.fleet.dsn(w.catalog)}"\nquery = "SELECT * FROM nope"\n'),
    ),
    # ---- what only a shard can tell: a failed target in the report, never retried ---------
    Case(
        "accept a misspelt migration id",
        ("accept", "--env", "test", "--migration", "001-create-persn", "--reason", "r"),
        EXIT_TARGETS_FAILED,
        "no migration '001-create-persn' in the published set",
        in_report=True,
    ),
    Case(
        "no password",
        (*APPLY, "--format", "json"),
        EXIT_TARGETS_FAILED,
        '"kind": "authentication"',
        env=lambda w: w.static(f"postgresql://postgres@{w.fleet.postgres.host}:{w.fleet.postgres.port}/{w.shard}"),
        in_report=True,
    ),
    Case(
        "role connection limit reached",
        (*APPLY, "--format", "json"),
        EXIT_TARGETS_FAILED,
        '"kind": "connection-limit"',
        env=lambda w: w.static(w.dsn(user=w.limited_role, password=SECRET)),
        in_report=True,
    ),
    Case(
        "bad sslmode from a catalog row",
        (*APPLY, "--format", "json"),
        EXIT_TARGETS_FAILED,
        '"kind": "configuration"',
        env=lambda w: w.directory(
            f'kind = "sql"\ndsn = "{w.fleet.dsn(w.catalog)}"\n'
            'query = "SELECT * FROM shards"\nuser = "postgres"\n'
            f'password = "${{{PASSWORD_VARIABLE}}}"\n'
        ),
        in_report=True,
    ),
]


def _objects(fleet: Fleet) -> set[str]:
    listing = fleet.s3.client().list_objects_v2(Bucket=fleet.bucket)
    return {o["Key"] for o in listing.get("Contents", [])}


def _secrets(fleet: Fleet) -> list[str]:
    return [SECRET, fleet.postgres.password.reveal()]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_named_in_one_line_with_its_exit_code_and_touches_nothing(world: World, case: Case) -> None:
    fleet = world.fleet
    case.env(world)
    args = [a.replace("{file:notes.json}", _file(world, "notes.json", '{"notes": 1}')) for a in case.args]
    before = _objects(fleet)

    result = fleet.cli(*args)

    assert result.exit_code == case.code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.in_report:
        assert case.message in result.stdout, result.output
        if '"kind"' in case.message:
            assert all(not r["retries"] for r in json.loads(result.stdout)["results"])  # a mistake is not retried
    else:
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("fanout: error: ") and case.message in lines[0], lines[0]
    tables = fleet.tables(world.shard)
    assert tables <= BOOKKEEPING, tables  # no migration ran
    assert fleet.applied(world.shard) == []
    if "fanout_checksums" in tables:
        assert fleet.query(world.shard, "SELECT count(*) FROM fanout_checksums") == [(0,)]
    assert {k for k in _objects(fleet) - before if "/_runs/" not in k} == set()  # nothing but run records
    for secret in _secrets(fleet):
        assert secret not in result.output


@pytest.mark.parametrize("case", [c for c in CASES if not c.in_report][::6], ids=lambda c: c.name)
def test_with_log_format_json_every_bad_input_is_one_json_error_event(world: World, case: Case) -> None:
    case.env(world)
    args = [a.replace("{file:notes.json}", _file(world, "notes.json", '{"notes": 1}')) for a in case.args]
    if args[0] == "--log-format":
        pytest.skip("this row is about --log-format itself")

    result = world.fleet.cli("--log-format", "json", *args)

    assert result.exit_code == case.code
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    event = json.loads(line)
    assert event["event"] == "error" and event["exit_code"] == case.code
    assert case.message in event["message"]


def test_the_catalogue_covers_sixty_kinds_of_bad_input() -> None:
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
