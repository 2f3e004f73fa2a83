"""Run records: every apply leaves its report behind, so a later run can resume it.

A record is the run's JSON report (the public `fanout/report/v1` shape, secrets
redacted), written to `<runs dir>/<env>/<run id>.json` and, when the environment's
migrations live in S3, to `s3://<bucket>/<prefix>/_runs/<env>/<run id>.json` too, so a
pipeline on another machine can resume it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fanout import source
from fanout.config import Environment, S3Location
from fanout.errors import ConfigError, FanoutError, SourceError
from fanout.report import RunReport, from_dict as report_from_dict, render_json
from fanout.source import Snapshot

log = logging.getLogger(__name__)

RUNS_DIR_VARIABLE = "FANOUT_RUNS_DIR"
DEFAULT_RUNS_DIR = Path(".fanout") / "runs"
_UNFINISHED = ("failed", "skipped", "in-doubt")


def runs_dir(override: Path | None = None) -> Path:
    return override or Path(os.environ.get(RUNS_DIR_VARIABLE) or DEFAULT_RUNS_DIR)


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    environment: str
    services: tuple[str, ...]
    unfinished: tuple[str, ...]  # target ids with a failed or skipped result, in run order
    sources: dict[str, dict[str, str]]  # service -> file name -> sha256
    report: RunReport | None = None  # the whole report, for what a resumed rollback must repeat


def save(env: Environment, report: RunReport, directory: Path | None = None) -> list[str]:
    """Write the record locally and to S3 when configured; returns where it went. Never raises.

    An empty list means no copy was written: the caller must say so (exit 6), because
    `--resume` of this run is then impossible.
    """
    body = render_json(report, indent=False).encode()  # read by fanout, not by eye: the fast encoder
    written = []
    path = runs_dir(directory) / env.name / f"{report.run_id}.json"
    try:
        write_atomically(path, body)
        written.append(str(path))
    except OSError as e:
        log.warning("could not write the run record %s: %s", path, e.strerror or e)
    if isinstance(env.source, S3Location):
        try:
            written.append(source.save_run_record(env.source, env.name, report.run_id, body))
        except FanoutError as e:
            log.warning("could not store the run record in S3: %s", e)
    return written


def write_atomically(path: Path, body: bytes) -> None:
    """Temp file, fsync, rename: a full disk or a kill leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def load(env: Environment, run_id: str, directory: Path | None = None, *, command: str = "apply") -> RunRecord:
    """The record of `run_id` (a run of `command`): from the runs directory, else from S3. Raises ConfigError when absent.

    A local record that cannot be read or parsed (a disk that filled up under an older
    fanout, a bad copy) gives way to the S3 copy when there is one.
    """
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ConfigError(f"--resume: {run_id!r} is not a run id")
    path = runs_dir(directory) / env.name / f"{run_id}.json"
    in_s3 = isinstance(env.source, S3Location)
    local_problem: ConfigError | None = None
    if path.is_file():
        try:
            return _parse(env, run_id, path.read_bytes(), command)
        except OSError as e:
            local_problem = ConfigError(f"cannot read the record of run {run_id!r} at {path}: {e.strerror or e}")
        except _Unreadable as e:
            local_problem = ConfigError(f"the record of run {run_id!r} at {path} is not a fanout report ({e})")
        if not in_s3:
            raise local_problem
        log.warning("%s; using the copy in S3", local_problem)
    body = source.load_run_record(env.source, env.name, run_id) if isinstance(env.source, S3Location) else None
    if body is None:
        if local_problem is not None:
            raise ConfigError(f"{local_problem}, and S3 has no copy")
        where = f"{path}" + (" or S3" if in_s3 else "")
        raise ConfigError(f"no record of run {run_id!r} for environment {env.name!r} in {where}")
    try:
        return _parse(env, run_id, body, command)
    except _Unreadable as e:
        raise ConfigError(f"the record of run {run_id!r} in S3 is not a fanout report ({e})") from None


class _Unreadable(Exception):
    """A record that is not a fanout report (truncated, not JSON, another shape)."""


def _parse(env: Environment, run_id: str, body: bytes, command: str) -> RunRecord:
    try:
        data: dict[str, Any] = json.loads(body)
        environment, recorded = data["environment"], data["command"]
        unfinished: list[str] = []
        for result in data["results"]:
            if result["status"] in _UNFINISHED and result["target"] not in unfinished:
                unfinished.append(result["target"])
        record = RunRecord(
            run_id=run_id,
            environment=env.name,
            services=tuple(data["services"]),
            unfinished=tuple(unfinished),
            sources={s["service"]: {f["name"]: f["sha256"] for f in s["files"]} for s in data["source"]["sets"]},
            report=report_from_dict(data) if recorded != "apply" else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise _Unreadable(f"{type(e).__name__}: {e}") from None
    if environment != env.name:
        raise ConfigError(f"run {run_id!r} was in environment {environment!r}, not {env.name!r}")
    if recorded != command:
        raise ConfigError(f"run {run_id!r} was a `fanout {recorded}`, not a `fanout {command}`")
    return record


def check_same_sources(expected: dict[str, dict[str, str]], snapshot: Snapshot, run_id: str) -> None:
    """A resumed run applies exactly the migrations of the run it resumes, or nothing."""
    current = {s.service: {f.name: f.sha256 for f in s.files} for s in snapshot.sets}
    for service, files in expected.items():
        now = current.get(service, {})
        changed = sorted(
            {name for name in files.keys() | now.keys() if files.get(name) != now.get(name)},
        )
        if changed:
            raise SourceError(
                f"the migrations of service {service!r} changed since run {run_id} "
                f"({', '.join(changed[:5])}); resume applies the same set, so start a new run instead"
            )
