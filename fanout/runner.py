"""The runner: applies (or plans) a pinned migration set on many targets at once.

This is the only module that talks to yoyo. Each target gets one connection, used by
one worker thread and closed afterwards (yoyo backends are not thread-safe), or handed
to the next target of the same database when it ends cleanly (`Connections`); the
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

import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from yoyo import exceptions as yoyo_exceptions, read_migrations
from yoyo.migrations import Migration, MigrationList, ancestors, topological_sort
from yoyo.topologicalsort import CycleError

from fanout import checksums, engines, indoubt, rollback as rollback_selection, rollout
from fanout.config import TcpSettings
from fanout.directory import DEFAULT_TCP, Target
from fanout.engines import (
    ChecksumChange,
    EngineError,
    Recording,
    Session,
    SettleItem,
    UnlockResult,
    in_doubt_error,
    timed_out,
)
from fanout.engines.connections import Connections
from fanout.errors import ConfigError, SourceError
from fanout.interrupt import Interrupt
from fanout.options import RunOptions, SessionSettings
from fanout.report import (
    AppliedMigration,
    Drift,
    DriftKind,
    ErrorKind,
    Finding,
    InDoubt,
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
    result_for,
)
from fanout.source import MigrationSet, Snapshot

# RunOptions, SessionSettings and UnlockResult are defined where the engines can read them
# (an engine never imports the runner); the command layer knows them as the runner's.
__all__ = [
    "Adoption", "RunOptions", "SessionSettings", "Settlement", "UnlockResult", "adopt", "ensure_database", "load",
    "run", "settle", "unlock", "up_to",
]  # fmt: skip

log = logging.getLogger(__name__)

RETRY_BACKOFF_CAP_SECONDS = 30.0
# yoyo's Migration keeps a process-wide registry by id that `load()` reads to resolve
# `-- depends:`; loading one set at a time keeps concurrent loads from mixing sets.
_load_lock = threading.Lock()


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
    _note_settings_not_sent(targets, options)
    if on_start is not None:
        on_start(len(targets), options.limits.waves.sizes(len(targets)))
    interrupt = interrupt or Interrupt()
    connections = Connections(
        targets, options, key=lambda target: engines.for_target(target).connection_key(target, options, run_id)
    )

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
            results = [result_for(target, p.service, Status.SKIPPED, error) for p in plans]
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
    target: Target, *, connect_timeout: float = 10.0, tcp: TcpSettings = DEFAULT_TCP, interrupt: Interrupt | None = None
) -> bool:
    """Create the target's database when it does not exist; True when it was created (raises TargetFailed).

    Connects with the target's own credentials, so its role needs the right to create databases.
    Safe when two bootstraps race: the loser sees the database exist. `interrupt`'s second
    signal cancels it (PostgreSQL).
    """
    return engines.for_target(target).ensure_database(
        target, connect_timeout=connect_timeout, tcp=tcp, interrupt=interrupt
    )


def _note_settings_not_sent(targets: Sequence[Target], options: RunOptions) -> None:
    """Warn once per run, by name, about `[session]` settings some of the run's shards will not get.

    They are PostgreSQL settings: an engine that does not take them opens its sessions
    without them, and a mixed fleet still runs. Names only: the values add nothing here.
    """
    if not options.session.settings:
        return
    without: dict[str, int] = {}
    for target in targets:
        engine = engines.for_target(target)
        if not engine.SESSION_SETTINGS:
            without[engine.NAME] = without.get(engine.NAME, 0) + 1
    names = ", ".join(name for name, _ in options.session.settings)
    for engine_name, count in without.items():
        log.warning(
            "[session] %s: not sent to the %d %s target(s) of this run (PostgreSQL settings)", names, count, engine_name
        )


# ---- one target ---------------------------------------------------------------------


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
    connections: Connections,
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
        session: Session | None = None
        reusable = False
        try:
            session = engines.for_target(target).open_session(target, options, run_id, interrupt, deadline, connections)
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
        except EngineError as caught:
            current = next((p for p in plans if progress[p.service].result is None), plans[0])
            if caught.retryable and attempt < options.retries and not interrupt.stopping.is_set():
                delay = _backoff(options, attempt)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    failure = timed_out(options, f"gave up retrying ({caught.error.message})").error
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
            result = result_for(target, plan.service, status, failure, **_outcome(state, plan, context))
        else:
            reason = f"not attempted: service {blocked_by!r} did not complete on this target"
            result = result_for(target, plan.service, Status.SKIPPED, TargetError(ErrorKind.NOT_STARTED, reason))
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
    session: Session,
    target: Target,
    plan: _ServicePlan,
    shard: _ShardState,
    state: _Progress,
    options: RunOptions,
    interrupt: Interrupt,
    deadline: float | None = None,
) -> TargetResult:
    """Apply one service's pending migrations; raises EngineError only when the connection is lost."""
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
        return result_for(
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
        except EngineError as failure:
            if failure.retryable and failure.error.kind is ErrorKind.UNREACHABLE:
                raise
            error = failure.error
        if doubt is not None:
            error = replace(in_doubt_error(doubt), migration=undoing.id, file=plan.rollback_files.get(undoing.id))
    for migration in pending if error is None else ():
        if interrupt.stopping.is_set():
            error = TargetError(ErrorKind.INTERRUPTED, f"interrupted before {migration.id}")
            break
        if deadline is not None and time.monotonic() >= deadline:
            error = timed_out(options, f"stopped before {migration.id}").error
            break
        recording = Recording(plan.sha256.get(migration.id, ""), plan.service, shard.environment)
        try:
            mark = shard.marks.get(migration.id)
            if mark is not None:
                doubt, repaired = session.in_doubt(migration, mark, repair=options.repair_invalid)
                if repaired is not None:
                    state.retries.append(Retry(len(state.retries) + 1, repaired, 0.0, migration.id))
                    log.warning("%s: %s: %s", target.id, migration.id, repaired)
                if doubt is not None:
                    raise EngineError(in_doubt_error(doubt), in_doubt=doubt)
            seconds = _with_retries(
                    lambda m=migration, r=recording: session.apply(m, r),  # type: ignore[misc]
                    migration.id, state, options, interrupt, deadline,
                )  # fmt: skip
        except EngineError as failure:
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
    return result_for(
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


def _run_hooks(session: Session, plan: _ServicePlan, due: Sequence[str]) -> TargetError | None:
    """Run the service's post-apply hooks in order; the first failure stops them and is logged, so the
    hook stays due for the next run; hooks `due` from an earlier run are logged as run once all pass."""
    for hook in plan.post_apply:
        try:
            session.run_hook(hook)
        except EngineError as failure:
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
    session: Session,
    target: Target,
    plan: _ServicePlan,
    shard: _ShardState,
    state: _Progress,
    options: RunOptions,
    interrupt: Interrupt,
    deadline: float | None = None,
) -> TargetResult:
    """Roll back what the request selects on this shard, newest first; raises EngineError only when the connection is lost.

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

    doubtful = [shard.marks[m] for m in plan.undo if m in shard.marks and not shard.marks[m].resumable]
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
        return result_for(target, plan.service, Status.IN_DOUBT, refusal, **outcome, **remaining())
    if drift and todo and options.mode is Mode.ROLLBACK and not request.accept_drift and not state.rolled_back:
        listed = ", ".join(f"{d.migration} ({d.kind.value})" for d in drift[:5])
        refusal = TargetError(
            ErrorKind.DRIFT,
            f"refused: applied migrations differ from the migration set: {listed}; the rollback files may not "
            "match what was applied: review, then `fanout accept` or `fanout rollback --accept-drift`",
        )
        return result_for(target, plan.service, Status.FAILED, refusal, **outcome, **remaining())
    error: TargetError | None = None
    for migration in todo:
        if migration.hash not in applied:
            continue  # rolled back before a lost connection made the target start over
        if interrupt.stopping.is_set():
            error = TargetError(ErrorKind.INTERRUPTED, f"interrupted before rolling back {migration.id}")
            break
        if deadline is not None and time.monotonic() >= deadline:
            error = timed_out(options, f"stopped before rolling back {migration.id}").error
            break
        unrecording = Recording(shard.recorded[migration.id].sha256 if migration.id in shard.recorded else "",
                                 plan.service, shard.environment)  # fmt: skip
        try:
            seconds = _with_retries(
                lambda m=migration, u=unrecording: session.rollback(m, u, request.reason),  # type: ignore[misc]
                migration.id, state, options, interrupt, deadline,
            )  # fmt: skip
        except EngineError as failure:
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
            recording = Recording(plan.sha256.get(migration.id, ""), plan.service, shard.environment)
            try:
                seconds = _with_retries(
                    lambda m=migration, r=recording: session.apply(m, r),  # type: ignore[misc]
                    migration.id, state, options, interrupt, deadline,
                )  # fmt: skip
            except EngineError as failure:
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
        return result_for(target, plan.service, status, None, **outcome, to_roll_back=tuple(m.id for m in todo),
                       pending=tuple(m.id for m in plan.migrations if m.hash not in applied))  # fmt: skip
    return result_for(target, plan.service, status, error, **outcome, **remaining())


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
        except EngineError as failure:
            if interrupt.aborting.is_set():
                if failure.error.kind is ErrorKind.INTERRUPTED:
                    raise
                raise EngineError(TargetError(ErrorKind.INTERRUPTED, "cancelled by a second interrupt")) from None
            transient = failure.retryable and failure.error.kind is not ErrorKind.UNREACHABLE
            if not transient or attempt >= options.retries or interrupt.stopping.is_set():
                raise
            delay = _backoff(options, attempt)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise timed_out(options, f"gave up retrying {migration_id} ({failure.error.message})") from None
            state.retries.append(Retry(attempt + 1, failure.error.message, delay, migration_id))
            log.info("%s: %s; retrying in %.1fs", migration_id, failure.error.message, delay)
            interrupt.stopping.wait(delay)
    raise AssertionError("unreachable")


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


def unlock(
    targets: Sequence[Target],
    *,
    force: bool,
    connect_timeout: float,
    concurrency: int,
    terminate: str | None = None,
    tcp: TcpSettings = DEFAULT_TCP,
    lock_timeout: str | None = None,
    interrupt: Interrupt | None = None,
) -> list[UnlockResult]:
    """Remove the migration lock of each target by hand; refuses while a holder may be alive, unless forced.

    `terminate` (a reason) ends the session of a live fanout holder first. `lock_timeout` (the
    environment's, else the engine's default) bounds the wait for a row lock on the lock table:
    a session stopped inside its acquisition keeps one until it ends. Once `interrupt` stops,
    no other target is started; the targets not reached have no result.
    """
    interrupt = interrupt or Interrupt()

    def one(target: Target) -> UnlockResult:
        return engines.for_target(target).unlock(
            target,
            force=force,
            terminate=terminate,
            connect_timeout=connect_timeout,
            tcp=tcp,
            lock_timeout=lock_timeout,
            interrupt=interrupt,
        )

    limits = rollout.Limits(concurrency=concurrency)
    outcome = rollout.schedule(
        targets, one, server_of=lambda t: t.server, failed=lambda _: False, limits=limits, stop=interrupt.stopping
    )
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
    writing = replace(options, mode=Mode.APPLY)
    _note_settings_not_sent(targets, options)

    def one(target: Target) -> Adoption:
        try:
            session = engines.for_target(target).open_session(target, writing, run_id, interrupt)
        except EngineError as failure:
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
                changes: list[ChecksumChange] = []
                for migration_id in wanted:
                    row = recorded.get(migration_id)
                    service, sha = current.get(migration_id, ("", ""))
                    if migration_ids is None:  # baseline: only what has no checksum, and the set knows
                        if row is None and sha:
                            changes.append(ChecksumChange(migration_id, None, sha, service, checksums.How.BASELINED))
                    elif migration_id not in applied and row is None:
                        continue
                    elif not sha:  # gone from the set: retire it, keeping what was recorded
                        if row is None or row.how != checksums.How.RETIRED:
                            old = row.sha256 if row else None
                            changes.append(
                                ChecksumChange(
                                    migration_id, old, old or "", row.service if row else "", checksums.How.RETIRED
                                )
                            )
                    elif row is None or row.sha256 != sha or row.environment != environment:
                        changes.append(
                            ChecksumChange(
                                migration_id, row.sha256 if row else None, sha, service, checksums.How.ACCEPTED
                            )
                        )
                session.adopt(changes, environment, reason)
        except EngineError as failure:
            return Adoption(target.id, target.display, (), failure.error.message, failed=True)
        finally:
            session.close()
        ids = tuple(change.migration_id for change in changes)
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
    writing = replace(options, mode=Mode.APPLY)
    _note_settings_not_sent(targets, options)

    def one(target: Target) -> Settlement:
        try:
            session = engines.for_target(target).open_session(target, writing, run_id, interrupt)
        except EngineError as failure:
            return Settlement(target.id, target.display, (), failure.error.message, failed=True)
        items = [
            SettleItem(migration, Recording(plan.sha256.get(migration.id, ""), plan.service, environment))
            for plan, migration in (by_id[m] for m in migration_ids)
        ]
        try:
            with session.lock(options.lock_wait):
                settled = session.settle(items, record=record, reason=reason, force=force)
        except EngineError as failure:
            return Settlement(target.id, target.display, (), failure.error.message, failed=True)
        finally:
            session.close()
        return Settlement(target.id, target.display, settled.changed, "; ".join(settled.notes), refused=settled.refused)

    limits = rollout.Limits(concurrency=options.concurrency, per_server=options.limits.per_server)
    outcome = rollout.schedule(
        targets, one, server_of=lambda t: t.server, failed=lambda s: s.failed, limits=limits, stop=interrupt.stopping
    )
    return [r for r in outcome.results if r is not None]


def resolve(
    snapshot: Snapshot,
    targets: Sequence[Target],
    options: RunOptions,
    *,
    run_id: str,
    migration_id: str,
    took_effect: bool,
    reason: str,
    interrupt: Interrupt | None = None,
) -> list[Settlement]:
    """Settle the statement in doubt of one migration by hand, under each target's lock (MySQL/MariaDB shards).

    `took_effect`: it is recorded as done, and apply (or rollback) continues after it; else
    it is forgotten, and the next run runs it. Targets whose engine records no statement
    progress (PostgreSQL), and shards where nothing is in doubt, are left as they were.
    Raises ConfigError, before any shard is touched, for an id that no set of the run has.
    """
    plans = load(snapshot.sets)
    found = {m.id: m for p in plans for m in p.migrations}
    if migration_id not in found:
        raise ConfigError(f"no migration {migration_id!r} in the migration set of any service")
    migration = found[migration_id]
    interrupt = interrupt or Interrupt()
    writing = replace(options, mode=Mode.APPLY)
    _note_settings_not_sent(targets, options)

    def one(target: Target) -> Settlement:
        engine = engines.for_target(target)
        if not engine.RESOLVING:
            return Settlement(target.id, target.display, (), f"{engine.NAME} shard: no statement progress to resolve "
                              "(`fanout mark`/`unmark` settle a migration in doubt)")  # fmt: skip
        try:
            session = engine.open_session(target, writing, run_id, interrupt)
        except EngineError as failure:
            return Settlement(target.id, target.display, (), failure.error.message, failed=True)
        try:
            if not isinstance(session, engines.Resolving):  # the engine's RESOLVING and its session disagree
                message = f"internal error: a {engine.NAME} session cannot resolve a statement"
                return Settlement(target.id, target.display, (), message, failed=True)
            with session.lock(options.lock_wait):
                note = session.resolve_statement(migration, took_effect=took_effect, reason=reason)
        except EngineError as failure:
            return Settlement(target.id, target.display, (), failure.error.message, failed=True)
        finally:
            session.close()
        if note is None:
            return Settlement(target.id, target.display, (), f"{migration_id}: no statement in doubt: nothing to do")
        return Settlement(target.id, target.display, (migration_id,), note)

    limits = rollout.Limits(concurrency=options.concurrency, per_server=options.limits.per_server)
    outcome = rollout.schedule(
        targets, one, server_of=lambda t: t.server, failed=lambda s: s.failed, limits=limits, stop=interrupt.stopping
    )
    return [r for r in outcome.results if r is not None]
