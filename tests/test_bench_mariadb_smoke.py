"""A small run of the MariaDB benchmark (N=3) so the script cannot rot; no timing is asserted."""

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
    apply = [r for r in rows if r["case"] == "MariaDB apply N=3 M=3"]
    assert [r["runner"].split(" (")[0] for r in apply] == ["yoyo loop", "fanout apply", "fanout apply"]
    assert apply[0]["connections"] == str(3 * (1 + 3))  # yoyo: a connection per database and per migration
    for row in apply[1:]:
        assert row["connections"] == "3"  # fanout: one per target
    (plan,) = [r for r in rows if r["case"] == "MariaDB no-op plan N=3"]
    assert plan["connections"] == "3" and float(plan["CPU s"]) > 0
