"""MySQL and MariaDB shards, behind the same session as PostgreSQL ones.

MySQL and MariaDB commit implicitly at every DDL statement, so a migration cannot commit
atomically with the row recording it, and a crash in the middle leaves a shard between
two statements. fanout therefore records its progress statement by statement in
`fanout_progress`: a DDL statement is marked `started` (committed) before it runs and
`done` (committed) after; a DML statement runs in one transaction with its `done` mark.
A `started` mark found later names the one statement that may or may not have taken
effect: it is never run again and never skipped silently; `resolve` records the
operator's answer and `apply` continues. A migration made only of DML runs in one
transaction with its yoyo records and checksum, as on PostgreSQL. A rollback runs its
`.rollback.sql` the same way.

The lock is yoyo's own `yoyo_lock` row (so fanout and plain yoyo exclude each other),
taken while holding a session-scoped `GET_LOCK`: the server releases it the moment the
session ends, which proves a holder gone, so a `yoyo_lock` row left by a dead fanout
(with its `fanout_lock` owner row) is broken automatically. A row without an owner row
belongs to plain yoyo and is never broken automatically.

Modules: `core` (endpoints, settings, error classification, statements, table shapes),
`session` (the apply session and the read-only one), `admin` (unlock, bootstrap).
"""

from __future__ import annotations

import os

from fanout.config import TcpSettings
from fanout.directory import Target
from fanout.engines import EngineError, Session, UnlockResult
from fanout.engines.connections import Connections
from fanout.engines.mysql.admin import create_database, unlock_database
from fanout.engines.mysql.core import (
    Endpoint,
    Flavor,
    InDoubtError,
    Settings,
    StatementInDoubt,
    Timeouts,
    classify,
    flavor_of,
    migration_statements,
    settings_from,
    settings_sql,
    statements,
)
from fanout.engines.mysql.readonly import ReadOnlySession
from fanout.engines.mysql.session import MySQLSession
from fanout.engines.mysql.watch import Watching
from fanout.errors import TargetFailed
from fanout.interrupt import Interrupt
from fanout.locking import Owner
from fanout.options import RunOptions, seconds
from fanout.report import ErrorKind, Mode, TargetError

NAME = "MySQL/MariaDB"
# `[session]` holds PostgreSQL settings, whose names and values MySQL does not share: none is sent
# (its lock and statement limits come from [runner], translated in core.settings_from).
SESSION_SETTINGS = False
RESOLVING = True  # progress is recorded statement by statement (fanout_progress): MySQLSession.resolve_statement
WRITE_SECONDS = 60.0  # a request the server does not take within this is a dead connection
UNLOCK_LOCK_SECONDS = 10.0  # unlock's wait for a row lock on the lock table when the environment sets none


def open_session(
    target: Target,
    options: RunOptions,
    run_id: str,
    interrupt: Interrupt,
    deadline: float | None = None,
    connections: Connections | None = None,
) -> Session:
    """A session on a MySQL/MariaDB target: read-only in plan mode (creates nothing, takes no lock), else applying."""
    try:
        settings = settings_from(options.session.lock_timeout, options.session.statement_timeout)
    except ValueError as e:
        raise EngineError(TargetError(ErrorKind.DATABASE, f"[session]: {e}")) from None
    timeouts = Timeouts(connect=options.connect_timeout, read=None, write=WRITE_SECONDS)
    watching = Watching(interrupt, deadline, options.target_timeout, options.liveness_check, options.tcp)
    if options.mode is Mode.PLAN:
        return ReadOnlySession(target, settings=settings, timeouts=timeouts, watching=watching, connections=connections)
    owner = Owner(pid=os.getpid(), run_id=run_id)
    return MySQLSession(target, owner, settings=settings, timeouts=timeouts, watching=watching, connections=connections)


def ensure_database(
    target: Target, *, connect_timeout: float = 10.0, tcp: TcpSettings | None = None, interrupt: Interrupt | None = None
) -> bool:
    """bootstrap --create-database: CREATE DATABASE when missing; True when created. Raises TargetFailed.

    Each answer is awaited at most the connection's read timeout (60 s); `interrupt` is the
    protocol's (PostgreSQL's acts on the second signal).
    """
    try:
        return create_database(target, connect_timeout=connect_timeout)
    except EngineError as e:
        raise TargetFailed(e.error.message) from None


def unlock(
    target: Target,
    *,
    force: bool,
    terminate: str | None,
    connect_timeout: float,
    tcp: TcpSettings | None = None,
    lock_timeout: str | None = None,
    interrupt: Interrupt | None = None,
) -> UnlockResult:
    """Remove the target's migration lock by hand (see admin.unlock_database); never raises for the target's trouble.

    Each answer is awaited at most the connection's read timeout (60 s); a second signal does
    not cut it (`interrupt` is the protocol's: PostgreSQL's unlock acts on it).
    """
    try:
        wait = seconds(lock_timeout) or UNLOCK_LOCK_SECONDS
        done = unlock_database(target, force=force, terminate=terminate, connect_timeout=connect_timeout,
                               lock_timeout=wait)  # fmt: skip
    except ValueError as e:
        return UnlockResult(target.id, target.display, None, None, f"[session] lock_timeout: {e}")
    except EngineError as e:
        return UnlockResult(target.id, target.display, None, None, e.error.message)
    return UnlockResult(
        target.id, target.display, done.outcome, done.holder, done.reason, done.rows_deleted, done.advisory_holder,
        done.terminated, done.hidden_sessions,
    )  # fmt: skip


def connection_key(target: Target, options: RunOptions, run_id: str) -> str:
    """Targets sharing a key may share a connection; MySQL sessions are never handed on, so each has its own."""
    return f"mysql {target.host.lower()}:{target.port}/{target.dbname} {target.user or ''}"


__all__ = [
    "NAME",
    "RESOLVING",
    "SESSION_SETTINGS",
    "Endpoint",
    "Flavor",
    "InDoubtError",
    "MySQLSession",
    "ReadOnlySession",
    "Settings",
    "StatementInDoubt",
    "Timeouts",
    "Watching",
    "classify",
    "connection_key",
    "ensure_database",
    "flavor_of",
    "migration_statements",
    "open_session",
    "settings_from",
    "settings_sql",
    "statements",
    "unlock",
    "unlock_database",
]
