"""The run report: one model behind plan, apply and status, and its renderers.

Rendering is pure (no I/O): callers decide where the text goes. The JSON form is a
public, versioned interface (`schema: fanout/report/v1`); tests pin its shape.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from io import StringIO
from typing import TYPE_CHECKING, Any

from fanout import schema

if TYPE_CHECKING:
    from fanout.directory import Target
from fanout.errors import (
    EXIT_INTERRUPTED,
    EXIT_NOT_STORED,
    EXIT_OK,
    EXIT_PENDING,
    EXIT_SOURCE,
    EXIT_TARGETS_FAILED,
)
from fanout.secret import redact

SCHEMA = "fanout/report/v1"
# Beyond this many rows the text report summarizes and lists only what needs attention.
TEXT_ROW_LIMIT = 40


class Mode(StrEnum):
    PLAN = "plan"  # read-only: connects, reads yoyo's tables, changes nothing
    APPLY = "apply"
    ROLLBACK = "rollback"  # undoes applied migrations with their rollback files (fanout rollback, reapply)


class Status(StrEnum):
    UP_TO_DATE = "up-to-date"  # nothing to apply
    PENDING = "pending"  # plan: migrations would be applied
    APPLIED = "applied"  # apply: migrations were applied in this run
    ROLLED_BACK = "rolled-back"  # rollback: migrations were rolled back in this run
    FAILED = "failed"
    DRIFTED = "drifted"  # plan/status/verify: applied migrations whose content differs from the set (see drift)
    # a non-transactional migration started and was never recorded (see in_doubt); settle it by hand
    IN_DOUBT = "in-doubt"
    # not attempted, or stopped before its end: failure budget, interrupt, an earlier service failed
    SKIPPED = "skipped"


class ErrorKind(StrEnum):
    UNREACHABLE = "unreachable"
    AUTHENTICATION = "authentication"
    # The connection's own settings are wrong (unknown option, bad sslmode value): never retried.
    CONFIGURATION = "configuration"
    # The server's or the role's connection limit is reached: lower --concurrency or --per-server.
    CONNECTION_LIMIT = "connection-limit"
    LOCKED = "locked"  # the shard's migration lock stayed taken for the whole --lock-wait
    LOCK_TIMEOUT = "lock-timeout"  # a migration waited longer than lock_timeout for a table lock
    STATEMENT_TIMEOUT = "statement-timeout"
    MIGRATION = "migration"  # a migration's SQL failed; the shard was rolled back to its last good one
    # A post-apply hook failed after the migrations were applied and recorded; it is due again on every apply.
    HOOK = "hook"
    DATABASE = "database"  # any other database error (permissions, missing schema, ...)
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM: stopped before or between migrations, rolled back
    NOT_STARTED = "not-started"  # the run stopped scheduling (failure budget, --fail-fast, interrupt)
    DRIFT = "drift"  # apply refused: applied migrations differ from the set (fanout accept, after review)
    TARGET_TIMEOUT = "target-timeout"  # still working at --target-timeout: cancelled, rolled back, lock released
    UNRESPONSIVE = "unresponsive"  # the shard stopped answering (keepalives, tcp_user_timeout, an unanswered cancel)
    POOLER = "pooler"  # a transaction-mode pooler sits between fanout and the shard: refused before any lock
    IN_DOUBT = "in-doubt"  # a non-transactional migration started earlier and was never recorded
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
class InDoubt:
    """A non-transactional migration marked as started and never recorded, and what the shard holds of it."""

    migration: str
    operation: str  # apply | rollback
    run_id: str
    host: str
    pid: int
    started_at: datetime
    invalid_indexes: tuple[str, ...] = ()  # INVALID indexes it builds, or that appeared since it started
    valid_indexes: tuple[str, ...] = ()  # indexes it builds that exist and are VALID
    missing_indexes: tuple[str, ...] = ()  # indexes it builds that do not exist
    # MySQL/MariaDB: the statement (numbered from 1) started and never recorded as done, and its first line
    # (a rollback that stopped between two statements: no statement, and where it stopped).
    statement: int | None = None
    statement_text: str | None = None

    def describe(self) -> str:
        if self.statement is None and self.statement_text is not None:
            return (
                f"{self.migration} was started ({self.operation}) by fanout run {self.run_id} (pid {self.pid} on "
                f"{self.host}) and never recorded: {self.statement_text}"
            )
        if self.statement is not None:
            return (
                f"{self.migration}: {'rollback ' if self.operation == 'rollback' else ''}statement {self.statement} "
                f"({self.statement_text}) was started by fanout run {self.run_id} (pid {self.pid} on {self.host}) at "
                f"{self.started_at:%Y-%m-%d %H:%M:%S} UTC and never recorded as done: it may or may not have taken effect"
            )
        found = [
            f"{label} {', '.join(names)}"
            for label, names in (
                ("INVALID index", self.invalid_indexes),
                ("VALID index", self.valid_indexes),
                ("missing index", self.missing_indexes),
            )
            if names
        ]
        return (
            f"{self.migration} was started ({self.operation}) by fanout run {self.run_id} (pid {self.pid} on "
            f"{self.host}) at {self.started_at:%Y-%m-%d %H:%M:%S} UTC and never recorded; found: "
            f"{'; '.join(found) or 'no index it builds'}"
        )


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure that was retried: lock timeout, serialization failure, deadlock, lost connection."""

    attempt: int
    reason: str
    delay: float
    migration: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", redact(self.reason))


class DriftKind(StrEnum):
    CHANGED = "changed"  # applied with other content than the migration set now has
    MISSING = "missing"  # applied, and no longer in the migration set
    FOREIGN = "foreign"  # applied from another environment's set


@dataclass(frozen=True, slots=True)
class Drift:
    migration: str
    kind: DriftKind
    recorded: str | None  # sha256 recorded on the shard
    current: str | None  # sha256 in this run's migration set (None: not in it)
    detail: str


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    id: str
    seconds: float


@dataclass(frozen=True, slots=True)
class RollbackRequest:
    """What `fanout rollback` undoes: exactly one of `to`, `migrations`, `release` is set.

    `to`: leave each service named by one of these ids at it (everything applied beyond it
    is rolled back); `migrations`: these and every applied migration that depends on them,
    as yoyo does; `release`: the migrations that release added. `reapply` applies what was
    rolled back again, under the same lock (`fanout reapply`).
    """

    to: tuple[str, ...] = ()
    migrations: tuple[str, ...] = ()
    release: str | None = None
    reapply: bool = False
    accept_drift: bool = False  # roll back shards whose applied checksums differ from the set
    reason: str | None = None  # logged in fanout_checksum_log with each rolled-back checksum

    def describe(self) -> str:
        if self.to:
            what = "--to " + " --to ".join(self.to)
        elif self.migrations:
            what = "--migration " + " --migration ".join(self.migrations)
        else:
            what = f"--release {self.release}"
        return ("reapply " if self.reapply else "rollback ") + what


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
    drift: tuple[Drift, ...] = ()
    unverified: tuple[str, ...] = ()  # applied, with no checksum recorded (before fanout: `fanout baseline`)
    rolled_back: tuple[AppliedMigration, ...] = ()  # rolled back by this run, newest first
    # rollback: still to roll back when the run ended (a dry run: what it would roll back);
    # verify --at: applied beyond the version the fleet is meant to be at.
    to_roll_back: tuple[str, ...] = ()
    in_doubt: InDoubt | None = None  # a non-transactional migration that started and was never recorded
    invalid_indexes: tuple[str, ...] = ()  # every INVALID index on the shard (on the target's first service)


def result_for(target: Target, service: str, status: Status, error: TargetError | None, **outcome: Any) -> TargetResult:
    """A result carrying the target's identity; `outcome` holds what the run learned (nothing if it never got in)."""
    outcome.setdefault("initialized", False)
    return TargetResult(
        target=target.id,
        service=service,
        status=status,
        server=target.server,
        database=target.display,
        schema=target.schema,
        tenants=target.tenants,
        error=error,
        **outcome,
    )


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
    manifest: str | None = None  # the release manifest that pinned the files (fanout publish)
    release: str | None = None
    # Migrations in the bucket the manifest does not list (uploaded outside publish), and the
    # environment's policy for them: "refuse" and "report" leave them out, "apply" runs them.
    unpublished: tuple[str, ...] = ()
    unpublished_policy: str | None = None
    paths: tuple[str, ...] = ()  # every path of the service, merged in this order (url is the first)

    @property
    def left_out(self) -> tuple[str, ...]:
        """Unpublished migrations this run did not apply."""
        return self.unpublished if self.unpublished_policy != "apply" else ()


@dataclass(frozen=True, slots=True)
class Finding:
    """A lint problem of the migration set (see fanout.lint): an error, or a warning with its rule."""

    service: str
    file: str
    rule: str
    severity: str  # "error" | "warning"
    message: str

    def describe(self) -> str:
        return f"{self.severity} [{self.rule}] {self.service}: {self.file}: {self.message}"


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
class SlicePart:
    """One slice's run inside a merged report."""

    slice: str
    run_id: str
    exit_code: int
    targets: int


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
    slice: str | None = None  # "K/N" when the run covered one slice of the fleet
    # A merged report: the slices it was made of, and those of 1..N that were missing.
    parts: tuple[SlicePart, ...] = ()
    missing_slices: tuple[str, ...] = ()
    # inspect and verify --schema: the shards' live schemas, grouped and compared (fanout.schema).
    inspection: schema.Inspection | None = None
    # What of this run could not be stored: "run record", a --output/--report-to destination,
    # "$GITHUB_STEP_SUMMARY". The work itself is done; exit 6 says the record is not.
    not_stored: tuple[str, ...] = ()
    rollback: RollbackRequest | None = None  # what a rollback (or reapply) run was asked to undo
    warnings: tuple[Finding, ...] = ()  # lint findings of the migration sets

    @property
    def lint_errors(self) -> tuple[Finding, ...]:
        return tuple(w for w in self.warnings if w.severity == "error")

    @property
    def unpublished(self) -> tuple[tuple[str, str], ...]:
        """(service, file) of every unpublished migration this run left out."""
        return tuple((s.service, name) for s in self.sources for name in s.left_out)

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status is status)

    @property
    def failed(self) -> tuple[TargetResult, ...]:
        return tuple(r for r in self.results if r.status is Status.FAILED)


_NOT_DONE = (Status.FAILED, Status.SKIPPED, Status.DRIFTED, Status.IN_DOUBT)


def exit_code(report: RunReport, *, detailed: bool = False) -> int:
    """0 when every target succeeded; 5 when any failed, drifted, is in doubt or was skipped (or a
    merged report misses a slice; or, for verify, a shard is behind, unverified or has an INVALID
    index; or an inspected shard's schema differs from its reference); 130 when interrupted.

    3 when the migration set has lint errors (plan, status and verify still report the
    fleet), and, for verify and `plan --detailed-exitcode`, when the bucket holds
    migrations outside the release that the run left out (unpublished).
    With `detailed` (plan --detailed-exitcode), 10 tells CI that migrations are pending.
    6 when the run's record or a requested report could not be stored and nothing worse happened.
    `detailed` counts only for a read-only run: a rollback that did its work leaves its
    migrations pending, which is the outcome asked for, not something left to do.
    """
    detailed = detailed and report.mode is Mode.PLAN
    if report.interrupted:
        return EXIT_INTERRUPTED
    if report.lint_errors:
        return EXIT_SOURCE
    if report.unpublished and (detailed or report.command == "verify"):
        return EXIT_SOURCE
    if report.missing_slices or any(r.status in _NOT_DONE for r in report.results):
        return EXIT_TARGETS_FAILED
    if report.command == "verify" and any(
        r.pending or r.unverified or r.to_roll_back or r.invalid_indexes for r in report.results
    ):
        return EXIT_TARGETS_FAILED  # verify gates on the whole published set, applied and checksummed
    if report.inspection is not None and report.inspection.differs:
        return EXIT_TARGETS_FAILED  # a shard's live schema differs from its version's reference
    if report.not_stored:
        return EXIT_NOT_STORED
    if detailed and any(r.pending or r.to_roll_back for r in report.results):
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
        "slice": report.slice,
        "parts": [asdict(part) for part in report.parts],
        "missing_slices": list(report.missing_slices),
        "not_stored": list(report.not_stored),
        "rollout": None if report.rollout is None else asdict(report.rollout),
        "totals": {
            "targets": report.target_count,
            "results": len(report.results),
            "by_status": {s.value: statuses.get(s.value, 0) for s in Status},
            "migrations_applied": sum(len(r.ran) for r in report.results),
            "migrations_pending": sum(len(r.pending) for r in report.results),
            "migrations_rolled_back": sum(len(r.rolled_back) for r in report.results),
        },
        "rollback": None if report.rollback is None else asdict(report.rollback),
        "source": {
            "s3_list_requests": report.s3_list_requests,
            "s3_get_requests": report.s3_get_requests,
            "sets": [
                {
                    "service": s.service,
                    "url": s.url,
                    "manifest": s.manifest,
                    "release": s.release,
                    "paths": list(s.paths or (s.url,)),
                    "unpublished": list(s.unpublished),
                    "unpublished_policy": s.unpublished_policy,
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
        "warnings": [
            {"service": w.service, "file": w.file, "rule": w.rule, "severity": w.severity, "message": w.message}
            for w in report.warnings
        ],
        "results": [_result_dict(r) for r in report.results],
        "inspection": None if report.inspection is None else schema.to_dict(report.inspection),
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
        "drift": [
            {
                "migration": d.migration,
                "kind": d.kind.value,
                "recorded": d.recorded,
                "current": d.current,
                "detail": d.detail,
            }
            for d in result.drift
        ],
        "unverified": list(result.unverified),
        "rolled_back": [{"id": m.id, "seconds": round(m.seconds, 4)} for m in result.rolled_back],
        "to_roll_back": list(result.to_roll_back),
        "in_doubt": None if result.in_doubt is None else _in_doubt_dict(result.in_doubt),
        "invalid_indexes": list(result.invalid_indexes),
    }


def _in_doubt_dict(found: InDoubt) -> dict[str, Any]:
    return {
        "migration": found.migration,
        "operation": found.operation,
        "run_id": found.run_id,
        "host": found.host,
        "pid": found.pid,
        "started_at": found.started_at.isoformat(),
        "invalid_indexes": list(found.invalid_indexes),
        "valid_indexes": list(found.valid_indexes),
        "missing_indexes": list(found.missing_indexes),
        "statement": found.statement,
        "statement_text": found.statement_text,
    }


def _in_doubt_from_dict(data: dict[str, Any] | None) -> InDoubt | None:
    if data is None:
        return None
    return InDoubt(
        data["migration"], data["operation"], data["run_id"], data["host"], data["pid"],
        datetime.fromisoformat(data["started_at"]), tuple(data["invalid_indexes"]), tuple(data["valid_indexes"]),
        tuple(data["missing_indexes"]), data.get("statement"), data.get("statement_text"),
    )  # fmt: skip


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


def from_dict(data: dict[str, Any]) -> RunReport:
    """The inverse of `to_dict`: a stored report (a run record, a --format json output) read back.

    Raises ValueError (KeyError, TypeError included) when `data` is not a fanout/report/v1.
    """
    if data.get("schema") != SCHEMA:
        raise ValueError(f"schema is {data.get('schema')!r}, not {SCHEMA!r}")
    rollout = data.get("rollout")
    return RunReport(
        run_id=data["run_id"],
        command=data["command"],
        mode=Mode(data["mode"]),
        environment=data["environment"],
        services=tuple(data["services"]),
        started_at=datetime.fromisoformat(data["started_at"]),
        finished_at=datetime.fromisoformat(data["finished_at"]),
        results=tuple(_result_from_dict(r) for r in data["results"]),
        sources=tuple(
            SourceSummary(
                s["service"],
                s["url"],
                tuple(SourceFile(**f) for f in s["files"]),
                s.get("manifest"),
                s.get("release"),
                tuple(s.get("unpublished", ())),
                s.get("unpublished_policy"),
                tuple(s.get("paths", ())),
            )
            for s in data["source"]["sets"]
        ),
        s3_list_requests=data["source"]["s3_list_requests"],
        s3_get_requests=data["source"]["s3_get_requests"],
        target_count=data["totals"]["targets"],
        rollout=None if rollout is None else Rollout(**rollout),
        interrupted=data["interrupted"],
        resumed_from=data.get("resumed_from"),
        slice=data.get("slice"),
        parts=tuple(SlicePart(**p) for p in data.get("parts", ())),
        missing_slices=tuple(data.get("missing_slices", ())),
        inspection=schema.from_dict(data["inspection"]) if data.get("inspection") else None,
        not_stored=tuple(data.get("not_stored", ())),
        rollback=_rollback_from_dict(data.get("rollback")),
        warnings=tuple(Finding(**w) for w in data.get("warnings", ())),
    )


def _rollback_from_dict(data: dict[str, Any] | None) -> RollbackRequest | None:
    if data is None:
        return None
    return RollbackRequest(
        to=tuple(data["to"]),
        migrations=tuple(data["migrations"]),
        release=data["release"],
        reapply=bool(data["reapply"]),
        accept_drift=bool(data["accept_drift"]),
        reason=data["reason"],
    )


def _result_from_dict(data: dict[str, Any]) -> TargetResult:
    error = data["error"]
    return TargetResult(
        target=data["target"],
        service=data["service"],
        status=Status(data["status"]),
        server=data["server"],
        database=data["database"],
        schema=data["schema"],
        tenants=tuple(data["tenants"]),
        applied_before=tuple(data["applied_before"]),
        ran=tuple(AppliedMigration(m["id"], m["seconds"]) for m in data["ran"]),
        pending=tuple(data["pending"]),
        initialized=data["initialized"],
        lock_holder=_holder_from_dict(data["lock_holder"]),
        broken_lock=_holder_from_dict(data["broken_lock"]),
        retries=tuple(Retry(r["attempt"], r["reason"], r["delay_seconds"], r["migration"]) for r in data["retries"]),
        error=None
        if error is None
        else TargetError(
            ErrorKind(error["kind"]),
            error["message"],
            error["migration"],
            error["file"],
            tuple(error["invalid_indexes"]),
        ),
        seconds=data["seconds"],
        drift=tuple(
            Drift(d["migration"], DriftKind(d["kind"]), d["recorded"], d["current"], d["detail"])
            for d in data.get("drift", ())
        ),
        unverified=tuple(data.get("unverified", ())),
        rolled_back=tuple(AppliedMigration(m["id"], m["seconds"]) for m in data.get("rolled_back", ())),
        to_roll_back=tuple(data.get("to_roll_back", ())),
        in_doubt=_in_doubt_from_dict(data.get("in_doubt")),
        invalid_indexes=tuple(data.get("invalid_indexes", ())),
    )


def _holder_from_dict(data: dict[str, Any] | None) -> LockHolder | None:
    if data is None:
        return None
    since = datetime.fromisoformat(data["since"]) if data["since"] else None
    return LockHolder(data["pid"], since, data["host"], data["run_id"], data["alive"])


def merge(reports: Sequence[RunReport]) -> RunReport:
    """One fleet report from the reports of N slices (`--slice K/N`) of one release.

    Refuses (ValueError) to merge what does not belong together: different environments,
    commands or slice counts, two reports of one slice, a target in two slices, or slices
    that ran different migration sets. Missing slices are named in the result, whose
    exit code is then 5.
    """
    if not reports:
        raise ValueError("nothing to merge")
    first = reports[0]
    for field_name in ("environment", "command"):
        values = sorted({str(getattr(r, field_name)) for r in reports})
        if len(values) > 1:
            raise ValueError(f"the reports are of different {field_name}s: {', '.join(values)}")
    if any(r.slice is None for r in reports):
        unsliced = next(r for r in reports if r.slice is None)
        raise ValueError(
            f"run {unsliced.run_id} covered the whole fleet (no --slice); there is nothing to merge it with"
        )
    counts = sorted({_slice_of(r)[1] for r in reports})
    if len(counts) > 1:
        raise ValueError(f"the reports split the fleet in different numbers of slices: {counts}")
    total = counts[0]
    by_index: dict[int, RunReport] = {}
    for r in reports:
        index = _slice_of(r)[0]
        if index in by_index:
            raise ValueError(f"slice {r.slice} appears twice (runs {by_index[index].run_id} and {r.run_id})")
        by_index[index] = r
    sets = {r.run_id: _source_digest(r) for r in reports}
    if len(set(sets.values())) > 1:
        raise ValueError(
            "the slices applied different migration sets (S3 changed between their runs): "
            + ", ".join(f"{r.slice} run {r.run_id}" for r in reports)
        )
    owner: dict[str, str] = {}
    for r in reports:
        for result in r.results:
            seen = owner.setdefault(result.target, r.slice or "")
            if seen != r.slice:
                raise ValueError(f"target {result.target!r} is in slice {seen} and in slice {r.slice}")
    ordered = [by_index[i] for i in sorted(by_index)]
    return RunReport(
        run_id="+".join(r.run_id for r in ordered),
        command=first.command,
        mode=first.mode,
        environment=first.environment,
        services=tuple(dict.fromkeys(s for r in ordered for s in r.services)),
        started_at=min(r.started_at for r in ordered),
        finished_at=max(r.finished_at for r in ordered),
        results=tuple(result for r in ordered for result in r.results),
        sources=first.sources,
        s3_list_requests=sum(r.s3_list_requests for r in ordered),
        s3_get_requests=sum(r.s3_get_requests for r in ordered),
        target_count=sum(r.target_count for r in ordered),
        interrupted=any(r.interrupted for r in ordered),
        parts=tuple(SlicePart(r.slice or "", r.run_id, exit_code(r), r.target_count) for r in ordered),
        missing_slices=tuple(f"{i}/{total}" for i in range(1, total + 1) if i not in by_index),
        rollback=first.rollback,
        inspection=schema.combine([r.inspection for r in ordered if r.inspection is not None]),
        warnings=first.warnings,
    )


def _slice_of(report: RunReport) -> tuple[int, int]:
    index, _, count = (report.slice or "1/1").partition("/")
    return int(index), int(count)


def _source_digest(report: RunReport) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    return tuple(sorted((s.service, tuple(sorted((f.name, f.sha256) for f in s.files))) for s in report.sources))


# Past this many results a JSON report is written on one line: indenting needs json's
# pure-Python encoder, 1.9 s for 10,000 schema targets against 0.4 s for the C one, and an
# apply renders it twice (the run record and stdout). Nobody reads 10 MB of JSON by eye.
JSON_INDENT_LIMIT = 1000


def render_json(report: RunReport, *, detailed: bool = False, indent: bool | None = None) -> str:
    """The `fanout/report/v1` document. `indent`: by default, indented up to JSON_INDENT_LIMIT results."""
    if indent is None:
        indent = len(report.results) <= JSON_INDENT_LIMIT
    document = to_dict(report, detailed=detailed)
    return redact(json.dumps(document, indent=2) if indent else json.dumps(document, separators=(",", ":")))


# ---- text ---------------------------------------------------------------------------

_STYLES = {
    Status.UP_TO_DATE: "green",
    Status.PENDING: "yellow",
    Status.APPLIED: "cyan",
    Status.ROLLED_BACK: "blue",
    Status.FAILED: "bold red",
    Status.SKIPPED: "magenta",
    Status.DRIFTED: "bold yellow",
    Status.IN_DOUBT: "bold red",
}


def render_text(report: RunReport, *, width: int = 120, color: bool = False) -> str:
    """A compact table; past TEXT_ROW_LIMIT rows, a summary plus every row that needs attention."""
    from rich.console import Console
    from rich.table import Table

    buffer = StringIO()
    console = Console(file=buffer, width=width, no_color=not color, force_terminal=color, highlight=False)
    where = f" · slice {report.slice}" if report.slice else ""
    if report.rollback is not None:
        where += f" · {report.rollback.describe()}" + (" (dry run)" if report.mode is Mode.PLAN else "")
    console.print(
        f"fanout {report.command} · environment {report.environment}{where} · "
        f"services {', '.join(report.services)} · run {report.run_id}"
    )
    rows = list(report.results)
    summarized = len(rows) > TEXT_ROW_LIMIT
    if summarized:
        rows = [r for r in rows if r.status in _NOT_DONE]  # every one of them, however many
    if rows:
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for column in ("target", "service", "status", "applied", "pending", "detail"):
            table.add_column(column, overflow="fold")
        for r in rows:
            table.add_row(
                r.target,
                r.service,
                f"[{_STYLES[r.status]}]{r.status.value}[/]",
                str(len(r.applied_before) + len(r.ran) - len(r.rolled_back)),
                str(len(r.pending)),
                describe(r, report.mode),
            )
        console.print(table)
    if summarized:
        console.print(f"({len(report.results)} results; only failed, drifted and skipped ones are listed)")
    console.print(_totals_line(report))
    rollout = report.rollout
    if rollout is not None and rollout.stop_reason:
        console.print(
            f"stopped after wave {rollout.waves_run} of {rollout.waves_planned}: {rollout.stop_reason}; "
            "targets not started are listed as skipped"
        )
    if report.parts:
        console.print(
            f"merged {len(report.parts)} slice(s): "
            + ", ".join(f"{p.slice} run {p.run_id} exit {p.exit_code}" for p in report.parts)
        )
    if report.missing_slices:
        console.print(f"missing slice(s) {', '.join(report.missing_slices)}: their targets are not in this report")
    if report.interrupted:
        console.print("interrupted: in-flight migrations finished or rolled back, every lock was released")
    if report.not_stored:
        console.print(f"the work is done, but not stored: {', '.join(report.not_stored)}")
    for line in source_notes(report):
        console.print(line, markup=False)
    return redact(buffer.getvalue())


def source_notes(report: RunReport) -> list[str]:
    """One line per lint finding and per unpublished migration: every format shows them."""
    lines = [w.describe() for w in report.warnings]
    for s in report.sources:
        if s.unpublished:
            handling = "applied" if s.unpublished_policy == "apply" else "not applied"
            lines.append(
                f"unpublished [{s.unpublished_policy}] {s.service}: {', '.join(s.unpublished)}: in the bucket but "
                f"not in release {s.release} ({handling}; publish them with fanout publish)"
            )
    return lines


def describe(result: TargetResult, mode: Mode) -> str:
    """One line on what happened to a result: its error, else drift, runs, pending, locks, retries."""
    invalid = f"; INVALID index(es) on the shard: {', '.join(result.invalid_indexes)}" if result.invalid_indexes else ""
    if result.error is not None:
        where = f"{result.error.file}: " if result.error.file else ""
        retried = f" (after {len(result.retries)} retries)" if result.retries else ""
        return f"{result.error.kind.value}: {where}{result.error.message}{retried}{invalid}"
    parts = []
    if not result.initialized and result.status is not Status.SKIPPED:
        parts.append("never migrated")
    if result.drift:
        parts.append("drift: " + "; ".join(f"{d.migration} {d.kind.value} ({d.detail})" for d in result.drift))
    if result.unverified:
        parts.append(f"{len(result.unverified)} applied without checksum (fanout baseline)")
    if result.rolled_back:
        parts.append("rolled back " + ", ".join(m.id for m in result.rolled_back))
    if result.to_roll_back and mode is Mode.PLAN:
        parts.append("would roll back " + _shorten(result.to_roll_back))
    elif result.to_roll_back:
        parts.append("still to roll back " + _shorten(result.to_roll_back))
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
    return "; ".join(parts) + invalid


def _shorten(ids: Iterable[str], limit: int = 4) -> str:
    items = list(ids)
    text = ", ".join(items[:limit])
    return text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _totals_line(report: RunReport) -> str:
    seconds = (report.finished_at - report.started_at).total_seconds()
    counts = ", ".join(f"{report.count(s)} {s.value}" for s in Status if report.count(s))
    applied = sum(len(r.ran) for r in report.results)
    pending = sum(len(r.pending) for r in report.results)
    rolled_back = sum(len(r.rolled_back) for r in report.results)
    undone = f", {rolled_back} rolled back" if rolled_back or report.rollback else ""
    return (
        f"{report.target_count} targets × {len(report.services)} services: {counts or 'nothing to do'} · "
        f"{applied} migrations applied{undone}, {pending} pending · {seconds:.1f}s"
    )


def render(report: RunReport, fmt: str, *, detailed: bool = False, color: bool = False) -> str:
    if fmt == "json":
        return render_json(report, detailed=detailed)
    return render_text(report, color=color)
