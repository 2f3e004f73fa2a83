"""`fanout demo`: what fanout is for, told on a throwaway fleet in about fifteen seconds.

The demo's environment file and migrations ship inside the package (next to this
module), so the demo runs from any folder once fanout is installed. It starts the
embedded stack (a PostgreSQL with four shard databases, a local S3), and then plays a
release: one shard fails and another is locked by a second runner while the rest go
on, the run is resumed, an edit of a published migration is refused and then shows up
as drift that apply refuses, the edit is accepted, and verify closes the release. The
reports of the interesting runs are written as HTML, JSON and markdown.

Everything the demo does to the fleet it does through the library's verbs, except the
trouble it stages (a stray table, another runner's lock), which it makes by hand on the
embedded server as a colleague would. Nothing here prints: steps go to a callback.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

from fanout import commands
from fanout.config import Environment, load_environment
from fanout.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SOURCE,
    EXIT_TARGETS_FAILED,
    ConfigError,
    SourceError,
)
from fanout.formats import render
from fanout.interrupt import Interrupt
from fanout.report import RunReport, exit_code

if TYPE_CHECKING:
    from fanout.embedded import EmbeddedPostgres, EmbeddedS3

ENVIRONMENT = "demo"
BUCKET = "fanout-demo"
DATABASES = ("tenant_acme", "tenant_globex", "shared_1", "shared_2")
# The story's lock wait: long enough to show the wait, short enough to keep the demo quick.
LOCK_WAIT = 2.0
REPORT_FORMATS = ("html", "json", "markdown")
_SUFFIXES = {"html": ".html", "json": ".json", "markdown": ".md"}
# The variables the environment file reads, with stand-ins to check the file before the stack starts.
_STAND_INS = {
    "FANOUT_DEMO_PG_PORT": "5432",
    "FANOUT_DEMO_PG_PASSWORD": "stand-in",
    "FANOUT_DEMO_S3_ENDPOINT": "http://127.0.0.1:9000",
}


@dataclass(frozen=True, slots=True)
class DemoStep:
    """One chapter of the story: what was set up, what fanout said, and whether it said what was expected."""

    title: str
    notes: tuple[str, ...] = ()
    report: RunReport | None = None
    lines: tuple[str, ...] = ()  # output of a step that has no report (shards, a refusal, accept)
    exit_code: int = EXIT_OK
    expected: int = EXIT_OK
    written: tuple[Path, ...] = ()  # report files the step wrote

    @property
    def as_expected(self) -> bool:
        return self.exit_code == self.expected


@dataclass(frozen=True, slots=True)
class KeptStack:
    """What a user needs to drive the kept stack by hand (`fanout demo --keep`)."""

    workdir: Path
    env_script: Path  # `. env.sh` exports the variables the environment file reads
    environments_dir: Path
    environment_file: Path
    migrations_dir: Path
    postgres: str  # host:port
    s3_endpoint: str
    psql: Path | None


@dataclass(frozen=True, slots=True)
class DemoResult:
    steps: tuple[DemoStep, ...]
    reports_dir: Path
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """0 when every step ended as the story expects (its failures are staged); 130 when interrupted."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        wrong = next((s for s in self.steps if not s.as_expected), None)
        if wrong is None:
            return EXIT_OK
        return wrong.exit_code or EXIT_INTERNAL


@dataclass(frozen=True, slots=True)
class DemoStack:
    postgres: EmbeddedPostgres
    s3: EmbeddedS3
    variables: dict[str, str] = field(repr=False)


def packaged_files() -> Traversable:
    """The demo's environments/ and migrations/ folders, as shipped in the package."""
    return resources.files(__name__)


def _copy_tree(source: Traversable, destination: Path) -> None:
    # Traversable rather than a path: the package may be installed where files are not plain files.
    destination.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            if entry.name != "__pycache__":
                _copy_tree(entry, destination / entry.name)
        elif entry.name.endswith((".toml", ".sql")):
            (destination / entry.name).write_bytes(entry.read_bytes())


def prepare(workdir: Path, reports_dir: Path) -> Path:
    """Copy the packaged environment and migrations into `workdir`, check them, and make `reports_dir`.

    Runs before the slow start of PostgreSQL and S3, so a broken installation or an
    unwritable reports folder is one ConfigError line, not a traceback after the wait.
    Returns the environment file.
    """
    files = packaged_files()
    _copy_tree(files / "environments", workdir / "environments")
    _copy_tree(files / "migrations", workdir / "migrations")
    path = workdir / "environments" / f"{ENVIRONMENT}.toml"
    env = load_environment(str(path), variables=_STAND_INS)
    env.source  # noqa: B018 - both tables are read here, so their errors surface before the start
    env.directory  # noqa: B018
    try:
        reports_dir.mkdir(parents=True, exist_ok=True)
        probe = reports_dir / ".fanout-demo-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the demo's reports to {reports_dir}: {e.strerror or e}") from None
    return path


@contextmanager
def stack() -> Iterator[DemoStack]:
    """Start an embedded PostgreSQL with the demo databases and a local S3; export what demo.toml reads.

    The variables are set in os.environ for the duration (boto3 and the environment file
    read them there) and restored afterwards.
    """
    from fanout.embedded import EmbeddedPostgres, EmbeddedS3

    with EmbeddedPostgres() as postgres, EmbeddedS3() as s3:
        postgres.create_databases(DATABASES)
        s3.client().create_bucket(Bucket=BUCKET)
        variables = {
            "FANOUT_DEMO_PG_PORT": str(postgres.port),
            "FANOUT_DEMO_PG_PASSWORD": postgres.password.reveal(),
            "FANOUT_DEMO_S3_ENDPOINT": s3.endpoint_url,
            "AWS_ACCESS_KEY_ID": "fanout-demo",
            # Not the bucket's name: the secret key is registered for redaction, and would mask it.
            "AWS_SECRET_ACCESS_KEY": "fanout-demo-local-s3-key",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        saved = {k: os.environ.get(k) for k in variables}
        os.environ.update(variables)
        try:
            yield DemoStack(postgres, s3, variables)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run(
    show: Callable[[DemoStep], None],
    *,
    reports_dir: Path,
    announce: Callable[[str], None] = lambda _: None,
    keep: Callable[[KeptStack], None] | None = None,
    interrupt: Interrupt | None = None,
) -> DemoResult:
    """Play the demo's story on a throwaway stack; with `keep`, call it while the stack still runs.

    `keep` returns when the user is done (the CLI waits there for Ctrl-C); the stack is
    then stopped and the temporary folder removed, whatever happened.
    """
    interrupt = interrupt or Interrupt()
    workdir = Path(tempfile.mkdtemp(prefix="fanout-demo-"))
    try:
        path = prepare(workdir, reports_dir)
        announce("starting an embedded PostgreSQL and a local S3 endpoint ...")
        with stack() as started:
            story = _Story(load_environment(str(path)), started, workdir, reports_dir, show, interrupt)
            finished = story.play()
            if finished and keep is not None:
                keep(_kept(started, workdir, path))
        announce("stopped the embedded stack")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return DemoResult(tuple(story.steps), reports_dir, interrupted=not finished)


def _kept(started: DemoStack, workdir: Path, environment_file: Path) -> KeptStack:
    variables = {
        **started.variables,
        "FANOUT_ENVIRONMENTS_DIR": str(environment_file.parent),
        "FANOUT_RUNS_DIR": str(workdir / "runs"),
    }
    script = workdir / "env.sh"
    # The file holds the server's password: readable by its owner only.
    descriptor = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("# Written by `fanout demo --keep`; valid while it runs. Source it: . env.sh\n")
        for name, value in variables.items():
            handle.write(f"export {name}={shlex.quote(value)}\n")
    psql = started.postgres.bin_dir / "psql" if started.postgres.bin_dir else None
    return KeptStack(
        workdir=workdir,
        env_script=script,
        environments_dir=environment_file.parent,
        environment_file=environment_file,
        migrations_dir=workdir / "migrations",
        postgres=f"{started.postgres.host}:{started.postgres.port}",
        s3_endpoint=started.s3.endpoint_url,
        psql=psql if psql is not None and psql.exists() else None,
    )


class _Story:
    """The chapters, in order; each one stages its trouble, runs a verb and records what fanout said."""

    def __init__(
        self,
        env: Environment,
        started: DemoStack,
        workdir: Path,
        reports_dir: Path,
        show: Callable[[DemoStep], None],
        interrupt: Interrupt,
    ) -> None:
        self.env = env
        self.postgres = started.postgres
        self.migrations = workdir / "migrations"
        self.runs = workdir / "runs"
        self.reports_dir = reports_dir
        self.show = show
        self.interrupt = interrupt
        self.steps: list[DemoStep] = []
        self.run_id = ""  # the troubled apply's, for --resume

    def step(self, step: DemoStep) -> bool:
        """Record and show a step; False when the user interrupted and the story must stop."""
        self.steps.append(step)
        self.show(step)
        return not self.interrupt.stopping.is_set()

    def report_step(
        self,
        title: str,
        report: RunReport,
        *,
        expected: int = EXIT_OK,
        notes: tuple[str, ...] = (),
        written: tuple[Path, ...] = (),
    ) -> bool:
        step = DemoStep(title, notes, report, exit_code=exit_code(report), expected=expected, written=written)
        return self.step(step)

    def write_reports(self, report: RunReport, stem: str) -> tuple[Path, ...]:
        written = []
        for fmt in REPORT_FORMATS:
            path = self.reports_dir / f"{stem}{_SUFFIXES[fmt]}"
            commands.store_report(render(report, fmt), str(path), self.env)
            written.append(path)
        return tuple(written)

    def sql(self, database: str, statement: str) -> None:
        with self.postgres.connect(database) as connection, connection.cursor() as cursor:
            cursor.execute(statement)

    def play(self) -> bool:
        """True when the story ran to its end; False when interrupted."""
        chapters = (
            self.publish,
            self.fleet,
            self.plan,
            self.apply_with_trouble,
            self.resume,
            self.edit_refused,
            self.drift_refused,
            self.accept_and_apply,
            self.verify,
        )
        return all(chapter() for chapter in chapters)

    def publish(self) -> bool:
        published = commands.publish(self.env, self.migrations)
        lines = tuple(
            f"{p.plan.service}: {len(p.plan.files)} files -> {p.plan.url}  (manifest {p.manifest})" for p in published
        )
        return self.step(DemoStep("publish: migrations go to S3, with a manifest per service", lines=lines))

    def fleet(self) -> bool:
        targets = commands.shards(self.env)
        lines = [f"{t.id:<9} {t.display:<48} tenants {', '.join(t.tenants)}" for t in targets]
        folded = [t for t in targets if t.aliases]
        notes = tuple(
            f"directory entries {', '.join(t.aliases)} name the same database as {t.id} ({t.dbname}): "
            "folded into one target, migrated once"
            for t in folded
        )
        lines.append(
            f"{len(targets)} targets from {len(targets) + sum(len(t.aliases) for t in folded)} directory entries"
        )
        return self.step(DemoStep("shards: the fleet, tenants folded into shared databases", notes, lines=tuple(lines)))

    def plan(self) -> bool:
        return self.report_step("plan: what would run where (read-only)", commands.plan(self.env))

    def apply_with_trouble(self) -> bool:
        from fanout.engines.postgres import locking

        # A colleague created a table by hand on shared_2; another runner holds globex's lock.
        self.sql("shared_2", "CREATE TABLE invoice (id int)")
        other = locking.Owner(pid=os.getpid(), run_id="another-runner")
        with self.postgres.connect("tenant_globex") as holder:
            # The database's default schema, where fanout (like yoyo) keeps its tables.
            locking.create_tables(holder, "public", create_schema=False)
            if not locking.try_acquire(holder, other, "public").taken:
                raise RuntimeError("the demo could not stage another runner's lock on globex")
            report = commands.apply(
                self.env,
                settings=commands.RunSettings(lock_wait=LOCK_WAIT),
                interrupt=self.interrupt,
                runs_dir=self.runs,
            )
            locking.release(holder, other, "public")
        self.run_id = report.run_id
        notes = (
            "staged: shared_2 already has a table 'invoice' (made by hand), and another runner holds globex's lock",
            f"apply waits {LOCK_WAIT:g} s for a lock (--lock-wait), then reports the target; the other targets go on",
        )
        return self.report_step(
            "apply: one shard fails, one is locked, the others are migrated",
            report,
            expected=EXIT_TARGETS_FAILED,
            notes=notes,
            written=self.write_reports(report, "apply"),
        )

    def resume(self) -> bool:
        self.sql("shared_2", "ALTER TABLE invoice RENAME TO invoice_by_hand")
        report = commands.apply(self.env, resume=self.run_id, interrupt=self.interrupt, runs_dir=self.runs)
        notes = (
            "fixed: the stray table is renamed, and the other runner has released its lock",
            f"apply --resume {self.run_id} retries only what failed or was skipped, with the same migrations",
        )
        return self.report_step("apply --resume: only the unfinished targets", report, notes=notes)

    def edit_refused(self) -> bool:
        edited = self.migrations / "people" / ENVIRONMENT / "002-add-address.sql"
        edited.write_text("-- Addresses are free text for now.\n" + edited.read_text())
        notes = ("someone edits 002-add-address.sql, already applied everywhere, and publishes again",)
        try:
            commands.publish(self.env, self.migrations)
        except SourceError as e:
            return self.step(
                DemoStep(
                    "publish: a published migration is immutable",
                    notes,
                    lines=(f"fanout: error: {e}",),
                    exit_code=e.exit_code,
                    expected=EXIT_SOURCE,
                )
            )
        return self.step(DemoStep("publish: a published migration is immutable", notes, expected=EXIT_SOURCE))

    def drift_refused(self) -> bool:
        (self.migrations / "people" / ENVIRONMENT / "004-add-phone.sql").write_text(
            "-- depends: 003-person-email-index\nALTER TABLE person ADD COLUMN phone TEXT;\n"
        )
        commands.publish(self.env, self.migrations, force_reason="demo: a comment-only edit of 002")
        report = commands.apply(self.env, interrupt=self.interrupt, runs_dir=self.runs)
        notes = (
            "forced: publish --force --reason '...' (recorded in the manifest), with a new 004-add-phone",
            "every shard applied the old 002: apply sees the drift and refuses to touch those shards",
        )
        return self.report_step("apply: drifted shards are refused", report, expected=EXIT_TARGETS_FAILED, notes=notes)

    def accept_and_apply(self) -> bool:
        adopted = commands.accept(self.env, ["002-add-address"], reason="comment-only edit, reviewed")
        lines = tuple(f"{a.target:<9} {'failed' if a.failed else 'ok':<7} {a.message}" for a in adopted)
        if not self.step(
            DemoStep(
                "accept: adopt the new content of 002 (logged, runs no SQL)",
                lines=lines,
                exit_code=EXIT_TARGETS_FAILED if any(a.failed for a in adopted) else EXIT_OK,
            )
        ):
            return False
        report = commands.apply(self.env, interrupt=self.interrupt, runs_dir=self.runs)
        return self.report_step("apply: 004 reaches every shard", report)

    def verify(self) -> bool:
        report = commands.verify(self.env)
        return self.report_step(
            "verify: the release gate (every migration applied, every checksum matching)",
            report,
            written=self.write_reports(report, "verify"),
        )
