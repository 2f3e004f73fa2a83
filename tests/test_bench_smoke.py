"""A small run of the benchmark (N=5) so the script cannot rot; no timing is asserted."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_benchmark_smoke_run_prints_its_table() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fleet.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = [cell.strip() for cell in lines[0].split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.split("|")), strict=True)) for line in lines[2:] if "|" in line]
    loopback = [r for r in rows if r["case"] == "apply N=5 M=5"]
    network = [r for r in rows if r["case"].startswith("apply N=5 M=5 RTT")]
    plan = [r for r in rows if r["case"] == "no-op plan N=5"]
    schemas = [r for r in rows if r["case"] == "schemas N=5 M=5"]
    for case in (loopback, network):
        assert case[0]["runner"] == "yoyo loop (baseline)"
        assert sum(r["runner"].startswith("psql -f floor") for r in case) == 2
        assert sum(r["runner"].startswith("fanout apply") for r in case) == 2
        assert case[0]["connections"] == str(5 * (1 + 5))  # yoyo: a connection per database and per migration
    # The floor with SCRAM keys derived once is measured only where psycopg 3.3+ on libpq 18 is installed.
    keyed = ["connect+close, SCRAM keys derived once"] if any("SCRAM keys" in r["runner"] for r in plan) else []
    assert [r["runner"].split(" (")[0] for r in plan] == ["connect+close only", *keyed, "fanout plan"]
    assert [r["runner"].split(" (")[0] for r in rows if r["case"] == "inspect N=5"] == ["fanout inspect"]
    fanout_rows = [r for r in rows if r["runner"].startswith("fanout") and r not in schemas]
    assert len(fanout_rows) == 6
    for row in fanout_rows:
        assert (row["S3 LIST"], row["S3 GET"]) == ("1", "5")  # one LIST, one GET per file, whatever N
        assert row["connections"] == "5"  # one per target
        assert float(row["RSS MB"]) > 0 and float(row["CPU s"]) > 0  # measured on the fanout process itself
    assert [r["runner"].split(" (")[0] for r in schemas] == [
        "yoyo loop apply",
        "SQL alone floor",
        "fanout apply",
        "yoyo loop no-op",
        "read yoyo's table floor",
        "fanout no-op plan",
    ]
    for row in (schemas[2], schemas[5]):
        # At most one per schema (16 workers for 5 schemas), plus the one that lists the schemas.
        assert int(row["connections"]) <= 5 + 1
        assert row["vs floor"].endswith("x")  # against the floor measured in the same run
    assert "schema per tenant, N=5, per schema: apply " in result.stdout  # wall, fanout's and the server's CPU
    assert "(floor: " in result.stdout
    assert "measured round trip" in result.stdout
    assert "inspect against the no-op plan over the same fleet, N=5: " in result.stdout
