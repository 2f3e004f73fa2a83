"""Benchmark, MariaDB rows: fanout against the sequential yoyo loop on the same MariaDB fleet.

    python bench/mariadb.py            # N = 10, 100; about 20 minutes on a loaded 2-core machine
    python bench/mariadb.py --smoke    # N = 3, M = 3, concurrency 2: seconds; run by the test suite

Starts its own mariadbd (Debian's mariadb-server, as the test suite does: tests/mariadb_server.py)
and S3 endpoint, builds identical fresh fleets of N MariaDB databases (one per runner), publishes
M migrations of the kinds bench/fleet.py uses (tables, columns, indexes, a 5,000-row backfill) in
MySQL's dialect, and measures in one run:
- baseline: the loop a team writes in shell, the real `yoyo apply --batch` CLI once per database,
  one after another (a process each: interpreter start and imports included, as for fanout);
- the same loop in one interpreter (yoyo's `get_backend("mysql://...")`, lock, apply, close), for
  N up to --in-process-up-to: what the baseline costs without its process starts;
- floors: the same SQL with no bookkeeping, per database, at fanout's concurrency: the `mariadb`
  client (C) reading the file, and PyMySQL (pure Python, fanout's driver) one statement at a time;
- fanout apply, the real CLI in its own process, at concurrency 16 and 1;
- with nothing to do: the yoyo CLI loop again over its migrated fleet, against fanout's plan and
  a second fanout apply over fanout's migrated fleet.
Then checks that every database ends with the same tables (SHOW CREATE TABLE, bookkeeping left out,
AUTO_INCREMENT counters stripped) and the same rows, and yoyo's and fanout's the same applied ids.
Columns: wall time, speed-up against the yoyo CLI loop of the same case, time against the floor at
the same concurrency, peak RSS (GNU time) and CPU time (os.wait4) of the runner's processes (for a loop of
processes, the largest RSS and the summed CPU), the server's CPU time (mariadbd's own, from /proc),
and the connections and statements the server counted (its `Connections` and `Questions`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
import pytest
from measured import TIME, Measure, run_measured
from yoyo import get_backend, read_migrations

from fanout.embedded import EmbeddedS3

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the suite's own mariadbd, never the system service
from mariadb_server import MariaDB, binaries  # noqa: E402

PASSWORD_VARIABLE = "BENCH_MARIADB_PASSWORD"
DATABASE_VARIABLE = "BENCH_MARIADB_DATABASE"
YOYO = Path(sys.executable).parent / "yoyo"
BOOKKEEPING = re.compile(r"^(_yoyo_|yoyo_lock$|fanout_)")


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


@dataclass
class Row:
    case: str
    runner: str
    measure: Measure
    speedup: str = "-"
    vs_floor: str = "-"
    server_cpu: str = "-"
    connections: str = "-"
    statements: str = "-"

    def cells(self) -> list[str]:
        m = self.measure
        rss = "-" if m.rss_mb is None else f"{m.rss_mb:.0f}"
        cpu = "-" if m.cpu is None else f"{m.cpu:.2f}"
        return [self.case, self.runner, f"{m.wall:.2f}", self.speedup, self.vs_floor, rss, cpu, self.server_cpu,
                self.connections, self.statements]  # fmt: skip


HEADER = ["case", "runner", "wall s", "speed-up", "vs floor", "RSS MB", "CPU s", "server CPU s", "connections",
          "statements"]  # fmt: skip


def table(rows: list[Row]) -> str:
    cells = [row.cells() for row in rows]
    widths = [max(len(r[i]) for r in [HEADER, *cells]) for i in range(len(HEADER))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)).rstrip()]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def summed(runs: list[Measure]) -> tuple[float | None, float | None]:
    """A loop of processes: (the largest one's peak RSS, their summed CPU time)."""
    peaks = [r.rss_mb for r in runs if r.rss_mb is not None]
    return max(peaks, default=None), sum(r.cpu or 0.0 for r in runs)


def fanout_cli(arguments: list[str]) -> Measure:
    """The fanout CLI as a user runs it, measured alone."""
    return run_measured([sys.executable, "-m", "fanout", *arguments])


class Counters:
    """The server's own counters, read on one connection kept open (so reading them opens nothing)."""

    def __init__(self, server: MariaDB) -> None:
        self._admin = server.admin()
        self._pid = int((Path(server.socket).parent / "mariadbd.pid").read_text().split()[0])
        first = self._read()
        self._own_statements = self._read()[1] - first[1]  # what one reading adds to Questions

    def _read(self) -> tuple[int, int]:
        with self._admin.cursor() as cursor:
            cursor.execute("SHOW GLOBAL STATUS WHERE Variable_name IN ('Connections', 'Questions')")
            values = dict(cursor.fetchall())
        return int(values["Connections"]), int(values["Questions"])

    def cpu(self) -> float:
        """mariadbd's CPU seconds so far (all its threads). Linux only."""
        fields = Path(f"/proc/{self._pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")  # utime stime

    def measure(self, row: Row, action: Callable[[], Measure]) -> Row:
        """Run `action` and fill `row` with its measure and what the server counted meanwhile."""
        connections, statements = self._read()
        cpu = self.cpu()
        row.measure = action()
        after = self._read()
        row.server_cpu = f"{self.cpu() - cpu:.2f}"
        row.connections = str(after[0] - connections)
        row.statements = str(after[1] - statements - self._own_statements)
        return row

    def close(self) -> None:
        self._admin.close()


class Bench:
    def __init__(self, server: MariaDB, s3: EmbeddedS3, root: Path, migrations: int) -> None:
        self.server, self.s3, self.root = server, s3, root
        self.counters = Counters(server)
        self.rows: list[Row] = []
        self.checks: list[str] = []
        self.folder = root / "local"
        self.folder.mkdir()
        self.files = migration_set(migrations)
        client = s3.client()
        client.create_bucket(Bucket="bench")
        for name, body in self.files.items():
            (self.folder / name).write_text(body)
            client.put_object(Bucket="bench", Key=f"m/bench/bench/{name}", Body=body.encode())
        self.script = root / "floor.sql"
        self.script.write_text("".join(f"{body}\n" for body in self.files.values()))
        self.statements = [body for body in self.files.values()]  # one statement per migration
        # Passwords go through files and the environment, never argv (visible in ps).
        self.client_options = root / "client.cnf"
        self.client_options.write_text(
            f"[client]\nuser={server.user}\npassword={server.password.reveal()}\nhost={server.host}\n"
            f"port={server.port}\nprotocol=tcp\n"
        )
        self.client_options.chmod(0o600)
        # yoyo interpolates the environment into its config file (lower-cased names).
        self.yoyo_config = root / "yoyo.ini"
        self.yoyo_config.write_text(
            "[DEFAULT]\nbatch_mode = on\nverbosity = 0\n"
            f"database = mysql://{server.user}:%({PASSWORD_VARIABLE.lower()})s@{server.host}:{server.port}"
            f"/%({DATABASE_VARIABLE.lower()})s\n"
        )
        self.migrations = migrations
        self._count = 0

    def databases(self, n: int) -> list[str]:
        names = [f"bench_{self._count}_{i:04d}" for i in range(n)]
        self._count += 1
        with self.server.admin() as admin, admin.cursor() as cursor:
            for name in names:
                cursor.execute(f"CREATE DATABASE `{name}`")
        return names

    def drop(self, databases: list[str]) -> None:
        with self.server.admin() as admin, admin.cursor() as cursor:
            for name in databases:
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")

    def environment(self, databases: list[str]) -> Path:
        lines = ['services = ["bench"]', "[source]", 'bucket = "bench"', 'prefix = "m"']
        lines += [f'endpoint_url = "{self.s3.endpoint_url}"', "[directory]", 'kind = "static"']
        server = self.server
        for database in databases:
            dsn = f"mysql://{server.user}:${{{PASSWORD_VARIABLE}}}@{server.host}:{server.port}/{database}"
            lines += ["[[directory.targets]]", f'id = "{database}"', f'dsn = "{dsn}"']
        path = self.root / "bench.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def yoyo_cli_loop(self, databases: list[str]) -> Measure:
        """`yoyo apply --batch` per database, one after another, as a shell loop runs it."""
        started = time.perf_counter()
        runs = [
            run_measured([str(YOYO), "apply", "--config", str(self.yoyo_config), str(self.folder)],
                         env={**os.environ, DATABASE_VARIABLE: database})
            for database in databases
        ]  # fmt: skip
        return Measure(time.perf_counter() - started, *summed(runs))

    def yoyo_in_process_loop(self, databases: list[str]) -> Measure:
        started = time.perf_counter()
        migrations = read_migrations(str(self.folder))
        for database in databases:
            backend = get_backend(self.server.url(database))
            with backend.lock():
                backend.apply_migrations(backend.to_apply(migrations))
            backend.connection.close()
        return Measure(time.perf_counter() - started)

    def client_floor(self, databases: list[str], concurrency: int) -> Measure:
        client = shutil.which("mariadb") or shutil.which("mysql") or "mysql"

        def one(database: str) -> Measure:
            with self.script.open("rb") as script:
                return run_measured([client, f"--defaults-extra-file={self.client_options}", database], stdin=script)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            runs = list(pool.map(one, databases))
        return Measure(time.perf_counter() - started, *summed(runs))

    def pymysql_floor(self, databases: list[str], concurrency: int) -> Measure:
        server = self.server

        def one(database: str) -> None:
            connection = pymysql.connect(host=server.host, port=server.port, user=server.user,
                                         password=server.password.reveal(), database=database, autocommit=True)  # fmt: skip
            with connection, connection.cursor() as cursor:
                for statement in self.statements:
                    cursor.execute(statement)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, databases))
        return Measure(time.perf_counter() - started)

    def fanout(self, command: str, databases: list[str], concurrency: int) -> Measure:
        env = self.environment(databases)
        arguments = [command, "--env", str(env), "--format", "json", "--concurrency", str(concurrency)]
        if command == "apply":
            arguments += ["--runs-dir", str(self.root / "runs")]
        return fanout_cli(arguments)

    def add(self, case: str, runner: str, action: Callable[[], Measure], base: Measure | None) -> Row:
        row = self.counters.measure(Row(case, runner, Measure(0.0)), action)
        if base is not None:
            row.speedup = f"{base.wall / row.measure.wall:.2f}x"
        self.rows.append(row)
        return row

    def apply_case(self, n: int, concurrencies: list[int], *, with_loop: bool, in_process: bool) -> None:
        case = f"MariaDB apply N={n} M={self.migrations}"
        looped = self.databases(n) if with_loop else []
        base: Measure | None = None
        if with_loop:
            base = self.add(case, "yoyo CLI loop (baseline)", lambda: self.yoyo_cli_loop(looped), None).measure
            self.rows[-1].speedup = "1.00x"
        if in_process:
            fleet = self.databases(n)
            self.add(case, "yoyo loop in one process", lambda: self.yoyo_in_process_loop(fleet), base)
            self.drop(fleet)
        fanned: dict[int, list[str]] = {}
        floors: list[list[str]] = []
        for concurrency in concurrencies:
            client = self.databases(n)
            floor = self.add(case, f"mariadb client floor ({concurrency})",
                             lambda c=concurrency, f=client: self.client_floor(f, c), base)  # fmt: skip
            floor.vs_floor = "1.00x"
            driver = self.databases(n)
            row = self.add(case, f"PyMySQL floor ({concurrency})",
                           lambda c=concurrency, f=driver: self.pymysql_floor(f, c), base)  # fmt: skip
            row.vs_floor = f"{row.measure.wall / floor.measure.wall:.2f}x"
            floors += [client, driver]
            fanned[concurrency] = self.databases(n)
            row = self.add(case, f"fanout apply (concurrency {concurrency})",
                           lambda c=concurrency: self.fanout("apply", fanned[c], c), base)  # fmt: skip
            row.vs_floor = f"{row.measure.wall / floor.measure.wall:.2f}x"
        self.check(n, looped, [f for fleet in fanned.values() for f in fleet], [f for fleet in floors for f in fleet])
        for fleet in floors:
            self.drop(fleet)
        kept = fanned.pop(max(fanned))
        for fleet in fanned.values():
            self.drop(fleet)

        case = f"MariaDB no-op N={n}"
        noop: Measure | None = None
        if with_loop:
            noop = self.add(case, "yoyo CLI loop, nothing to do", lambda: self.yoyo_cli_loop(looped), None).measure
            self.rows[-1].speedup = "1.00x"
        tuned = max(concurrencies)
        self.add(case, f"fanout plan (concurrency {tuned})", lambda: self.fanout("plan", kept, tuned), noop)
        self.add(case, f"fanout apply, nothing to do ({tuned})", lambda: self.fanout("apply", kept, tuned), noop)
        self.drop(looped + kept)

    def fingerprint(self, database: str) -> tuple[str, tuple[str, ...]]:
        """(digest of the migrations' tables and rows, yoyo's applied ids) of one database."""
        digest = hashlib.sha256()
        with self.server.admin() as admin, admin.cursor() as cursor:
            cursor.execute(f"USE `{database}`")
            cursor.execute("SHOW TABLES")
            tables = sorted(name for (name,) in cursor.fetchall() if not BOOKKEEPING.match(name))
            for name in tables:
                cursor.execute(f"SHOW CREATE TABLE `{name}`")
                digest.update(re.sub(r" AUTO_INCREMENT=\d+", "", cursor.fetchone()[1]).encode())
                cursor.execute(f"SELECT COUNT(*) FROM `{name}`")
                digest.update(f"{name}:{cursor.fetchone()[0]}\n".encode())
            applied: tuple[str, ...] = ()
            cursor.execute("SHOW TABLES LIKE '_yoyo_migration'")
            if cursor.fetchone() is not None:
                cursor.execute("SELECT migration_id FROM _yoyo_migration ORDER BY migration_id")
                applied = tuple(i for (i,) in cursor.fetchall())
        return f"{len(tables)} tables {digest.hexdigest()[:12]}", applied

    def check(self, n: int, looped: list[str], fanned: list[str], floors: list[str]) -> None:
        """Every database of every runner holds the same tables and rows; yoyo and fanout record the same ids."""
        prints = {database: self.fingerprint(database) for database in [*looped, *fanned, *floors]}
        schemas = {schema for schema, _ in prints.values()}
        recorded = {prints[database][1] for database in [*looped, *fanned]}
        if len(schemas) != 1 or len(recorded) != 1 or len(next(iter(recorded))) != self.migrations:
            raise RuntimeError(f"N={n}: the runners' databases differ: {sorted(schemas)}, {len(recorded)} id lists")
        self.checks.append(
            f"N={n}: all {len(prints)} databases hold the same {next(iter(schemas)).split(' ')[0]} tables and rows;"
            + (
                f" yoyo's and fanout's record the same {self.migrations} ids"
                if looped
                else f" fanout's record the same {self.migrations} ids"
            )
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smoke", action="store_true", help="N=3, M=3, concurrency 2: seconds; checks that the benchmark works"
    )
    parser.add_argument("--migrations", type=int, default=20, help="M")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 1], help="fanout's (first: the tuned one)")
    parser.add_argument("--apply", type=int, nargs="*", default=[10, 100], metavar="N")
    parser.add_argument("--in-process-up-to", type=int, default=10, metavar="N",
                        help="run the in-process yoyo loop only up to N databases")  # fmt: skip
    parser.add_argument("--loop-up-to", type=int, metavar="N",
                        help="run the yoyo CLI loops only up to N databases (fanout and the floors alone above)")  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.migrations, args.apply, args.concurrency = 3, [3], [2]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-local-s3-secret", AWS_DEFAULT_REGION="us-east-1"
    )
    startup: Measure = fanout_cli(["--version"])
    try:
        server_binaries: Any = binaries()
    except (pytest.skip.Exception, pytest.fail.Exception) as e:  # the suite's rule: fails only under CI=true
        print(f"bench/mariadb.py: {e.msg}", file=sys.stderr)
        return 1 if isinstance(e, pytest.fail.Exception) else 0
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    with MariaDB(*server_binaries) as server, EmbeddedS3() as s3, tempfile.TemporaryDirectory() as tmp:
        os.environ[PASSWORD_VARIABLE] = server.password.reveal()
        bench = Bench(server, s3, Path(tmp), args.migrations)
        for n in args.apply:
            with_loop = args.loop_up_to is None or n <= args.loop_up_to
            bench.apply_case(n, args.concurrency, with_loop=with_loop, in_process=n <= args.in_process_up_to)
        bench.counters.close()
        version = server.version
    print(table(bench.rows))
    print(
        f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, MariaDB {version} and S3 on this machine."
        f"\nfanout rows are the CLI in its own process: wall includes {startup.wall:.2f} s of interpreter start and"
        f" imports (`fanout --version` alone: {startup.rss_mb or 0:.0f} MB RSS); RSS and CPU s are that process's"
        " (for the CLI loops and the client floor: the largest process's RSS and their summed CPU; peak RSS by"
        f" GNU time{'' if TIME else ', not installed here'})."
        + "".join(f"\nschemas: {line}" for line in bench.checks)
        + f"\nstarted {began}, load average {' '.join(f'{x:.1f}' for x in load)};"
        f" at the end {time.strftime('%H:%M UTC', time.gmtime())},"
        f" load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
