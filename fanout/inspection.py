"""`inspect`: the live schema of every shard, read-only, grouped and compared with a reference.

Orchestration only: `fanout.engines.postgres.catalog` reads each shard (one connection, no lock, nothing
written), `fanout.schema` describes, fingerprints, groups and diffs. With the `build`
reference the migration set is applied by the runner, exactly as `apply` would, to a
scratch namespace that is dropped afterwards.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from fanout import rollout, runner, schema
from fanout.directory import Target
from fanout.engines import postgres
from fanout.engines.postgres import catalog
from fanout.errors import Interrupted, TargetFailed
from fanout.interrupt import Interrupt
from fanout.report import (
    ErrorKind,
    Mode,
    Rollout,
    RunReport,
    SourceFile,
    SourceSummary,
    Status,
    TargetError,
    TargetResult,
    result_for,
)
from fanout.source import Snapshot


@dataclass(frozen=True, slots=True)
class _Set:
    """One service's migration ids, in the order yoyo applies them."""

    service: str
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Read:
    target: Target
    shard: schema.ShardSchema | None
    results: tuple[TargetResult, ...]


def inspect(
    snapshot: Snapshot,
    targets: Sequence[Target],
    options: runner.RunOptions,
    *,
    run_id: str,
    environment: str,
    reference: str = schema.LARGEST,
    command: str = "inspect",
    on_result: Callable[[TargetResult], None] | None = None,
    on_start: Callable[[int, list[int]], None] | None = None,
    interrupt: Interrupt | None = None,
) -> RunReport:
    """Inspect every target; a target that cannot be read is a failed result, never an exception.

    `reference`: "largest", "build" (raises TargetFailed when the set cannot be built) or a target id.
    """
    started_at = datetime.now(UTC)
    # Read-only: a set with lint errors is still inspected (they are in the report), unless it is built.
    loaded = runner.load(snapshot.sets, python=options.python_migrations, tolerant=reference != schema.BUILD)
    plans = [_Set(p.service, tuple(m.id for m in p.migrations)) for p in loaded]
    interrupt = interrupt or Interrupt()
    built = (
        _build(snapshot, targets[0], plans, options, run_id, environment, interrupt)
        if reference == schema.BUILD
        else None
    )
    limits = rollout.Limits(concurrency=options.concurrency, per_server=options.limits.per_server)
    if on_start is not None:
        on_start(len(targets), [len(targets)])
    connections = itertools.count()

    def work(target: Target) -> _Read:
        next(connections)
        read = _read(target, plans, options, run_id, interrupt)
        if on_result is not None:
            for result in read.results:
                on_result(result)
        return read

    outcome = rollout.schedule(
        targets, work, server_of=lambda t: t.server, failed=lambda r: r.shard is None, limits=limits,
        stop=interrupt.stopping,
    )  # fmt: skip
    reads: list[_Read] = []
    for target, read in zip(targets, outcome.results, strict=True):
        if read is None:
            error = TargetError(ErrorKind.NOT_STARTED, f"not started: {outcome.stop_reason}")
            read = _Read(target, None, tuple(result_for(target, p.service, Status.SKIPPED, error) for p in plans))
            if on_result is not None:
                for result in read.results:
                    on_result(result)
        reads.append(read)
    inspection = schema.group([r.shard for r in reads if r.shard is not None], reference, built)
    return RunReport(
        run_id=run_id,
        command=command,
        mode=Mode.PLAN,
        environment=environment,
        services=tuple(p.service for p in plans),
        started_at=started_at,
        finished_at=datetime.now(UTC),
        results=tuple(result for r in reads for result in r.results),
        sources=tuple(
            SourceSummary(
                s.service,
                s.url,
                tuple(SourceFile(f.name, f.sha256, f.size, f.etag, f.version_id) for f in s.files),
                s.manifest,
                s.release,
            )
            for s in snapshot.sets
        ),
        s3_list_requests=snapshot.stats.list_requests,
        s3_get_requests=snapshot.stats.get_requests,
        target_count=len(targets),
        rollout=Rollout(
            concurrency=limits.concurrency,
            per_server=limits.per_server or limits.concurrency,
            waves="100%",
            max_failures="unlimited",
            waves_run=outcome.waves_run,
            waves_planned=1,
            stop_reason=outcome.stop_reason,
            peak_in_flight=outcome.peak_in_flight,
            peak_per_server=max(outcome.peak_per_server.values(), default=0),
            connections_opened=next(connections),
        ),
        interrupted=interrupt.stopping.is_set(),
        inspection=inspection,
    )


def _read(
    target: Target, plans: Sequence[_Set], options: runner.RunOptions, run_id: str, interrupt: Interrupt
) -> _Read:
    started = time.monotonic()
    deadline = started + options.target_timeout if options.target_timeout is not None else None
    try:
        found = catalog.read(
            target,
            options,
            interrupt,
            application_name=f"{postgres.APPLICATION_NAME} inspect {run_id}",
            deadline=deadline,
        )
    except catalog.CatalogError as e:
        error = TargetError(e.kind, e.message)
        first, *rest = plans
        blocked = TargetError(ErrorKind.NOT_STARTED, f"not attempted: service {first.service!r} did not complete")
        results = [result_for(target, first.service, Status.FAILED, error)]
        results += [result_for(target, p.service, Status.SKIPPED, blocked) for p in rest]
        seconds = time.monotonic() - started
        return _Read(target, None, tuple(replace(r, seconds=seconds) for r in results))
    seconds = time.monotonic() - started
    results = []
    for plan in plans:
        ids = plan.ids
        before = tuple(i for i in ids if i in found.applied)
        pending = tuple(i for i in ids if i not in found.applied)
        status = Status.PENDING if pending else Status.UP_TO_DATE
        results.append(
            result_for(
                target,
                plan.service,
                status,
                None,
                applied_before=before,
                pending=pending,
                initialized=found.initialized,
                seconds=seconds,
            )
        )
    shard = schema.ShardSchema(target.id, version(plans, found.applied), schema.describe(found.rows, found.home))
    return _Read(target, shard, tuple(results))


def version(plans: Sequence[_Set], applied: frozenset[str] | set[str]) -> schema.Version:
    """Each service's last applied migration in the set's order (ids no set knows are drift's business)."""
    parts = []
    for plan in plans:
        ids = plan.ids
        position = max((i for i, m in enumerate(ids) if m in applied), default=-1)
        parts.append(schema.VersionPart(plan.service, ids[position] if position >= 0 else None, position))
    return tuple(parts)


def _build(
    snapshot: Snapshot,
    like: Target,
    plans: Sequence[_Set],
    options: runner.RunOptions,
    run_id: str,
    environment: str,
    interrupt: Interrupt,
) -> schema.ShardSchema:
    """The schema the migration set builds: applied by the runner to a scratch namespace, read, dropped."""
    try:
        with catalog.scratch(like, options, interrupt) as target:
            applied = runner.run(
                snapshot,
                [target],
                replace(options, mode=Mode.APPLY, limits=rollout.Limits(concurrency=1)),
                run_id=run_id,
                environment=environment,
                command="inspect",
                interrupt=interrupt,
            )
            if interrupt.stopping.is_set():
                raise Interrupted(
                    "interrupted while building the reference (its scratch is dropped); no shard was read"
                )
            done = (Status.APPLIED, Status.UP_TO_DATE)
            failed = next((r for r in applied.results if r.status not in done), None)
            if failed is not None:
                why = failed.error.message if failed.error else failed.status.value
                where = f" ({failed.error.file})" if failed.error and failed.error.file else ""
                raise TargetFailed(f"--reference build: the migration set did not build{where}: {why}")
            found = catalog.read(
                target, options, interrupt, application_name=f"{postgres.APPLICATION_NAME} inspect {run_id}"
            )
    except catalog.CatalogError as e:
        if interrupt.aborting.is_set():
            raise Interrupted(f"interrupted while building the reference: {e.message}") from None
        raise TargetFailed(
            f"--reference build: {e.message} (it needs CREATEDB, or CREATE on the database for schema targets; "
            "or name a shard with --reference TARGET)"
        ) from None
    all_applied = {i for p in plans for i in p.ids}
    return schema.ShardSchema(schema.BUILD, version(plans, all_applied), schema.describe(found.rows, found.home))
