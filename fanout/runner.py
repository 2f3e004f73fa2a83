"""The runner: applies (or plans) a pinned migration set on many targets at once.

This is the only module that talks to yoyo. Each target gets one connection, used by
one worker thread and closed afterwards (yoyo backends are not thread-safe), or handed
to the next target of the same database when it ends cleanly (`_Connections`); the
migration lists are read and fully loaded once, in the calling thread, before the
fan-out, and are shared read-only after that. `fanout.rollout` decides when each
target starts (waves, failure budget, caps per server); this module decides what
happens on it.

Plan and apply go through the same per-target procedure; the mode only picks the
session behind it. The plan session is read-only (its transactions are READ ONLY,
it creates no table and takes no lock), the apply session drives yoyo.

Departures from yoyo's own `apply_migrations`, each for a failure yoyo users meet:
- A transactional migration and the row that records it are committed in one
  transaction on one connection, so a crash can never leave a shard with a change
  applied but unrecorded (yoyo applies on one connection and marks on another).
  One connection per target also makes the connection budget simple: at most
  `concurrency` connections to shards, at most `per_server` to one server.
- A plain transactional SQL migration goes to the server as one query string: BEGIN, its
  statements, the two rows that record it, COMMIT. yoyo's own path costs seven round
  trips per migration (a savepoint per step and per migration, one statement per row),
  which on a shard 2 ms away is most of the time. Anything else (non-transactional
  migrations, Python steps) goes through yoyo's steps.
- The shard lock is yoyo's `yoyo_lock` row, taken through `fanout.locking`, which
  recognizes and breaks the lock of a fanout that died (see that module).
- Transient failures (lock timeout, serialization failure, deadlock, lost connection)
  are retried with backoff and jitter, and every retry is in the report.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import itertools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql
from yoyo import exceptions as yoyo_exceptions
from yoyo import read_migrations
from yoyo.backends import PostgresqlBackend
from yoyo.connections import DatabaseURI
from yoyo.migrations import (
    Migration,
    MigrationList,
    MigrationStep,
    TransactionWrapper,
    ancestors,
    topological_sort,
)
from yoyo.topologicalsort import CycleError
from yoyo.utils import change_param_style

from fanout import checksums, indoubt, locking, pooler, rollout
from fanout import rollback as rollback_selection
from fanout.config import TcpSettings
from fanout.directory import DEFAULT_TCP, Target
from fanout.errors import ConfigError, SourceError, TargetFailed
from fanout.interrupt import Interrupt, PgCancel, Reason, Watched
from fanout.report import (
    AppliedMigration,
    Drift,
    DriftKind,
    ErrorKind,
    Finding,
    InDoubt,
    LockHolder,
    Mode,
    Retry,
    RollbackRequest,
    Rollout,
    RunReport,
    SourceFile,
    SourceSummary,
    Status,
    TargetError,
    TargetResult,
)
from fanout.secret import error_line
from fanout.source import MigrationSet, Snapshot

log = logging.getLogger(__name__)

MIGRATION_TABLE = "_yoyo_migration"
VERSION_TABLE = "_yoyo_version"
LOCK_POLL_SECONDS = 0.25
APPLICATION_NAME = "fanout"
RETRY_BACKOFF_CAP_SECONDS = 30.0
CLIENT_CHECK_INTERVAL = "1s"
# SQLSTATEs worth another try: lock_not_available (lock_timeout), serialization_failure,
# deadlock_detected. Everything else is the migration's own fault.
_RETRYABLE_SQLSTATES = {"55P03", "40001", "40P01"}
_SQLSTATE_KINDS = {"55P03": ErrorKind.LOCK_TIMEOUT, "57014": ErrorKind.STATEMENT_TIMEOUT}

yoyo_exceptions.register(psycopg2.DatabaseError)
# yoyo's Migration keeps a process-wide registry by id that `load()` reads to resolve
# `-- depends:`; loading one set at a time keeps concurrent loads from mixing sets.
_load_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """PostgreSQL settings for every session fanout opens on a shard (None: the server's default).

    `settings` are the environment's own (`[session]`): (name, value) pairs, set on every
    session after fanout's, and again whenever the session is reset between migrations.
    """

    lock_timeout: str | None = None
    statement_timeout: str | None = None
    settings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RunOptions:
    mode: Mode
    limits: rollout.Limits = field(default_factory=rollout.Limits)
    lock_wait: float = 60.0  # seconds to wait for a shard's migration lock
    connect_timeout: float = 10.0
    session: SessionSettings = field(default_factory=SessionSettings)
    retries: int = 3
    retry_backoff: float = 0.5  # first delay; doubles each retry, with jitter
    # Seconds one target may take, lock wait included; past it the statement in flight is
    # cancelled and the target fails (target-timeout, or unresponsive if the shard does not answer).
    target_timeout: float | None = None
    # Seconds an answer may be awaited before a second connection checks that the server is
    # still working on it (a long migration is; a session whose answer a hung proxy swallowed
    # is not, and fails `unresponsive`). None or 0: no check.
    liveness_check: float | None = 30.0
    tcp: TcpSettings = field(default_factory=TcpSettings)
    # Every service of the environment is in the run: a migration yoyo recorded that no
    # set knows is then drift (with a subset, it may belong to a service left out).
    all_services: bool = True
    # Mode.ROLLBACK (or a dry run of it: Mode.PLAN with this set): what to roll back.
    rollback: RollbackRequest | None = None
    # verify --at: the version each named migration's service is meant to be at.
    at: tuple[str, ...] = ()
    # rollback --release R of a release that is no longer a service's current one: service -> ids it added.
    release_added: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # `.py` migrations may be imported and run (their code runs inside the runner).
    python_migrations: bool = False
    # A migration in doubt whose only trace is INVALID indexes it builds: drop them and run it again.
    repair_invalid: bool = False
    # apply --to ID: only that migration and what it depends on, in the service that has it (yoyo's -r).
    up_to: str | None = None

    @property
    def concurrency(self) -> int:
        return self.limits.concurrency


@dataclass(frozen=True, slots=True)
class _ServicePlan:
    """One service's loaded migrations, in yoyo's order."""

    service: str
    migrations: tuple[Migration, ...]
    post_apply: tuple[Migration, ...]
    files: dict[str, str]  # migration id -> file name
    sha256: dict[str, str]  # migration id -> sha256 of the content this run applies
    rollback_files: dict[str, str] = field(default_factory=dict)  # migration id -> its rollback file's name
    undo: tuple[str, ...] = ()  # rollback: what this service may roll back on a shard, newest first
    release: str | None = None
    added: tuple[str, ...] | None = None  # what the release added (from its manifest)
    # Files yoyo could not load, as (file, message): only in a read-only run, which reports them.
    problems: tuple[tuple[str, str], ...] = ()


def run(
    snapshot: Snapshot,
    targets: Sequence[Target],
    options: RunOptions,
    *,
    run_id: str,
    environment: str,
    command: str,
    on_result: Callable[[TargetResult], None] | None = None,
    on_start: Callable[[int, list[int]], None] | None = None,
    interrupt: Interrupt | None = None,
    resumed_from: str | None = None,
) -> RunReport:
    """Run `options.mode` on every target; a target's failure is a result, never an exception.

    `on_start(targets, wave sizes)` and `on_result(result)` report progress; `on_result` is
    called from worker threads.
    """
    started_at = datetime.now(UTC)
    plans = load(snapshot.sets, python=options.python_migrations, tolerant=options.mode is Mode.PLAN)
    if options.rollback is not None:
        plans = _select_rollback(plans, options.rollback, options.release_added)
    if options.up_to is not None:
        plans = _up_to(plans, options.up_to)
        options = replace(options, all_services=False)  # the other services are not in this run
    if options.at:
        graphs = [_graph(p) for p in plans]
        for migration in options.at:
            if rollback_selection.owner(graphs, migration) is None:
                raise ConfigError(f"--at {migration}: no such migration in the run's sets")
    if on_start is not None:
        on_start(len(targets), options.limits.waves.sizes(len(targets)))
    interrupt = interrupt or Interrupt()
    connections = _Connections(targets, options, run_id)

    def work(target: Target) -> list[TargetResult]:
        results = _migrate_target(target, plans, options, run_id, environment, interrupt, connections)
        if on_result is not None:
            for result in results:
                on_result(result)
        return results

    try:
        outcome = rollout.schedule(
            targets,
            work,
            server_of=lambda t: t.server,
            failed=lambda results: any(r.status in (Status.FAILED, Status.IN_DOUBT) for r in results),
            limits=options.limits,
            stop=interrupt.stopping,
        )
    finally:
        connections.close_idle()
    per_target: list[list[TargetResult]] = []
    for target, results in zip(targets, outcome.results, strict=True):
        if results is None:
            error = TargetError(ErrorKind.NOT_STARTED, f"not started: {outcome.stop_reason}")
            results = [_result(target, p.service, Status.SKIPPED, error) for p in plans]
            if on_result is not None:
                for result in results:
                    on_result(result)
        per_target.append(results)

    limits = options.limits
    return RunReport(
        run_id=run_id,
        command=command,
        mode=options.mode,
        environment=environment,
        services=tuple(p.service for p in plans),
        started_at=started_at,
        finished_at=datetime.now(UTC),
        results=tuple(r for results in per_target for r in results),
        sources=tuple(_summary(s) for s in snapshot.sets),
        s3_list_requests=snapshot.stats.list_requests,
        s3_get_requests=snapshot.stats.get_requests,
        target_count=len(targets),
        rollout=Rollout(
            concurrency=limits.concurrency,
            per_server=limits.per_server or limits.concurrency,
            waves=str(limits.waves),
            max_failures=str(limits.budget),
            waves_run=outcome.waves_run,
            waves_planned=len(limits.waves.sizes(len(targets))),
            stop_reason=outcome.stop_reason,
            peak_in_flight=outcome.peak_in_flight,
            peak_per_server=max(outcome.peak_per_server.values(), default=0),
            connections_opened=connections.opened,
        ),
        interrupted=interrupt.stopping.is_set(),
        resumed_from=resumed_from,
        rollback=options.rollback,
        warnings=tuple(
            Finding(p.service, file, "bad-migration", "error", message) for p in plans for file, message in p.problems
        ),
    )


def up_to(snapshot: Snapshot, wanted: str, *, python: bool = False) -> str:
    """The id of the migration `apply --to wanted` would stop at; raises ConfigError as that run would."""
    (plan,) = _up_to(load(snapshot.sets, python=python), wanted)
    return str(plan.migrations[-1].id)


def _up_to(plans: tuple[_ServicePlan, ...], wanted: str) -> tuple[_ServicePlan, ...]:
    """yoyo's `apply -r`: the one migration `wanted` names and its `-- depends:` ancestors, in yoyo's order.

    As in yoyo, `wanted` may be any part of an id that names exactly one migration; an exact
    id always names its migration (yoyo refuses it when it is also part of another id). Only
    the service that has it is in the run. Raises ConfigError, before any shard is touched.
    """
    every = [(plan, m) for plan in plans for m in plan.migrations]
    found = [(plan, m) for plan, m in every if m.id == wanted] or [(plan, m) for plan, m in every if wanted in m.id]
    services = ", ".join(repr(p.service) for p in plans)
    if not found:
        raise ConfigError(f"--to {wanted}: no migration id of the run's services ({services}) is or contains it")
    if len(found) > 1:
        listed = ", ".join(m.id for _, m in found[:10])
        raise ConfigError(f"--to {wanted}: names {len(found)} migrations ({listed}); give one of their ids")
    plan, target = found[0]
    keep = ancestors(target, plan.migrations) | {target}
    return (replace(plan, migrations=tuple(m for m in plan.migrations if m in keep)),)


def _graph(plan: _ServicePlan) -> rollback_selection.Graph:
    return rollback_selection.Graph(
        service=plan.service,
        order=tuple(m.id for m in plan.migrations),
        depends={m.id: frozenset(d.id for d in m.depends) for m in plan.migrations},
        rollback_files=frozenset(plan.rollback_files),
        release=plan.release,
        added=None if plan.added is None else frozenset(plan.added),
    )


def _select_rollback(
    plans: tuple[_ServicePlan, ...], request: RollbackRequest, release_added: dict[str, tuple[str, ...]]
) -> tuple[_ServicePlan, ...]:
    """Each plan with what it may roll back; refuses (before any shard is touched) a migration without rollback file."""
    graphs = [
        replace(_graph(p), release=request.release, added=frozenset(release_added[p.service]))
        if p.service in release_added
        else _graph(p)
        for p in plans
    ]
    selected = rollback_selection.candidates(request, graphs)
    rollback_selection.refuse_missing_rollback_files(graphs, selected)
    return tuple(replace(p, undo=selected[p.service]) for p in plans)


def load(sets: Sequence[MigrationSet], *, python: bool = False, tolerant: bool = False) -> tuple[_ServicePlan, ...]:
    """Parse every migration of every set now, so a broken file stops the run before any shard is touched.

    Reads the set's paths as yoyo's `read_migrations(*paths)` does (merged in order). A `.py`
    migration is imported (its code runs here) only when `python` allows it. `tolerant`
    (plan, status, verify) keeps a file that cannot be loaded in the set, with no step and
    no dependency, and names it in the plan's `problems` instead of raising SourceError.
    """
    plans = []
    owner: dict[str, str] = {}
    for migration_set in sets:
        problems: list[tuple[str, str]] = []
        service = migration_set.service
        folders = migration_set.folders or (migration_set.folder,)
        with _load_lock:
            # yoyo resolves dependencies through a process-wide registry of ids: without this,
            # a `__depends__` could silently resolve to another service's migration.
            Migration._Migration__all_migrations.clear()
            try:
                migrations: MigrationList = read_migrations(*(str(f) for f in folders))
            except yoyo_exceptions.MigrationConflict as e:
                raise SourceError(f"service {service!r}: migration id {e.args[0]!r} is in two files") from None
            members = {*migrations, *migrations.post_apply}
            for m in [*migrations, *migrations.post_apply]:
                file = os.path.basename(m.path)
                if not m.is_raw_sql() and not python:
                    problem = (file, "Python migration, not allowed by [source] python_migrations")
                elif (loading := _try_load(m, members)) is not None:
                    problem = (file, loading)
                else:
                    continue
                if not tolerant:
                    raise SourceError(f"service {service!r}: {problem[0]}: {problem[1]}")
                problems.append(problem)
                _stub(m)
            try:
                ordered = tuple(topological_sort(migrations))
            except (yoyo_exceptions.BadMigration, CycleError) as e:
                # yoyo's topological_sort is lazy: a cycle escapes as the sorter's own CycleError.
                cycle = " -> ".join(str(getattr(m, "id", m)) for m in (e.args[1] if len(e.args) > 1 else ()))
                message = f"'-- depends:' lines form a cycle{': ' + cycle if cycle else ''}"
                if not tolerant:
                    raise SourceError(f"service {service!r}: {message}") from None
                problems.append(("(dependencies)", message))
                for m in migrations:
                    m._depends = set()
                ordered = tuple(migrations)
        for m in ordered:
            if m.id in owner:
                raise SourceError(
                    f"migration id {m.id!r} exists in services {owner[m.id]!r} and {migration_set.service!r}; "
                    "ids must be unique across an environment's services because they share yoyo's table on each shard"
                )
            owner[m.id] = migration_set.service
        sources = [f for f in migration_set.files if not f.is_rollback]
        files = {f.migration_id: f.name for f in sources}
        sha256 = {f.migration_id: f.sha256 for f in sources}
        rollbacks = {
            f.name.removesuffix(rollback_selection.ROLLBACK_SUFFIX): f.name
            for f in migration_set.files
            if f.is_rollback
        }
        plans.append(
            _ServicePlan(
                service, ordered, tuple(migrations.post_apply), files, sha256,
                rollback_files=rollbacks, release=migration_set.release, added=migration_set.added,
                problems=tuple(problems),
            )
        )  # fmt: skip
    return tuple(plans)


def _try_load(migration: Migration, members: set[Migration]) -> str | None:
    """Load one migration as yoyo does; what went wrong, or None."""
    try:
        migration.load()
    except yoyo_exceptions.BadMigration as e:
        cause = e.args[1] if len(e.args) > 1 else None
        return f"yoyo cannot load it: {type(cause).__name__}: {cause}" if cause else _bad_migration(e)
    except UnicodeDecodeError as e:
        return f"not UTF-8 text: {e}"
    except KeyError as e:  # yoyo's lookup of '-- transactional:'
        return f"'-- transactional: {e.args[0]}' must be true or false"
    outside = sorted(d.id for d in migration.depends if d not in members)
    if outside:
        return f"depends on {', '.join(outside)}, which this service's set does not have"
    return None


def _stub(migration: Migration) -> None:
    """A migration kept by id only (a read-only run lists it): no step, no known dependency."""
    migration.steps = []
    migration._depends = {d for d in (migration._depends or ()) if d is not None}
    migration.use_transactions = True


def _bad_migration(error: yoyo_exceptions.BadMigration) -> str:
    text = " ".join(str(a) for a in error.args)
    return text.replace("Could not resolve dependencies in", "a '-- depends:' names an unknown migration in")


def ensure_database(
    target: Target, *, connect_timeout: float = 10.0, maintenance_db: str = "postgres", tcp: TcpSettings = DEFAULT_TCP
) -> bool:
    """Create the target's database when it does not exist; True when it was created.

    Connects to the server's maintenance database with the target's own credentials, so the
    role needs CREATEDB. Safe when two bootstraps race: the loser sees the database exist.
    """
    options = RunOptions(mode=Mode.APPLY, connect_timeout=connect_timeout, tcp=tcp)
    kwargs = _connect_kwargs(replace(target, dbname=maintenance_db), options, "bootstrap")
    try:
        connection = psycopg2.connect(**kwargs)
    except psycopg2.Error as e:
        raise TargetFailed(_classify_connect_error(e, replace(target, dbname=maintenance_db)).error.message) from None
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.dbname,))
            if cursor.fetchone():
                return False
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(target.dbname)))
            return True
    except psycopg2.errors.DuplicateDatabase:
        return False
    except psycopg2.Error as e:
        raise TargetFailed(f"cannot create database {target.dbname!r} on {target.server}: {_pg_message(e)}") from None
    finally:
        connection.close()


# ---- one target ---------------------------------------------------------------------


class _Failure(Exception):
    """A classified per-target failure; becomes TargetResult.error."""

    def __init__(self, error: TargetError, *, retryable: bool = False, in_doubt: InDoubt | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable
        self.in_doubt = in_doubt


@dataclass(slots=True)
class _Progress:
    """What one service achieved on one target, kept across the target's retries."""

    before: tuple[str, ...] | None = None
    ran: list[AppliedMigration] = field(default_factory=list)
    retries: list[Retry] = field(default_factory=list)
    rolled_back: list[AppliedMigration] = field(default_factory=list)
    result: TargetResult | None = None


def _backoff(options: RunOptions, attempt: int) -> float:
    """Exponential, capped, with full jitter so retrying runners do not march in step."""
    ceiling = min(RETRY_BACKOFF_CAP_SECONDS, options.retry_backoff * 2**attempt)
    return random.uniform(ceiling / 2, ceiling)


def _migrate_target(
    target: Target,
    plans: Sequence[_ServicePlan],
    options: RunOptions,
    run_id: str,
    environment: str,
    interrupt: Interrupt,
    connections: _Connections,
) -> list[TargetResult]:
    started = time.monotonic()
    deadline = started + options.target_timeout if options.target_timeout is not None else None
    connections.starting(target)
    progress = {p.service: _Progress() for p in plans}
    if options.rollback is not None:
        plans = tuple(reversed(plans))  # services are rolled back in reverse order: dependents first
    failure: TargetError | None = None
    context: dict[str, Any] = {}
    for attempt in itertools.count():
        session: _Session | None = None
        reusable = False
        try:
            session = _open_session(target, options, run_id, interrupt, deadline, connections)
            context["initialized"] = session.initialized
            with session.lock(options.lock_wait) as (holder, broken):
                context["lock_holder"] = holder
                context["broken_lock"] = context.get("broken_lock") or broken
                applied = session.applied()
                recorded = session.recorded_checksums()
                marks, invalid = session.marks_and_invalid()
                failed_hooks = frozenset(session.failed_hooks())
                unknown = _unknown_to_every_set(applied, plans, recorded) if options.all_services else []
                for plan in plans:
                    state = progress[plan.service]
                    if state.result is None:
                        first = plan is plans[0]
                        shard = _ShardState(
                            applied,
                            recorded,
                            environment,
                            unknown if first else [],
                            marks,
                            invalid if first else (),
                            failed_hooks,
                        )
                        procedure = _migrate_service if options.rollback is None else _rollback_service
                        state.result = _at_level(
                            procedure(session, target, plan, shard, state, options, interrupt, deadline),
                            plan,
                            options.at,
                        )
                    if state.result.status in _STOPS_TARGET:
                        break
            # Only a target that went entirely well hands its connection on; any failure closes it.
            reusable = all(p.result is not None and p.result.error is None for p in progress.values())
            break
        except _Failure as caught:
            current = next((p for p in plans if progress[p.service].result is None), plans[0])
            if caught.retryable and attempt < options.retries and not interrupt.stopping.is_set():
                delay = _backoff(options, attempt)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    failure = _timed_out(options, f"gave up retrying ({caught.error.message})").error
                    break
                progress[current.service].retries.append(Retry(attempt + 1, caught.error.message, delay))
                log.info("%s: %s; retrying in %.1fs", target.id, caught.error.message, delay)
                interrupt.stopping.wait(delay)
                continue
            failure = caught.error
            break
        except Exception as e:  # a bug or an unexpected driver error must not crash the fleet run
            log.exception("unexpected error on target %s", target.id)
            failure = TargetError(ErrorKind.INTERNAL, f"{type(e).__name__}: {e}")
            break
        finally:
            if session is not None:
                session.close(reuse=reusable)

    results: list[TargetResult] = []
    blocked_by: str | None = None
    for plan in plans:
        state = progress[plan.service]
        if state.result is not None:
            result = state.result
        elif failure is not None and blocked_by is None:
            status = Status.SKIPPED if failure.kind is ErrorKind.INTERRUPTED else Status.FAILED
            result = _result(target, plan.service, status, failure, **_outcome(state, plan, context))
        else:
            reason = f"not attempted: service {blocked_by!r} did not complete on this target"
            result = _result(target, plan.service, Status.SKIPPED, TargetError(ErrorKind.NOT_STARTED, reason))
        if blocked_by is None and result.status in _STOPS_TARGET:
            blocked_by = plan.service
        results.append(replace(result, retries=tuple(state.retries), **_lock_context(context)))
    seconds = time.monotonic() - started
    return [replace(r, seconds=seconds) for r in results]


# A service that ends so leaves the services after it on the target not attempted.
_STOPS_TARGET = (Status.FAILED, Status.SKIPPED, Status.IN_DOUBT)


def _outcome(state: _Progress, plan: _ServicePlan, context: dict[str, Any]) -> dict[str, Any]:
    ran = {m.id for m in state.ran}
    undone = {m.id for m in state.rolled_back}
    before = state.before or ()
    return {
        "applied_before": before,
        "ran": tuple(state.ran),
        "pending": tuple(m.id for m in plan.migrations if (m.id not in ran and m.id not in before) or m.id in undone)
        if state.before is not None
        else (),
        "initialized": context.get("initialized", False),
        "rolled_back": tuple(state.rolled_back),
        "to_roll_back": tuple(m for m in rollback_selection.on_shard(plan.undo, before) if m not in undone),
    }


def _lock_context(context: dict[str, Any]) -> dict[str, Any]:
    return {"lock_holder": context.get("lock_holder"), "broken_lock": context.get("broken_lock")}


@dataclass(frozen=True, slots=True)
class _Recording:
    """What fanout records next to yoyo's row when it applies a migration."""

    sha256: str
    service: str
    environment: str


@dataclass(frozen=True, slots=True)
class _ShardState:
    """What a target's shard holds, read once under its lock."""

    applied: dict[str, str]  # yoyo's applied migrations: hash -> id (updated as the run applies)
    recorded: dict[str, checksums.Recorded]  # fanout's checksums by migration id
    environment: str
    unknown: list[Drift]  # applied migrations no set of the run knows (reported on the first service)
    marks: dict[str, indoubt.Mark]  # non-transactional migrations started and never recorded
    invalid: tuple[str, ...]  # every INVALID index (reported on the first service)
    failed_hooks: frozenset[str] = frozenset()  # post-apply hooks whose last run here failed


def _unknown_to_every_set(
    applied: dict[str, str], plans: Sequence[_ServicePlan], recorded: dict[str, checksums.Recorded]
) -> list[Drift]:
    known = {m.hash for p in plans for m in p.migrations}
    return [
        Drift(migration_id, DriftKind.MISSING, None, None, "recorded by yoyo, in no service's migration set")
        for hash_, migration_id in sorted(applied.items(), key=lambda item: item[1])
        if hash_ not in known and migration_id not in recorded  # recorded ones are checked per service
    ]


def _migrate_service(
    session: _Session,
    target: Target,
    plan: _ServicePlan,
    shard: _ShardState,
    state: _Progress,
    options: RunOptions,
    interrupt: Interrupt,
    deadline: float | None = None,
) -> TargetResult:
    """Apply one service's pending migrations; raises _Failure only when the connection is lost."""
    applied = shard.applied
    if state.before is None:
        state.before = tuple(m.id for m in plan.migrations if m.hash in applied)
    drift, unverified = checksums.compare(
        shard.recorded,
        service=plan.service,
        environment=shard.environment,
        applied_ids=set(state.before),
        current=plan.sha256,
    )
    drift = shard.unknown + drift
    pending = list(topological_sort(m for m in plan.migrations if m.hash not in applied))
    error: TargetError | None = None
    if drift and options.mode is Mode.APPLY and not state.ran:
        listed = ", ".join(f"{d.migration} ({d.kind.value})" for d in drift[:5])
        error = TargetError(
            ErrorKind.DRIFT,
            f"refused: applied migrations differ from the migration set: {listed}; "
            "review, then `fanout accept --migration ID` to adopt the current content",
        )
        pending_for_drift = tuple(m.id for m in pending)
        return _result(
            target, plan.service, Status.FAILED, error, applied_before=state.before, pending=pending_for_drift,
            initialized=session.initialized, drift=tuple(drift), unverified=tuple(unverified),
            invalid_indexes=shard.invalid,
        )  # fmt: skip
    ran_now = 0
    doubt: InDoubt | None = None
    # A rollback marked as started and never unrecorded: the migration is still recorded but its
    # effect may be half undone, so the shard is neither up to date nor safe to apply to. Never
    # repaired here: --repair-invalid would clear the mark of a rollback, not finish it.
    undoing = next((m for m in plan.migrations if m.id in shard.marks and m.hash in applied), None)
    if undoing is not None:
        try:
            doubt, _ = session.in_doubt(undoing, shard.marks[undoing.id], repair=False)
        except _Failure as failure:
            if failure.retryable and failure.error.kind is ErrorKind.UNREACHABLE:
                raise
            error = failure.error
        if doubt is not None:
            error = replace(_in_doubt_error(doubt), migration=undoing.id, file=plan.rollback_files.get(undoing.id))
    for migration in pending if error is None else ():
        if interrupt.stopping.is_set():
            error = TargetError(ErrorKind.INTERRUPTED, f"interrupted before {migration.id}")
            break
        if deadline is not None and time.monotonic() >= deadline:
            error = _timed_out(options, f"stopped before {migration.id}").error
            break
        recording = _Recording(plan.sha256.get(migration.id, ""), plan.service, shard.environment)
        try:
            mark = shard.marks.get(migration.id)
            if mark is not None:
                doubt, repaired = session.in_doubt(migration, mark, repair=options.repair_invalid)
                if repaired is not None:
                    state.retries.append(Retry(len(state.retries) + 1, repaired, 0.0, migration.id))
                    log.warning("%s: %s: %s", target.id, migration.id, repaired)
                if doubt is not None:
                    raise _Failure(_in_doubt_error(doubt), in_doubt=doubt)
            seconds = _apply_with_retries(session, migration, recording, state, options, interrupt, deadline)
        except _Failure as failure:
            if failure.retryable and failure.error.kind is ErrorKind.UNREACHABLE:
                raise  # the connection is gone: the target starts over on a new one
            error = replace(failure.error, migration=migration.id, file=plan.files.get(migration.id))
            doubt = failure.in_doubt
            break
        if seconds is not None:
            ran_now += 1
            applied[migration.hash] = migration.id
            state.ran.append(AppliedMigration(migration.id, seconds))
    # A hook that failed on an earlier run stays due, or the next run would forget it.
    due = sorted(shard.failed_hooks & {h.id for h in plan.post_apply})
    if error is None and (state.ran or due):
        error = _run_hooks(session, plan, due)
    still_pending = tuple(m.id for m in pending[ran_now:])
    if error is not None and error.kind is ErrorKind.INTERRUPTED:
        status = Status.SKIPPED
    elif error is not None and error.kind is ErrorKind.IN_DOUBT:
        status = Status.IN_DOUBT
    elif error is not None:
        status = Status.FAILED
    elif options.mode is Mode.PLAN and drift:
        status = Status.DRIFTED
    elif options.mode is Mode.PLAN:
        status = Status.PENDING if still_pending else Status.UP_TO_DATE
    else:
        status = Status.APPLIED if state.ran else Status.UP_TO_DATE
    return _result(
        target,
        plan.service,
        status,
        error,
        applied_before=state.before,
        ran=tuple(state.ran),
        pending=still_pending,
        initialized=session.initialized,
        drift=tuple(drift),
        unverified=tuple(unverified),
        in_doubt=doubt,
        invalid_indexes=shard.invalid,
    )


def _run_hooks(session: _Session, plan: _ServicePlan, due: Sequence[str]) -> TargetError | None:
    """Run the service's post-apply hooks in order; the first failure stops them and is logged, so the
    hook stays due for the next run; hooks `due` from an earlier run are logged as run once all pass."""
    for hook in plan.post_apply:
        try:
            session.run_hook(hook)
        except _Failure as failure:
            session.note_hook(hook.id, plan.sha256.get(hook.id, ""), failed=True, reason=failure.error.message)
            return TargetError(
                ErrorKind.HOOK,
                f"post-apply hook {hook.id} failed: {failure.error.message}; the migrations before it are "
                "applied and recorded, and the hook runs again on the next apply",
                migration=hook.id,
                file=os.path.basename(hook.path),
            )
    for hook_id in due:
        session.note_hook(hook_id, plan.sha256.get(hook_id, ""), failed=False, reason=None)
    return None


def _in_doubt_error(doubt: InDoubt) -> TargetError:
    if doubt.operation == "rollback":
        return TargetError(
            ErrorKind.IN_DOUBT,
            f"in doubt: {doubt.describe()}. Settle it with `fanout mark --migration {doubt.migration}` (it is "
            f"still applied) or `fanout unmark --migration {doubt.migration}` (its rollback is complete)",
            invalid_indexes=doubt.invalid_indexes,
        )
    return TargetError(
        ErrorKind.IN_DOUBT,
        f"in doubt: {doubt.describe()}. Not run again: settle it with `fanout mark --migration {doubt.migration}` "
        f"(it is done) or `fanout unmark --migration {doubt.migration}` (run it again), or `apply --repair-invalid`",
        invalid_indexes=doubt.invalid_indexes,
    )


def _at_level(result: TargetResult, plan: _ServicePlan, at: Sequence[str]) -> TargetResult:
    """verify --at: the service is meant to have exactly its migrations up to the id named for it."""
    level = rollback_selection.target_level(_graph(plan), at)
    if level is None or result.status not in (Status.PENDING, Status.UP_TO_DATE):
        return result
    expected = set(level)
    pending = tuple(m for m in result.pending if m in expected)
    beyond = tuple(m for m in reversed(plan.migrations) if m.id in result.applied_before and m.id not in expected)
    status = Status.PENDING if pending or beyond else Status.UP_TO_DATE
    return replace(result, status=status, pending=pending, to_roll_back=tuple(m.id for m in beyond))


def _rollback_service(
    session: _Session,
    target: Target,
    plan: _ServicePlan,
    shard: _ShardState,
    state: _Progress,
    options: RunOptions,
    interrupt: Interrupt,
    deadline: float | None = None,
) -> TargetResult:
    """Roll back what the request selects on this shard, newest first; raises _Failure only when the connection is lost.

    Each rollback, yoyo's records of it and fanout's checksum row go in one transaction,
    so a failure leaves the shard exactly at its last good rollback. With `reapply`, what
    was rolled back is applied again afterwards, under the same lock.
    """
    request = options.rollback
    assert request is not None
    applied = shard.applied
    if state.before is None:
        state.before = tuple(m.id for m in plan.migrations if m.hash in applied)
    drift, unverified = checksums.compare(
        shard.recorded,
        service=plan.service,
        environment=shard.environment,
        applied_ids=set(state.before),
        current=plan.sha256,
    )
    drift = shard.unknown + drift
    by_id = {m.id: m for m in plan.migrations}
    todo = [by_id[m] for m in rollback_selection.on_shard(plan.undo, applied.values())]
    outcome: dict[str, Any] = {
        "applied_before": state.before, "initialized": session.initialized, "drift": tuple(drift),
        "unverified": tuple(unverified),
    }  # fmt: skip

    def remaining() -> dict[str, Any]:
        now = set(applied.values())
        return {
            "rolled_back": tuple(state.rolled_back),
            "to_roll_back": rollback_selection.on_shard(plan.undo, now) if not request.reapply else (),
            "ran": tuple(state.ran),
            "pending": tuple(m.id for m in plan.migrations if m.id not in now),
        }

    doubtful = [shard.marks[m] for m in plan.undo if m in shard.marks]
    if doubtful and not state.rolled_back:
        # A migration the request selects was started (applied or rolled back) and never recorded:
        # what the shard holds of it is unknown, so nothing of this service is rolled back around it.
        mark = doubtful[0]
        refusal = TargetError(
            ErrorKind.IN_DOUBT,
            f"in doubt: the {mark.operation} of {mark.migration_id} started in run {mark.run_id} on {mark.host} and "
            f"was never recorded; settle it first: `fanout mark --migration {mark.migration_id}` (it is applied) "
            f"or `fanout unmark --migration {mark.migration_id}` (it is not), then roll back again",
            migration=mark.migration_id,
        )
        return _result(target, plan.service, Status.IN_DOUBT, refusal, **outcome, **remaining())
    if drift and todo and options.mode is Mode.ROLLBACK and not request.accept_drift and not state.rolled_back:
        listed = ", ".join(f"{d.migration} ({d.kind.value})" for d in drift[:5])
        refusal = TargetError(
            ErrorKind.DRIFT,
            f"refused: applied migrations differ from the migration set: {listed}; the rollback files may not "
            "match what was applied: review, then `fanout accept` or `fanout rollback --accept-drift`",
        )
        return _result(target, plan.service, Status.FAILED, refusal, **outcome, **remaining())
    error: TargetError | None = None
    for migration in todo:
        if migration.hash not in applied:
            continue  # rolled back before a lost connection made the target start over
        if interrupt.stopping.is_set():
            error = TargetError(ErrorKind.INTERRUPTED, f"interrupted before rolling back {migration.id}")
            break
        if deadline is not None and time.monotonic() >= deadline:
            error = _timed_out(options, f"stopped before rolling back {migration.id}").error
            break
        unrecording = _Recording(shard.recorded[migration.id].sha256 if migration.id in shard.recorded else "",
                                 plan.service, shard.environment)  # fmt: skip
        try:
            seconds = _with_retries(
                lambda m=migration, u=unrecording: session.rollback(m, u, request.reason),  # type: ignore[misc]
                migration.id, state, options, interrupt, deadline,
            )  # fmt: skip
        except _Failure as failure:
            if failure.retryable and failure.error.kind is ErrorKind.UNREACHABLE:
                raise  # the connection is gone: the target starts over on a new one
            error = replace(failure.error, migration=migration.id, file=plan.rollback_files.get(migration.id))
            break
        if seconds is None:
            continue
        del applied[migration.hash]
        state.rolled_back.append(AppliedMigration(migration.id, seconds))
    if error is None and request.reapply and options.mode is Mode.ROLLBACK:
        undone = {m.id for m in state.rolled_back}
        for migration in topological_sort(m for m in plan.migrations if m.id in undone and m.hash not in applied):
            recording = _Recording(plan.sha256.get(migration.id, ""), plan.service, shard.environment)
            try:
                seconds = _apply_with_retries(session, migration, recording, state, options, interrupt, deadline)
            except _Failure as failure:
                if failure.retryable and failure.error.kind is ErrorKind.UNREACHABLE:
                    raise
                error = replace(failure.error, migration=migration.id, file=plan.files.get(migration.id))
                break
            if seconds is not None:
                applied[migration.hash] = migration.id
                state.ran.append(AppliedMigration(migration.id, seconds))
        due = sorted(shard.failed_hooks & {h.id for h in plan.post_apply})
        if error is None and (state.ran or due):
            error = _run_hooks(session, plan, due)  # as yoyo's reapply, which applies through apply_migrations
    if error is not None:
        status = Status.SKIPPED if error.kind is ErrorKind.INTERRUPTED else Status.FAILED
    elif options.mode is Mode.PLAN:
        status = Status.DRIFTED if drift else Status.PENDING if todo else Status.UP_TO_DATE
    elif state.ran:
        status = Status.APPLIED
    else:
        status = Status.ROLLED_BACK if state.rolled_back else Status.UP_TO_DATE
    if options.mode is Mode.PLAN:
        return _result(target, plan.service, status, None, **outcome, to_roll_back=tuple(m.id for m in todo),
                       pending=tuple(m.id for m in plan.migrations if m.hash not in applied))  # fmt: skip
    return _result(target, plan.service, status, error, **outcome, **remaining())


def _with_retries(
    call: Callable[[], bool],
    migration_id: str,
    state: _Progress,
    options: RunOptions,
    interrupt: Interrupt,
    deadline: float | None = None,
) -> float | None:
    """Seconds `call` took (None when it only planned); retries what a second try can fix, as apply does."""
    for attempt in itertools.count():
        started = time.monotonic()
        try:
            return time.monotonic() - started if call() else None
        except _Failure as failure:
            if interrupt.aborting.is_set():
                if failure.error.kind is ErrorKind.INTERRUPTED:
                    raise
                raise _Failure(TargetError(ErrorKind.INTERRUPTED, "cancelled by a second interrupt")) from None
            transient = failure.retryable and failure.error.kind is not ErrorKind.UNREACHABLE
            if not transient or attempt >= options.retries or interrupt.stopping.is_set():
                raise
            delay = _backoff(options, attempt)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise _timed_out(options, f"gave up retrying {migration_id} ({failure.error.message})") from None
            state.retries.append(Retry(attempt + 1, failure.error.message, delay, migration_id))
            log.info("%s: %s; retrying in %.1fs", migration_id, failure.error.message, delay)
            interrupt.stopping.wait(delay)
    raise AssertionError("unreachable")


def _apply_with_retries(
    session: _Session,
    migration: Migration,
    recording: _Recording,
    state: _Progress,
    options: RunOptions,
    interrupt: Interrupt,
    deadline: float | None = None,
) -> float | None:
    """Seconds the migration took (None in plan mode); retries what a second try can fix."""
    for attempt in itertools.count():
        started = time.monotonic()
        try:
            return time.monotonic() - started if session.apply(migration, recording) else None
        except _Failure as failure:
            if interrupt.aborting.is_set():
                if failure.error.kind is ErrorKind.INTERRUPTED:
                    raise
                raise _Failure(TargetError(ErrorKind.INTERRUPTED, "cancelled by a second interrupt")) from None
            transient = failure.retryable and failure.error.kind is not ErrorKind.UNREACHABLE
            if not transient or attempt >= options.retries or interrupt.stopping.is_set():
                raise
            delay = _backoff(options, attempt)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise _timed_out(options, f"gave up retrying {migration.id} ({failure.error.message})") from None
            state.retries.append(Retry(attempt + 1, failure.error.message, delay, migration.id))
            log.info("%s: %s; retrying in %.1fs", migration.id, failure.error.message, delay)
            interrupt.stopping.wait(delay)
    raise AssertionError("unreachable")


def _result(target: Target, service: str, status: Status, error: TargetError | None, **outcome: Any) -> TargetResult:
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


def _summary(migration_set: MigrationSet) -> SourceSummary:
    return SourceSummary(
        service=migration_set.service,
        url=migration_set.url,
        files=tuple(SourceFile(f.name, f.sha256, f.size, f.etag, f.version_id) for f in migration_set.files),
        manifest=migration_set.manifest,
        release=migration_set.release,
        unpublished=migration_set.unpublished,
        unpublished_policy=migration_set.unpublished_policy,
        paths=migration_set.urls,
    )


# ---- unlock ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnlockResult:
    target: str
    database: str
    outcome: locking.UnlockOutcome | None  # None: could not connect or query
    holder: LockHolder | None
    message: str
    rows_deleted: int = 0
    advisory_holder: int | None = None  # server pid still holding fanout's advisory lock (None: free)
    terminated: int | None = None  # server pid ended by --terminate
    hidden_sessions: int = 0  # sessions of other roles this role cannot see


# How long unlock waits for a row lock on yoyo's lock table when the environment sets no lock_timeout.
UNLOCK_LOCK_TIMEOUT = "10s"


def unlock(
    targets: Sequence[Target],
    *,
    force: bool,
    connect_timeout: float,
    concurrency: int,
    terminate: str | None = None,
    tcp: TcpSettings = DEFAULT_TCP,
    lock_timeout: str | None = None,
) -> list[UnlockResult]:
    """Remove the migration lock of each target by hand; refuses while a holder may be alive, unless forced.

    `terminate` (a reason) ends the session of a live fanout holder first (see locking.unlock).
    `lock_timeout` (the environment's, else UNLOCK_LOCK_TIMEOUT) bounds the wait for a row lock
    on the lock table: a session stopped inside its acquisition keeps one until it ends.
    """
    options = RunOptions(mode=Mode.APPLY, connect_timeout=connect_timeout, tcp=tcp)

    def one(target: Target) -> UnlockResult:
        kwargs = _connect_kwargs(target, options, "unlock")
        try:
            connection = psycopg2.connect(**kwargs)
        except psycopg2.Error as e:
            return UnlockResult(target.id, target.display, None, None, _classify_connect_error(e, target).error.message)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT coalesce(%s, current_schema()), set_config('lock_timeout', %s, false)",
                    (target.schema, lock_timeout or UNLOCK_LOCK_TIMEOUT),
                )
                schema = cursor.fetchone()[0]
            if schema is None:
                return UnlockResult(target.id, target.display, locking.UnlockOutcome.NOT_LOCKED, None, "never migrated")
            done = locking.unlock(connection, schema, force=force, terminate=terminate)
            return UnlockResult(
                target.id, target.display, done.outcome, done.holder, done.reason, done.rows_deleted,
                done.advisory_holder, done.terminated, done.hidden_sessions,
            )  # fmt: skip
        except psycopg2.Error as e:
            return UnlockResult(target.id, target.display, None, None, _pg_message(e))
        finally:
            connection.close()

    limits = rollout.Limits(concurrency=concurrency)
    outcome = rollout.schedule(targets, one, server_of=lambda t: t.server, failed=lambda _: False, limits=limits)
    return [r for r in outcome.results if r is not None]


@dataclass(frozen=True, slots=True)
class Adoption:
    """What `accept` or `baseline` recorded on one target."""

    target: str
    database: str
    recorded: tuple[str, ...]  # migration ids whose checksum was (re)recorded
    message: str
    failed: bool = False


def adopt(
    snapshot: Snapshot,
    targets: Sequence[Target],
    options: RunOptions,
    *,
    environment: str,
    run_id: str,
    migration_ids: Sequence[str] | None,
    reason: str | None,
    interrupt: Interrupt | None = None,
) -> list[Adoption]:
    """Record checksums without running anything, under each target's lock.

    With `migration_ids` (accept): adopt the set's current content of those migrations
    where it differs from what was recorded (or retire them when the set no longer has
    them). Without (baseline): record the current content of every applied migration
    that has no checksum yet, as for a fleet migrated before fanout.
    """
    plans = load(snapshot.sets, python=options.python_migrations)
    current = {m_id: (p.service, sha) for p in plans for m_id, sha in p.sha256.items()}
    interrupt = interrupt or Interrupt()

    def one(target: Target) -> Adoption:
        try:
            session = _YoyoSession(target, options, run_id, interrupt)
        except _Failure as failure:
            return Adoption(target.id, target.display, (), failure.error.message, failed=True)
        try:
            with session.lock(options.lock_wait):
                applied = set(session.applied().values())
                recorded = session.recorded_checksums()
                wanted = migration_ids if migration_ids is not None else sorted(applied)
                unknown = [m for m in wanted if m not in current and m not in applied and m not in recorded]
                if migration_ids is not None and unknown:
                    # A misspelt id must not read as "nothing to record": record nothing, say why.
                    return Adoption(
                        target.id, target.display, (),
                        f"no migration {', '.join(map(repr, unknown))} in the published set or applied here; "
                        "nothing recorded",
                        failed=True,
                    )  # fmt: skip
                changes: list[tuple[str, str | None, str, str, checksums.How]] = []
                for migration_id in wanted:
                    row = recorded.get(migration_id)
                    service, sha = current.get(migration_id, ("", ""))
                    if migration_ids is None:  # baseline: only what has no checksum, and the set knows
                        if row is None and sha:
                            changes.append((migration_id, None, sha, service, checksums.How.BASELINED))
                    elif migration_id not in applied and row is None:
                        continue
                    elif not sha:  # gone from the set: retire it, keeping what was recorded
                        if row is None or row.how != checksums.How.RETIRED:
                            old = row.sha256 if row else None
                            changes.append(
                                (migration_id, old, old or "", row.service if row else "", checksums.How.RETIRED)
                            )
                    elif row is None or row.sha256 != sha or row.environment != environment:
                        changes.append(
                            (migration_id, row.sha256 if row else None, sha, service, checksums.How.ACCEPTED)
                        )
                session.record(
                    [
                        statement
                        for migration_id, old, new, service, how in changes
                        for statement in session.checksum_statements(
                            migration_id, old, new, service, environment, how, reason
                        )
                    ]
                )
        except _Failure as failure:
            return Adoption(target.id, target.display, (), failure.error.message, failed=True)
        finally:
            session.close()
        ids = tuple(change[0] for change in changes)
        message = f"recorded {len(ids)} checksum(s)" if ids else "nothing to record"
        return Adoption(target.id, target.display, ids, message)

    limits = rollout.Limits(concurrency=options.concurrency, per_server=options.limits.per_server)
    outcome = rollout.schedule(
        targets, one, server_of=lambda t: t.server, failed=lambda a: a.failed, limits=limits, stop=interrupt.stopping
    )
    return [r for r in outcome.results if r is not None]


@dataclass(frozen=True, slots=True)
class Settlement:
    """What `mark` or `unmark` did on one target."""

    target: str
    database: str
    changed: tuple[str, ...]  # migration ids whose record or mark changed
    message: str  # one line per migration, joined
    failed: bool = False
    refused: bool = False  # a migration was left as it was (an INVALID index, without --force)


def settle(
    snapshot: Snapshot,
    targets: Sequence[Target],
    options: RunOptions,
    *,
    run_id: str,
    environment: str,
    migration_ids: Sequence[str],
    record: bool,
    reason: str,
    force: bool = False,
    interrupt: Interrupt | None = None,
) -> list[Settlement]:
    """Settle migrations by hand, under each target's lock: record them as applied (`record`) or not.

    Recording (`fanout mark`) writes yoyo's rows (logged as `mark`) and the checksum of the
    set's content, and clears a started mark; it refuses while an index the migration
    builds (or one that appeared since it started) is INVALID, unless `force`. Not recording
    (`fanout unmark`) clears the mark and removes yoyo's record and the checksum, so the
    next apply runs the migration again. Both are logged in fanout_checksum_log with `reason`.
    Raises ConfigError, before any shard is touched, for an id that no set of the run has.
    """
    plans = load(snapshot.sets)
    by_id = {m.id: (p, m) for p in plans for m in p.migrations}
    unknown = [m for m in migration_ids if m not in by_id]
    if unknown:
        raise ConfigError(f"no migration {', '.join(map(repr, unknown))} in the migration set of any service")
    interrupt = interrupt or Interrupt()

    def one(target: Target) -> Settlement:
        try:
            session = _YoyoSession(target, options, run_id, interrupt)
        except _Failure as failure:
            return Settlement(target.id, target.display, (), failure.error.message, failed=True)
        notes: list[str] = []
        changed: list[str] = []
        refused = False
        try:
            with session.lock(options.lock_wait):
                applied = session.applied()
                marks, _ = session.marks_and_invalid()
                recorded = session.recorded_checksums()
                statements: list[str] = []
                with session._connection.cursor() as cursor:
                    for migration_id in migration_ids:
                        plan, migration = by_id[migration_id]
                        mark, is_applied = marks.get(migration_id), migration.hash in applied
                        sha = plan.sha256.get(migration_id, "")
                        old = recorded[migration_id].sha256 if migration_id in recorded else None
                        if record and is_applied:
                            notes.append(f"{migration_id}: already applied" + ("; cleared its mark" if mark else ""))
                            if mark is None:
                                continue
                        elif record:
                            if mark is not None:
                                _, found, _ = _examine(cursor, session._schema, session._schema_only, migration, mark)
                                invalid = found.invalid
                            else:
                                builds, _ = indoubt.index_builds(_statements(migration) or [])
                                invalid = tuple(i for i in indoubt.inspect(cursor, builds, (), ()).invalid)
                            if invalid and not force:
                                refused = True
                                notes.append(
                                    f"{migration_id}: refused: INVALID index {', '.join(invalid)} (drop it and "
                                    "`fanout unmark` to run it again, or --force to record it anyway)"
                                )
                                continue
                            recording = _Recording(sha, plan.service, environment)
                            statements += session._records(migration, recording, "mark", checksums.How.MARKED)
                            statements.append(checksums.log_sql(cursor, session._schema, migration_id, old, sha, checksums.How.MARKED,
                                                                reason))  # fmt: skip
                            notes.append(f"{migration_id}: recorded as applied")
                        elif is_applied:
                            statements += session._unmark_rows(migration)
                            statements.append(
                                checksums.log_sql(
                                    cursor, session._schema, migration_id, old, "", checksums.How.UNMARKED, reason
                                )
                            )
                            notes.append(f"{migration_id}: record removed: the next apply runs it")
                        elif mark is not None:
                            statements.append(
                                checksums.log_sql(
                                    cursor, session._schema, migration_id, old, "", checksums.How.UNMARKED, reason
                                )
                            )
                            notes.append(f"{migration_id}: mark cleared: the next apply runs it")
                        else:
                            notes.append(f"{migration_id}: neither applied nor in doubt: nothing to do")
                            continue
                        if mark is not None:
                            statements.append(indoubt.clear_sql(cursor, session._schema, migration_id))
                        changed.append(migration_id)
                session.record(statements)
        except _Failure as failure:
            return Settlement(target.id, target.display, (), failure.error.message, failed=True)
        except psycopg2.Error as e:
            return Settlement(target.id, target.display, (), _classify_database_error(e).error.message, failed=True)
        finally:
            session.close()
        return Settlement(target.id, target.display, tuple(changed), "; ".join(notes), refused=refused)

    limits = rollout.Limits(concurrency=options.concurrency, per_server=options.limits.per_server)
    outcome = rollout.schedule(
        targets, one, server_of=lambda t: t.server, failed=lambda s: s.failed, limits=limits, stop=interrupt.stopping
    )
    return [r for r in outcome.results if r is not None]


# ---- sessions: the one place the mode makes a difference ----------------------------


class _Session(Protocol):
    initialized: bool

    def lock(self, wait: float) -> Any:
        """A context manager holding the target's migration lock; yields (holder seen, stale lock broken)."""
        ...

    def applied(self) -> dict[str, str]:
        """yoyo's applied migrations: hash -> id."""
        ...

    def recorded_checksums(self) -> dict[str, checksums.Recorded]: ...

    def marks_and_invalid(self) -> tuple[dict[str, indoubt.Mark], tuple[str, ...]]:
        """Migrations marked as started and never recorded, and every INVALID index of the target."""
        ...

    def in_doubt(self, migration: Migration, mark: indoubt.Mark, *, repair: bool) -> tuple[InDoubt | None, str | None]:
        """What the shard holds of a marked migration; (None, what was done) when `repair` settled it."""
        ...

    def apply(self, migration: Migration, recording: _Recording) -> bool:
        """True when the migration ran (apply), False when it was only planned."""
        ...

    def rollback(self, migration: Migration, recorded: _Recording, reason: str | None) -> bool:
        """True when the migration was rolled back and unrecorded, False when it was only planned."""
        ...

    def run_hook(self, migration: Migration) -> None: ...

    def failed_hooks(self) -> set[str]:
        """Post-apply hooks whose last run on the shard failed."""
        ...

    def note_hook(self, hook_id: str, sha256: str, *, failed: bool, reason: str | None) -> None:
        """Log that a hook failed (it stays due) or ran after failing; best effort, never raises."""
        ...

    def close(self, *, reuse: bool = False) -> None: ...


def _open_session(
    target: Target,
    options: RunOptions,
    run_id: str,
    interrupt: Interrupt,
    deadline: float | None = None,
    connections: _Connections | None = None,
) -> _Session:
    if options.mode is Mode.PLAN:
        return _ReadOnlySession(target, options, run_id, interrupt, deadline, connections)
    return _YoyoSession(target, options, run_id, interrupt, deadline, connections)


@dataclass(slots=True)
class _Idle:
    connection: Any
    backend_pid: int | None  # from the pooler check it passed when it was opened
    server: str


class _Connections:
    """The run's shard connections: counted, and handed from one target to the next of the same database.

    Tenant schemas of one database are targets that differ only in their schema. Opening a
    connection per schema costs a SCRAM exchange, a fresh backend with cold catalog caches,
    the pooler check and the session setup, which at thousands of schemas is most of a run.
    A session that ends cleanly (its lock released, no transaction open, nothing cancelled,
    its session state reset) gives its connection back here; the next target of the same
    database takes it instead of connecting. Anything else is closed, never reused.

    A connection is kept only while a target of its database has yet to start, and the
    connections open (in use and idle) stay within `concurrency` and `per_server`: opening
    one closes an idle one first when the budget is full.
    """

    def __init__(self, targets: Sequence[Target], options: RunOptions, run_id: str) -> None:
        self._lock = threading.Lock()
        self._options = options
        self._run_id = run_id
        self._idle: dict[str, list[_Idle]] = {}
        self._waiting: dict[str, int] = {}
        for target in targets:
            key = self.key(target)
            self._waiting[key] = self._waiting.get(key, 0) + 1
        self._open: dict[str, int] = {}  # per server: in use and idle
        self.opened = 0

    def key(self, target: Target) -> str:
        """The database a connection is to: everything in its connection parameters but the schema."""
        kwargs = _connect_kwargs(target, self._options, self._run_id, read_only=self._options.mode is Mode.PLAN)
        # A digest: the parameters hold the password, which has no business in a dict key.
        return hashlib.sha256(repr(sorted(kwargs.items())).encode()).hexdigest()

    def starting(self, target: Target) -> None:
        with self._lock:
            key = self.key(target)
            self._waiting[key] = self._waiting.get(key, 1) - 1

    def take(self, target: Target) -> _Idle | None:
        """An idle connection to the target's database, now in use; None: open one (then call `opening`)."""
        key = self.key(target)
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def opening(self, target: Target) -> None:
        """A connection is about to be opened for `target`: make room within the budget, and count it."""
        evict: list[_Idle] = []
        with self._lock:
            limits = self._options.limits
            per_server = limits.per_server or limits.concurrency
            server = target.server
            # Idle connections to the target's server first: closing one frees both budgets.
            for idle in sorted(self._idle.values(), key=lambda pool: not pool or pool[0].server != server):
                while idle and (
                    sum(self._open.values()) - len(evict) >= limits.concurrency
                    or (idle[0].server == server and self._open.get(server, 0) - len(evict) >= per_server)
                ):
                    evict.append(idle.pop())
            for gone in evict:
                self._open[gone.server] -= 1
            self._open[target.server] = self._open.get(target.server, 0) + 1
            self.opened += 1
        for gone in evict:
            with contextlib.suppress(psycopg2.Error):
                gone.connection.close()

    def not_opened(self, target: Target) -> None:
        """The connection `opening` counted could not be opened (it still counts as an attempt)."""
        with self._lock:
            self._open[target.server] -= 1

    def give_back(self, target: Target, connection: Any, backend_pid: int | None, *, reuse: bool) -> None:
        """The session is done with `connection`: keep it for the next target of its database, or close it."""
        key = self.key(target)
        with self._lock:
            if reuse and self._waiting.get(key, 0) > 0 and not connection.closed:
                self._idle.setdefault(key, []).append(_Idle(connection, backend_pid, target.server))
                return
            self._open[target.server] = self._open.get(target.server, 1) - 1
        with contextlib.suppress(psycopg2.Error):
            connection.close()

    def close_idle(self) -> None:
        with self._lock:
            idle = [i for pool in self._idle.values() for i in pool]
            self._idle.clear()
            for gone in idle:
                self._open[gone.server] -= 1
        for gone in idle:
            with contextlib.suppress(psycopg2.Error):
                gone.connection.close()


def _connect_kwargs(target: Target, options: RunOptions, run_id: str, *, read_only: bool = False) -> dict[str, Any]:
    return target.libpq_kwargs(
        application_name=f"{APPLICATION_NAME} {options.mode.value} {run_id}",
        connect_timeout=options.connect_timeout,
        read_only=read_only,
        tcp=options.tcp,
    )


def _check_session(
    connection: Any, target: Target, kwargs: dict[str, Any], started: float, watch: _Watch
) -> int | None:
    """Fail the target before any lock when its session is not its own across transactions; arm liveness checks.

    Returns the session's server process (None when the server does not show it).
    """
    checked = pooler.check_session(
        connection,
        reconnect=lambda: psycopg2.connect(**kwargs),
        connection_age=lambda: time.monotonic() - started,
        server=target.server,
    )
    if checked.refused is not None:
        raise _Failure(
            TargetError(
                ErrorKind.POOLER,
                f"{checked.refused}. fanout's lock and search_path need a session of their own: connect directly or "
                "through a session-mode pool. Refused before taking any lock",
            )
        )
    if checked.backend_pid is not None:
        watch.check_liveness(connection, kwargs, checked.backend_pid)
    return checked.backend_pid


# A session the server shows idle for this long while fanout still waits for its answer lost that answer.
_IDLE_PROOF_SECONDS = 2.0


def _session_alive(kwargs: dict[str, Any], backend_pid: int) -> bool:
    """Asked on a second connection: is the server still working for the session that waits?

    A long migration shows `active` (or waits on a lock, still `active`): alive. A session the
    server shows idle while fanout waits for its answer (a hung proxy swallowed it), a session
    that is gone, or a server that does not even accept a connection: not alive.
    """
    try:
        probe = psycopg2.connect(**kwargs)
    except psycopg2.OperationalError as e:
        text = error_line(e).lower()
        return not ("timeout expired" in text or "connection refused" in text or "could not connect" in text)
    try:
        probe.autocommit = True
        with probe.cursor() as cursor:
            cursor.execute(
                "SELECT state, extract(epoch FROM clock_timestamp() - state_change)::float8 "
                "FROM pg_catalog.pg_stat_activity WHERE pid = %s",
                (backend_pid,),
            )
            row = cursor.fetchone()
    except psycopg2.Error:
        return True  # cannot tell: keep waiting
    finally:
        probe.close()
    if row is None:
        return False
    state, idle_for = row
    return state is None or state == "active" or idle_for is None or idle_for < _IDLE_PROOF_SECONDS


class _TrackedConnection(psycopg2.extensions.connection):
    """Knows since when it waits for the server: the watchdog's cue to check the session is alive."""

    busy_since: float | None = None

    def commit(self) -> None:
        self.busy_since = time.monotonic()
        try:
            super().commit()
        finally:
            self.busy_since = None

    def rollback(self) -> None:
        self.busy_since = time.monotonic()
        try:
            super().rollback()
        finally:
            self.busy_since = None


class _TrackedCursor(psycopg2.extensions.cursor):
    def execute(self, query: Any, vars: Any = None) -> None:
        connection = self.connection
        if not isinstance(connection, _TrackedConnection):
            super().execute(query, vars)
            return
        connection.busy_since = time.monotonic()
        try:
            super().execute(query, vars)
        finally:
            connection.busy_since = None


def _timed_out(options: RunOptions, what: str) -> _Failure:
    return _Failure(TargetError(ErrorKind.TARGET_TIMEOUT, f"target timeout ({options.target_timeout:g}s): {what}"))


class _Watch:
    """A session's connection under the run's watchdog: the target's deadline and the second signal."""

    def __init__(self, connection: Any, interrupt: Interrupt, options: RunOptions, deadline: float | None) -> None:
        self._watchdog = interrupt.watchdog
        self._options = options
        self.deadline = deadline
        self._cancel = PgCancel(connection)
        self.handle: Watched = self._watchdog.watch(self._cancel, deadline)
        self._released = False

    def check_liveness(self, connection: Any, kwargs: dict[str, Any], backend_pid: int) -> None:
        """From now on, an answer awaited longer than `liveness_check` is checked for on a second connection."""
        if not self._options.liveness_check or not isinstance(connection, _TrackedConnection):
            return
        self.handle.alive = lambda: _session_alive(kwargs, backend_pid)
        self.handle.check_every = self._options.liveness_check
        self.handle.busy = lambda: connection.busy_since

    def untouched(self) -> bool:
        """The watchdog never acted on this connection (no cancel, nothing abandoned)."""
        return self.handle.reason is None and not self.handle.abandoned

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._watchdog.release(self.handle)
            self._cancel.close()

    def classify(self, error: psycopg2.Error, *, otherwise: ErrorKind = ErrorKind.DATABASE) -> _Failure:
        """What `error` means, given what the watchdog did to the connection (if anything)."""
        handle = self.handle
        if handle.reason is None:
            return _classify_database_error(error, otherwise=otherwise)
        cut = (
            f"no answer {self._watchdog.grace:g}s after a cancel request: connection abandoned "
            "(the server frees the shard's lock when it ends the session)"
        )
        if handle.reason is Reason.ABORT:
            message = "cancelled by a second interrupt" + (f"; {cut}" if handle.abandoned else "")
            return _Failure(TargetError(ErrorKind.INTERRUPTED, message))
        if handle.reason is Reason.SILENT:
            return _Failure(
                TargetError(
                    ErrorKind.UNRESPONSIVE,
                    f"the shard stopped answering: no answer for {handle.silent_for:.0f}s, and a second connection "
                    "found the server no longer working on it; connection abandoned (the server frees the "
                    "shard's lock when it ends the session)",
                )
            )
        if handle.abandoned:
            return _Failure(
                TargetError(
                    ErrorKind.UNRESPONSIVE,
                    f"the shard stopped answering: still waiting at the target timeout "
                    f"({self._options.target_timeout:g}s), then {cut}",
                )
            )
        return _timed_out(self._options, "still working: cancelled and rolled back")


def _lost(error: psycopg2.Error) -> bool:
    return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)) and error.pgcode is None


# libpq's words for a connection string it cannot use; retrying would fail the same way.
_CONFIGURATION_MESSAGES = ("invalid connection option", "invalid sslmode value", "invalid dsn", "invalid value for",
                           "invalid integer value", "invalid port number")  # fmt: skip


def _classify_connect_error(error: psycopg2.Error, target: Target) -> _Failure:
    message = error_line(error)
    lowered = message.lower()
    missing = "does not exist" in lowered
    no_password = "no password supplied" in lowered or "password is required" in lowered
    if (
        "authentication" in lowered
        or "no pg_hba.conf entry" in lowered
        or ("role" in lowered and missing)
        or no_password
    ):
        kind = ErrorKind.AUTHENTICATION
    elif any(m in lowered for m in _CONFIGURATION_MESSAGES) or isinstance(error, psycopg2.ProgrammingError):
        kind = ErrorKind.CONFIGURATION
    elif "too many clients" in lowered or "too many connections" in lowered or error.pgcode == "53300":
        kind = ErrorKind.CONNECTION_LIMIT
    elif "database" in lowered and missing:
        kind = ErrorKind.DATABASE
    else:
        kind = ErrorKind.UNREACHABLE
    return _Failure(
        TargetError(kind, f"cannot connect to {target.display}: {message}"), retryable=kind is ErrorKind.UNREACHABLE
    )


def _classify_database_error(error: psycopg2.Error, *, otherwise: ErrorKind = ErrorKind.DATABASE) -> _Failure:
    """`otherwise` is the kind of an error that is neither a lost connection nor a timeout."""
    if _lost(error) and "timed out" in error_line(error).lower():
        # Keepalives or tcp_user_timeout gave up on the peer: retrying would wait as long again.
        return _Failure(TargetError(ErrorKind.UNRESPONSIVE, f"the shard stopped answering: {error_line(error)}"))
    if _lost(error):
        return _Failure(TargetError(ErrorKind.UNREACHABLE, f"connection lost: {error_line(error)}"), retryable=True)
    kind = _SQLSTATE_KINDS.get(error.pgcode or "", otherwise)
    return _Failure(TargetError(kind, _pg_message(error)), retryable=error.pgcode in _RETRYABLE_SQLSTATES)


def _classify_migration_error(error: psycopg2.Error) -> _Failure:
    return _classify_database_error(error, otherwise=ErrorKind.MIGRATION)


def _pg_message(error: psycopg2.Error) -> str:
    primary = getattr(getattr(error, "diag", None), "message_primary", None) or error_line(error)
    code = f" [{error.pgcode}]" if error.pgcode else ""
    return f"{primary}{code}"


# What a fresh connection has, restored before each migration and before fanout's own
# statements on a connection a migration has used. DISCARD ALL would do the same in one
# statement but also runs pg_advisory_unlock_all(), which would drop the shard lock, and it
# cannot run inside the transaction the next migration's message opens. RESET ALL restores
# the values a new session starts with (server, database and role defaults, startup
# parameters such as application_name); fanout's own settings are set again after it.
_IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
_FRESH_SESSION = (
    "CLOSE ALL",
    "SET SESSION AUTHORIZATION DEFAULT",
    "RESET ROLE",
    "RESET ALL",
    "DEALLOCATE ALL",
    "UNLISTEN *",
    "DISCARD PLANS",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
)
# Inside a migration's transaction, before the rows that record it: a migration that
# switched roles must not make fanout record as a role without rights on yoyo's tables.
_ORIGINAL_ROLE = ("SET SESSION AUTHORIZATION DEFAULT", "RESET ROLE")
# The time a migration finished: evaluated by the server when the recording rows are
# inserted, after the migration's statements, even when all of it is one message.
_FINISHED_AT = psycopg2.extensions.AsIs("(clock_timestamp() AT TIME ZONE 'UTC')")


def _settings_sql(connection: Any, schema: str | None, settings: SessionSettings, *, watch: bool) -> list[str]:
    """fanout's settings for a shard session, then the environment's, as statements.

    `watch`: make the server notice a dead runner within a second, even mid-statement
    (PostgreSQL 14+); otherwise a runner killed during a long migration keeps its
    transaction, and with it the shard lock, until the statement ends.
    """
    statements: list[sql.Composable] = []
    if schema:
        statements.append(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    for name in ("lock_timeout", "statement_timeout"):
        value = getattr(settings, name)
        if value is not None:
            statements.append(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    if watch:
        statements.append(sql.SQL(f"SET client_connection_check_interval = '{CLIENT_CHECK_INTERVAL}'"))
    for name, value in settings.settings:
        setting = sql.SQL(".").join(sql.Identifier(part) for part in name.split("."))
        statements.append(sql.SQL("SET {} = {}").format(setting, sql.Literal(value)))
    return [statement.as_string(connection) for statement in statements]


def _join(statements: Sequence[str]) -> str:
    """Statements as one simple-query message (one round trip); a newline before each ';' ends -- comments."""
    return "\n;\n".join(statements)


class _ReadOnlySession:
    """Reads yoyo's tables inside READ ONLY transactions; creates nothing and takes no lock."""

    def __init__(
        self,
        target: Target,
        options: RunOptions,
        run_id: str,
        interrupt: Interrupt,
        deadline: float | None = None,
        connections: _Connections | None = None,
    ) -> None:
        # The server enforces read-only: even a bug here could not write.
        kwargs = _connect_kwargs(target, options, run_id, read_only=True)
        started = time.monotonic()
        self._target, self._connections = target, connections
        reused = connections.take(target) if connections is not None else None
        if reused is not None:
            self._connection, self._backend_pid = reused.connection, reused.backend_pid
        else:
            if connections is not None:
                connections.opening(target)
            try:
                self._connection = psycopg2.connect(**kwargs, connection_factory=_TrackedConnection)
            except psycopg2.Error as e:
                if connections is not None:
                    connections.not_opened(target)
                raise _classify_connect_error(e, target) from None
            self._backend_pid = None
        self._connection.cursor_factory = _TrackedCursor
        self._watch = _Watch(self._connection, interrupt, options, deadline)
        self.initialized = False
        self._schema_only = target.schema is not None
        try:
            if reused is None:
                self._connection.set_session(readonly=True)
                self._backend_pid = _check_session(self._connection, target, kwargs, started, self._watch)
            elif self._backend_pid is not None:
                self._watch.check_liveness(self._connection, kwargs, self._backend_pid)
            with self._connection.cursor() as cursor:
                # Settings and the probe of yoyo's tables in one round trip; the tables are looked
                # up in the target's schema, or the one the session starts in (yoyo's default).
                settings = _settings_sql(self._connection, target.schema, options.session, watch=False)
                probe = cursor.mogrify(
                    "SELECT s, "
                    + ", ".join(["to_regclass(format('%%I.%%I', s, %s)) IS NOT NULL"] * 5)
                    + " FROM (SELECT coalesce(%s, current_schema()) AS s) AS schema",
                    (
                        MIGRATION_TABLE,
                        VERSION_TABLE,
                        locking.YOYO_LOCK_TABLE,
                        checksums.TABLE,
                        indoubt.TABLE,
                        target.schema,
                    ),
                ).decode()
                cursor.execute(_join([*settings, probe]))
                row = cursor.fetchone()
            assert row is not None
            self._schema: str = row[0] or ""
            self.initialized, self._has_version_table, self._has_lock_table, self._has_checksums, self._has_marks = (
                bool(v) for v in row[1:]
            )
        except psycopg2.Error as e:
            self.close()
            raise self._watch.classify(e) from None
        except _Failure:
            self.close()
            raise

    @contextmanager
    def lock(self, wait: float) -> Iterator[tuple[LockHolder | None, None]]:
        try:
            holder = locking.read_holder(self._connection, self._schema) if self._has_lock_table else None
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None
        yield holder, None

    def applied(self) -> dict[str, str]:
        if not self.initialized:
            return {}
        try:
            with self._connection.cursor() as cursor:
                if self._has_version_table:
                    return _applied(cursor, self._schema)
                # yoyo < 6 kept ids, not hashes.
                cursor.execute(f'SELECT "id" FROM {locking.qualified(self._schema, MIGRATION_TABLE)}')
                return {hashlib.sha256(row[0].encode()).hexdigest(): row[0] for row in cursor.fetchall()}
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def recorded_checksums(self) -> dict[str, checksums.Recorded]:
        try:
            with self._connection.cursor() as cursor:
                return checksums.read(cursor, self._schema, exists=self._has_checksums)
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def marks_and_invalid(self) -> tuple[dict[str, indoubt.Mark], tuple[str, ...]]:
        try:
            with self._connection.cursor() as cursor:
                return indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=self._has_marks)
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def in_doubt(self, migration: Migration, mark: indoubt.Mark, *, repair: bool) -> tuple[InDoubt | None, str | None]:
        """Plan mode: say what is there; never repair."""
        try:
            with self._connection.cursor() as cursor:
                return _examine(cursor, self._schema, self._schema_only, migration, mark)[0], None
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def apply(self, migration: Migration, recording: _Recording) -> bool:
        """Plan mode: record nothing, run nothing."""
        return False

    def rollback(self, migration: Migration, recorded: _Recording, reason: str | None) -> bool:
        """Plan mode: a dry run of a rollback rolls nothing back."""
        return False

    def run_hook(self, migration: Migration) -> None:
        """Plan mode: hooks are not run."""

    def failed_hooks(self) -> set[str]:
        return set()  # plan runs no hook, so it has none to remember

    def note_hook(self, hook_id: str, sha256: str, *, failed: bool, reason: str | None) -> None:
        """Plan mode: nothing is written."""

    def close(self, *, reuse: bool = False) -> None:
        self._watch.release()
        try:
            # Everything this session set (search_path, timeouts) was set inside its READ ONLY
            # transaction: the rollback restores the session as it was when it was opened.
            self._connection.rollback()
        except psycopg2.Error:
            reuse = False
        reuse = reuse and self._watch.untouched()
        if self._connections is not None:
            self._connections.give_back(self._target, self._connection, self._backend_pid, reuse=reuse)
            return
        with contextlib.suppress(psycopg2.Error):
            self._connection.close()


def _applied(cursor: Any, schema: str) -> dict[str, str]:
    cursor.execute(f'SELECT "migration_hash", "migration_id" FROM {locking.qualified(schema, MIGRATION_TABLE)}')
    return {row[0]: row[1] for row in cursor.fetchall()}


def _plain_rollback_sql(migration: Migration) -> list[str] | None:
    """The statements of a transactional .sql migration's rollback file, in yoyo's order; None when it needs yoyo's steps.

    yoyo pairs the rollback file's statements with the migration's steps and runs the
    steps in reverse, which executes the rollback statements in file order.
    """
    if not (migration.is_raw_sql() and migration.use_transactions):
        return None
    statements = []
    for step in reversed(migration.steps):
        if not isinstance(step, TransactionWrapper) or step.ignore_errors is not None:
            return None
        inner = step.step
        if type(inner) is not MigrationStep or not isinstance(inner._rollback, str | None):
            return None
        if inner._rollback:
            statements.append(inner._rollback)
    return statements


def _statements(migration: Migration) -> list[str] | None:
    """The SQL statements of a .sql migration, in order; None when it has Python steps."""
    statements = []
    for step in migration.steps:
        inner = getattr(step, "step", None)
        if (
            not isinstance(inner, MigrationStep)
            or type(inner) is not MigrationStep
            or not isinstance(inner._apply, str)
        ):
            return None
        statements.append(inner._apply)
    return statements


def _examine(
    cursor: Any, schema: str, only_schema: bool, migration: Migration, mark: indoubt.Mark
) -> tuple[InDoubt, indoubt.Found, bool]:
    """What the shard holds of a migration in doubt, and whether it is an index-only migration."""
    builds, only = indoubt.index_builds(_statements(migration) or [])
    _, invalid_now = indoubt.read(cursor, schema, only_schema=only_schema, marks=False)
    found = indoubt.inspect(cursor, builds, invalid_now, mark.invalid_before)
    doubt = InDoubt(
        migration.id, mark.operation, mark.run_id, mark.host, mark.pid, mark.started_at,
        found.invalid, found.valid, found.missing,
    )  # fmt: skip
    return doubt, found, only


def _plain_sql(migration: Migration) -> list[str] | None:
    """The statements of a transactional .sql migration; None when it needs yoyo's steps."""
    if not (migration.is_raw_sql() and migration.use_transactions):
        return None
    statements = []
    for step in migration.steps:
        if not isinstance(step, TransactionWrapper) or step.ignore_errors is not None:
            return None
        inner = step.step
        if type(inner) is not MigrationStep or not isinstance(inner._apply, str):
            return None
        statements.append(inner._apply)
    return statements


class _QuietCursor(_TrackedCursor):
    """yoyo prints the rows of any statement that returns some to sys.stdout; a runner never prints."""

    @property
    def description(self) -> None:
        return None


class _Backend(PostgresqlBackend):  # type: ignore[misc]
    """yoyo's PostgreSQL backend, adjusted for a runner that opens hundreds of them.

    Its tables are named with their schema (`bookkeeping`, resolved once per session), so
    yoyo's own statements, on the paths that use them (Python steps, non-transactional
    migrations, the upgrade of its tables), reach them whatever a migration did to the
    session's search_path.
    """

    _driver = psycopg2  # skip yoyo's per-instance driver import and error registration
    _schema_checked = False
    _hostname = socket.getfqdn()
    _username = getpass.getuser()
    bookkeeping = ""  # the schema of yoyo's tables; set by the session before any use

    def __init__(self, dburi: DatabaseURI, migration_table: str, connection: Any = None) -> None:
        self._reused = connection
        super().__init__(dburi, migration_table)

    def connect(self, dburi: DatabaseURI) -> Any:
        kwargs = dict(dburi.args)
        self.schema = kwargs.pop("schema", None)
        if self._reused is not None:
            return self._reused  # handed on by the target before, in a fresh session
        connection = psycopg2.connect(**kwargs, connection_factory=_TrackedConnection)
        connection.autocommit = True
        connection.cursor_factory = _QuietCursor
        return connection

    def init_connection(self, connection: Any) -> None:
        # yoyo calls this after connecting and after every rollback to set search_path; the
        # session sets it (with everything else a fresh session needs) before each migration.
        pass

    @property
    def migration_table_quoted(self) -> str:
        return locking.qualified(self.bookkeeping, self.migration_table)

    @property
    def log_table_quoted(self) -> str:
        return locking.qualified(self.bookkeeping, self.log_table)

    @property
    def version_table_quoted(self) -> str:
        return locking.qualified(self.bookkeeping, self.version_table)

    @property
    def lock_table_quoted(self) -> str:
        return locking.qualified(self.bookkeeping, self.lock_table)

    def list_tables(self, **kwargs: Any) -> list[str]:
        # yoyo asks only whether its own tables exist. information_schema.tables, filtered by
        # schema, reads all of pg_class: per tenant schema, a cost that grows with the database.
        # By name, the lookup is an index scan. (yoyo also asks for current_schema first, a
        # round trip; the schema is known.)
        names = [self.migration_table, self.version_table, self.log_table, self.lock_table]
        cursor = self.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relname = ANY(:names) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            {"schema": self.bookkeeping, "names": names},
        )
        return [row[0] for row in cursor.fetchall()]

    def init_database(self) -> None:
        # PostgreSQL has transactional DDL; yoyo's probe costs a table creation per connection.
        self.has_transactional_ddl = True
        for attempt in range(3):
            try:
                locking.create_tables(
                    self.connection,
                    self.bookkeeping,
                    create_schema=bool(self.schema),
                    extra=(*checksums.create_sql(self.bookkeeping), indoubt.create_sql(self.bookkeeping)),
                )
                return
            except (psycopg2.errors.UniqueViolation, psycopg2.errors.DuplicateObject, psycopg2.errors.DuplicateTable):
                # A plain yoyo created yoyo_lock at the same instant (fanout runners serialize).
                if attempt == 2:
                    raise

    def ensure_internal_schema_updated(self) -> None:
        # yoyo re-checks (two queries) on every call unless it upgraded; once is enough per connection.
        if not self._schema_checked:
            super().ensure_internal_schema_updated()
            self._schema_checked = True

    def get_log_data(self, migration: Migration | None = None, operation: str = "apply") -> dict[str, Any]:
        # yoyo resolves the FQDN (a DNS lookup) for every log row; resolve it once per process.
        return {
            "id": str(uuid.uuid1()),
            "migration_id": migration.id if migration else None,
            "migration_hash": migration.hash if migration else None,
            "username": self._username,
            "hostname": self._hostname,
            "created_at_utc": _FINISHED_AT,
            "operation": operation,
        }


class _YoyoSession:
    """Applies migrations through yoyo under the shard lock."""

    def __init__(
        self,
        target: Target,
        options: RunOptions,
        run_id: str,
        interrupt: Interrupt,
        deadline: float | None = None,
        connections: _Connections | None = None,
    ) -> None:
        kwargs = _connect_kwargs(target, options, run_id)
        if target.schema:
            kwargs["schema"] = target.schema
        uri = DatabaseURI("postgresql", None, None, None, None, None, kwargs)
        started = time.monotonic()
        self._target, self._connections = target, connections
        reused = connections.take(target) if connections is not None else None
        if reused is None and connections is not None:
            connections.opening(target)
        try:
            self._backend = _Backend(uri, MIGRATION_TABLE, reused.connection if reused else None)
        except psycopg2.Error as e:
            if connections is not None:
                connections.not_opened(target)
            raise _classify_connect_error(e, target) from None
        self._connection = self._backend.connection
        self._backend_pid = reused.backend_pid if reused else None
        # False once the lock could not be given back: the connection is then closed, never handed on.
        self._released_cleanly = True
        self._watch = _Watch(self._connection, interrupt, options, deadline)
        self._interrupt = interrupt
        self._options = options
        self._owner = locking.Owner(pid=os.getpid(), run_id=run_id)
        self._display = target.display
        # True once a migration may have changed the session (role, search_path, settings,
        # temporary tables, an open transaction): the next message then starts by restoring it.
        self._dirty = False
        self._schema_only = target.schema is not None
        self._repair = options.repair_invalid
        try:
            plain = _connect_kwargs(target, options, run_id)
            if reused is None:
                self._backend_pid = _check_session(self._connection, target, plain, started, self._watch)
            elif self._backend_pid is not None:
                self._watch.check_liveness(self._connection, plain, self._backend_pid)
            self._settings, self._schema = self._configure(target.schema, options.session)
            self._backend.bookkeeping = self._schema
            self._backend.init_database()
        except psycopg2.Error as e:
            self.close()
            raise self._watch.classify(e) from None
        except _Failure:
            self.close()
            raise
        self.initialized = True

    def _configure(self, schema: str | None, settings: SessionSettings) -> tuple[list[str], str]:
        """Apply the session's settings and find the schema of yoyo's tables, in one round trip.

        Returns the settings as statements (to apply again after each reset) and the schema:
        the target's, or the one the session starts in, which is where yoyo keeps its tables.
        """
        watch = self._connection.server_version >= 140000
        with self._connection.cursor() as cursor:
            for attempt in (watch, False) if watch else (False,):
                statements = _settings_sql(self._connection, schema, settings, watch=attempt)
                probe = cursor.mogrify("SELECT coalesce(%s, current_schema())", (schema,)).decode()
                try:
                    cursor.execute(_join([*statements, probe]))
                except psycopg2.errors.InvalidParameterValue as e:
                    if not attempt:
                        raise
                    # Platforms without the check refuse any non-zero interval; the rest still applies.
                    log.debug("client_connection_check_interval unavailable: %s", e)
                    continue
                row = cursor.fetchone()
                break
        found = row[0] if row else None
        if not found:
            raise _Failure(
                TargetError(ErrorKind.DATABASE, "no schema for yoyo's tables: the search_path names no existing schema")
            )
        return statements, str(found)

    def _prologue(self) -> list[str]:
        """What the next message starts with so that it runs in a fresh session (nothing when it already does)."""
        statements = []
        if self._connection.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            statements.append("ROLLBACK")  # a migration left a transaction open, or aborted
        if self._dirty:
            statements += [*_FRESH_SESSION, *self._settings]
        return statements

    def _clean(self) -> None:
        """Restore a fresh session now (one round trip; none when it is fresh already)."""
        prologue = self._prologue()
        if prologue:
            with self._connection.cursor() as cursor:
                cursor.execute(_join(prologue))
            self._dirty = False
        self._backend._in_transaction = False

    def _commit_clean(self, statements: Sequence[str], *, then: str | None = None) -> None:
        """Commit fanout's own `statements` in a fresh session, all in one round trip."""
        locking.in_one_transaction(self._connection, statements, before=self._prologue(), then=then)
        self._dirty = False

    @contextmanager
    def lock(self, wait: float) -> Iterator[tuple[LockHolder | None, LockHolder | None]]:
        deadline = time.monotonic() + wait
        while True:
            try:
                attempt = locking.try_acquire(self._connection, self._owner, self._schema)
            except psycopg2.Error as e:
                raise self._watch.classify(e) from None
            if attempt.taken:
                break
            if self._interrupt.stopping.is_set():
                raise _Failure(TargetError(ErrorKind.INTERRUPTED, "interrupted while waiting for the shard's lock"))
            if self._watch.deadline is not None and time.monotonic() >= self._watch.deadline:
                who = attempt.holder.describe() if attempt.holder else "another process"
                raise _timed_out(self._options, f"still waiting for the shard's lock, held by {who}")
            if time.monotonic() >= deadline:
                who = attempt.holder.describe() if attempt.holder else "another process"
                raise _Failure(TargetError(ErrorKind.LOCKED, f"lock held by {who}; gave up after {wait:g}s"))
            time.sleep(LOCK_POLL_SECONDS * random.uniform(0.5, 1.5))
        if attempt.broken is not None:
            log.warning("%s: broke the stale lock of %s", self._display, attempt.broken.describe())
        self._backend._is_locked = True
        try:
            yield None, attempt.broken
        finally:
            self._backend._is_locked = False
            try:
                locking.release(self._connection, self._owner, self._schema, before=self._prologue())
                self._dirty = False
                self._backend._in_transaction = False
            except psycopg2.Error:
                self._released_cleanly = False
                # Only reachable when the connection broke; the lock is then recognizably stale.
                log.warning("could not release the lock on %s; the next run breaks it", self._display)

    def applied(self) -> dict[str, str]:
        try:
            self._backend.ensure_internal_schema_updated()  # yoyo creates (or upgrades) its tables here
            with self._connection.cursor() as cursor:
                return _applied(cursor, self._schema)
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def recorded_checksums(self) -> dict[str, checksums.Recorded]:
        try:
            with self._connection.cursor() as cursor:
                return checksums.read(cursor, self._schema, exists=True)  # created with the lock tables
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def marks_and_invalid(self) -> tuple[dict[str, indoubt.Mark], tuple[str, ...]]:
        try:
            with self._connection.cursor() as cursor:
                return indoubt.read(cursor, self._schema, only_schema=self._schema_only)
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def in_doubt(self, migration: Migration, mark: indoubt.Mark, *, repair: bool) -> tuple[InDoubt | None, str | None]:
        try:
            self._clean()
            with self._connection.cursor() as cursor:
                doubt, found, only = _examine(cursor, self._schema, self._schema_only, migration, mark)
                if not (repair and indoubt.repairable(only, found)):
                    return doubt, None
                for index in found.own_invalid:
                    cursor.execute(indoubt.drop_sql(index))
                cursor.execute(indoubt.clear_sql(cursor, self._schema, migration.id))
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None
        dropped = f"dropped INVALID index {', '.join(found.own_invalid)}, " if found.own_invalid else ""
        return None, f"in doubt since run {mark.run_id}: {dropped}running it again (--repair-invalid)"

    def apply(self, migration: Migration, recording: _Recording) -> bool:
        backend = self._backend
        try:
            statements = _plain_sql(migration)
            records = [*_ORIGINAL_ROLE, *self._records(migration, recording)]
            if statements is not None:
                # A fresh session, the statements and the rows recording them: one transaction, one round trip.
                prologue = self._prologue()
                self._dirty = True
                locking.in_one_transaction(self._connection, [*statements, *records], before=prologue)
            elif migration.use_transactions:
                # One transaction: the migration's steps (as savepoints) and the rows recording them.
                self._clean()
                self._dirty = True
                with backend.transaction():
                    migration.process_steps(backend, "apply")
                    self._execute(_join(records))
            else:
                self._apply_marked(migration, recording)
        except psycopg2.Error as e:
            self._reset()
            raise self._watch.classify(e, otherwise=ErrorKind.MIGRATION) from None
        return True

    def rollback(self, migration: Migration, recorded: _Recording, reason: str | None) -> bool:
        """Run the migration's rollback and remove its records (yoyo's and fanout's) in one transaction.

        A non-transactional rollback runs outside a transaction, as in yoyo; its records are
        removed in one transaction afterwards.
        """
        backend = self._backend
        try:
            statements = _plain_rollback_sql(migration)
            unrecords = [*_ORIGINAL_ROLE, *self._unrecords(migration, recorded, reason)]
            if statements is not None:
                # As for apply: a fresh session, the rollback and its records, one round trip.
                prologue = self._prologue()
                self._dirty = True
                locking.in_one_transaction(self._connection, [*statements, *unrecords], before=prologue)
            elif migration.use_transactions:
                self._clean()
                self._dirty = True
                with backend.transaction():
                    migration.process_steps(backend, "rollback")
                    self._execute(_join(unrecords))
            else:
                self._rollback_marked(migration, unrecords)
        except psycopg2.Error as e:
            self._reset()
            raise self._watch.classify(e, otherwise=ErrorKind.MIGRATION) from None
        return True

    def _rollback_marked(self, migration: Migration, unrecords: Sequence[str]) -> None:
        """A non-transactional migration's rollback, as `_apply_marked` applies one: marked as started
        (committed, operation "rollback"), run statement by statement, then unrecorded with the mark
        cleared in one transaction. Stopped midway, the mark stays and the next run reports the
        migration in doubt instead of rolling it back blindly again."""
        backend = self._backend
        before = self._mark_started(migration.id, "rollback")
        with self._connection.cursor() as cursor:
            clear = indoubt.clear_sql(cursor, self._schema, migration.id)
        executed = 0
        self._dirty = True
        try:
            with backend.disable_transactions():
                for step in reversed(migration.steps):  # as yoyo: the rollback file's statements in file order
                    step.rollback(backend)
                    # yoyo pairs a migration's statements with its rollback's: an apply statement with
                    # no rollback partner runs nothing here. Anything else (or unknown) counts as run.
                    if getattr(getattr(step, "step", step), "_rollback", "") is not None:
                        executed += 1
        except psycopg2.Error as e:
            failure = self._watch.classify(e, otherwise=ErrorKind.MIGRATION)
            if _lost(e) or self._watch.handle.reason is not None:
                raise failure from None  # the mark stays: the next run says what is there
            try:
                self._clean()
                left = tuple(sorted(self._invalid_indexes() - set(before)))
                if not executed and not left:
                    with self._connection.cursor() as cursor:
                        cursor.execute(clear)  # its first statement failed whole: nothing happened, not in doubt
                    raise failure from None
            except psycopg2.Error:
                raise _Failure(failure.error) from None
            gone = f"; left INVALID index {', '.join(left)}" if left else ""
            ran = f"; {executed} of its statements had run" if executed else ""
            message = (
                f"{failure.error.message}{gone}{ran}; marked in doubt: the next run reports it until it is settled "
                "(`fanout mark` if it is still applied, `fanout unmark` if its rollback is complete)"
            )
            raise _Failure(replace(failure.error, message=message, invalid_indexes=left)) from None
        self._commit_clean([*unrecords, clear])

    def _unrecords(self, migration: Migration, recorded: _Recording, reason: str | None) -> list[str]:
        """yoyo's `_yoyo_log` "rollback" row and the removal of its `_yoyo_migration` row, as yoyo's
        `rollback_one` writes them, then the removal of fanout's checksum row, logged."""
        backend = self._backend
        rows = [
            self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, "rollback")),
            self._yoyo_row(backend.unmark_migration_sql, {"migration_hash": migration.hash}),
        ]
        with self._connection.cursor() as cursor:
            rows.append(checksums.unrecord_sql(cursor, self._schema, migration.id))
            rows.append(
                checksums.log_sql(
                    cursor, self._schema, migration.id, recorded.sha256 or None, "", checksums.How.ROLLED_BACK, reason
                )
            )
        return rows

    def _mark_started(self, migration_id: str, operation: str) -> tuple[str, ...]:
        """Commit the started mark of a non-transactional `operation` in a fresh session, before its
        first statement; returns the INVALID indexes already there (recorded with the mark, so that
        what the operation leaves behind can be told apart later)."""
        self._clean()
        owner = self._owner
        with self._connection.cursor() as cursor:
            _, before = indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)
            cursor.execute(
                indoubt.mark_sql(
                    cursor, self._schema, migration_id, operation=operation, run_id=owner.run_id, host=owner.host,
                    pid=owner.pid, invalid=before,
                )
            )  # fmt: skip
        return before

    def _invalid_indexes(self) -> set[str]:
        """Every INVALID index the session can see (a failed CREATE/DROP INDEX CONCURRENTLY leaves one)."""
        with self._connection.cursor() as cursor:
            return set(indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)[1])

    def _apply_marked(self, migration: Migration, recording: _Recording) -> None:
        """A non-transactional migration: marked as started (committed), run, then recorded with the mark cleared.

        Whatever stops it midway, the mark stays and the next run reports the migration in
        doubt instead of running it blindly again; only a failure of its first statement
        that left nothing behind (no new INVALID index) clears the mark, since a single
        statement outside a transaction is atomic but for the INVALID index of a
        CONCURRENTLY build. Never records it while an index it builds is INVALID.
        """
        backend = self._backend
        builds, only = indoubt.index_builds(_statements(migration) or [])
        for attempt in itertools.count():
            before = self._mark_started(migration.id, "apply")
            executed = []
            self._dirty = True
            try:
                with backend.disable_transactions():
                    for step in migration.steps:
                        step.apply(backend)
                        executed.append(step)
            except psycopg2.Error as e:
                raise self._failed_midway(migration, e, executed, builds, only, before) from None
            self._clean()  # the migration's session changes must not reach what follows (nor its lookups)
            with self._connection.cursor() as cursor:
                _, now = indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)
                found = indoubt.inspect(cursor, builds, now, before)
                if found.own_invalid and self._repair and attempt == 0 and indoubt.repairable(only, found):
                    # An INVALID index of the same name that IF NOT EXISTS skipped: build it for real.
                    for index in found.own_invalid:
                        cursor.execute(indoubt.drop_sql(index))
                    continue
                clear = indoubt.clear_sql(cursor, self._schema, migration.id)
            if found.own_invalid:
                doubt = InDoubt(
                    migration.id, "apply", self._owner.run_id, self._owner.host, self._owner.pid,
                    datetime.now(UTC).replace(tzinfo=None),
                    found.invalid, found.valid, found.missing,
                )  # fmt: skip
                message = (
                    f"ran, but index {', '.join(found.own_invalid)} is INVALID (CREATE INDEX ... IF NOT EXISTS "
                    "skips an INVALID index of that name): not recorded as applied. "
                    + _in_doubt_error(doubt).message.removeprefix("in doubt: ")
                )
                raise _Failure(
                    TargetError(ErrorKind.IN_DOUBT, message, invalid_indexes=found.own_invalid), in_doubt=doubt
                )
            self._commit_clean([*_ORIGINAL_ROLE, *self._records(migration, recording), clear])
            return

    def _failed_midway(
        self,
        migration: Migration,
        error: psycopg2.Error,
        executed: list[Any],
        builds: list[indoubt.IndexBuild],
        only: bool,
        before: tuple[str, ...],
    ) -> _Failure:
        """Classify a failed non-transactional migration; keep its mark unless nothing can have happened."""
        failure = self._watch.classify(error, otherwise=ErrorKind.MIGRATION)
        if _lost(error) or self._watch.handle.reason is not None:
            return failure  # the mark stays: the retry on a new connection finds it and says what is there
        for step in reversed(executed):  # as yoyo does: undo the steps that ran, as far as their rollbacks go
            try:
                step.rollback(self._backend)
            except psycopg2.Error as e:
                log.warning("%s: rollback of a step of %s failed: %s", self._display, migration.id, _pg_message(e))
        try:
            self._clean()
            with self._connection.cursor() as cursor:
                _, now = indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)
                found = indoubt.inspect(cursor, builds, now, before)
                if not executed and found.own_invalid and self._repair and only:
                    for index in found.own_invalid:
                        cursor.execute(indoubt.drop_sql(index))
                    _, now = indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)
                    found = indoubt.inspect(cursor, builds, now, before)
                if not executed and not found.invalid:
                    cursor.execute(
                        indoubt.clear_sql(cursor, self._schema, migration.id)
                    )  # nothing happened: not in doubt
                    return failure
        except psycopg2.Error:
            return _Failure(failure.error)  # the mark stays
        left = f"; left INVALID index {', '.join(found.invalid)}" if found.invalid else ""
        ran = f"; {len(executed)} of its {len(migration.steps)} statements had run" if executed else ""
        message = (
            f"{failure.error.message}{left}{ran}; marked in doubt: the next run reports it until it is settled "
            "(`fanout mark`/`fanout unmark`, or drop the INVALID index and `fanout unmark`, or `apply --repair-invalid`)"
        )
        return _Failure(replace(failure.error, message=message, invalid_indexes=found.invalid))

    def checksum_statements(
        self,
        migration_id: str,
        old: str | None,
        new: str,
        service: str,
        environment: str,
        how: checksums.How,
        reason: str | None,
    ) -> list[str]:
        with self._connection.cursor() as cursor:
            return [
                checksums.record_sql(cursor, self._schema, migration_id, new, service, environment, how),
                checksums.log_sql(cursor, self._schema, migration_id, old, new, how, reason),
            ]

    def record(self, statements: Sequence[str]) -> None:
        """Commit `statements` in one transaction (one round trip)."""
        if not statements:
            return
        try:
            self._commit_clean(statements)
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def _execute(self, statement: str) -> None:
        # Not backend.execute(): it passes {} as parameters, and psycopg2 would then read % in the text.
        with self._connection.cursor() as cursor:
            cursor.execute(statement)

    def _yoyo_row(self, template: str, values: dict[str, Any]) -> str:
        """One of yoyo's statements (its SQL template, its values), as text."""
        backend = self._backend
        query, params = change_param_style(psycopg2.paramstyle, backend.format_sql(template), values)
        with self._connection.cursor() as cursor:
            return str(cursor.mogrify(query, params).decode())

    def _records(
        self,
        migration: Migration,
        recording: _Recording,
        operation: str = "apply",
        how: checksums.How = checksums.How.APPLIED,
    ) -> list[str]:
        """yoyo's `_yoyo_log` and `_yoyo_migration` rows and fanout's checksum row, as statements.

        Their times are the server's clock when they are inserted, after the migration ran.
        `operation` is yoyo's log operation (`apply`, or `mark` for `fanout mark`).
        """
        backend = self._backend
        marked = {"migration_hash": migration.hash, "migration_id": migration.id, "when": _FINISHED_AT}
        rows = [
            self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, operation)),
            self._yoyo_row(backend.mark_migration_sql, marked),
        ]
        with self._connection.cursor() as cursor:
            rows.append(
                checksums.record_sql(
                    cursor, self._schema, migration.id, recording.sha256, recording.service, recording.environment,
                    how, at=_FINISHED_AT,
                )
            )  # fmt: skip
        return rows

    def _unmark_rows(self, migration: Migration) -> list[str]:
        """yoyo's unmark (its row deleted, `_yoyo_log` says unmark) and fanout's checksum row deleted."""
        backend = self._backend
        rows = [
            self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, "unmark")),
            self._yoyo_row(backend.unmark_migration_sql, {"migration_hash": migration.hash}),
        ]
        with self._connection.cursor() as cursor:
            rows.append(checksums.unrecord_sql(cursor, self._schema, migration.id))
        return rows

    def run_hook(self, migration: Migration) -> None:
        """Run a post-apply hook and log it in `_yoyo_log` as yoyo does (an `apply` row; hooks are never marked)."""
        backend = self._backend
        try:
            self._clean()
            self._dirty = True
            migration.process_steps(backend, "apply")
            self._commit_clean([self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, "apply"))])
        except psycopg2.Error as e:
            self._reset()
            raise self._watch.classify(e, otherwise=ErrorKind.MIGRATION) from None

    def failed_hooks(self) -> set[str]:
        try:
            with self._connection.cursor() as cursor:
                return checksums.failed_hooks(cursor, self._schema)
        except psycopg2.Error as e:
            self._reset()
            raise self._watch.classify(e) from None

    def note_hook(self, hook_id: str, sha256: str, *, failed: bool, reason: str | None) -> None:
        action = checksums.How.HOOK_FAILED if failed else checksums.How.HOOK_RAN
        try:
            with self._connection.cursor() as cursor:
                statement = checksums.log_sql(cursor, self._schema, hook_id, None, sha256, action, reason)
            self.record([statement])
        except (psycopg2.Error, _Failure) as e:
            # The report still names the failure; only the reminder for the next run is lost.
            log.warning("%s: could not log post-apply hook %s as %s: %s", self._display, hook_id, action.value, e)

    def _reset(self) -> None:
        """Leave the connection usable (to release the lock) after a failed statement."""
        with contextlib.suppress(psycopg2.Error):
            self._clean()

    def close(self, *, reuse: bool = False) -> None:
        self._watch.release()
        reuse = reuse and self._released_cleanly and self._watch.untouched() and self._connections is not None
        if reuse:
            try:
                # What pgbouncer's server_reset_query does, and no advisory lock survives the
                # target: the next target of this database starts from a fresh session.
                prologue = ["ROLLBACK"] if self._connection.info.transaction_status != _IDLE else []
                with self._connection.cursor() as cursor:
                    cursor.execute(_join([*prologue, *_FRESH_SESSION, "SELECT pg_catalog.pg_advisory_unlock_all()"]))
                reuse = self._connection.info.transaction_status == _IDLE
            except psycopg2.Error:
                reuse = False
        if self._connections is not None:
            self._connections.give_back(self._target, self._connection, self._backend_pid, reuse=reuse)
            return
        with contextlib.suppress(psycopg2.Error):
            self._connection.close()
