"""One public function per verb; the CLI is a thin layer over these.

Each function takes a loaded `Environment`, does its work, and returns data (a
`RunReport`, a tuple of targets); none prints. Errors are `FanoutError`s raised
before any shard is touched (configuration, source, directory); a failure on a
shard is a result inside the report, never an exception.
"""

from __future__ import annotations

import getpass
import json
import logging
import secrets
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from fanout import inspection, lint, runner, runs, schema, source
from fanout.config import Environment, S3Location, UnpublishedPolicy, interpolate
from fanout.directory import Target, list_targets
from fanout.errors import ConfigError, DirectoryError, Interrupted, SourceError, TargetFailed
from fanout.interrupt import Interrupt
from fanout.report import Finding, Mode, RollbackRequest, RunReport, TargetResult, from_dict as report_from_dict, merge
from fanout.rollout import WHOLE_FLEET, FailureBudget, Limits, Slice, Waves

ResultCallback = Callable[[TargetResult], None]
StartCallback = Callable[[int, list[int]], None]  # (targets, wave sizes)
log = logging.getLogger(__name__)
T = TypeVar("T")


def new_run_id() -> str:
    """Sortable and unique enough to name a run in logs, reports and application_name."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def shards(env: Environment, *, interrupt: Interrupt | None = None) -> tuple[Target, ...]:
    """Every distinct target of the environment (deduplicated). Raises DirectoryError, or Interrupted once stopped."""
    interrupt = interrupt or Interrupt()
    return interrupt.until_stopped(lambda: list_targets(env.directory, env.name), "listing the shard directory")


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Command-line overrides of the environment's [runner] table; None keeps the environment's value."""

    concurrency: int | None = None
    per_server: int | None = None
    lock_wait: float | None = None
    waves: str | None = None
    max_failures: str | None = None
    fail_fast: bool = False  # the same as max_failures "0"
    slice: str | None = None  # "K/N": only the targets of that slice (see rollout.Slice)
    target_timeout: float | None = None  # seconds one target may take (see RunOptions.target_timeout)
    repair_invalid: bool | None = None  # apply: drop the INVALID indexes of a migration in doubt and run it again


def plan(
    env: Environment,
    services: Sequence[str] = (),
    *,
    settings: RunSettings = RunSettings(),
    on_result: ResultCallback | None = None,
    on_start: StartCallback | None = None,
    interrupt: Interrupt | None = None,
) -> RunReport:
    """What apply would run, per target. Read-only: no table, no lock, no write, on any shard."""
    return _read_only(env, services, "plan", settings, on_result, on_start, interrupt)


def status(
    env: Environment,
    services: Sequence[str] = (),
    *,
    settings: RunSettings = RunSettings(),
    on_result: ResultCallback | None = None,
    on_start: StartCallback | None = None,
    interrupt: Interrupt | None = None,
) -> RunReport:
    """Applied and pending migrations and lock holders per target; read-only like plan."""
    return _read_only(env, services, "status", settings, on_result, on_start, interrupt)


def verify(
    env: Environment,
    services: Sequence[str] = (),
    *,
    settings: RunSettings = RunSettings(),
    on_result: ResultCallback | None = None,
    on_start: StartCallback | None = None,
    interrupt: Interrupt | None = None,
    schema: bool = False,
    at: Sequence[str] = (),
) -> RunReport:
    """Check every shard's applied set and checksums against the published set. Read-only.

    Its exit code gates a pipeline: 0 only when every shard has every migration applied,
    each with the checksum of the set's content, and nothing drifted; with `schema`, also
    when every shard's live schema is its version's reference (see `inspect`). With `at`
    (after a rollback), the service of each id given is meant to stand exactly at that
    migration: what comes after it must not be applied, and is no longer expected.
    """
    if at:
        options = replace(_options(env, Mode.PLAN, settings), at=tuple(at))
        report = _run_on(
            env, services, "verify", options, None, part=_slice(settings), on_result=on_result, on_start=on_start,
            interrupt=interrupt,
        )  # fmt: skip
    else:
        report = _read_only(env, services, "verify", settings, on_result, on_start, interrupt)
    if schema and not report.interrupted:
        inspected = inspect(env, services, settings=settings, interrupt=interrupt)
        report = replace(report, inspection=inspected.inspection, interrupted=inspected.interrupted)
    return report


def inspect(
    env: Environment,
    services: Sequence[str] = (),
    *,
    reference: str = "largest",
    settings: RunSettings = RunSettings(),
    on_result: ResultCallback | None = None,
    on_start: StartCallback | None = None,
    interrupt: Interrupt | None = None,
) -> RunReport:
    """Every shard's live schema, grouped by (applied version, fingerprint) and compared with a reference.

    Read-only like plan. `reference`: "largest" (each version's largest group), a target id,
    or "build": the schema the migration set builds, applied to a scratch database (or, for
    schema-per-tenant targets, a scratch schema) that is dropped afterwards; the only case
    that writes, and it needs CREATEDB (or CREATE on the database).
    """
    options = _options(env, Mode.PLAN, settings)
    part = _slice(settings)
    targets = tuple(t for t in list_targets(env.directory, env.name) if part.contains(t.id))
    if reference not in (schema.LARGEST, schema.BUILD) and reference not in {t.id for t in targets}:
        raise ConfigError(f"--reference {reference!r}: no such target in environment {env.name!r} (or its slice)")
    with tempfile.TemporaryDirectory(prefix="fanout-snapshot-") as workdir:
        snapshot = source.take_snapshot(env, env.select_services(services), Path(workdir))
        findings = lint_snapshot(snapshot, env)
        report = inspection.inspect(
            snapshot, targets, options, run_id=new_run_id(), environment=env.name, reference=reference,
            on_result=on_result, on_start=on_start, interrupt=interrupt,
        )  # fmt: skip
    report = replace(report, warnings=tuple(findings))
    return replace(report, slice=str(part)) if part.count > 1 else report


def _read_only(
    env: Environment,
    services: Sequence[str],
    command: str,
    settings: RunSettings,
    on_result: ResultCallback | None,
    on_start: StartCallback | None,
    interrupt: Interrupt | None,
) -> RunReport:
    options = _options(env, Mode.PLAN, settings)
    return _run_on(
        env, services, command, options, None, part=_slice(settings), on_result=on_result, on_start=on_start,
        interrupt=interrupt,
    )  # fmt: skip


def accept(
    env: Environment,
    migration_ids: Sequence[str],
    target_ids: Sequence[str] = (),
    *,
    reason: str | None = None,
    settings: RunSettings = RunSettings(),
    interrupt: Interrupt | None = None,
) -> list[runner.Adoption]:
    """Adopt the published content of drifted migrations on the shards (all, or those named), with a logged reason."""
    if not migration_ids:
        raise ConfigError("accept: name at least one --migration")
    return _adopt(env, target_ids, settings, migration_ids=migration_ids, reason=reason, interrupt=interrupt)


def baseline(
    env: Environment,
    target_ids: Sequence[str] = (),
    *,
    settings: RunSettings = RunSettings(),
    interrupt: Interrupt | None = None,
) -> list[runner.Adoption]:
    """Record checksums for what a fleet migrated before fanout has applied; runs no migration."""
    return _adopt(env, target_ids, settings, migration_ids=None, reason="baseline", interrupt=interrupt)


def _adopt(
    env: Environment,
    target_ids: Sequence[str],
    settings: RunSettings,
    *,
    migration_ids: Sequence[str] | None,
    reason: str | None,
    interrupt: Interrupt | None,
) -> list[runner.Adoption]:
    interrupt = interrupt or Interrupt()
    return _on_named_shards(
        env, target_ids, settings, interrupt,
        lambda snapshot, targets, options: runner.adopt(
            snapshot, targets, options, environment=env.name, run_id=new_run_id(),
            migration_ids=migration_ids, reason=reason, interrupt=interrupt,
        ),
    )  # fmt: skip


def mark(
    env: Environment,
    migration_ids: Sequence[str],
    target_ids: Sequence[str] = (),
    *,
    reason: str,
    force: bool = False,
    settings: RunSettings = RunSettings(),
    interrupt: Interrupt | None = None,
) -> list[runner.Settlement]:
    """Record migrations as applied without running them (a migration in doubt that is done), with a logged reason.

    Refuses, per shard, while an index the migration builds is INVALID, unless `force`.
    """
    return _settle(
        env, migration_ids, target_ids, record=True, reason=reason, force=force, settings=settings, interrupt=interrupt
    )


def unmark(
    env: Environment,
    migration_ids: Sequence[str],
    target_ids: Sequence[str] = (),
    *,
    reason: str,
    settings: RunSettings = RunSettings(),
    interrupt: Interrupt | None = None,
) -> list[runner.Settlement]:
    """Forget that migrations started or were applied, so that the next apply runs them; with a logged reason."""
    return _settle(
        env, migration_ids, target_ids, record=False, reason=reason, force=False, settings=settings, interrupt=interrupt
    )


def resolve(
    env: Environment,
    migration_id: str,
    target_ids: Sequence[str] = (),
    *,
    took_effect: bool,
    reason: str,
    settings: RunSettings = RunSettings(),
    interrupt: Interrupt | None = None,
) -> list[runner.Settlement]:
    """Settle a MySQL/MariaDB statement in doubt: it took effect (continue after it) or not (run it); logged."""
    if not reason.strip():
        raise ConfigError("resolve: --reason must say why; it is logged on each shard")
    interrupt = interrupt or Interrupt()
    return _on_named_shards(
        env, target_ids, settings, interrupt,
        lambda snapshot, targets, options: runner.resolve(
            snapshot, targets, options, run_id=new_run_id(), migration_id=migration_id, took_effect=took_effect,
            reason=reason, interrupt=interrupt,
        ),
    )  # fmt: skip


def _settle(
    env: Environment,
    migration_ids: Sequence[str],
    target_ids: Sequence[str],
    *,
    record: bool,
    reason: str,
    force: bool,
    settings: RunSettings,
    interrupt: Interrupt | None = None,
) -> list[runner.Settlement]:
    verb = "mark" if record else "unmark"
    if not migration_ids:
        raise ConfigError(f"{verb}: name at least one --migration")
    if not reason.strip():
        raise ConfigError(f"{verb}: --reason must say why; it is logged on each shard")
    interrupt = interrupt or Interrupt()
    return _on_named_shards(
        env, target_ids, settings, interrupt,
        lambda snapshot, targets, options: runner.settle(
            snapshot, targets, options, run_id=new_run_id(), environment=env.name, migration_ids=migration_ids,
            record=record, reason=reason, force=force, interrupt=interrupt,
        ),
    )  # fmt: skip


def _on_named_shards(
    env: Environment,
    target_ids: Sequence[str],
    settings: RunSettings,
    interrupt: Interrupt,
    act: Callable[[source.Snapshot, tuple[Target, ...], runner.RunOptions], T],
) -> T:
    """List the named targets (all, when none is named) and read every service's migrations, then `act`.

    accept, baseline, mark, unmark and resolve work by hand on shards: a signal before the
    shards are reached ends the command at once, with nothing touched.
    """
    targets = interrupt.until_stopped(lambda: _named_targets(env, target_ids), "listing the shard directory")
    options = _options(env, Mode.APPLY, settings)
    with tempfile.TemporaryDirectory(prefix="fanout-snapshot-") as workdir:
        snapshot = interrupt.until_stopped(
            lambda: source.take_snapshot(env, env.select_services(()), Path(workdir)), "reading the migrations"
        )
        return act(snapshot, targets, options)


def _named_targets(env: Environment, target_ids: Sequence[str]) -> tuple[Target, ...]:
    targets = list_targets(env.directory, env.name)
    if not target_ids:
        return targets
    known = {t.id: t for t in targets}
    unknown = [t for t in target_ids if t not in known]
    if unknown:
        raise ConfigError(f"no target {', '.join(map(_shown_target, unknown))} in environment {env.name!r}")
    return tuple(known[t] for t in target_ids)


def _shown_target(value: str) -> str:
    """A --target value that names no target, as an error may show it.

    A key=value connection string (`host=... password=...`) given by mistake is not shown: it
    may hold a password, and redact() only knows passwords it was told about and those in URLs.
    """
    if "=" in value or any(c.isspace() for c in value):
        return "(a key=value connection string, not shown: it may hold a password)"
    return repr(value)


def apply(
    env: Environment,
    services: Sequence[str] = (),
    *,
    settings: RunSettings = RunSettings(),
    on_result: ResultCallback | None = None,
    on_start: StartCallback | None = None,
    interrupt: Interrupt | None = None,
    resume: str | None = None,
    runs_dir: Path | None = None,
    to: str | None = None,
) -> RunReport:
    """Apply outstanding migrations on every target, each under its lock, many targets at once.

    Every run is recorded (see `runs.save`); when no copy of the record could be written,
    the report's `not_stored` says so (exit 6). With `resume`, only the targets that failed
    or were skipped in that run are retried, with the same migration set. With `to`, only
    that migration and what it depends on are applied (yoyo's `apply -r`).
    """
    options = replace(_options(env, Mode.APPLY, settings), up_to=to)
    part = _slice(settings)
    targets: tuple[Target, ...] | None = None
    expected: dict[str, dict[str, str]] | None = None
    if resume is not None:
        if services:
            raise ConfigError("--resume retries the services of the run it resumes; drop --service")
        previous = runs.load(env, resume, runs_dir)
        services = previous.services
        expected = previous.sources
        interrupt = interrupt or Interrupt()
        targets = interrupt.until_stopped(lambda: _resumable_targets(env, previous), "listing the shard directory")
    report = _run_on(
        env,
        services,
        "apply",
        options,
        targets,
        part=part,
        on_result=on_result,
        on_start=on_start,
        interrupt=interrupt,
        expected_sources=expected,
        resumed_from=resume,
    )
    if not runs.save(env, report, runs_dir):
        # Neither copy was written: the work is done, but resume cannot find this run.
        report = replace(report, not_stored=("run record",))
    return report


def rollback(
    env: Environment,
    request: RollbackRequest | None,
    services: Sequence[str] = (),
    *,
    settings: RunSettings = RunSettings(),
    dry_run: bool = False,
    on_result: ResultCallback | None = None,
    on_start: StartCallback | None = None,
    interrupt: Interrupt | None = None,
    resume: str | None = None,
    runs_dir: Path | None = None,
) -> RunReport:
    """Roll back migrations on every target with their rollback files, each under its lock.

    What to roll back is `request` (see RollbackRequest); services are rolled back in
    reverse order. Refuses before touching any shard when a migration to roll back has no
    rollback file (SourceError). `dry_run` is read-only and reports, per shard, what would
    be rolled back. Every real run is recorded; with `resume`, only the targets that
    failed or were skipped in that rollback are retried, with the same request (None: take
    the resumed run's) and files.
    """
    if request is None and resume is None:
        raise ConfigError("rollback: give one of --to ID, --migration ID or --release R")
    command = "reapply" if request is not None and request.reapply else "rollback"
    mode = Mode.PLAN if dry_run else Mode.ROLLBACK
    targets: tuple[Target, ...] | None = None
    expected: dict[str, dict[str, str]] | None = None
    if resume is not None:
        if services:
            raise ConfigError("--resume retries the services of the run it resumes; drop --service")
        previous = runs.load(env, resume, runs_dir, command=command)
        assert previous.report is not None
        if previous.report.rollback is None:
            raise ConfigError(f"--resume {resume}: that run's record does not say what it rolled back")
        if request is None:
            request = previous.report.rollback
        elif previous.report.rollback != request:
            raise ConfigError(
                f"--resume {resume}: that run was `{previous.report.rollback.describe()}`; "
                f"this one is `{request.describe()}`"
            )
        services = previous.services
        expected = previous.sources
        targets = _resumable_targets(env, previous)
    assert request is not None
    options = replace(_options(env, mode, settings), rollback=request)
    if request.release is not None and isinstance(env.source, S3Location):
        kept = {
            s: source.release_added(env.source, s, env.name, request.release) for s in env.select_services(services)
        }
        options = replace(options, release_added={s: added for s, added in kept.items() if added is not None})
    report = _run_on(
        env, services, command, options, targets, part=_slice(settings), on_result=on_result, on_start=on_start,
        interrupt=interrupt, expected_sources=expected, resumed_from=resume,
    )  # fmt: skip
    if not dry_run and not runs.save(env, report, runs_dir):
        report = replace(report, not_stored=("run record",))  # as apply: done, but --resume cannot find it
    return report


def _resumable_targets(env: Environment, previous: runs.RunRecord) -> tuple[Target, ...]:
    known = {t.id: t for t in list_targets(env.directory, env.name)}
    missing = [t for t in previous.unfinished if t not in known]
    if missing:
        raise DirectoryError(
            f"run {previous.run_id}: {len(missing)} target(s) to resume are no longer in the directory: "
            + ", ".join(missing[:10])
        )
    return tuple(known[t] for t in previous.unfinished)


def unlock(
    env: Environment,
    target_ids: Sequence[str] = (),
    *,
    force: bool = False,
    terminate: bool = False,
    reason: str | None = None,
    interrupt: Interrupt | None = None,
) -> list[runner.UnlockResult]:
    """Remove shard locks by hand (all targets, or those named). Refuses while a holder may be alive, unless forced.

    `terminate` ends the session of a live fanout holder (its recorded server process) first; it needs a `reason`,
    logged on the shard. Once `interrupt` stops, the targets not reached are left as they were (no result).
    """
    if terminate and not (reason and reason.strip()):
        raise ConfigError("unlock --terminate needs --reason: it is logged on each shard")
    interrupt = interrupt or Interrupt()
    targets = interrupt.until_stopped(lambda: _named_targets(env, target_ids), "listing the shard directory")
    return runner.unlock(
        targets, force=force, connect_timeout=env.runner.connect_timeout, concurrency=env.runner.concurrency,
        terminate=reason if terminate else None, tcp=env.runner.tcp, lock_timeout=env.runner.lock_timeout,
        interrupt=interrupt,
    )  # fmt: skip


def bootstrap(
    env: Environment,
    target: str,
    *,
    create_database: bool = False,
    services: Sequence[str] = (),
    lock_wait: float | None = None,
    interrupt: Interrupt | None = None,
    to: str | None = None,
) -> tuple[RunReport, RunReport]:
    """Bring one shard, listed in the directory or not yet, to the current schema of every service.

    `target` is a target id from the directory or a DSN (which may use ${VARIABLE}s; a
    password is better left to PGPASSWORD or ~/.pgpass than put on a command line).
    Idempotent: a second run applies nothing. Returns the apply report and the status after it.
    With `to`, only that migration and what it depends on (see `apply`); the status shows the rest.
    """
    interrupt = interrupt or Interrupt()
    if "://" in target:
        chosen = Target.from_dsn("bootstrap", interpolate(target, what="--target"))
        chosen = replace(chosen, id=chosen.display.partition("://")[2])
    else:
        listed = interrupt.until_stopped(lambda: list_targets(env.directory, env.name), "listing the shard directory")
        known = {t.id: t for t in listed}
        if target not in known:
            raise ConfigError(
                f"no target {_shown_target(target)} in environment {env.name!r}; "
                "give a postgresql:// or mysql:// DSN to bootstrap an unlisted shard"
            )
        chosen = known[target]
    if to is not None and create_database:
        # An unknown --to must leave no database behind: check it before creating one.
        with tempfile.TemporaryDirectory(prefix="fanout-snapshot-") as workdir:
            snapshot = interrupt.until_stopped(
                lambda: source.take_snapshot(env, env.select_services(services), Path(workdir)),
                "reading the migrations",
            )
            runner.up_to(snapshot, to, python=env.rules.python_migrations)
    if create_database:
        if interrupt.stopping.is_set():
            raise Interrupted("interrupted before creating the database; nothing was touched")
        try:
            runner.ensure_database(
                chosen, connect_timeout=env.runner.connect_timeout, tcp=env.runner.tcp, interrupt=interrupt
            )
        except TargetFailed as e:
            if interrupt.aborting.is_set():
                raise Interrupted(
                    f"interrupted while creating the database ({e}); bootstrap again: it is idempotent"
                ) from None
            raise
    options = _options(env, Mode.APPLY, RunSettings(lock_wait=lock_wait))
    applied = _run_on(env, services, "bootstrap", replace(options, up_to=to), (chosen,), interrupt=interrupt)
    after = _run_on(env, services, "status", replace(options, mode=Mode.PLAN), (chosen,), interrupt=interrupt)
    return applied, after


@dataclass(frozen=True, slots=True)
class Published:
    plan: source.PublishPlan
    manifest: str | None  # None: a dry run


def publish(
    env: Environment,
    migrations_dir: Path,
    services: Sequence[str] = (),
    *,
    dry_run: bool = False,
    force_reason: str | None = None,
    interrupt: Interrupt | None = None,
) -> list[Published]:
    """Upload migrations/<service>/<env>/ to the environment's bucket, then a manifest of the release.

    Published files are immutable: a file whose content differs from the published one, or
    that is gone from the folder, is refused (SourceError) unless `force_reason` is given,
    which the manifest records. Lint errors refuse the whole publish. Every service is
    checked before anything is written. `dry_run` checks and reports, and writes nothing.
    """
    if not isinstance(env.source, S3Location):
        raise ConfigError(f"environment {env.name!r} reads migrations from a folder; there is nothing to publish to")
    location = env.source
    interrupt = interrupt or Interrupt()
    plans = interrupt.until_stopped(
        lambda: [
            source.plan_publish(
                location, migrations_dir, s, env.name, python=env.rules.python_migrations, raised=env.rules.lint_errors
            )
            for s in env.select_services(services)
        ],
        "reading the published migrations",
    )
    for plan in plans:
        _refuse_lint_errors(plan.service, plan.problems)
        if plan.refused and not force_reason:
            details = [f"{n} (content differs)" for n in plan.changed] + [
                f"{n} (not in {migrations_dir})" for n in plan.removed
            ]
            raise SourceError(
                f"service {plan.service!r}: refusing to change published migrations: {', '.join(details)}. "
                "Published migrations are immutable: ship the change as a new migration, or pass "
                "--force --reason '...' (recorded in the manifest)"
            )
    if dry_run:
        return [Published(plan, None) for plan in plans]
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    return [
        Published(
            plan, source.execute_publish(location, plan, force_reason=force_reason, who=who, stop=interrupt.stopping)
        )
        for plan in plans
    ]


def _refuse_lint_errors(service: str, problems: Sequence[lint.Problem]) -> None:
    for problem in problems:
        if problem.severity is lint.Severity.WARNING:
            log.warning("service %r: %s", service, problem)
    found = lint.errors(problems)
    if found:
        raise SourceError(f"service {service!r}: {len(found)} lint error(s): {'; '.join(str(p) for p in found)}")


def lint_snapshot(snapshot: source.Snapshot, env: Environment) -> list[Finding]:
    """Lint what a run is about to apply: every finding, errors and warnings, per service."""
    findings = []
    for migration_set in snapshot.sets:
        files = {migration_set.display(f): migration_set.local(f).read_bytes() for f in migration_set.files}
        files.update({name: b"" for name in migration_set.ignored if not name.endswith("/")})
        folders = [name for name in migration_set.ignored if name.endswith("/")]
        problems = lint.lint(files, folders=folders, python=env.rules.python_migrations, errors=env.rules.lint_errors)
        findings += [
            Finding(migration_set.service, p.file, p.rule.value, p.severity.value, p.message) for p in problems
        ]
    return findings


def _refuse_before_any_shard(findings: Sequence[Finding], snapshot: source.Snapshot, *, unpublished: bool) -> None:
    """Lint errors stop a run that writes; so do unpublished migrations under the "refuse" policy (apply)."""
    for finding in findings:
        if finding.severity == "warning":
            log.warning("%s", finding.describe())
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        raise SourceError(
            f"{len(errors)} lint error(s), nothing was applied: "
            + "; ".join(f"{f.service}: {f.file}: {f.message} [{f.rule}]" for f in errors)
        )
    for migration_set in snapshot.sets:
        if not unpublished:
            break
        if migration_set.unpublished and migration_set.unpublished_policy == UnpublishedPolicy.REFUSE:
            raise SourceError(
                f"service {migration_set.service!r}: {', '.join(migration_set.unpublished)} in the bucket but not in "
                f"release {migration_set.release} (uploaded outside fanout publish); nothing was applied. "
                'Publish them with fanout publish, delete them, or choose [source] unpublished = "report" or "apply"'
            )


def _slice(settings: RunSettings) -> Slice:
    return Slice.parse(settings.slice) if settings.slice else WHOLE_FLEET


def _options(env: Environment, mode: Mode, settings: RunSettings) -> runner.RunOptions:
    defaults = env.runner
    if settings.fail_fast and settings.max_failures is not None:
        raise ConfigError("--fail-fast is --max-failures 0: give one or the other, not both")
    waves_text = settings.waves or defaults.waves
    budget_text = "0" if settings.fail_fast else settings.max_failures or defaults.max_failures
    waves = Waves.parse(waves_text) if waves_text else Waves()
    # A canary is only a canary if a failure stops the rollout: with waves, the default budget is 0.
    budget = FailureBudget.parse(budget_text) if budget_text else FailureBudget(count=0 if waves_text else None)
    return runner.RunOptions(
        mode=mode,
        limits=Limits(
            concurrency=settings.concurrency or defaults.concurrency,
            per_server=settings.per_server or defaults.per_server,
            waves=waves,
            budget=budget,
        ),
        lock_wait=settings.lock_wait if settings.lock_wait is not None else defaults.lock_wait,
        connect_timeout=defaults.connect_timeout,
        session=runner.SessionSettings(
            lock_timeout=defaults.lock_timeout, statement_timeout=defaults.statement_timeout, settings=env.session
        ),
        retries=defaults.retries,
        retry_backoff=defaults.retry_backoff,
        target_timeout=settings.target_timeout if settings.target_timeout is not None else defaults.target_timeout,
        liveness_check=defaults.liveness_check or None,
        tcp=defaults.tcp,
        python_migrations=env.rules.python_migrations,
        repair_invalid=defaults.repair_invalid if settings.repair_invalid is None else settings.repair_invalid,
    )


def _run_on(
    env: Environment,
    services: Sequence[str],
    command: str,
    options: runner.RunOptions,
    targets: Sequence[Target] | None,
    *,
    part: Slice = WHOLE_FLEET,
    on_result: ResultCallback | None = None,
    on_start: StartCallback | None = None,
    interrupt: Interrupt | None = None,
    expected_sources: dict[str, dict[str, str]] | None = None,
    resumed_from: str | None = None,
) -> RunReport:
    """Snapshot the sources and run; `targets` None means every target of the directory."""
    selected = env.select_services(services)
    options = replace(options, all_services=set(selected) == set(env.services))
    interrupt = interrupt or Interrupt()
    # A signal during these phases ends the run at once: no shard has been touched yet.
    chosen = (
        interrupt.until_stopped(lambda: list_targets(env.directory, env.name), "listing the shard directory")
        if targets is None
        else tuple(targets)
    )
    chosen = tuple(t for t in chosen if part.contains(t.id))
    with tempfile.TemporaryDirectory(prefix="fanout-snapshot-") as workdir:
        snapshot = interrupt.until_stopped(
            lambda: source.take_snapshot(env, selected, Path(workdir)), "reading the migrations"
        )
        findings = lint_snapshot(snapshot, env)
        if options.mode is not Mode.PLAN:  # apply, bootstrap, rollback
            _refuse_before_any_shard(findings, snapshot, unpublished=options.mode is Mode.APPLY)
        if expected_sources is not None:
            runs.check_same_sources(expected_sources, snapshot, resumed_from or "")
        report = runner.run(
            snapshot,
            chosen,
            options,
            run_id=new_run_id(),
            environment=env.name,
            command=command,
            on_result=on_result,
            on_start=on_start,
            interrupt=interrupt,
            resumed_from=resumed_from,
        )
    # The runner names files yoyo could not load; lint has usually named them already.
    flagged = {(f.service, f.file) for f in findings if f.severity == "error"}
    extra = tuple(w for w in report.warnings if (w.service, w.file) not in flagged)
    report = replace(report, warnings=(*findings, *extra))
    return replace(report, slice=str(part)) if part.count > 1 else report


# ---- stored reports ------------------------------------------------------------------


def check_destination(destination: str, *, s3: bool) -> None:
    """Raise ConfigError for a report destination that cannot be written whatever the run does.

    `s3`: given as --report-to, so it must be s3://bucket/key. A local file must not be a
    folder, and its nearest existing parent must be one (a full disk is only found later).
    """
    if s3 or destination.startswith("s3://"):
        bucket, _, key = destination.removeprefix("s3://").partition("/")
        if not destination.startswith("s3://") or not bucket or not key or key.endswith("/"):
            raise ConfigError(f"{destination!r} is not an s3://bucket/key URL")
        return
    path = Path(destination)
    if path.is_dir():
        raise ConfigError(f"{destination} is a folder, not a file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {destination}: {parent} is not a folder")


def store_report(text: str, destination: str, env: Environment | None) -> str:
    """Write a rendered report to a local file or an s3:// URL (reached like the environment's bucket)."""
    if destination.startswith("s3://"):
        like = _s3_settings(env)
        content_type = "application/json" if destination.endswith(".json") else "text/plain; charset=utf-8"
        source.put_object(destination, text.encode(), like=like, content_type=content_type)
        return destination
    path = Path(destination)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise ConfigError(f"cannot write the report to {destination}: {e.strerror or e}") from None
    return str(path)


def _s3_settings(env: Environment | None) -> S3Location | None:
    """The environment's S3 settings (endpoint, region, profile), to reach any bucket the same way."""
    return env.source if env is not None and isinstance(env.source, S3Location) else None


def merge_reports(locations: Sequence[str], env: Environment | None = None) -> RunReport:
    """One fleet report from the JSON reports (or run records) of the slices of one release.

    Each location is a file, a folder (its *.json), an s3://bucket/key or an s3://bucket/prefix/.
    Raises ConfigError when a report cannot be read or the reports do not belong together.
    """
    bodies: list[tuple[str, bytes]] = []
    for location in locations:
        if location.startswith("s3://"):
            # Read the environment's source only here: merging local files needs none of its variables.
            bodies += source.get_objects(location, like=_s3_settings(env), suffix=".json")
            continue
        path = Path(location)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        if not files:
            raise ConfigError(f"no *.json report in {location}")
        for file in files:
            try:
                bodies.append((str(file), file.read_bytes()))
            except OSError as e:
                raise ConfigError(f"cannot read {file}: {e.strerror or e}") from None
    reports = []
    for where, body in bodies:
        try:
            reports.append(report_from_dict(json.loads(body)))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where} is not a fanout report ({type(e).__name__}: {e})") from None
    try:
        return merge(reports)
    except ValueError as e:
        raise ConfigError(f"cannot merge: {e}") from None
