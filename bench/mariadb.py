"""Benchmark, MariaDB rows: fanout against the sequential yoyo loop on the same MariaDB fleet.

    python bench/mariadb.py            # N = 10, 100 (and a no-op plan); minutes on 2 cores
    python bench/mariadb.py --smoke    # N = 3, M = 3: seconds; run by the test suite so it cannot rot

Starts its own mariadbd (Debian's mariadb-server, as the test suite does: tests/mariadb_server.py)
and S3 endpoint, builds identical fresh fleets of N MariaDB databases, publishes M migrations
of the kinds bench/fleet.py uses (tables, columns, indexes, a 5,000-row backfill) in MySQL's
dialect, and measures:
- baseline: for each database, yoyo's `get_backend("mysql://...")`; with backend.lock():
  backend.apply_migrations(backend.to_apply(migrations)), migrations read once, in-process
  (PyMySQL, the driver fanout's engine uses too);
- fanout apply, the real CLI in a subprocess, at its default concurrency and a tuned one;
- fanout's no-op plan over the migrated fleet.
Columns as bench/fleet.py's; connections are the server's `Connections` counter.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from fleet import DEFAULT_CONCURRENCY, Measure, Row, fanout_cli, table, timed
from yoyo import get_backend, read_migrations

from fanout.embedded import EmbeddedS3

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the suite's own mariadbd, never the system service
from mariadb_server import MariaDB, binaries  # noqa: E402

PASSWORD_VARIABLE = "BENCH_MARIADB_PASSWORD"


def _digits(count: int) -> str:
    """A derived table of 0..count-1 (5,000 rows are 10 x 10 x 10 x 5: no recursion limit, no sequence engine)."""
    return "(" + " UNION ALL ".join(f"SELECT {i} AS n" for i in range(count)) + ")"


def migration_set(count: int) -> dict[str, str]:
    """M migrations, bench/fleet.py's kinds in MySQL's dialect: tables, columns, indexes, a backfill."""
    files = {
        "001-create-account.sql": "CREATE TABLE account (id BIGINT AUTO_INCREMENT PRIMARY KEY, name TEXT NOT NULL);"
    }
    files["002-backfill-accounts.sql"] = (
        "-- depends: 001-create-account\n"
        f"INSERT INTO account (name) SELECT CONCAT('account-', a.n + 10 * b.n + 100 * c.n + 1000 * d.n + 1) "
        f"FROM {_digits(10)} AS a, {_digits(10)} AS b, {_digits(10)} AS c, {_digits(5)} AS d;"
    )
    previous = "002-backfill-accounts"
    for number in range(3, count + 1):
        name = f"{number:03d}-step"
        kind = number % 3
        if kind == 0:
            body = (
                f"CREATE TABLE t{number} (id BIGINT AUTO_INCREMENT PRIMARY KEY, account_id BIGINT, v TEXT, "
                f"FOREIGN KEY (account_id) REFERENCES account (id));"
            )
        elif kind == 1:
            body = f"ALTER TABLE account ADD COLUMN c{number} TEXT;"
        else:
            body = f"CREATE INDEX i{number} ON account (name(20), id);"
        files[f"{name}.sql"] = f"-- depends: {previous}\n{body}"
        previous = name
    return files


def server_connections(server: MariaDB) -> int:
    """Connections the server accepted so far, this query's own included."""
    with server.admin() as admin, admin.cursor() as cursor:
        cursor.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
        return int(cursor.fetchone()[1])


def opened_since(server: MariaDB, before: int) -> str:
    """Connections opened since `before` was read, not counting the query that reads it now."""
    return str(server_connections(server) - before - 1)


class Bench:
    def __init__(self, server: MariaDB, s3: EmbeddedS3, root: Path, migrations: int) -> None:
        self.server, self.s3, self.root = server, s3, root
        self.rows: list[Row] = []
        self.folder = root / "local"
        self.folder.mkdir()
        files = migration_set(migrations)
        client = s3.client()
        client.create_bucket(Bucket="bench")
        for name, body in files.items():
            (self.folder / name).write_text(body)
            client.put_object(Bucket="bench", Key=f"m/bench/bench/{name}", Body=body.encode())
        self.migrations = migrations
        self._count = 0

    def databases(self, n: int) -> list[str]:
        names = [f"bench_{self._count}_{i:04d}" for i in range(n)]
        self._count += 1
        for name in names:
            self.server.create_database(name)
        return names

    def environment(self, databases: list[str], name: str) -> Path:
        lines = ['name = "bench"', 'services = ["bench"]', "[source]", 'bucket = "bench"', 'prefix = "m"']
        lines += [f'endpoint_url = "{self.s3.endpoint_url}"', "[directory]", 'kind = "static"']
        server = self.server
        for database in databases:
            dsn = f"mysql://{server.user}:${{{PASSWORD_VARIABLE}}}@{server.host}:{server.port}/{database}"
            lines += ["[[directory.targets]]", f'id = "{database}"', f'dsn = "{dsn}"']
        path = self.root / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def baseline(self, databases: list[str]) -> None:
        migrations = read_migrations(str(self.folder))
        for database in databases:
            backend = get_backend(self.server.url(database))
            with backend.lock():
                backend.apply_migrations(backend.to_apply(migrations))
            backend.connection.close()

    def apply_case(self, n: int, concurrencies: list[int]) -> list[str]:
        case = f"MariaDB apply N={n} M={self.migrations}"
        looped = self.databases(n)
        before = server_connections(self.server)
        base = timed(lambda: self.baseline(looped))
        self.rows.append(Row(case, "yoyo loop (baseline)", base, "1.00x",
                             connections=opened_since(self.server, before)))  # fmt: skip
        self.drop(looped)
        migrated: list[str] = []
        for concurrency in concurrencies:
            fleet = self.databases(n)
            env = self.environment(fleet, f"apply-{n}-{concurrency}")
            before = server_connections(self.server)
            measure = fanout_cli(["apply", "--env", str(env),
                                  "--concurrency", str(concurrency), "--format", "json"])  # fmt: skip
            self.rows.append(Row(case, f"fanout apply (concurrency {concurrency})", measure,
                                 f"{base.wall / measure.wall:.2f}x",
                                 connections=opened_since(self.server, before)))  # fmt: skip
            if migrated:
                self.drop(migrated)
            migrated = fleet
        return migrated

    def plan_case(self, migrated: list[str], concurrency: int) -> None:
        env = self.environment(migrated, f"plan-{len(migrated)}")
        before = server_connections(self.server)
        measure = fanout_cli(["plan", "--env", str(env),
                              "--concurrency", str(concurrency), "--format", "json"])  # fmt: skip
        self.rows.append(Row(f"MariaDB no-op plan N={len(migrated)}", f"fanout plan (concurrency {concurrency})",
                             measure, connections=opened_since(self.server, before)))  # fmt: skip

    def drop(self, databases: list[str]) -> None:
        for name in databases:
            self.server.drop_database(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="N=3, M=3: seconds; checks that the benchmark works")
    parser.add_argument("--migrations", type=int, default=20, help="M")
    parser.add_argument("--tuned", type=int, default=16, help="the tuned concurrency")
    parser.add_argument("--apply", type=int, nargs="*", default=[10, 100], metavar="N")
    args = parser.parse_args()
    if args.smoke:
        args.migrations, args.tuned, args.apply = 3, 4, [3]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    startup: Measure = fanout_cli(["--version"])
    server_binaries: Any = binaries()
    with MariaDB(*server_binaries) as server, EmbeddedS3() as s3, tempfile.TemporaryDirectory() as tmp:
        os.environ[PASSWORD_VARIABLE] = server.password.reveal()
        bench = Bench(server, s3, Path(tmp), args.migrations)
        for n in args.apply:
            migrated = bench.apply_case(n, sorted({DEFAULT_CONCURRENCY, args.tuned}))
            bench.plan_case(migrated, args.tuned)
            bench.drop(migrated)
        version = server.version
    print(table(bench.rows))
    print(
        f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, MariaDB {version} and S3 on this machine."
        f"\nfanout rows are the CLI in its own process: wall includes {startup.wall:.2f} s of interpreter start and"
        " imports; RSS and CPU s are that process's."
        f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
