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
- Errors are classified in `connection` (lost connection, lock timeout, serialization failure,
  deadlock: retryable; the rest is the migration's own fault); the runner retries.

Modules: `connection` (connecting, the pooler check, the watchdog, classification, a fresh
session's statements), `migrations` (a migration as statements; what a shard holds of
one), `readonly` (the plan session), `session` (the apply session, through yoyo).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import psycopg2
import psycopg2.errors
from psycopg2 import sql

from fanout.config import TcpSettings
from fanout.directory import DEFAULT_TCP, Target
from fanout.engines import EngineError, Session, UnlockResult
from fanout.engines.connections import Connections
from fanout.engines.postgres import locking
from fanout.engines.postgres.connection import (
    APPLICATION_NAME,
    classify_connect_error,
    connect_kwargs,
    pg_message,
    watched_session,
)
from fanout.engines.postgres.migrations import MIGRATION_TABLE
from fanout.engines.postgres.readonly import ReadOnlySession
from fanout.engines.postgres.session import YoyoSession
from fanout.errors import TargetFailed
from fanout.interrupt import Interrupt
from fanout.options import RunOptions
from fanout.report import Mode

__all__ = [
    "APPLICATION_NAME", "MIGRATION_TABLE", "NAME", "RESOLVING", "SESSION_SETTINGS", "connection_key",
    "ensure_database", "open_session", "unlock",
]  # fmt: skip

NAME = "PostgreSQL"
SESSION_SETTINGS = True  # set on every session, after fanout's own (connection.settings_sql)
# A migration is one transaction or, when it is not, in doubt as a whole (fanout mark/unmark settle it).
RESOLVING = False

# How long unlock waits for a row lock on yoyo's lock table when the environment sets no lock_timeout.
UNLOCK_LOCK_TIMEOUT = "10s"


def ensure_database(
    target: Target,
    *,
    connect_timeout: float = 10.0,
    maintenance_db: str = "postgres",
    tcp: TcpSettings = DEFAULT_TCP,
    interrupt: Interrupt | None = None,
) -> bool:
    """Create the target's database when it does not exist; True when it was created.

    Connects to the server's maintenance database with the target's own credentials, so the
    role needs CREATEDB. Safe when two bootstraps race: the loser sees the database exist.
    Watched as a run's session (the liveness check, `interrupt`'s second signal): a server
    gone silent fails it instead of holding the command.
    """
    options = RunOptions(mode=Mode.APPLY, connect_timeout=connect_timeout, tcp=tcp)
    maintenance = replace(target, dbname=maintenance_db)
    kwargs = connect_kwargs(maintenance, options, "bootstrap")
    failure = f"cannot create database {target.dbname!r} on {target.server}"
    try:
        connection, watch = watched_session(kwargs, options, interrupt or Interrupt())
    except psycopg2.Error as e:
        raise TargetFailed(classify_connect_error(e, maintenance).error.message) from None
    except EngineError as e:
        raise TargetFailed(f"{failure}: {e.error.message}") from None
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
        acted = watch.acted()
        raise TargetFailed(f"{failure}: {acted.error.message if acted else pg_message(e)}") from None
    finally:
        watch.release()
        connection.close()


def connection_key(target: Target, options: RunOptions, run_id: str) -> str:
    """The database a connection is to: everything in its connection parameters but the schema."""
    kwargs = connect_kwargs(target, options, run_id, read_only=options.mode is Mode.PLAN)
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
    interrupt: Interrupt,
) -> UnlockResult:
    """Remove the target's migration lock by hand (see locking.unlock); never raises for the target's trouble.

    `lock_timeout` (the environment's, else UNLOCK_LOCK_TIMEOUT) bounds the wait for a row lock
    on the lock table: a session stopped inside its acquisition keeps one until it ends. An
    answer awaited longer than the liveness check is checked for as in a run, and a second
    signal cancels the statement in flight: a shard gone silent cannot keep unlock waiting.
    """
    options = RunOptions(mode=Mode.APPLY, connect_timeout=connect_timeout, tcp=tcp)
    kwargs = connect_kwargs(target, options, "unlock")
    try:
        connection, watch = watched_session(kwargs, options, interrupt)
    except psycopg2.Error as e:
        return UnlockResult(target.id, target.display, None, None, classify_connect_error(e, target).error.message)
    except EngineError as e:
        return UnlockResult(target.id, target.display, None, None, e.error.message)
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
        acted = watch.acted()
        return UnlockResult(target.id, target.display, None, None, acted.error.message if acted else pg_message(e))
    finally:
        watch.release()
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
        return ReadOnlySession(target, options, run_id, interrupt, deadline, connections)
    return YoyoSession(target, options, run_id, interrupt, deadline, connections)
