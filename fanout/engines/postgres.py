"""The PostgreSQL engine: every psycopg2 call fanout makes to a shard.

One connection per target, used by one worker thread (yoyo backends are not thread-safe),
or handed to the next target of the same database when it ends cleanly (see
fanout/engines/connections.py). Plan and apply go through the same per-target procedure
in the runner; the mode only picks the session here. The plan session is read-only (its
transactions are READ ONLY, it creates no table and takes no lock), the apply session
drives yoyo.

Departures from yoyo's own `apply_migrations`, each for a failure yoyo users meet:
- A transactional migration and the row that records it are committed in one
  transaction on one connection, so a crash can never leave a shard with a change
  applied but unrecorded (yoyo applies on one connection and marks on another).
- A plain transactional SQL migration goes to the server as one query string: BEGIN, its
  statements, the two rows that record it, COMMIT. yoyo's own path costs seven round
  trips per migration (a savepoint per step and per migration, one statement per row),
  which on a shard 2 ms away is most of the time. Anything else (non-transactional
  migrations, Python steps) goes through yoyo's steps.
- The shard lock is yoyo's `yoyo_lock` row, taken through `fanout.locking`, which
  recognizes and breaks the lock of a fanout that died (see that module).
- Errors are classified here (lost connection, lock timeout, serialization failure,
  deadlock: retryable; the rest is the migration's own fault); the runner retries.
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
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql
from yoyo import exceptions as yoyo_exceptions
from yoyo import internalmigrations
from yoyo.backends import PostgresqlBackend
from yoyo.connections import DatabaseURI
from yoyo.internalmigrations import v2 as internal_v2
from yoyo.migrations import Migration, MigrationStep, TransactionWrapper
from yoyo.utils import change_param_style

from fanout import checksums, indoubt, locking, pooler
from fanout.config import TcpSettings
from fanout.directory import DEFAULT_TCP, Target
from fanout.engines import (
    ChecksumChange,
    EngineError,
    Recording,
    Session,
    Settled,
    SettleItem,
    UnlockResult,
    in_doubt_error,
    timed_out,
)
from fanout.engines.connections import Connections
from fanout.errors import TargetFailed
from fanout.interrupt import Interrupt, PgCancel, Reason, Watched
from fanout.options import RunOptions, SessionSettings
from fanout.report import ErrorKind, InDoubt, LockHolder, Mode, TargetError
from fanout.secret import error_line

log = logging.getLogger(__name__)

MIGRATION_TABLE = "_yoyo_migration"
VERSION_TABLE = "_yoyo_version"
LOCK_POLL_SECONDS = 0.25
APPLICATION_NAME = "fanout"
CLIENT_CHECK_INTERVAL = "1s"
# How long unlock waits for a row lock on yoyo's lock table when the environment sets no lock_timeout.
UNLOCK_LOCK_TIMEOUT = "10s"
# SQLSTATEs worth another try: lock_not_available (lock_timeout), serialization_failure,
# deadlock_detected. Everything else is the migration's own fault.
_RETRYABLE_SQLSTATES = {"55P03", "40001", "40P01"}
_SQLSTATE_KINDS = {"55P03": ErrorKind.LOCK_TIMEOUT, "57014": ErrorKind.STATEMENT_TIMEOUT}

yoyo_exceptions.register(psycopg2.DatabaseError)


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


def connection_key(target: Target, options: RunOptions, run_id: str) -> str:
    """The database a connection is to: everything in its connection parameters but the schema."""
    kwargs = _connect_kwargs(target, options, run_id, read_only=options.mode is Mode.PLAN)
    # A digest: the parameters hold the password, which has no business in a dict key.
    return hashlib.sha256(repr(sorted(kwargs.items())).encode()).hexdigest()


def unlock(
    target: Target,
    *,
    force: bool,
    terminate: str | None,
    connect_timeout: float,
    tcp: TcpSettings,
    lock_timeout: str | None,
) -> UnlockResult:
    """Remove the target's migration lock by hand (see locking.unlock); never raises for the target's trouble.

    `lock_timeout` (the environment's, else UNLOCK_LOCK_TIMEOUT) bounds the wait for a row lock
    on the lock table: a session stopped inside its acquisition keeps one until it ends.
    """
    options = RunOptions(mode=Mode.APPLY, connect_timeout=connect_timeout, tcp=tcp)
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


def open_session(
    target: Target,
    options: RunOptions,
    run_id: str,
    interrupt: Interrupt,
    deadline: float | None = None,
    connections: Connections | None = None,
) -> Session:
    if options.mode is Mode.PLAN:
        return _ReadOnlySession(target, options, run_id, interrupt, deadline, connections)
    return _YoyoSession(target, options, run_id, interrupt, deadline, connections)


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
        raise EngineError(
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

    def classify(self, error: psycopg2.Error, *, otherwise: ErrorKind = ErrorKind.DATABASE) -> EngineError:
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
            return EngineError(TargetError(ErrorKind.INTERRUPTED, message))
        if handle.reason is Reason.SILENT:
            return EngineError(
                TargetError(
                    ErrorKind.UNRESPONSIVE,
                    f"the shard stopped answering: no answer for {handle.silent_for:.0f}s, and a second connection "
                    "found the server no longer working on it; connection abandoned (the server frees the "
                    "shard's lock when it ends the session)",
                )
            )
        if handle.abandoned:
            return EngineError(
                TargetError(
                    ErrorKind.UNRESPONSIVE,
                    f"the shard stopped answering: still waiting at the target timeout "
                    f"({self._options.target_timeout:g}s), then {cut}",
                )
            )
        return timed_out(self._options, "still working: cancelled and rolled back")


def _lost(error: psycopg2.Error) -> bool:
    return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)) and error.pgcode is None


# libpq's words for a connection string it cannot use; retrying would fail the same way.
_CONFIGURATION_MESSAGES = ("invalid connection option", "invalid sslmode value", "invalid dsn", "invalid value for",
                           "invalid integer value", "invalid port number")  # fmt: skip


def _classify_connect_error(error: psycopg2.Error, target: Target) -> EngineError:
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
    return EngineError(
        TargetError(kind, f"cannot connect to {target.display}: {message}"), retryable=kind is ErrorKind.UNREACHABLE
    )


def _classify_database_error(error: psycopg2.Error, *, otherwise: ErrorKind = ErrorKind.DATABASE) -> EngineError:
    """`otherwise` is the kind of an error that is neither a lost connection nor a timeout."""
    if _lost(error) and "timed out" in error_line(error).lower():
        # Keepalives or tcp_user_timeout gave up on the peer: retrying would wait as long again.
        return EngineError(TargetError(ErrorKind.UNRESPONSIVE, f"the shard stopped answering: {error_line(error)}"))
    if _lost(error):
        return EngineError(TargetError(ErrorKind.UNREACHABLE, f"connection lost: {error_line(error)}"), retryable=True)
    kind = _SQLSTATE_KINDS.get(error.pgcode or "", otherwise)
    return EngineError(TargetError(kind, _pg_message(error)), retryable=error.pgcode in _RETRYABLE_SQLSTATES)


def _classify_migration_error(error: psycopg2.Error) -> EngineError:
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
        connections: Connections | None = None,
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
        except EngineError:
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

    def apply(self, migration: Migration, recording: Recording) -> bool:
        """Plan mode: record nothing, run nothing."""
        return False

    def rollback(self, migration: Migration, recorded: Recording, reason: str | None) -> bool:
        """Plan mode: a dry run of a rollback rolls nothing back."""
        return False

    def run_hook(self, migration: Migration) -> None:
        """Plan mode: hooks are not run."""

    def failed_hooks(self) -> set[str]:
        return set()  # plan runs no hook, so it has none to remember

    def note_hook(self, hook_id: str, sha256: str, *, failed: bool, reason: str | None) -> None:
        """Plan mode: nothing is written."""

    def adopt(self, changes: Sequence[ChecksumChange], environment: str, reason: str | None) -> None:
        raise EngineError(TargetError(ErrorKind.INTERNAL, "a read-only session records nothing"))

    def settle(self, items: Sequence[SettleItem], *, record: bool, reason: str, force: bool) -> Settled:
        raise EngineError(TargetError(ErrorKind.INTERNAL, "a read-only session records nothing"))

    def close(self, *, reuse: bool = False) -> None:
        self._watch.release()
        try:
            # Everything this session set (search_path, timeouts) was set inside its READ ONLY
            # transaction: the rollback restores the session as it was when it was opened.
            self._connection.rollback()
        except psycopg2.Error:
            reuse = False
        reuse = reuse and self._watch.untouched() and not self._connection.closed
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
        if self._schema_checked:
            return
        present = set(self.list_tables())
        if self._is_locked and present.isdisjoint({self.migration_table, self.version_table, self.log_table}):
            self._create_internal_tables()
        else:
            super().ensure_internal_schema_updated()
        self._schema_checked = True

    def _create_internal_tables(self) -> None:
        """yoyo's tables at its current version, created with yoyo's own statements, in one message.

        yoyo gets there by upgrading through its versions: it creates `_yoyo_migration` at
        version 1, then the log and version tables, reads, drops and recreates the first: 11
        round trips and a table created for nothing on every new schema (measured on one
        connection: 19-25 ms of server CPU per schema for all of fanout's and yoyo's tables,
        14 ms this way). The end state is the same; an older yoyo's tables still go through
        yoyo's upgrade. The caller holds yoyo's lock, which yoyo upgrades under.
        """
        statements: list[str] = []
        collector = SimpleNamespace(  # what yoyo's table definitions use of a backend; collects their DDL
            quote_identifier=self.quote_identifier,
            log_table_quoted=self.log_table_quoted,
            version_table_quoted=self.version_table_quoted,
            migration_table_quoted=self.migration_table_quoted,
            execute=lambda sql, params=None: statements.append(sql),
        )
        for create in (
            internal_v2.create_log_table,
            internal_v2.create_version_table,
            internal_v2.create_migration_table,
        ):
            create(collector)
        version = max(internalmigrations.schema_versions)
        with self.connection.cursor() as cursor:
            statements.append(
                cursor.mogrify(
                    f"INSERT INTO {self.version_table_quoted} VALUES (%s, %s)",
                    (version, datetime.now(UTC).replace(tzinfo=None)),
                ).decode()
            )
        locking.in_one_transaction(self.connection, statements)
        self._internal_schema_updated = True

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
        connections: Connections | None = None,
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
        except EngineError:
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
            raise EngineError(
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
                raise EngineError(TargetError(ErrorKind.INTERRUPTED, "interrupted while waiting for the shard's lock"))
            if self._watch.deadline is not None and time.monotonic() >= self._watch.deadline:
                who = attempt.holder.describe() if attempt.holder else "another process"
                raise timed_out(self._options, f"still waiting for the shard's lock, held by {who}")
            if time.monotonic() >= deadline:
                who = attempt.holder.describe() if attempt.holder else "another process"
                raise EngineError(TargetError(ErrorKind.LOCKED, f"lock held by {who}; gave up after {wait:g}s"))
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

    def apply(self, migration: Migration, recording: Recording) -> bool:
        return self._run(
            migration,
            "apply",
            _plain_sql(migration),
            lambda: self._records(migration, recording),
            lambda records: self._apply_marked(migration, records),
        )

    def rollback(self, migration: Migration, recorded: Recording, reason: str | None) -> bool:
        """Run the migration's rollback and remove its records (yoyo's and fanout's) in one transaction.

        A non-transactional rollback runs outside a transaction, as in yoyo; its records are
        removed in one transaction afterwards.
        """
        return self._run(
            migration,
            "rollback",
            _plain_rollback_sql(migration),
            lambda: self._unrecords(migration, recorded, reason),
            lambda unrecords: self._rollback_marked(migration, unrecords),
        )

    def _run(
        self,
        migration: Migration,
        direction: str,
        statements: list[str] | None,
        rows: Callable[[], list[str]],
        marked: Callable[[list[str]], None],
    ) -> bool:
        """Run a migration in `direction` ("apply" or "rollback") with the `rows` that record it.

        A plain transactional .sql migration: a fresh session, its statements and the rows, one
        transaction in one round trip. Other transactional ones: yoyo's steps (as savepoints) and
        the rows in one transaction. A non-transactional one goes to `marked`, which marks it as
        started first.
        """
        backend = self._backend
        try:
            # Inside the migration's transaction, before the rows: a migration that switched roles
            # must not make fanout record as a role without rights on yoyo's tables.
            records = [*_ORIGINAL_ROLE, *rows()]
            if statements is not None:
                prologue = self._prologue()
                self._dirty = True
                locking.in_one_transaction(self._connection, [*statements, *records], before=prologue)
            elif migration.use_transactions:
                self._clean()
                self._dirty = True
                with backend.transaction():
                    migration.process_steps(backend, direction)
                    self._execute(_join(records))
            else:
                marked(records)
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
                raise EngineError(failure.error) from None
            gone = f"; left INVALID index {', '.join(left)}" if left else ""
            ran = f"; {executed} of its statements had run" if executed else ""
            message = (
                f"{failure.error.message}{gone}{ran}; marked in doubt: the next run reports it until it is settled "
                "(`fanout mark` if it is still applied, `fanout unmark` if its rollback is complete)"
            )
            raise EngineError(replace(failure.error, message=message, invalid_indexes=left)) from None
        self._commit_clean([*unrecords, clear])

    def _unrecords(self, migration: Migration, recorded: Recording, reason: str | None) -> list[str]:
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

    def _apply_marked(self, migration: Migration, records: Sequence[str]) -> None:
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
                    + in_doubt_error(doubt).message.removeprefix("in doubt: ")
                )
                raise EngineError(
                    TargetError(ErrorKind.IN_DOUBT, message, invalid_indexes=found.own_invalid), in_doubt=doubt
                )
            self._commit_clean([*records, clear])
            return

    def _failed_midway(
        self,
        migration: Migration,
        error: psycopg2.Error,
        executed: list[Any],
        builds: list[indoubt.IndexBuild],
        only: bool,
        before: tuple[str, ...],
    ) -> EngineError:
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
            return EngineError(failure.error)  # the mark stays
        left = f"; left INVALID index {', '.join(found.invalid)}" if found.invalid else ""
        ran = f"; {len(executed)} of its {len(migration.steps)} statements had run" if executed else ""
        message = (
            f"{failure.error.message}{left}{ran}; marked in doubt: the next run reports it until it is settled "
            "(`fanout mark`/`fanout unmark`, or drop the INVALID index and `fanout unmark`, or `apply --repair-invalid`)"
        )
        return EngineError(replace(failure.error, message=message, invalid_indexes=found.invalid))

    def adopt(self, changes: Sequence[ChecksumChange], environment: str, reason: str | None) -> None:
        try:
            statements = [
                statement
                for c in changes
                for statement in self.checksum_statements(
                    c.migration_id, c.old, c.new, c.service, environment, c.how, reason
                )
            ]
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None
        self.record(statements)

    def settle(self, items: Sequence[SettleItem], *, record: bool, reason: str, force: bool) -> Settled:
        """`fanout mark` (`record`) or `unmark`, in one transaction; see runner.settle."""
        try:
            applied = self.applied()
            marks, _ = self.marks_and_invalid()
            recorded = self.recorded_checksums()
            statements, notes, changed, refused = self._settle_rows(
                items, applied, marks, recorded, record, reason, force
            )
        except psycopg2.Error as e:
            raise _classify_database_error(e) from None
        self.record(statements)
        return Settled(tuple(changed), tuple(notes), refused)

    def _settle_rows(
        self,
        items: Sequence[SettleItem],
        applied: dict[str, str],
        marks: dict[str, indoubt.Mark],
        recorded: dict[str, checksums.Recorded],
        record: bool,
        reason: str,
        force: bool,
    ) -> tuple[list[str], list[str], list[str], bool]:
        statements: list[str] = []
        notes: list[str] = []
        changed: list[str] = []
        refused = False
        with self._connection.cursor() as cursor:
            for item in items:
                migration, recording = item.migration, item.recording
                migration_id = migration.id
                mark, is_applied = marks.get(migration_id), migration.hash in applied
                sha = recording.sha256
                old = recorded[migration_id].sha256 if migration_id in recorded else None
                if record and is_applied:
                    notes.append(f"{migration_id}: already applied" + ("; cleared its mark" if mark else ""))
                    if mark is None:
                        continue
                elif record:
                    if mark is not None:
                        _, found, _ = _examine(cursor, self._schema, self._schema_only, migration, mark)
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
                    statements += self._records(migration, recording, "mark", checksums.How.MARKED)
                    statements.append(
                        checksums.log_sql(cursor, self._schema, migration_id, old, sha, checksums.How.MARKED, reason)
                    )
                    notes.append(f"{migration_id}: recorded as applied")
                elif is_applied:
                    statements += self._unmark_rows(migration)
                    statements.append(
                        checksums.log_sql(cursor, self._schema, migration_id, old, "", checksums.How.UNMARKED, reason)
                    )
                    notes.append(f"{migration_id}: record removed: the next apply runs it")
                elif mark is not None:
                    statements.append(
                        checksums.log_sql(cursor, self._schema, migration_id, old, "", checksums.How.UNMARKED, reason)
                    )
                    notes.append(f"{migration_id}: mark cleared: the next apply runs it")
                else:
                    notes.append(f"{migration_id}: neither applied nor in doubt: nothing to do")
                    continue
                if mark is not None:
                    statements.append(indoubt.clear_sql(cursor, self._schema, migration_id))
                changed.append(migration_id)
        return statements, notes, changed, refused

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
        recording: Recording,
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
        except (psycopg2.Error, EngineError) as e:
            # The report still names the failure; only the reminder for the next run is lost.
            log.warning("%s: could not log post-apply hook %s as %s: %s", self._display, hook_id, action.value, e)

    def _reset(self) -> None:
        """Leave the connection usable (to release the lock) after a failed statement."""
        with contextlib.suppress(psycopg2.Error):
            self._clean()

    def close(self, *, reuse: bool = False) -> None:
        self._watch.release()
        reuse = (
            reuse
            and self._released_cleanly
            and self._watch.untouched()
            and self._connections is not None
            and not self._connection.closed
        )
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
