"""One public function per verb; the CLI is a thin layer over these.

Each function takes a loaded `Environment`, does its work, and returns data (a
`RunReport`, a tuple of targets); none prints. Errors are `FanoutError`s raised
before any shard is touched (configuration, source, directory); a failure on a
shard is a result inside the report, never an exception.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from fanout import runner, runs, source
from fanout.config import Environment, S3Location, interpolate, load_environment
from fanout.directory import Target, list_targets
from fanout.errors import ConfigError, DirectoryError
from fanout.interrupt import Interrupt
from fanout.report import Mode, RunReport, TargetResult
from fanout.rollout import FailureBudget, Limits, Waves

ResultCallback = Callable[[TargetResult], None]


def new_run_id() -> str:
    """Sortable and unique enough to name a run in logs, reports and application_name."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def shards(env: Environment) -> tuple[Target, ...]:
    """Every distinct target of the environment (deduplicated). Raises DirectoryError."""
    return list_targets(env.directory, env.name)


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Command-line overrides of the environment's [runner] table; None keeps the environment's value."""

    concurrency: int | None = None
    per_server: int | None = None
    lock_wait: float | None = None
    waves: str | None = None
    max_failures: str | None = None
    fail_fast: bool = False  # the same as max_failures "0"


def plan(
    env: Environment,
    services: Sequence[str] = (),
    *,
    settings: RunSettings = RunSettings(),
    on_result: ResultCallback | None = None,
    interrupt: Interrupt | None = None,
) -> RunReport:
    """What apply would run, per target. Read-only: no table, no lock, no write, on any shard."""
    options = _options(env, Mode.PLAN, settings)
    return _run_on(env, services, "plan", options, None, on_result=on_result, interrupt=interrupt)


def status(
    env: Environment,
    services: Sequence[str] = (),
    *,
    settings: RunSettings = RunSettings(),
    on_result: ResultCallback | None = None,
    interrupt: Interrupt | None = None,
) -> RunReport:
    """Applied and pending migrations and lock holders per target; read-only like plan."""
    options = _options(env, Mode.PLAN, settings)
    return _run_on(env, services, "status", options, None, on_result=on_result, interrupt=interrupt)


def apply(
    env: Environment,
    services: Sequence[str] = (),
    *,
    settings: RunSettings = RunSettings(),
    on_result: ResultCallback | None = None,
    interrupt: Interrupt | None = None,
    resume: str | None = None,
    runs_dir: Path | None = None,
) -> RunReport:
    """Apply outstanding migrations on every target, each under its lock, many targets at once.

    Every run is recorded (see `runs.save`). With `resume`, only the targets that failed
    or were skipped in that run are retried, with the same migration set.
    """
    options = _options(env, Mode.APPLY, settings)
    targets: tuple[Target, ...] | None = None
    expected: dict[str, dict[str, str]] | None = None
    if resume is not None:
        if services:
            raise ConfigError("--resume retries the services of the run it resumes; drop --service")
        previous = runs.load(env, resume, runs_dir)
        services = previous.services
        expected = previous.sources
        targets = _resumable_targets(env, previous)
    report = _run_on(
        env,
        services,
        "apply",
        options,
        targets,
        on_result=on_result,
        interrupt=interrupt,
        expected_sources=expected,
        resumed_from=resume,
    )
    runs.save(env, report, runs_dir)
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


def unlock(env: Environment, target_ids: Sequence[str] = (), *, force: bool = False) -> list[runner.UnlockResult]:
    """Remove shard locks by hand (all targets, or those named). Refuses while a holder may be alive, unless forced."""
    targets = list_targets(env.directory, env.name)
    if target_ids:
        known = {t.id: t for t in targets}
        unknown = [t for t in target_ids if t not in known]
        if unknown:
            raise ConfigError(f"no target {', '.join(map(repr, unknown))} in environment {env.name!r}")
        targets = tuple(known[t] for t in target_ids)
    return runner.unlock(
        targets, force=force, connect_timeout=env.runner.connect_timeout, concurrency=env.runner.concurrency
    )


def bootstrap(
    env: Environment,
    target: str,
    *,
    create_database: bool = False,
    services: Sequence[str] = (),
    lock_wait: float | None = None,
    interrupt: Interrupt | None = None,
) -> tuple[RunReport, RunReport]:
    """Bring one shard, listed in the directory or not yet, to the current schema of every service.

    `target` is a target id from the directory or a DSN (which may use ${VARIABLE}s; a
    password is better left to PGPASSWORD or ~/.pgpass than put on a command line).
    Idempotent: a second run applies nothing. Returns the apply report and the status after it.
    """
    if "://" in target:
        chosen = Target.from_dsn("bootstrap", interpolate(target, what="--target"))
        chosen = replace(chosen, id=chosen.display.removeprefix("postgresql://"))
    else:
        known = {t.id: t for t in list_targets(env.directory, env.name)}
        if target not in known:
            raise ConfigError(
                f"no target {target!r} in environment {env.name!r}; give a DSN to bootstrap an unlisted shard"
            )
        chosen = known[target]
    if create_database:
        runner.ensure_database(chosen, connect_timeout=env.runner.connect_timeout)
    options = _options(env, Mode.APPLY, RunSettings(lock_wait=lock_wait))
    applied = _run_on(env, services, "bootstrap", options, (chosen,), interrupt=interrupt)
    after = _run_on(env, services, "status", replace(options, mode=Mode.PLAN), (chosen,), interrupt=interrupt)
    return applied, after


def publish(env: Environment, migrations_dir: Path, services: Sequence[str] = ()) -> list[str]:
    """Upload migrations/<service>/<env>/ to the environment's bucket; returns the keys written."""
    if not isinstance(env.source, S3Location):
        raise ConfigError(f"environment {env.name!r} reads migrations from a folder; there is nothing to publish to")
    return source.publish_folder(env.source, migrations_dir, env.select_services(services), env.name)


def _options(env: Environment, mode: Mode, settings: RunSettings) -> runner.RunOptions:
    defaults = env.runner
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
            lock_timeout=defaults.lock_timeout, statement_timeout=defaults.statement_timeout
        ),
        retries=defaults.retries,
        retry_backoff=defaults.retry_backoff,
    )


def _run_on(
    env: Environment,
    services: Sequence[str],
    command: str,
    options: runner.RunOptions,
    targets: Sequence[Target] | None,
    *,
    on_result: ResultCallback | None = None,
    interrupt: Interrupt | None = None,
    expected_sources: dict[str, dict[str, str]] | None = None,
    resumed_from: str | None = None,
) -> RunReport:
    """Snapshot the sources and run; `targets` None means every target of the directory."""
    selected = env.select_services(services)
    chosen = list_targets(env.directory, env.name) if targets is None else tuple(targets)
    with tempfile.TemporaryDirectory(prefix="fanout-snapshot-") as workdir:
        snapshot = source.take_snapshot(env, selected, Path(workdir))
        if expected_sources is not None:
            runs.check_same_sources(expected_sources, snapshot, resumed_from or "")
        return runner.run(
            snapshot,
            chosen,
            options,
            run_id=new_run_id(),
            environment=env.name,
            command=command,
            on_result=on_result,
            interrupt=interrupt,
            resumed_from=resumed_from,
        )


# ---- the embedded demo --------------------------------------------------------------

DEMO_DATABASES = ("tenant_acme", "tenant_globex", "shared_1", "shared_2")


@dataclass(frozen=True, slots=True)
class DemoStep:
    title: str
    report: RunReport


@contextmanager
def demo_stack(environment: str = "demo") -> Iterator[dict[str, str]]:
    """Start an embedded PostgreSQL with the demo databases and a local S3; yield the variables demo.toml reads."""
    from fanout.embedded import EmbeddedPostgres, EmbeddedS3

    with EmbeddedPostgres() as postgres, EmbeddedS3() as s3:
        postgres.create_databases(DEMO_DATABASES)
        s3.client().create_bucket(Bucket="fanout-demo")
        variables = {
            "FANOUT_DEMO_PG_PORT": str(postgres.port),
            "FANOUT_DEMO_PG_PASSWORD": postgres.password.reveal(),
            "FANOUT_DEMO_S3_ENDPOINT": s3.endpoint_url,
            "AWS_ACCESS_KEY_ID": "fanout-demo",
            "AWS_SECRET_ACCESS_KEY": "fanout-demo",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        saved = {k: os.environ.get(k) for k in variables}
        os.environ.update(variables)
        try:
            yield variables
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def demo(
    migrations_dir: Path,
    environments_dir: Path,
    show: Callable[[DemoStep], None],
    *,
    announce: Callable[[str], None] = lambda _: None,
) -> list[DemoStep]:
    """Publish the example migrations to a throwaway stack, then plan, apply, re-plan and show status."""
    steps: list[DemoStep] = []

    def step(title: str, report: RunReport) -> None:
        steps.append(DemoStep(title, report))
        show(steps[-1])

    announce("starting an embedded PostgreSQL and a local S3 endpoint ...")
    with demo_stack():
        env = load_environment("demo", search_dir=environments_dir)
        keys = publish(env, migrations_dir)
        announce(
            f"published {len(keys)} files to s3://fanout-demo/{env.source.prefix if isinstance(env.source, S3Location) else ''}"
        )
        step("plan: what would run where", plan(env))
        step("apply", apply(env))
        step("apply again: nothing to do", apply(env))
        step("status", status(env))
    announce("stopped the embedded stack")
    return steps
