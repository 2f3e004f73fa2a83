"""Benchmark: fanout against the sequential yoyo loop a team writes by hand.

    python bench/fleet.py                   # the full table (N = 10, 100, 200 for apply; 10, 100, 1000 for plan)
    python bench/fleet.py --smoke           # N = 5, seconds; run by the test suite so it cannot rot

Starts its own PostgreSQL (the embedded one) and S3 endpoint, builds identical fresh
fleets of N shard databases, publishes M realistic migrations, and measures in one run:
- baseline: for each database, get_backend(dsn); with backend.lock():
  backend.apply_migrations(backend.to_apply(migrations)), migrations read once;
- fanout apply at its default concurrency and at a tuned one;
- fanout's no-op plan over the migrated fleet.
Prints wall time, the ratio against the baseline, S3 LIST/GET requests seen by the S3
server, the runner's peak RSS, and connections opened (from pg_stat_database).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from yoyo import get_backend, read_migrations

from fanout import commands
from fanout.commands import RunSettings
from fanout.config import load_environment
from fanout.embedded import EmbeddedPostgres, EmbeddedS3


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


def connections(postgres: EmbeddedPostgres, databases: list[str]) -> int:
    with postgres.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(sum(sessions), 0) FROM pg_stat_database WHERE datname = ANY(%s)", (databases,))
        return int(cursor.fetchone()[0])


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def baseline(postgres: EmbeddedPostgres, databases: list[str], folder: Path) -> None:
    migrations = read_migrations(str(folder))
    for database in databases:
        backend = get_backend(postgres.dsn(database))
        with backend.lock():
            backend.apply_migrations(backend.to_apply(migrations))
        backend.connection.close()


def connect_only(postgres: EmbeddedPostgres, databases: list[str], concurrency: int) -> None:
    import psycopg2

    def one(database: str) -> None:
        psycopg2.connect(**postgres.connect_kwargs(database)).close()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, databases))


def write_environment(root: Path, postgres: EmbeddedPostgres, s3: EmbeddedS3, databases: list[str], name: str) -> Path:
    lines = [
        'services = ["bench"]',
        "[source]",
        'bucket = "bench"',
        'prefix = "m"',
        f'endpoint_url = "{s3.endpoint_url}"',
    ]
    lines += ["[directory]", 'kind = "static"']
    for database in databases:
        lines += ["[[directory.targets]]", f'id = "{database}"', f'dsn = "{postgres.dsn(database)}"']
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(sizes_apply: list[int], sizes_plan: list[int], migrations: int, tuned: int) -> list[list[str]]:
    rows: list[list[str]] = []
    files = migration_set(migrations)
    with EmbeddedPostgres() as postgres, EmbeddedS3() as s3, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        client = s3.client()
        client.create_bucket(Bucket="bench")
        folder = root / "local"
        folder.mkdir()
        for name, body in files.items():
            (folder / name).write_text(body)
            for env_name in ("base", "dflt", "tuned", "plan"):
                client.put_object(Bucket="bench", Key=f"m/bench/{env_name}/{name}", Body=body.encode())

        for n in sorted(set(sizes_apply) | set(sizes_plan)):
            kinds = ("base", "dflt", "tuned") if n in sizes_apply else ("dflt",)
            fleets = {kind: [f"{kind}_{n}_{i}" for i in range(n)] for kind in kinds}
            for names in fleets.values():
                postgres.create_databases(names)
            if n in sizes_apply:
                base = timed(lambda names=fleets["base"]: baseline(postgres, names, folder))
                rows.append(
                    [
                        f"apply N={n} M={migrations}",
                        "yoyo loop (baseline)",
                        f"{base:.2f}",
                        "1.00",
                        "-",
                        "-",
                        "-",
                        str(connections(postgres, fleets["base"])),
                    ]
                )
                for kind, concurrency in (("dflt", None), ("tuned", tuned)):
                    env = load_environment(str(write_environment(root, postgres, s3, fleets[kind], kind)))
                    s3.requests.reset()
                    seconds = timed(
                        lambda env=env, c=concurrency: commands.apply(
                            env, settings=RunSettings(concurrency=c), runs_dir=root / "runs"
                        )
                    )
                    seen = s3.requests.snapshot()
                    label = f"fanout apply (concurrency {concurrency or env.runner.concurrency})"
                    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    rows.append(
                        [
                            f"apply N={n} M={migrations}",
                            label,
                            f"{seconds:.2f}",
                            f"{base / seconds:.2f}x",
                            str(seen["LIST"]),
                            str(seen["GET"]),
                            f"{rss:.0f}",
                            str(connections(postgres, fleets[kind])),
                        ]
                    )
            if n in sizes_plan:
                migrated = fleets["tuned"] if n in sizes_apply else fleets["dflt"]
                if n not in sizes_apply:
                    env = load_environment(str(write_environment(root, postgres, s3, migrated, "plan")))
                    commands.apply(env, settings=RunSettings(concurrency=tuned), runs_dir=root / "runs")
                env = load_environment(str(write_environment(root, postgres, s3, migrated, "plan")))
                s3.requests.reset()
                # The floor a no-op plan cannot beat: one fresh (SCRAM) connection per database, nothing else.
                floor = timed(lambda names=migrated: connect_only(postgres, names, tuned))
                label = f"connect+close only (concurrency {tuned})"
                rows.append([f"no-op plan N={n}", label, f"{floor:.2f}", "1.00x of floor", "-", "-", "-", str(n)])
                seconds = timed(lambda env=env: commands.plan(env, settings=RunSettings(concurrency=tuned)))
                seen = s3.requests.snapshot()
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                rows.append(
                    [
                        f"no-op plan N={n}",
                        f"fanout plan (concurrency {tuned})",
                        f"{seconds:.2f}",
                        f"{floor / seconds:.2f}x of floor",
                        str(seen["LIST"]),
                        str(seen["GET"]),
                        f"{rss:.0f}",
                        "-",
                    ]
                )
            for names in fleets.values():
                postgres.drop_databases(names)
    return rows


def table(rows: list[list[str]]) -> str:
    header = ["case", "runner", "wall s", "speed-up", "S3 LIST", "S3 GET", "peak RSS MB", "connections"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smoke", action="store_true", help="N=5, M=5: a seconds-long run that checks the benchmark works"
    )
    parser.add_argument("--migrations", type=int, default=20)
    parser.add_argument("--tuned", type=int, default=16, help="the tuned concurrency")
    args = parser.parse_args()
    smoke = args.smoke
    rows = run([5], [5], 5, 4) if smoke else run([10, 100, 200], [10, 100, 1000], args.migrations, args.tuned)
    print(table(rows))
    print(
        f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; peak RSS is the benchmark process's (fanout runs in-process)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
