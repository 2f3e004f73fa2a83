"""Benchmark: fanout against the sequential yoyo loop a team writes by hand, and against the floor.

    python bench/fleet.py            # the full table, about 10 minutes on 2 cores
    python bench/fleet.py --smoke    # N = 5, seconds; run by the test suite so it cannot rot

Starts its own PostgreSQL (the embedded one) and S3 endpoint, builds identical fresh fleets of
N shard databases, publishes M realistic migrations, and measures in one run:
- baseline: for each database, get_backend(dsn); with backend.lock():
  backend.apply_migrations(backend.to_apply(migrations)), migrations read once, in-process;
- floor: the same SQL, each migration in its own transaction, with `psql -f` per database,
  in parallel at fanout's concurrency, no bookkeeping at all;
- fanout apply, the real CLI in a subprocess (interpreter start and imports included), at its
  default concurrency and at a tuned one;
- fanout's no-op plan over the migrated fleet, against opening and closing one connection per
  database (a plan cannot do less);
- fanout inspect over the same migrated fleet (every shard's live schema read, fingerprinted,
  grouped), against the same floor and against that no-op plan;
- the apply comparison again through a TCP proxy that adds about 2 ms of round trip
  (bench/latency_proxy.py, a process of its own; its measured RTT is printed);
- schema per tenant: one database holding N tenant schemas that fanout finds with
  `[directory.schemas] pattern`, 5 small migrations, concurrency 16: fanout apply and no-op
  plan against the sequential loop a team writes, yoyo's `get_backend(dsn?schema=...)` per
  schema (`--schemas N...`; each N builds two databases of N schemas, one per runner).
Columns: wall time, speed-up against the baseline, time against the floor, S3 LIST/GET
requests seen by the S3 server, the runner's own peak RSS (GNU time, bench/measured.py) and
CPU time (os.wait4 on the fanout process), and connections opened (pg_stat_database.sessions).
"""

from __future__ import annotations

import argparse
import base64
import compileall
import hashlib
import hmac
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
from measured import Measure, run_measured
from yoyo import get_backend, read_migrations

import fanout
from fanout.embedded import EmbeddedPostgres, EmbeddedS3

DEFAULT_CONCURRENCY = 8  # fanout's own default when the environment sets none
PROXY_ONE_WAY_MS = 0.85  # plus the proxy's own hop, about 2 ms per round trip (measured and printed)
HERE = Path(__file__).resolve().parent


TENANT_MIGRATIONS = {
    "001-account.sql": "CREATE TABLE account (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL);",
    "002-email.sql": "-- depends: 001-account\nALTER TABLE account ADD COLUMN email TEXT;",
    "003-email-index.sql": "-- depends: 002-email\nCREATE INDEX account_email ON account (email);",
    "004-invoice.sql": (
        "-- depends: 003-email-index\n"
        "CREATE TABLE invoice (id BIGSERIAL PRIMARY KEY, account_id BIGINT REFERENCES account (id));"
    ),
    "005-first-account.sql": "-- depends: 004-invoice\nINSERT INTO account (name) VALUES ('first');",
}
SCHEMA_CONCURRENCY = 16


def migration_set(count: int) -> dict[str, str]:
    """M migrations of the kinds real services ship: tables, columns, indexes, a backfill."""
    files = {"001-create-account.sql": "CREATE TABLE account (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL);"}
    files["002-backfill-accounts.sql"] = (
        "-- depends: 001-create-account\n"
        "INSERT INTO account (name) SELECT 'account-' || g FROM generate_series(1, 5000) AS g;"
    )
    previous = "002-backfill-accounts"
    for number in range(3, count + 1):
        name = f"{number:03d}-step"
        kind = number % 3
        if kind == 0:
            body = (
                f"CREATE TABLE t{number} (id BIGSERIAL PRIMARY KEY, account_id BIGINT REFERENCES account (id), v TEXT);"
            )
        elif kind == 1:
            body = f"ALTER TABLE account ADD COLUMN c{number} TEXT;"
        else:
            body = f"CREATE INDEX i{number} ON account (name, id);"
        files[f"{name}.sql"] = f"-- depends: {previous}\n{body}"
        previous = name
    return files


@dataclass(frozen=True)
class Endpoint:
    """Where the runners reach the server: directly, or through the latency proxy."""

    host: str
    port: int

    def dsn(self, postgres: EmbeddedPostgres, database: str) -> str:
        direct = postgres.dsn(database)
        return direct.replace(f"@{postgres.host}:{postgres.port}/", f"@{self.host}:{self.port}/")


@dataclass
class Row:
    case: str
    runner: str
    measure: Measure
    speedup: str = "-"
    vs_floor: str = "-"
    s3_list: str = "-"
    s3_get: str = "-"
    connections: str = "-"

    def cells(self) -> list[str]:
        m = self.measure
        rss = "-" if m.rss_mb is None else f"{m.rss_mb:.0f}"
        cpu = "-" if m.cpu is None else f"{m.cpu:.2f}"
        return [self.case, self.runner, f"{m.wall:.2f}", self.speedup, self.vs_floor, self.s3_list, self.s3_get, rss,
                cpu, self.connections]  # fmt: skip


def timed(action: Callable[[], object]) -> Measure:
    started = time.perf_counter()
    action()
    return Measure(time.perf_counter() - started)


def connections(postgres: EmbeddedPostgres, databases: list[str]) -> int:
    with postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(sum(sessions), 0) FROM pg_stat_database WHERE datname = ANY(%s)", (databases,))
        return int(cursor.fetchone()[0])


def baseline(postgres: EmbeddedPostgres, endpoint: Endpoint, databases: list[str], folder: Path) -> None:
    migrations = read_migrations(str(folder))
    for database in databases:
        backend = get_backend(endpoint.dsn(postgres, database))
        with backend.lock():
            backend.apply_migrations(backend.to_apply(migrations))
        backend.connection.close()


def yoyo_schema_loop(postgres: EmbeddedPostgres, database: str, schemas: list[str], folder: Path) -> None:
    """What a team writes for schema per tenant: yoyo, one backend per schema, one after another."""
    migrations = read_migrations(str(folder))
    for schema in schemas:
        backend = get_backend(f"{postgres.dsn(database)}?schema={schema}")
        with backend.lock():
            backend.apply_migrations(backend.to_apply(migrations))
        backend.connection.close()


def on_each_schema(
    postgres: EmbeddedPostgres,
    database: str,
    schemas: list[str],
    concurrency: int,
    messages: Callable[[str], list[str]],
) -> None:
    """Send each schema's `messages` on one of `concurrency` connections to the database, schemas taken in turn."""
    pending = iter(schemas)
    taking = threading.Lock()

    def worker() -> None:
        with postgres.connect(database) as connection, connection.cursor() as cursor:
            connection.autocommit = True
            while True:
                with taking:
                    schema = next(pending, None)
                if schema is None:
                    return
                for message in messages(schema):
                    cursor.execute(message)
                    if cursor.description is not None:
                        cursor.fetchall()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def schema_floor(postgres: EmbeddedPostgres, database: str, schemas: list[str], concurrency: int) -> None:
    """The tenant migrations' SQL alone: per schema, one transaction per migration, no lock, nothing recorded."""
    bodies = [f"BEGIN;\n{body}\nCOMMIT" for body in TENANT_MIGRATIONS.values()]
    on_each_schema(postgres, database, schemas, concurrency, lambda s: [f'SET search_path TO "{s}"', *bodies])


def schema_read_floor(postgres: EmbeddedPostgres, database: str, schemas: list[str], concurrency: int) -> None:
    """What a no-op pass cannot do without: read each schema's applied migrations (one query, one table)."""
    on_each_schema(
        postgres, database, schemas, concurrency, lambda s: [f'SELECT "migration_hash" FROM "{s}"."_yoyo_migration"']
    )


def tenant_schemas(postgres: EmbeddedPostgres, database: str, n: int) -> list[str]:
    names = [f"tenant_{i:05d}" for i in range(n)]
    postgres.create_databases([database])
    with postgres.connect(database) as connection, connection.cursor() as cursor:
        connection.autocommit = True
        for start in range(0, n, 500):
            cursor.execute(";".join(f"CREATE SCHEMA {name}" for name in names[start : start + 500]))
    return names


def psql_floor(
    postgres: EmbeddedPostgres, endpoint: Endpoint, databases: list[str], script: Path, concurrency: int
) -> None:
    assert postgres.bin_dir is not None
    psql = str(postgres.bin_dir / "psql")
    # The password goes through the environment, never argv (visible in ps).
    env = {
        **os.environ,
        "PGHOST": endpoint.host,
        "PGPORT": str(endpoint.port),
        "PGUSER": postgres.user,
        "PGPASSWORD": postgres.password.reveal(),
    }

    def one(database: str) -> None:
        subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script), "-d", database],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, databases))


def connect_only(postgres: EmbeddedPostgres, databases: list[str], concurrency: int) -> None:
    def one(database: str) -> None:
        psycopg2.connect(**postgres.connect_kwargs(database)).close()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, databases))


def server_cpu(postgres: EmbeddedPostgres) -> float:
    """CPU seconds of the server's processes that have exited (its backends, once their connection
    closes): what a run cost the server, whatever else loads the machine. Linux only."""
    pid = (postgres.log_path.parent / "data" / "postmaster.pid").read_text().split()[0]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def scram_keys(postgres: EmbeddedPostgres) -> dict[str, str] | None:
    """The role's SCRAM-SHA-256 client and server keys, derived once (libpq 18's `scram_client_key`/
    `scram_server_key`), or None without psycopg 3.3+ on libpq 18+ (not a dependency: measured when present).

    The salt and iteration count come from the role's verifier in pg_authid (the benchmark owns the
    server); a client in production would learn them from one ordinary SCRAM exchange per role and server.
    """
    try:
        import psycopg
    except ImportError:
        return None
    if psycopg.pq.version() < 180000:
        return None
    with postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT rolpassword FROM pg_authid WHERE rolname = current_user")
        verifier = cursor.fetchone()[0]  # SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
    _, parameters, keys = verifier.split("$")
    iterations, salt = parameters.split(":")
    server_key = keys.split(":")[1]
    salted = hashlib.pbkdf2_hmac("sha256", postgres.password.reveal().encode(), base64.b64decode(salt), int(iterations))
    client_key = base64.b64encode(hmac.new(salted, b"Client Key", "sha256").digest()).decode()
    return {"scram_client_key": client_key, "scram_server_key": server_key}


def connect_only_with_keys(
    postgres: EmbeddedPostgres, databases: list[str], concurrency: int, keys: dict[str, str]
) -> None:
    """The connect+close floor through psycopg 3 / libpq 18, with SCRAM keys derived once instead of per connection."""
    import psycopg

    def one(database: str) -> None:
        kwargs = {k: v for k, v in postgres.connect_kwargs(database).items() if k != "password"}
        psycopg.connect(**kwargs, **keys).close()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, databases))


def fanout_cli(arguments: list[str], expect: int = 0) -> Measure:
    """Run the fanout CLI as a user would and measure that process alone."""
    return run_measured([sys.executable, "-m", "fanout", *arguments], expect=expect)


def write_environment(
    root: Path, postgres: EmbeddedPostgres, s3: EmbeddedS3, endpoint: Endpoint, databases: list[str], name: str
) -> Path:
    lines = ['services = ["bench"]', "[source]", 'bucket = "bench"', 'prefix = "m"']
    lines += [f'endpoint_url = "{s3.endpoint_url}"', "[directory]", 'kind = "static"']
    for database in databases:
        lines += ["[[directory.targets]]", f'id = "{database}"', f'dsn = "{endpoint.dsn(postgres, database)}"']
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def latency_proxy(postgres: EmbeddedPostgres) -> Iterator[Endpoint]:
    command = [sys.executable, str(HERE / "latency_proxy.py"), "--target", f"{postgres.host}:{postgres.port}"]
    process = subprocess.Popen([*command, "--one-way-ms", str(PROXY_ONE_WAY_MS)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield Endpoint("127.0.0.1", int(process.stdout.readline()))
    finally:
        process.terminate()
        process.wait()


def round_trip_ms(postgres: EmbeddedPostgres, endpoint: Endpoint) -> float:
    with psycopg2.connect(endpoint.dsn(postgres, "postgres")) as connection, connection.cursor() as cursor:
        started = time.perf_counter()
        for _ in range(200):
            cursor.execute("SELECT 1")
        return (time.perf_counter() - started) / 200 * 1000


class Bench:
    def __init__(self, postgres: EmbeddedPostgres, s3: EmbeddedS3, root: Path, migrations: int) -> None:
        self.postgres, self.s3, self.root = postgres, s3, root
        self.migrations = migrations
        self.rows: list[Row] = []
        self.inspect_ratios: list[str] = []
        self.per_schema: list[str] = []
        self.planned: tuple[Row, Row]  # the last plan case's connect+close floor and fanout plan
        self.folder = root / "local"
        self.folder.mkdir()
        self.tenant_folder = root / "tenants"
        self.tenant_folder.mkdir()
        files = migration_set(migrations)
        # What psql runs: the same statements, one transaction per migration, nothing recorded.
        self.script = root / "floor.sql"
        self.script.write_text("".join(f"BEGIN;\n{body}\nCOMMIT;\n" for body in files.values()))
        client = s3.client()
        client.create_bucket(Bucket="bench")
        for name, body in files.items():
            (self.folder / name).write_text(body)
            client.put_object(Bucket="bench", Key=f"m/bench/bench/{name}", Body=body.encode())
        for name, body in TENANT_MIGRATIONS.items():
            (self.tenant_folder / name).write_text(body)
            client.put_object(Bucket="bench", Key=f"t/bench/bench/{name}", Body=body.encode())
        self._fleets = 0

    def fleet(self, n: int) -> list[str]:
        self._fleets += 1
        names = [f"f{self._fleets}_{i}" for i in range(n)]
        self.postgres.create_databases(names)
        return names

    def fanout(self, command: str, endpoint: Endpoint, databases: list[str], concurrency: int, expect: int = 0) -> Row:
        env = write_environment(self.root, self.postgres, self.s3, endpoint, databases, "bench")
        self.s3.requests.reset()
        arguments = [command, "--env", str(env), "--format", "json", "--concurrency", str(concurrency)]
        if command == "apply":
            arguments += ["--runs-dir", str(self.root / "runs")]
        measure = fanout_cli(arguments, expect)
        seen = self.s3.requests.snapshot()
        return Row(
            "",
            f"fanout {command} (concurrency {concurrency})",
            measure,
            s3_list=str(seen["LIST"]),
            s3_get=str(seen["GET"]),
            connections=str(connections(self.postgres, databases)),
        )

    def apply_case(self, n: int, endpoint: Endpoint, concurrencies: list[int], label: str) -> list[str]:
        """Baseline, then per concurrency the psql floor and fanout, each on a fresh fleet."""
        case = f"apply N={n} M={self.migrations}{label}"
        fleet = self.fleet(n)
        base = timed(lambda: baseline(self.postgres, endpoint, fleet, self.folder))
        self.rows.append(
            Row(case, "yoyo loop (baseline)", base, "1.00x", connections=str(connections(self.postgres, fleet)))
        )
        self.postgres.drop_databases(fleet)
        migrated: list[str] = []
        for concurrency in concurrencies:
            fleet = self.fleet(n)
            floor = timed(lambda c=concurrency, f=fleet: psql_floor(self.postgres, endpoint, f, self.script, c))
            self.rows.append(
                Row(case, f"psql -f floor (concurrency {concurrency})", floor, f"{base.wall / floor.wall:.2f}x", "1.00x",
                    connections=str(connections(self.postgres, fleet)))
            )  # fmt: skip
            self.postgres.drop_databases(fleet)
            fleet = self.fleet(n)
            row = self.fanout("apply", endpoint, fleet, concurrency)
            row.case = case
            row.speedup = f"{base.wall / row.measure.wall:.2f}x"
            row.vs_floor = f"{row.measure.wall / floor.wall:.2f}x"
            self.rows.append(row)
            if migrated:
                self.postgres.drop_databases(migrated)
            migrated = fleet
        return migrated

    def plan_case(self, n: int, concurrency: int, migrated: list[str] | None) -> list[str]:
        direct = Endpoint(self.postgres.host, self.postgres.port)
        if migrated is None:
            migrated = self.fleet(n)
            self.fanout("apply", direct, migrated, concurrency)
        case = f"no-op plan N={n}"
        floor = timed(lambda: connect_only(self.postgres, migrated, concurrency))
        floor_row = Row(case, f"connect+close only (concurrency {concurrency})", floor, vs_floor="1.00x",
                        connections=str(n))  # fmt: skip
        self.rows.append(floor_row)
        keys = scram_keys(self.postgres)
        if keys is not None:
            keyed = timed(lambda: connect_only_with_keys(self.postgres, migrated, concurrency, keys))
            self.rows.append(Row(case, f"connect+close, SCRAM keys derived once ({concurrency})", keyed,
                                 vs_floor=f"{keyed.wall / floor.wall:.2f}x", connections=str(n)))  # fmt: skip
        before = connections(self.postgres, migrated)
        row = self.fanout("plan", direct, migrated, concurrency)
        row.case = case
        row.vs_floor = f"{row.measure.wall / floor.wall:.2f}x"
        row.connections = str(connections(self.postgres, migrated) - before)
        self.rows.append(row)
        self.planned = (floor_row, row)
        return migrated

    def inspect_case(self, n: int, concurrency: int, migrated: list[str]) -> None:
        """inspect over the fleet plan_case just planned, against its floor and that plan."""
        direct = Endpoint(self.postgres.host, self.postgres.port)
        floor, plan = self.planned
        before = connections(self.postgres, migrated)
        row = self.fanout("inspect", direct, migrated, concurrency)
        row.case = f"inspect N={n}"
        row.vs_floor = f"{row.measure.wall / floor.measure.wall:.2f}x"
        row.connections = str(connections(self.postgres, migrated) - before)
        self.rows.append(row)
        assert plan.measure.cpu is not None and row.measure.cpu is not None
        self.inspect_ratios.append(
            f"N={n}: {row.measure.wall / plan.measure.wall:.2f}x its wall time, "
            f"{row.measure.cpu / plan.measure.cpu:.2f}x its CPU time"
        )

    def schemas_case(self, n: int, *, with_loop: bool = True, concurrency: int = SCHEMA_CONCURRENCY) -> None:
        """One database of N tenant schemas: yoyo's loop, the SQL-alone floor and fanout, apply then a no-op
        pass, each on its own copy."""
        case = f"schemas N={n} M={len(TENANT_MIGRATIONS)}"
        self._fleets += 1
        looped, fanned, floored = f"s{self._fleets}_yoyo", f"s{self._fleets}_fanout", f"s{self._fleets}_floor"
        schemas = tenant_schemas(self.postgres, looped, n) if with_loop else []
        tenant_schemas(self.postgres, fanned, n)
        tenant_schemas(self.postgres, floored, n)
        loop = lambda: yoyo_schema_loop(self.postgres, looped, schemas, self.tenant_folder)  # noqa: E731
        every = [f"tenant_{i:05d}" for i in range(n)]
        floors = {
            "apply": lambda: schema_floor(self.postgres, floored, every, concurrency),
            "plan": lambda: schema_read_floor(self.postgres, fanned, every, concurrency),
        }
        floor_labels = {"apply": "SQL alone floor", "plan": "read yoyo's table floor"}
        base: Measure | None = None
        if with_loop:
            base = timed(loop)
            self.rows.append(Row(case, "yoyo loop apply (baseline)", base, "1.00x",
                                 connections=str(connections(self.postgres, [looped]))))  # fmt: skip
        env = self.root / "bench.toml"
        dsn = Endpoint(self.postgres.host, self.postgres.port).dsn(self.postgres, fanned)
        env.write_text(
            f'services = ["bench"]\n[source]\nbucket = "bench"\nprefix = "t"\nendpoint_url = "{self.s3.endpoint_url}"\n'
            f'[directory]\nkind = "static"\n[directory.schemas]\npattern = "tenant\\\\_%"\n'
            f'[[directory.targets]]\nid = "tenants"\ndsn = "{dsn}"\n'
        )
        spent: list[str] = []
        for command, label in (("apply", "fanout apply"), ("plan", "fanout no-op plan")):
            if command == "plan" and base is not None:
                before = connections(self.postgres, [looped])
                noop = timed(loop)
                self.rows.append(Row(case, "yoyo loop no-op", noop, "1.00x",
                                     connections=str(connections(self.postgres, [looped]) - before)))  # fmt: skip
                base = noop
            before = connections(self.postgres, [fanned])
            arguments = [command, "--env", str(env), "--format", "json", "--concurrency", str(concurrency)]
            if command == "apply":
                arguments += ["--runs-dir", str(self.root / "runs")]
            cpu_before = server_cpu(self.postgres)
            measure = fanout_cli(arguments)
            time.sleep(0.5)  # the backends' exit, for their CPU time
            server = server_cpu(self.postgres) - cpu_before
            opened = connections(self.postgres, [fanned]) - before
            floor = timed(floors[command])
            time.sleep(0.5)
            floor_server = server_cpu(self.postgres) - cpu_before - server
            speedup = "-" if base is None else f"{base.wall / measure.wall:.2f}x"
            self.rows.append(Row(case, f"{floor_labels[command]} ({concurrency})", floor, vs_floor="1.00x"))
            self.rows.append(
                Row(case, f"{label} (concurrency {concurrency})", measure, speedup,
                    vs_floor=f"{measure.wall / floor.wall:.2f}x",
                    connections=str(opened))
            )  # fmt: skip
            assert measure.cpu is not None
            spent.append(
                f"{command} {measure.wall / n * 1000:.1f} ms wall, CPU {measure.cpu / n * 1000:.1f} ms fanout + "
                f"{server / n * 1000:.1f} ms server (floor: {floor.wall / n * 1000:.1f} ms wall, "
                f"{floor_server / n * 1000:.1f} ms server)"
            )
        self.per_schema.append(f"N={n}, per schema: {'; '.join(spent)}")
        self.postgres.drop_databases([looped, fanned, floored] if with_loop else [fanned, floored])


def table(rows: list[Row]) -> str:
    header = ["case", "runner", "wall s", "speed-up", "vs floor", "S3 LIST", "S3 GET", "RSS MB", "CPU s", "connections"]
    cells = [row.cells() for row in rows]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="N=5, M=5: seconds; checks that the benchmark works")
    parser.add_argument("--migrations", type=int, default=20, help="M")
    parser.add_argument("--tuned", type=int, default=16, help="the tuned concurrency on loopback")
    parser.add_argument("--tuned-network", type=int, default=16, help="the tuned concurrency at 2 ms RTT")
    parser.add_argument("--apply", type=int, nargs="*", default=[10, 100, 200, 1000], metavar="N")
    parser.add_argument("--network", type=int, nargs="*", default=[200], metavar="N", help="apply sizes at 2 ms RTT")
    parser.add_argument("--plan", type=int, nargs="*", default=[10, 100, 1000], metavar="N")
    parser.add_argument(
        "--inspect", type=int, nargs="*", default=[1000], metavar="N", help="inspect sizes (each also plans)"
    )
    parser.add_argument(
        "--schemas",
        type=int,
        nargs="*",
        default=[1000, 3000, 10000],
        metavar="N",
        help="tenant schemas in one database",
    )
    parser.add_argument(
        "--schema-concurrency", type=int, default=SCHEMA_CONCURRENCY, help="fanout's concurrency in the schema case"
    )
    parser.add_argument(
        "--loop-up-to",
        type=int,
        metavar="N",
        help="run the yoyo loop of the schema case only up to N schemas (at 10,000 it alone takes about half an hour)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.migrations, args.tuned, args.tuned_network = 5, 4, 4
        args.apply, args.network, args.plan, args.inspect, args.schemas = [5], [5], [5], [5], [5]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-local-s3-secret", AWS_DEFAULT_REGION="us-east-1"
    )
    # fanout as pip installs it, byte-compiled (yoyo's package already is): with
    # PYTHONDONTWRITEBYTECODE set, a checkout compiles its sources at each start (0.3 s here).
    compileall.compile_dir(Path(fanout.__file__).parent, quiet=1)
    startup = fanout_cli(["--version"])
    with (
        EmbeddedPostgres(max_connections=max(args.tuned, args.tuned_network) + 40) as postgres,
        EmbeddedS3() as s3,
        tempfile.TemporaryDirectory() as tmp,
    ):
        bench = Bench(postgres, s3, Path(tmp), args.migrations)
        direct = Endpoint(postgres.host, postgres.port)
        migrated: dict[int, list[str]] = {}
        for n in args.apply:
            concurrencies = [DEFAULT_CONCURRENCY, args.tuned] if n <= 200 else [args.tuned]
            migrated[n] = bench.apply_case(n, direct, sorted(set(concurrencies)), "")
        for n in sorted(set(args.plan) | set(args.inspect)):
            planned = bench.plan_case(n, args.tuned, migrated.pop(n, None))
            if n in args.inspect:
                bench.inspect_case(n, args.tuned, planned)
            postgres.drop_databases(planned)
        for fleet in migrated.values():
            postgres.drop_databases(fleet)
        for n in args.schemas:
            bench.schemas_case(
                n, with_loop=args.loop_up_to is None or n <= args.loop_up_to, concurrency=args.schema_concurrency
            )
        rtt = None
        if args.network:
            with latency_proxy(postgres) as proxied:
                rtt = round_trip_ms(postgres, proxied)
                for n in args.network:
                    concurrencies = sorted({DEFAULT_CONCURRENCY, args.tuned_network})
                    postgres.drop_databases(bench.apply_case(n, proxied, concurrencies, f" RTT {rtt:.1f} ms"))
    print(table(bench.rows))
    print(
        f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, PostgreSQL and S3 on this machine."
        f"\nfanout rows are the CLI in its own process: wall includes {startup.wall:.2f} s of interpreter start and"
        f" imports (`fanout --version` alone: {startup.rss_mb or 0:.0f} MB RSS); RSS and CPU s are that process's."
        + (f"\nnetwork rows go through bench/latency_proxy.py: measured round trip {rtt:.2f} ms." if rtt else "")
        + "".join(f"\ninspect against the no-op plan over the same fleet, {r}" for r in bench.inspect_ratios)
        + "".join(f"\nschema per tenant, {r}" for r in bench.per_schema)
        + f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
