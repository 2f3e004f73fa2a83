"""The runner: applies (or plans) a pinned migration set on many targets at once.

This is the only module that talks to yoyo. Each target gets its own connection, used
by one worker thread and closed afterwards (yoyo backends are not thread-safe); the
migration lists are read and fully loaded once, in the calling thread, before the
fan-out, and are shared read-only after that.

Plan and apply go through the same per-target procedure; the mode only picks the
session behind it. The plan session is read-only (its transactions are READ ONLY,
it creates no table and takes no lock), the apply session drives yoyo.

Two deliberate departures from yoyo's own `apply_migrations`:
- A transactional migration and the row that records it are committed in one
  transaction on one connection, so a crash can never leave a shard with a change
  applied but unrecorded (yoyo applies on one connection and marks on another).
- The lock is taken with fanout's own loop on yoyo's `yoyo_lock` row, so plain yoyo
  processes and fanout still exclude each other, but a real error (permission denied,
  missing schema) surfaces at once instead of being retried until the lock timeout.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
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
from yoyo.migrations import Migration, MigrationList, topological_sort

from fanout.directory import Target
from fanout.errors import SourceError, TargetFailed
from fanout.report import (
    AppliedMigration,
    ErrorKind,
    LockHolder,
    Mode,
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
LOCK_TABLE = "yoyo_lock"
LOCK_POLL_SECONDS = 0.25
APPLICATION_NAME = "fanout"

yoyo_exceptions.register(psycopg2.DatabaseError)
# yoyo's Migration keeps a process-wide registry by id that `load()` reads to resolve
# `-- depends:`; loading one set at a time keeps concurrent loads from mixing sets.
_load_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class RunOptions:
    mode: Mode
    concurrency: int = 8
    lock_timeout: float = 60.0
    connect_timeout: float = 10.0
    fail_fast: bool = False


@dataclass(frozen=True, slots=True)
class _ServicePlan:
    """One service's loaded migrations, in yoyo's order."""

    service: str
    migrations: tuple[Migration, ...]
    post_apply: tuple[Migration, ...]
    files: dict[str, str]  # migration id -> file name


def run(
    snapshot: Snapshot,
    targets: Sequence[Target],
    options: RunOptions,
    *,
    run_id: str,
    environment: str,
    command: str,
    on_result: Callable[[TargetResult], None] | None = None,
) -> RunReport:
    """Run `options.mode` on every target; a target's failure is a result, never an exception."""
    started_at = datetime.now(UTC)
    plans = load(snapshot.sets)
    cancel = threading.Event()

    def work(target: Target) -> list[TargetResult]:
        if cancel.is_set():
            results = [
                _skipped(target, p.service, "not attempted: an earlier target failed (--fail-fast)") for p in plans
            ]
        else:
            results = _migrate_target(target, plans, options, run_id)
            if options.fail_fast and any(r.status is Status.FAILED for r in results):
                cancel.set()
        if on_result is not None:
            for result in results:
                on_result(result)
        return results

    workers = max(1, min(options.concurrency, len(targets)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fanout-target") as pool:
        per_target = list(pool.map(work, targets))

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
    )


def load(sets: Sequence[MigrationSet]) -> tuple[_ServicePlan, ...]:
    """Parse every migration of every set now, so a broken file stops the run before any shard is touched."""
    plans = []
    owner: dict[str, str] = {}
    for migration_set in sets:
        with _load_lock:
            try:
                migrations: MigrationList = read_migrations(str(migration_set.folder))
                for m in [*migrations, *migrations.post_apply]:
                    m.load()
                ordered = tuple(topological_sort(migrations))
            except yoyo_exceptions.BadMigration as e:
                raise SourceError(f"service {migration_set.service!r}: bad migration: {_bad_migration(e)}") from None
            except UnicodeDecodeError as e:
                raise SourceError(f"service {migration_set.service!r}: a migration is not UTF-8 text: {e}") from None
        for m in ordered:
            if m.id in owner:
                raise SourceError(
                    f"migration id {m.id!r} exists in services {owner[m.id]!r} and {migration_set.service!r}; "
                    "ids must be unique across an environment's services because they share yoyo's table on each shard"
                )
            owner[m.id] = migration_set.service
        files = {f.migration_id: f.name for f in migration_set.files if not f.is_rollback}
        plans.append(_ServicePlan(migration_set.service, ordered, tuple(migrations.post_apply), files))
    return tuple(plans)


def _bad_migration(error: yoyo_exceptions.BadMigration) -> str:
    text = " ".join(str(a) for a in error.args)
    return text.replace("Could not resolve dependencies in", "a '-- depends:' names an unknown migration in")


def ensure_database(target: Target, *, connect_timeout: float = 10.0, maintenance_db: str = "postgres") -> bool:
    """Create the target's database when it does not exist; True when it was created.

    Connects to the server's maintenance database with the target's own credentials, so the
    role needs CREATEDB. Safe when two bootstraps race: the loser sees the database exist.
    """
    options = RunOptions(mode=Mode.APPLY, connect_timeout=connect_timeout)
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

    def __init__(self, error: TargetError) -> None:
        super().__init__(error.message)
        self.error = error


def _migrate_target(
    target: Target, plans: Sequence[_ServicePlan], options: RunOptions, run_id: str
) -> list[TargetResult]:
    started = time.monotonic()
    results: list[TargetResult] = []
    session: _Session | None = None
    try:
        session = _open_session(target, options, run_id)
        with session.lock(options.lock_timeout) as holder:
            applied = session.applied_hashes()
            for index, plan in enumerate(plans):
                result = _migrate_service(session, target, plan, applied, holder, options.mode)
                results.append(result)
                if result.status is Status.FAILED:
                    reason = f"not attempted: service {plan.service!r} failed on this target"
                    results.extend(_skipped(target, p.service, reason) for p in plans[index + 1 :])
                    break
    except _Failure as failure:
        done = {r.service for r in results}
        results.extend(_failed(target, p.service, failure.error) for p in plans if p.service not in done)
    except Exception as e:  # a bug or an unexpected driver error must not crash the fleet run
        log.exception("unexpected error on target %s", target.id)
        error = TargetError(ErrorKind.INTERNAL, f"{type(e).__name__}: {e}")
        done = {r.service for r in results}
        results.extend(_failed(target, p.service, error) for p in plans if p.service not in done)
    finally:
        if session is not None:
            session.close()
    seconds = time.monotonic() - started
    return [replace(r, seconds=seconds) for r in results]


def _migrate_service(
    session: _Session,
    target: Target,
    plan: _ServicePlan,
    applied: set[str],
    holder: LockHolder | None,
    mode: Mode,
) -> TargetResult:
    before = tuple(m.id for m in plan.migrations if m.hash in applied)
    pending = list(topological_sort(m for m in plan.migrations if m.hash not in applied))
    ran: list[AppliedMigration] = []
    error: TargetError | None = None
    for migration in pending:
        started = time.monotonic()
        try:
            session.apply(migration)
        except _Failure as failure:
            error = replace(failure.error, migration=migration.id, file=plan.files.get(migration.id))
            break
        if mode is Mode.APPLY:
            applied.add(migration.hash)
            ran.append(AppliedMigration(migration.id, time.monotonic() - started))
    if error is None and ran:
        for hook in plan.post_apply:
            try:
                session.run_hook(hook)
            except _Failure as failure:
                error = replace(failure.error, migration=hook.id, file=f"{hook.id}.sql")
                break
    still_pending = tuple(m.id for m in pending[len(ran) :])
    if error is not None:
        status = Status.FAILED
    elif mode is Mode.PLAN:
        status = Status.PENDING if still_pending else Status.UP_TO_DATE
    else:
        status = Status.APPLIED if ran else Status.UP_TO_DATE
    return _result(
        target,
        plan.service,
        status,
        error,
        applied_before=before,
        ran=tuple(ran),
        pending=still_pending,
        initialized=session.initialized,
        lock_holder=holder,
    )


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


def _failed(target: Target, service: str, error: TargetError) -> TargetResult:
    return _result(target, service, Status.FAILED, error)


def _skipped(target: Target, service: str, reason: str) -> TargetResult:
    return _result(target, service, Status.SKIPPED, TargetError(ErrorKind.INTERNAL, reason))


def _summary(migration_set: MigrationSet) -> SourceSummary:
    return SourceSummary(
        service=migration_set.service,
        url=migration_set.url,
        files=tuple(SourceFile(f.name, f.sha256, f.size, f.etag, f.version_id) for f in migration_set.files),
    )


# ---- sessions: the one place the mode makes a difference ----------------------------


class _Session(Protocol):
    initialized: bool

    def lock(self, timeout: float) -> Any:
        """A context manager that holds the target's migration lock and yields the holder seen, if any."""
        ...

    def applied_hashes(self) -> set[str]: ...

    def apply(self, migration: Migration) -> None: ...

    def run_hook(self, migration: Migration) -> None: ...

    def close(self) -> None: ...


def _open_session(target: Target, options: RunOptions, run_id: str) -> _Session:
    if options.mode is Mode.PLAN:
        return _ReadOnlySession(target, options, run_id)
    return _YoyoSession(target, options, run_id)


def _connect_kwargs(target: Target, options: RunOptions, run_id: str, *, read_only: bool = False) -> dict[str, Any]:
    return target.libpq_kwargs(
        application_name=f"{APPLICATION_NAME} {options.mode.value} {run_id}",
        connect_timeout=options.connect_timeout,
        read_only=read_only,
    )


def _classify_connect_error(error: psycopg2.Error, target: Target) -> _Failure:
    message = error_line(error)
    lowered = message.lower()
    missing = "does not exist" in lowered
    if "authentication" in lowered or "no pg_hba.conf entry" in lowered or ("role" in lowered and missing):
        kind = ErrorKind.AUTHENTICATION
    elif "database" in lowered and missing:
        kind = ErrorKind.DATABASE
    else:
        kind = ErrorKind.UNREACHABLE
    return _Failure(TargetError(kind, f"cannot connect to {target.display}: {message}"))


def _classify_database_error(error: psycopg2.Error) -> _Failure:
    if isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)) and error.pgcode is None:
        return _Failure(TargetError(ErrorKind.UNREACHABLE, f"connection lost: {error_line(error)}"))
    return _Failure(TargetError(ErrorKind.DATABASE, _pg_message(error)))


def _pg_message(error: psycopg2.Error) -> str:
    primary = getattr(getattr(error, "diag", None), "message_primary", None) or error_line(error)
    code = f" [{error.pgcode}]" if error.pgcode else ""
    return f"{primary}{code}"


def _quote_schema(schema: str) -> sql.Composable:
    return sql.SQL("SET search_path TO {}").format(sql.Identifier(schema))


class _ReadOnlySession:
    """Reads yoyo's tables inside READ ONLY transactions; creates nothing and takes no lock."""

    def __init__(self, target: Target, options: RunOptions, run_id: str) -> None:
        # The server enforces read-only: even a bug here could not write.
        kwargs = _connect_kwargs(target, options, run_id, read_only=True)
        try:
            self._connection = psycopg2.connect(**kwargs)
        except psycopg2.Error as e:
            raise _classify_connect_error(e, target) from None
        self._connection.set_session(readonly=True)
        self._schema = target.schema
        self.initialized = False
        try:
            with self._connection.cursor() as cursor:
                if self._schema:
                    cursor.execute(_quote_schema(self._schema))
                cursor.execute(
                    "SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
                    (_relation(MIGRATION_TABLE), _relation(VERSION_TABLE), _relation(LOCK_TABLE)),
                )
                row = cursor.fetchone()
            assert row is not None
            self.initialized, self._has_version_table, self._has_lock_table = row
        except psycopg2.Error as e:
            self.close()
            raise _classify_database_error(e) from None

    @contextmanager
    def lock(self, timeout: float) -> Iterator[LockHolder | None]:
        yield _read_lock_holder(self._connection) if self._has_lock_table else None

    def applied_hashes(self) -> set[str]:
        if not self.initialized:
            return set()
        try:
            with self._connection.cursor() as cursor:
                if self._has_version_table:
                    cursor.execute(f'SELECT "migration_hash" FROM "{MIGRATION_TABLE}"')
                    return {row[0] for row in cursor.fetchall()}
                # yoyo < 6 kept ids, not hashes.
                cursor.execute(f'SELECT "id" FROM "{MIGRATION_TABLE}"')
                return {hashlib.sha256(row[0].encode()).hexdigest() for row in cursor.fetchall()}
        except psycopg2.Error as e:
            raise _classify_database_error(e) from None

    def apply(self, migration: Migration) -> None:
        """Plan mode: record nothing, run nothing."""

    def run_hook(self, migration: Migration) -> None:
        """Plan mode: hooks are not run."""

    def close(self) -> None:
        try:
            self._connection.rollback()
            self._connection.close()
        except psycopg2.Error:
            pass


def _relation(name: str) -> str:
    return '"' + name + '"'


def _read_lock_holder(connection: Any) -> LockHolder | None:
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT "pid", "ctime" FROM "{LOCK_TABLE}" LIMIT 1')
        row = cursor.fetchone()
    return LockHolder(pid=row[0], since=row[1]) if row else None


class _QuietCursor(psycopg2.extensions.cursor):
    """yoyo prints the rows of any statement that returns some to sys.stdout; a runner never prints."""

    @property
    def description(self) -> None:
        return None


class _Backend(PostgresqlBackend):  # type: ignore[misc]
    """yoyo's PostgreSQL backend, adjusted for a runner that opens hundreds of them."""

    _driver = psycopg2  # skip yoyo's per-instance driver import and error registration
    _schema_checked = False
    _hostname = socket.getfqdn()
    _username = getpass.getuser()

    def connect(self, dburi: DatabaseURI) -> Any:
        kwargs = dict(dburi.args)
        self.schema = kwargs.pop("schema", None)
        connection = psycopg2.connect(**kwargs)
        connection.autocommit = True
        connection.cursor_factory = _QuietCursor
        return connection

    def init_connection(self, connection: Any) -> None:
        if self.schema:
            with connection.cursor() as cursor:
                cursor.execute(_quote_schema(self.schema))  # yoyo would interpolate the name unquoted

    def init_database(self) -> None:
        # PostgreSQL has transactional DDL; yoyo's probe costs a table creation per connection.
        self.has_transactional_ddl = True
        if self.schema:
            # A schema-per-tenant target may be brand new: its schema is part of what apply brings.
            with self.transaction(), self.connection.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        try:
            with self.transaction():
                self.execute(
                    self.format_sql(self.create_lock_table_sql.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
                )
        except psycopg2.errors.UniqueViolation:
            pass  # another runner created it at the same instant

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
            "created_at_utc": datetime.now(UTC).replace(tzinfo=None),
            "operation": operation,
        }


class _YoyoSession:
    """Applies migrations through yoyo under yoyo's lock."""

    def __init__(self, target: Target, options: RunOptions, run_id: str) -> None:
        kwargs = _connect_kwargs(target, options, run_id)
        if target.schema:
            kwargs["schema"] = target.schema
        uri = DatabaseURI("postgresql", None, None, None, None, None, kwargs)
        try:
            self._backend = _Backend(uri, MIGRATION_TABLE)
        except psycopg2.Error as e:
            raise _classify_connect_error(e, target) from None
        try:
            self._backend.init_database()
        except psycopg2.Error as e:
            self.close()
            raise _classify_database_error(e) from None
        self.initialized = True
        self._pid = os.getpid()
        self._display = target.display

    @contextmanager
    def lock(self, timeout: float) -> Iterator[LockHolder | None]:
        backend = self._backend
        insert = f'INSERT INTO "{LOCK_TABLE}" ("locked", "ctime", "pid") VALUES (1, %(when)s, %(pid)s)'
        deadline = time.monotonic() + timeout
        while True:
            try:
                with backend.transaction():
                    backend.cursor().execute(insert, {"when": datetime.now(UTC).replace(tzinfo=None), "pid": self._pid})
                break
            except psycopg2.errors.UniqueViolation:
                if time.monotonic() >= deadline:
                    holder = self._holder()
                    who = (
                        f"pid {holder.pid} since {holder.since:%Y-%m-%d %H:%M:%S} UTC"
                        if holder and holder.since
                        else "another process"
                    )
                    raise _Failure(
                        TargetError(ErrorKind.LOCK_TIMEOUT, f"lock held by {who}; gave up after {timeout:g}s")
                    ) from None
                time.sleep(LOCK_POLL_SECONDS * random.uniform(0.5, 1.5))
            except psycopg2.Error as e:
                raise _classify_database_error(e) from None
        backend._is_locked = True
        try:
            yield None
        finally:
            backend._is_locked = False
            try:
                if backend._in_transaction:
                    backend.rollback()
                with backend.transaction():
                    backend.cursor().execute(f'DELETE FROM "{LOCK_TABLE}" WHERE "pid" = %(pid)s', {"pid": self._pid})
            except psycopg2.Error:
                log.warning("could not release the lock on %s; yoyo break-lock releases it", self._display)

    def _holder(self) -> LockHolder | None:
        try:
            return _read_lock_holder(self._backend.connection)
        except psycopg2.Error:
            return None

    def applied_hashes(self) -> set[str]:
        try:
            return set(self._backend.get_applied_migration_hashes())
        except psycopg2.Error as e:
            raise _classify_database_error(e) from None

    def apply(self, migration: Migration) -> None:
        backend = self._backend
        try:
            if migration.use_transactions:
                # One transaction: the migration's steps (as savepoints) and the row recording them.
                with backend.transaction():
                    migration.process_steps(backend, "apply")
                    backend.log_migration(migration, "apply")
                    backend.mark_one(migration, log=False)
            else:
                migration.process_steps(backend, "apply")
                with backend.transaction():
                    backend.log_migration(migration, "apply")
                    backend.mark_one(migration, log=False)
        except psycopg2.Error as e:
            self._reset()
            if isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError)) and e.pgcode is None:
                raise _classify_database_error(e) from None
            raise _Failure(TargetError(ErrorKind.MIGRATION, _pg_message(e))) from None

    def run_hook(self, migration: Migration) -> None:
        try:
            migration.process_steps(self._backend, "apply")
        except psycopg2.Error as e:
            self._reset()
            raise _Failure(TargetError(ErrorKind.MIGRATION, _pg_message(e))) from None

    def _reset(self) -> None:
        """Leave the connection usable (to release the lock) after a failed statement."""
        try:
            if self._backend._in_transaction:
                self._backend.rollback()
        except psycopg2.Error:
            pass

    def close(self) -> None:
        with contextlib.suppress(psycopg2.Error):
            self._backend.connection.close()
