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
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith(("apply", "no-op"))]
    runners = [r[1].strip() for r in rows]
    assert runners[0] == "yoyo loop (baseline)"
    assert sum(r.startswith("fanout apply") for r in runners) == 2
    assert runners[-1].startswith("fanout plan")
    fanout_rows = [r for r in rows if r[1].strip().startswith("fanout")]
    assert all(r[4].strip() == "1" and r[5].strip() == "5" for r in fanout_rows)  # one LIST, one GET per file
