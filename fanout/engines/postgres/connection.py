"""Connecting to a PostgreSQL shard and knowing what went wrong: connection parameters, the pooler check,
the watchdog (cancel, liveness), error classification, and the statements of a fresh session."""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from fanout import pooler
from fanout.directory import Target
from fanout.engines import EngineError, watchdog_verdict
from fanout.engines.postgres.cancel import PgCancel
from fanout.interrupt import Interrupt, Watched
from fanout.options import RunOptions, SessionSettings
from fanout.report import ErrorKind, TargetError
from fanout.secret import error_line

if TYPE_CHECKING:
    from fanout.engines.postgres.readonly import Shape

log = logging.getLogger(__name__)

APPLICATION_NAME = "fanout"
CLIENT_CHECK_INTERVAL = "1s"
# SQLSTATEs worth another try: lock_not_available (lock_timeout), serialization_failure,
# deadlock_detected. Everything else is the migration's own fault.
RETRYABLE_SQLSTATES = {"55P03", "40001", "40P01"}
SQLSTATE_KINDS = {"55P03": ErrorKind.LOCK_TIMEOUT, "57014": ErrorKind.STATEMENT_TIMEOUT}


def connect_kwargs(target: Target, options: RunOptions, run_id: str, *, read_only: bool = False) -> dict[str, Any]:
    return target.libpq_kwargs(
        application_name=f"{APPLICATION_NAME} {options.mode.value} {run_id}",
        connect_timeout=options.connect_timeout,
        read_only=read_only,
        tcp=options.tcp,
    )


def check_session(connection: Any, target: Target, kwargs: dict[str, Any], started: float, watch: Watch) -> int | None:
    """Fail the target before any lock when its session is not its own across transactions; arm liveness checks.

    Returns the session's server process (None when the server does not show it).
    """
    checked = pooler.check_session(
        connection,
        other_session=lambda: held_session(kwargs, watch),
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


# How often a wait of the pooler check's second connection looks at the watchdog.
_HELD_SESSION_POLL_SECONDS = 0.2


@contextmanager
def held_session(kwargs: dict[str, Any], watch: Watch) -> Iterator[int | None]:
    """Another session like the watched one, inside a transaction (a pooler must keep a server session for it): its server process.

    Waits no longer than `connect_timeout`, and ends with the watched session's target: a
    session-mode pool with no session left would keep it waiting for PgBouncer's
    `query_wait_timeout` (120 s by default) while the watched session holds one, then fail it
    as unreachable, and retries would wait as long again. Past that wait: pooler.NoServerSession.
    """
    within = watch.connect_timeout
    deadline = time.monotonic() + within
    # Asynchronous, so that no wait is left to libpq: its connect_timeout ends a connection
    # attempt, but nothing ends a query a pooler keeps queued.
    other = psycopg2.connect(**kwargs, async_=1)
    try:
        _await(other, deadline, watch)
        with other.cursor() as cursor:
            cursor.execute("BEGIN; SELECT pg_backend_pid()")
            _await(other, deadline, watch)
            row = cursor.fetchone()
        yield row[0] if row else None
        # A pooler keeps a server session whose client ended its transaction; the check is done
        # either way, so this is attempted, not awaited at any cost.
        with contextlib.suppress(psycopg2.Error, pooler.NoServerSession), other.cursor() as cursor:
            cursor.execute("ROLLBACK")
            _await(other, time.monotonic() + within, watch)
    finally:
        other.close()


def _await(connection: Any, deadline: float, watch: Watch) -> None:
    """Until an asynchronous connection's connect or query is done; pooler.NoServerSession past `deadline`."""
    poller = select.poll()
    while (state := connection.poll()) != psycopg2.extensions.POLL_OK:
        acted = watch.acted()
        if acted is not None:
            raise acted
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise pooler.NoServerSession(watch.connect_timeout)
        poller.register(
            connection.fileno(), select.POLLIN if state == psycopg2.extensions.POLL_READ else select.POLLOUT
        )
        poller.poll(min(remaining, _HELD_SESSION_POLL_SECONDS) * 1000)
        poller.unregister(connection.fileno())


# A session the server shows idle for this long while fanout still waits for its answer lost that answer.
IDLE_PROOF_SECONDS = 2.0


def session_alive(kwargs: dict[str, Any], backend_pid: int) -> bool:
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
    return state is None or state == "active" or idle_for is None or idle_for < IDLE_PROOF_SECONDS


class TrackedConnection(psycopg2.extensions.connection):
    """Knows since when it waits for the server: the watchdog's cue to check the session is alive."""

    busy_since: float | None = None
    # Which of yoyo's and fanout's tables the last tenant schema read on this connection held
    # (the plan's guess for the next one; readonly.ReadOnlySession).
    shape: Shape | None = None

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


class TrackedCursor(psycopg2.extensions.cursor):
    def execute(self, query: Any, vars: Any = None) -> None:
        connection = self.connection
        if not isinstance(connection, TrackedConnection):
            super().execute(query, vars)
            return
        connection.busy_since = time.monotonic()
        try:
            super().execute(query, vars)
        finally:
            connection.busy_since = None


class Watch:
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
        if not self._options.liveness_check or not isinstance(connection, TrackedConnection):
            return
        self.handle.alive = lambda: session_alive(kwargs, backend_pid)
        self.handle.check_every = self._options.liveness_check
        self.handle.busy = lambda: connection.busy_since

    @property
    def connect_timeout(self) -> float:
        return self._options.connect_timeout

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
        return self.acted() or classify_database_error(error, otherwise=otherwise)

    def acted(self) -> EngineError | None:
        """What the watchdog did to the connection, as the target's error (None: nothing)."""
        return watchdog_verdict(
            self.handle,
            grace=self._watchdog.grace,
            target_timeout=self._options.target_timeout,
            cancel="a cancel request",
            still_working="still working: cancelled and rolled back",
        )


def watched_session(kwargs: dict[str, Any], options: RunOptions, interrupt: Interrupt) -> tuple[Any, Watch]:
    """An autocommit session under the run's watchdog, for the statements outside a run (unlock,
    CREATE DATABASE): an answer awaited past the liveness check is checked for on a second
    connection, and the second signal cancels the statement in flight.

    The check asks about the server process the session's first query reports: through a
    session-mode pool, libpq's is the pooler's. Raises psycopg2.Error when it cannot connect,
    EngineError when that first query fails.
    """
    connection = psycopg2.connect(**kwargs, connection_factory=TrackedConnection)
    connection.cursor_factory = TrackedCursor
    connection.autocommit = True
    watch = Watch(connection, interrupt, options, None)
    watch.check_liveness(connection, kwargs, connection.get_backend_pid())  # until the server says its own
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            row = cursor.fetchone()
    except psycopg2.Error as e:
        watch.release()
        connection.close()
        raise watch.classify(e) from None
    watch.check_liveness(connection, kwargs, int(row[0]) if row else connection.get_backend_pid())
    return connection, watch


def connection_lost(error: psycopg2.Error) -> bool:
    return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)) and error.pgcode is None


# libpq's words for a connection string it cannot use; retrying would fail the same way.
CONFIGURATION_MESSAGES = ("invalid connection option", "invalid sslmode value", "invalid dsn", "invalid value for",
                           "invalid integer value", "invalid port number")  # fmt: skip


def classify_connect_error(error: psycopg2.Error, target: Target) -> EngineError:
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
    elif any(m in lowered for m in CONFIGURATION_MESSAGES) or isinstance(error, psycopg2.ProgrammingError):
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


def classify_database_error(error: psycopg2.Error, *, otherwise: ErrorKind = ErrorKind.DATABASE) -> EngineError:
    """`otherwise` is the kind of an error that is neither a lost connection nor a timeout."""
    if connection_lost(error) and "timed out" in error_line(error).lower():
        # Keepalives or tcp_user_timeout gave up on the peer: retrying would wait as long again.
        return EngineError(TargetError(ErrorKind.UNRESPONSIVE, f"the shard stopped answering: {error_line(error)}"))
    if connection_lost(error):
        return EngineError(TargetError(ErrorKind.UNREACHABLE, f"connection lost: {error_line(error)}"), retryable=True)
    kind = SQLSTATE_KINDS.get(error.pgcode or "", otherwise)
    return EngineError(TargetError(kind, pg_message(error)), retryable=error.pgcode in RETRYABLE_SQLSTATES)


def pg_message(error: psycopg2.Error) -> str:
    primary = getattr(getattr(error, "diag", None), "message_primary", None) or error_line(error)
    code = f" [{error.pgcode}]" if error.pgcode else ""
    return f"{primary}{code}"


# What a fresh connection has, restored before each migration and before fanout's own
# statements on a connection a migration has used. DISCARD ALL would do the same in one
# statement but also runs pg_advisory_unlock_all(), which would drop the shard lock, and it
# cannot run inside the transaction the next migration's message opens. RESET ALL restores
# the values a new session starts with (server, database and role defaults, startup
# parameters such as application_name); fanout's own settings are set again after it.
IDLE = psycopg2.extensions.TRANSACTION_STATUS_IDLE
FRESH_SESSION = (
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
ORIGINAL_ROLE = ("SET SESSION AUTHORIZATION DEFAULT", "RESET ROLE")
# The time a migration finished: evaluated by the server when the recording rows are
# inserted, after the migration's statements, even when all of it is one message.
FINISHED_AT = psycopg2.extensions.AsIs("(clock_timestamp() AT TIME ZONE 'UTC')")


def settings_sql(
    connection: Any, schema: str | None, settings: SessionSettings, *, watch: bool, local: bool = False
) -> list[str]:
    """fanout's settings for a shard session, then the environment's, as statements.

    `local`: SET LOCAL, for a message whose implicit transaction is all the session there is.

    `watch`: make the server notice a dead runner within a second, even mid-statement
    (PostgreSQL 14+); otherwise a runner killed during a long migration keeps its
    transaction, and with it the shard lock, until the statement ends.
    """
    statements: list[sql.Composable] = []
    set_ = sql.SQL("SET LOCAL" if local else "SET")
    if schema:
        statements.append(sql.SQL("{} search_path TO {}").format(set_, sql.Identifier(schema)))
    for name in ("lock_timeout", "statement_timeout"):
        value = getattr(settings, name)
        if value is not None:
            statements.append(sql.SQL("{} {} = {}").format(set_, sql.Identifier(name), sql.Literal(value)))
    if watch:
        statements.append(
            sql.SQL("{} client_connection_check_interval = {}").format(set_, sql.Literal(CLIENT_CHECK_INTERVAL))
        )
    for name, value in settings.settings:
        setting = sql.SQL(".").join(sql.Identifier(part) for part in name.split("."))
        statements.append(sql.SQL("{} {} = {}").format(set_, setting, sql.Literal(value)))
    return [statement.as_string(connection) for statement in statements]


def one_message(statements: Sequence[str]) -> str:
    """Statements as one simple-query message (one round trip); a newline before each ';' ends -- comments."""
    return "\n;\n".join(statements)
