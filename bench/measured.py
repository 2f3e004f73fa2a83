"""One process run to completion and measured alone: wall time, its own peak RSS, its CPU time.

Shared by the benchmarks (fleet.py, mariadb.py).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Measure:
    wall: float
    rss_mb: float | None = None
    cpu: float | None = None


# The child's own peak RSS comes from GNU time, a small process between: os.wait4's ru_maxrss of a
# process spawned by this one counts this one's RSS too (Linux keeps the high-water mark of the
# address space the child had before exec, fork's copy or vfork's shared one): about 120 MB here.
# Without GNU time the RSS column says "-".
TIME = "/usr/bin/time" if Path("/usr/bin/time").is_file() else None


def run_measured(
    command: list[str], *, env: dict[str, str] | None = None, stdin: Any = None, expect: int = 0
) -> Measure:
    """Run `command` to completion (its exit code must be `expect`): its wall time, peak RSS and CPU time."""
    with tempfile.NamedTemporaryFile() as peak, tempfile.TemporaryFile() as err:
        prefix = [TIME, "-f", "%M", "-o", peak.name] if TIME else []
        started = time.perf_counter()
        process = subprocess.Popen([*prefix, *command], env=env, stdin=stdin, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        if code != expect:
            err.seek(0)
            raise RuntimeError(f"{' '.join(command[:4])} exited {code}: {err.read().decode()[-2000:]}")
        # GNU time's own line is its last: a process killed by a signal gets one before it.
        rss = int(Path(peak.name).read_text().split()[-1]) / 1024 if TIME else None
    return Measure(wall, rss_mb=rss, cpu=usage.ru_utime + usage.ru_stime)
