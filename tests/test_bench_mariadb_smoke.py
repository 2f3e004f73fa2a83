"""A small run of the MariaDB benchmark (N=3, M=3) so the script cannot rot; no timing is asserted."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from mariadb_server import binaries


def test_mariadb_benchmark_smoke_run_prints_its_table() -> None:
    binaries()  # skips (fails under CI=true) where mariadb-server is not installed
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "mariadb.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = [cell.strip() for cell in lines[0].split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.split("|")), strict=True)) for line in lines[2:] if "|" in line]
    apply = {r["runner"]: r for r in rows if r["case"] == "MariaDB apply N=3 M=3"}
    assert list(apply) == [
        "yoyo CLI loop (baseline)",
        "yoyo loop in one process",
        "mariadb client floor (2)",
        "PyMySQL floor (2)",
        "fanout apply (concurrency 2)",
    ]
    for runner in ("yoyo CLI loop (baseline)", "yoyo loop in one process"):
        assert apply[runner]["connections"] == str(3 * (1 + 3))  # yoyo: a connection per database and per migration
    for runner in ("mariadb client floor (2)", "PyMySQL floor (2)", "fanout apply (concurrency 2)"):
        assert apply[runner]["connections"] == "3"  # one per database
    noop = {r["runner"]: r for r in rows if r["case"] == "MariaDB no-op N=3"}
    assert list(noop) == [
        "yoyo CLI loop, nothing to do",
        "fanout plan (concurrency 2)",
        "fanout apply, nothing to do (2)",
    ]
    measured_processes = [apply["yoyo CLI loop (baseline)"], apply["fanout apply (concurrency 2)"], *noop.values()]
    for row in measured_processes:
        assert float(row["CPU s"]) > 0 and int(row["statements"]) > 0
        assert row["RSS MB"] == "-" or 0 < float(row["RSS MB"]) < 1000  # GNU time's figure, when it is installed
    # Every database of every runner ends with the same tables and rows; yoyo and fanout record the same ids.
    assert (
        "schemas: N=3: all 12 databases hold the same 2 tables and rows; yoyo's and fanout's record the same 3 ids"
        in (result.stdout)
    )
