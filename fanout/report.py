"""The run report: one model behind plan, apply and status, and its renderers.

Rendering is pure (no I/O): callers decide where the text goes. The JSON form is a
public, versioned interface (`schema: fanout/report/v1`); tests pin its shape.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from io import StringIO
from typing import Any

from fanout.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PENDING, EXIT_TARGETS_FAILED
from fanout.secret import redact

SCHEMA = "fanout/report/v1"
# Beyond this many rows the text report summarizes and lists only what needs attention.
TEXT_ROW_LIMIT = 40


class Mode(StrEnum):
    PLAN = "plan"  # read-only: connects, reads yoyo's tables, changes nothing
    APPLY = "apply"


class Status(StrEnum):
    UP_TO_DATE = "up-to-date"  # nothing to apply
    PENDING = "pending"  # plan: migrations would be applied
    APPLIED = "applied"  # apply: migrations were applied in this run
    FAILED = "failed"
    # not attempted, or stopped before its end: failure budget, interrupt, an earlier service failed
    SKIPPED = "skipped"


class ErrorKind(StrEnum):
    UNREACHABLE = "unreachable"
    AUTHENTICATION = "authentication"
    LOCKED = "locked"  # the shard's migration lock stayed taken for the whole --lock-wait
    LOCK_TIMEOUT = "lock-timeout"  # a migration waited longer than lock_timeout for a table lock
    STATEMENT_TIMEOUT = "statement-timeout"
    MIGRATION = "migration"  # a migration's SQL failed; the shard was rolled back to its last good one
    DATABASE = "database"  # any other database error (permissions, missing schema, ...)
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM: stopped before or between migrations, rolled back
    NOT_STARTED = "not-started"  # the run stopped scheduling (failure budget, --fail-fast, interrupt)
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class TargetError:
    kind: ErrorKind
    message: str
    migration: str | None = None
    file: str | None = None
    # Indexes a failed non-transactional migration left INVALID (CREATE INDEX CONCURRENTLY).
    invalid_indexes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", redact(self.message))


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds a shard's migration lock. `run_id` None: plain yoyo (or a hand-made row)."""

    pid: int
    since: datetime | None = None
    host: str | None = None
    run_id: str | None = None
    alive: bool | None = None  # None: unknowable (plain yoyo)

    def describe(self) -> str:
        who = f"fanout run {self.run_id} (pid {self.pid} on {self.host})" if self.run_id else f"yoyo pid {self.pid}"
        when = f" since {self.since:%Y-%m-%d %H:%M:%S} UTC" if self.since else ""
        state = {True: "", False: ", session gone", None: ""}[self.alive]
        return f"{who}{when}{state}"


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure that was retried: lock timeout, serialization failure, deadlock, lost connection."""

    attempt: int
    reason: str
    delay: float
    migration: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", redact(self.reason))


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    id: str
    seconds: float


@dataclass(frozen=True, slots=True)
class TargetResult:
    """What happened to one service's migrations on one target."""

    target: str
    service: str
    status: Status
    server: str
    database: str
    schema: str | None = None
    tenants: tuple[str, ...] = ()
    applied_before: tuple[str, ...] = ()  # applied before this run started
    ran: tuple[AppliedMigration, ...] = ()  # applied by this run
    pending: tuple[str, ...] = ()  # still outstanding when the run ended (plan: what apply would run)
    initialized: bool = True  # False: yoyo's tables do not exist yet (never migrated)
    lock_holder: LockHolder | None = None
    broken_lock: LockHolder | None = None  # a stale lock this run broke to get in
    retries: tuple[Retry, ...] = ()
    error: TargetError | None = None
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class SourceFile:
    name: str
    sha256: str
    size: int
    etag: str | None = None
    version_id: str | None = None


@dataclass(frozen=True, slots=True)
class SourceSummary:
    service: str
    url: str
    files: tuple[SourceFile, ...]


@dataclass(frozen=True, slots=True)
class Rollout:
    """How the run was paced, and what the pacing measured."""

    concurrency: int
    per_server: int
    waves: str
    max_failures: str
    waves_run: int
    waves_planned: int
    stop_reason: str | None
    peak_in_flight: int
    peak_per_server: int
    connections_opened: int


@dataclass(frozen=True, slots=True)
class RunReport:
    run_id: str
    command: str
    mode: Mode
    environment: str
    services: tuple[str, ...]
    started_at: datetime
    finished_at: datetime
    results: tuple[TargetResult, ...]
    sources: tuple[SourceSummary, ...] = ()
    s3_list_requests: int = 0
    s3_get_requests: int = 0
    target_count: int = 0
    rollout: Rollout | None = None
    interrupted: bool = False
    resumed_from: str | None = None

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status is status)

    @property
    def failed(self) -> tuple[TargetResult, ...]:
        return tuple(r for r in self.results if r.status is Status.FAILED)


def exit_code(report: RunReport, *, detailed: bool = False) -> int:
    """0 when every target succeeded; 5 when any failed or was skipped; 130 when interrupted.

    With `detailed` (plan --detailed-exitcode), 10 tells CI that migrations are pending.
    """
    if report.interrupted:
        return EXIT_INTERRUPTED
    if any(r.status in (Status.FAILED, Status.SKIPPED) for r in report.results):
        return EXIT_TARGETS_FAILED
    if detailed and any(r.pending for r in report.results):
        return EXIT_PENDING
    return EXIT_OK


# ---- JSON ---------------------------------------------------------------------------


def to_dict(report: RunReport, *, detailed: bool = False) -> dict[str, Any]:
    statuses = Counter(r.status.value for r in report.results)
    return {
        "schema": SCHEMA,
        "run_id": report.run_id,
        "command": report.command,
        "mode": report.mode.value,
        "environment": report.environment,
        "services": list(report.services),
        "started_at": report.started_at.isoformat(),
        "finished_at": report.finished_at.isoformat(),
        "duration_seconds": round((report.finished_at - report.started_at).total_seconds(), 3),
        "exit_code": exit_code(report, detailed=detailed),
        "interrupted": report.interrupted,
        "resumed_from": report.resumed_from,
        "rollout": None if report.rollout is None else asdict(report.rollout),
        "totals": {
            "targets": report.target_count,
            "results": len(report.results),
            "by_status": {s.value: statuses.get(s.value, 0) for s in Status},
            "migrations_applied": sum(len(r.ran) for r in report.results),
            "migrations_pending": sum(len(r.pending) for r in report.results),
        },
        "source": {
            "s3_list_requests": report.s3_list_requests,
            "s3_get_requests": report.s3_get_requests,
            "sets": [
                {
                    "service": s.service,
                    "url": s.url,
                    "files": [
                        {
                            "name": f.name,
                            "sha256": f.sha256,
                            "size": f.size,
                            "etag": f.etag,
                            "version_id": f.version_id,
                        }
                        for f in s.files
                    ],
                }
                for s in report.sources
            ],
        },
        "results": [_result_dict(r) for r in report.results],
    }


def _result_dict(result: TargetResult) -> dict[str, Any]:
    return {
        "target": result.target,
        "service": result.service,
        "status": result.status.value,
        "server": result.server,
        "database": result.database,
        "schema": result.schema,
        "tenants": list(result.tenants),
        "initialized": result.initialized,
        "applied_before": list(result.applied_before),
        "ran": [{"id": m.id, "seconds": round(m.seconds, 4)} for m in result.ran],
        "pending": list(result.pending),
        "lock_holder": _holder_dict(result.lock_holder),
        "broken_lock": _holder_dict(result.broken_lock),
        "retries": [
            {"attempt": r.attempt, "migration": r.migration, "reason": r.reason, "delay_seconds": round(r.delay, 3)}
            for r in result.retries
        ],
        "error": None
        if result.error is None
        else {
            "kind": result.error.kind.value,
            "message": result.error.message,
            "migration": result.error.migration,
            "file": result.error.file,
            "invalid_indexes": list(result.error.invalid_indexes),
        },
        "seconds": round(result.seconds, 4),
    }


def _holder_dict(holder: LockHolder | None) -> dict[str, Any] | None:
    if holder is None:
        return None
    return {
        "pid": holder.pid,
        "since": holder.since.isoformat() if holder.since else None,
        "host": holder.host,
        "run_id": holder.run_id,
        "alive": holder.alive,
    }


def render_json(report: RunReport, *, detailed: bool = False) -> str:
    return redact(json.dumps(to_dict(report, detailed=detailed), indent=2))


# ---- text ---------------------------------------------------------------------------

_STYLES = {
    Status.UP_TO_DATE: "green",
    Status.PENDING: "yellow",
    Status.APPLIED: "cyan",
    Status.FAILED: "bold red",
    Status.SKIPPED: "magenta",
}


def render_text(report: RunReport, *, width: int = 120, color: bool = False) -> str:
    """A compact table; past TEXT_ROW_LIMIT rows, a summary plus every row that needs attention."""
    from rich.console import Console
    from rich.table import Table

    buffer = StringIO()
    console = Console(file=buffer, width=width, no_color=not color, force_terminal=color, highlight=False)
    console.print(
        f"fanout {report.command} · environment {report.environment} · "
        f"services {', '.join(report.services)} · run {report.run_id}"
    )
    rows = list(report.results)
    summarized = len(rows) > TEXT_ROW_LIMIT
    if summarized:
        rows = [r for r in rows if r.status in (Status.FAILED, Status.SKIPPED)][:TEXT_ROW_LIMIT]
    if rows:
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for column in ("target", "service", "status", "applied", "pending", "detail"):
            table.add_column(column, overflow="fold")
        for r in rows:
            table.add_row(
                r.target,
                r.service,
                f"[{_STYLES[r.status]}]{r.status.value}[/]",
                str(len(r.applied_before) + len(r.ran)),
                str(len(r.pending)),
                _detail(r, report.mode),
            )
        console.print(table)
    if summarized:
        console.print(f"({len(report.results)} results; only failed and skipped ones are listed)")
    console.print(_totals_line(report))
    rollout = report.rollout
    if rollout is not None and rollout.stop_reason:
        console.print(
            f"stopped after wave {rollout.waves_run} of {rollout.waves_planned}: {rollout.stop_reason}; "
            "targets not started are listed as skipped"
        )
    if report.interrupted:
        console.print("interrupted: in-flight migrations finished or rolled back, every lock was released")
    return redact(buffer.getvalue())


def _detail(result: TargetResult, mode: Mode) -> str:
    if result.error is not None:
        where = f"{result.error.file}: " if result.error.file else ""
        retried = f" (after {len(result.retries)} retries)" if result.retries else ""
        return f"{result.error.kind.value}: {where}{result.error.message}{retried}"
    parts = []
    if not result.initialized and result.status is not Status.SKIPPED:
        parts.append("never migrated")
    if result.ran:
        parts.append("ran " + ", ".join(m.id for m in result.ran))
    if result.pending and mode is Mode.PLAN:
        parts.append("would run " + _shorten(result.pending))
    elif result.pending:
        parts.append("still pending " + _shorten(result.pending))
    if result.lock_holder is not None:
        parts.append(f"locked by {result.lock_holder.describe()}")
    if result.broken_lock is not None:
        parts.append(f"broke the stale lock of {result.broken_lock.describe()}")
    if result.retries:
        parts.append(f"{len(result.retries)} retr{'y' if len(result.retries) == 1 else 'ies'}")
    if result.status is Status.SKIPPED and not parts:
        parts.append("not attempted")
    return "; ".join(parts)


def _shorten(ids: Iterable[str], limit: int = 4) -> str:
    items = list(ids)
    text = ", ".join(items[:limit])
    return text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _totals_line(report: RunReport) -> str:
    seconds = (report.finished_at - report.started_at).total_seconds()
    counts = ", ".join(f"{report.count(s)} {s.value}" for s in Status if report.count(s))
    applied = sum(len(r.ran) for r in report.results)
    pending = sum(len(r.pending) for r in report.results)
    return (
        f"{report.target_count} targets × {len(report.services)} services: {counts or 'nothing to do'} · "
        f"{applied} migrations applied, {pending} pending · {seconds:.1f}s"
    )


def render(report: RunReport, fmt: str, *, detailed: bool = False, color: bool = False) -> str:
    if fmt == "json":
        return render_json(report, detailed=detailed)
    return render_text(report, color=color)
