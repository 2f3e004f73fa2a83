"""By hand, on a MySQL/MariaDB shard: remove the migration lock (`fanout unlock`), create the database (`bootstrap`)."""

from __future__ import annotations

import time
from contextlib import suppress
from typing import Any

import pymysql
import pymysql.err

from fanout.directory import Target
from fanout.engines.mysql.core import Timeouts, classify, connect, engine_error, lock_name
from fanout.locking import (
    LOG_TABLE as LOCK_LOG_TABLE,
    OWNER_TABLE,
    TERMINATE_WAIT_SECONDS,
    WHO,
    YOYO_LOCK_TABLE,
    Unlock,
    UnlockOutcome,
    rows_removed,
)
from fanout.report import ErrorKind, LockHolder, TargetError
from fanout.secret import register

_POLL_SECONDS = 0.2


def create_database(target: Target, *, connect_timeout: float = 10.0) -> bool:
    """CREATE DATABASE when the target's database does not exist; True when it was created.

    Connects without a database, with the target's own credentials (the user needs CREATE).
    Refuses a name it could not quote safely; safe when two bootstraps race.
    """
    name = target.dbname
    if not name or len(name) > 64 or any(c in name for c in "`\x00/\\.") or name != name.rstrip():
        raise engine_error(
            TargetError(ErrorKind.DATABASE, f"cannot create database {name!r}: not a name fanout quotes safely")
        )
    if target.password is not None:
        register(target.password.reveal())
    connection = connect(target, Timeouts(connect=connect_timeout, read=60.0), database=False)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (name,))
            if cursor.fetchone():
                return False
            created = cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
            return bool(created)  # 0 rows (and a warning) when a concurrent bootstrap created it first
    except pymysql.err.MySQLError as e:
        error = classify(e)
        raise engine_error(
            TargetError(error.kind, f"cannot create database {name!r} on {target.server}: {error.message}")
        ) from None
    finally:
        with suppress(pymysql.err.Error):
            connection.close()


def unlock_database(target: Target, *, force: bool, terminate: str | None, connect_timeout: float = 10.0,
                    lock_timeout: float = 10.0) -> Unlock:  # fmt: skip
    """Remove the lock by hand, with PostgreSQL's semantics (fanout/engines/postgres/locking.py's `unlock`).

    Refuses while a holder may be alive: GET_LOCK held by a session (a fanout holder), or
    other sessions on the database (a plain yoyo lock records no session). `force` removes
    the rows anyway; `terminate` (a reason) KILLs the session holding GET_LOCK first, waits
    for it to end, then removes the rows. Logged in fanout_lock_log.
    """
    if target.password is not None:
        register(target.password.reveal())
    connection = connect(target, Timeouts(connect=connect_timeout, read=60.0))
    try:
        with connection.cursor() as cursor:
            wait = max(1, round(lock_timeout))
            cursor.execute(f"SET SESSION lock_wait_timeout = {wait}, SESSION innodb_lock_wait_timeout = {wait}")
            return _unlock(connection, cursor, lock_name(target.dbname), force=force, terminate=terminate)
    except pymysql.err.MySQLError as e:
        raise engine_error(classify(e)) from None
    finally:
        with suppress(pymysql.err.Error):
            connection.close()


def _unlock(connection: Any, cursor: Any, name: str, *, force: bool, terminate: str | None) -> Unlock:
    cursor.execute(
        "SELECT `table_name` FROM information_schema.tables WHERE `table_schema` = DATABASE() AND `table_name` IN "
        "(%s, %s)",
        (YOYO_LOCK_TABLE, OWNER_TABLE),
    )
    tables = {str(row[0]) for row in cursor.fetchall()}
    if YOYO_LOCK_TABLE not in tables:
        return Unlock(UnlockOutcome.NOT_LOCKED, None, "never migrated")
    holder = _holder(cursor, tables)
    holding = _lock_holder(cursor, name)
    if holder is None and holding is None:
        return Unlock(UnlockOutcome.NOT_LOCKED, None, "not locked")
    hidden = 0
    if holder is None:
        reason = f"no lock row, but connection {holding} holds fanout's GET_LOCK"
    elif holding is not None:
        reason = f"the holder's session (connection {holding}) is alive"
    elif holder.run_id is None:
        others = _other_sessions(cursor)
        reason = f"plain yoyo lock; {others} other session(s) connected to this database" if others else ""
    else:
        reason = ""
    terminated = None
    if terminate is not None and reason:
        if holding is None:
            return Unlock(
                UnlockOutcome.REFUSED, holder,
                f"{reason}; a plain yoyo lock records no session, so --terminate cannot tell which session to end "
                "(--force removes the row)",
            )  # fmt: skip
        try:
            cursor.execute(f"KILL {int(holding)}")
        except pymysql.err.MySQLError as e:
            return Unlock(
                UnlockOutcome.REFUSED, holder, f"{reason}; could not end connection {holding}: {classify(e).message}",
                advisory_holder=holding,
            )  # fmt: skip
        terminated = holding
        until = time.monotonic() + TERMINATE_WAIT_SECONDS
        while _lock_holder(cursor, name) == holding and time.monotonic() < until:
            time.sleep(_POLL_SECONDS)
    elif reason and not force:
        return Unlock(
            UnlockOutcome.REFUSED, holder,
            reason + " (--force removes the rows anyway; --terminate ends a fanout holder's session)",
            advisory_holder=holding,
        )  # fmt: skip
    action = "terminated" if terminated else "forced" if reason else "released"
    deleted = _delete_rows(connection, cursor, holder, action, terminate, terminated)
    still = _lock_holder(cursor, name)
    return rows_removed(
        holder, reason, deleted=deleted, still=still, terminated=terminated, hidden=hidden,
        session="connection", lock="GET_LOCK",
    )  # fmt: skip


def _holder(cursor: Any, tables: set[str]) -> LockHolder | None:
    cursor.execute(f"SELECT `pid`, `ctime` FROM `{YOYO_LOCK_TABLE}`")
    row = cursor.fetchone()
    if row is None:
        return None
    if OWNER_TABLE in tables:
        cursor.execute(f"SELECT `host`, `run_id`, `ctime` FROM `{OWNER_TABLE}` WHERE `pid` = %s", (row[0],))
        owner = cursor.fetchone()
        if owner is not None:
            return LockHolder(pid=row[0], since=owner[2], host=owner[0], run_id=owner[1])
    return LockHolder(pid=row[0], since=row[1])


def _lock_holder(cursor: Any, name: str) -> int | None:
    cursor.execute("SELECT IS_USED_LOCK(%s)", (name,))
    row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else None


def _other_sessions(cursor: Any) -> int:
    """Other sessions on this database that this user can see (all of them with the PROCESS privilege)."""
    cursor.execute(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE `DB` = DATABASE() AND `ID` <> CONNECTION_ID()"
    )
    return int(cursor.fetchone()[0])


def _delete_rows(
    connection: Any, cursor: Any, holder: LockHolder | None, action: str, reason: str | None, terminated: int | None
) -> int:
    """Delete the holder's rows and log what was done, in one transaction; the yoyo_lock rows deleted."""
    if holder is None and terminated is None:
        return 0
    cursor.execute(
        f"CREATE TABLE IF NOT EXISTS `{LOCK_LOG_TABLE}` (`id` BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, "
        "`action` VARCHAR(32) NOT NULL, `holder_pid` INT NULL, `run_id` VARCHAR(64) NULL, `host` VARCHAR(255) NULL, "
        "`terminated_backend_pid` BIGINT NULL, `reason` TEXT NULL, `by` VARCHAR(255) NOT NULL, "
        "`at` DATETIME(6) NOT NULL) ENGINE=InnoDB"
    )
    cursor.execute("START TRANSACTION")
    try:
        deleted = 0
        if holder is not None:
            cursor.execute(f"DELETE FROM `{YOYO_LOCK_TABLE}` WHERE `pid` = %s", (holder.pid,))
            deleted = int(cursor.rowcount)
            if holder.run_id is not None:
                cursor.execute(f"DELETE FROM `{OWNER_TABLE}` WHERE `run_id` = %s", (holder.run_id,))
        cursor.execute(
            f"INSERT INTO `{LOCK_LOG_TABLE}` (`action`, `holder_pid`, `run_id`, `host`, `terminated_backend_pid`, "
            "`reason`, `by`, `at`) VALUES (%s, %s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))",
            (action, holder.pid if holder else None, holder.run_id if holder else None,
             holder.host if holder else None, terminated, reason, WHO),
        )  # fmt: skip
        cursor.execute("COMMIT")
    except BaseException:
        with suppress(pymysql.err.MySQLError):
            connection.rollback()
        raise
    return deleted
