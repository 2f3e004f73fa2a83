"""The shard lock on PostgreSQL (what it is: `fanout/locking.py`).

The server's lock is an advisory lock keyed on the schema, held by fanout's session while
it holds yoyo's row. Every function takes a psycopg2 connection in autocommit mode, except
`read_holder`, which only reads and works inside a read-only transaction, and the schema
that holds the lock tables: every name is qualified with it and the advisory lock is keyed
on it, so nothing a migration does to the session (`SET search_path`, `set_config`) can
move fanout's statements to other tables or another lock.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.errors

# The shared names, re-exported: the engine's modules use this one module for both.
from fanout.locking import (
    LOG_TABLE as LOG_TABLE,
    OWNER_TABLE as OWNER_TABLE,
    TERMINATE_WAIT_SECONDS as TERMINATE_WAIT_SECONDS,
    WHO as WHO,
    YOYO_LOCK_TABLE as YOYO_LOCK_TABLE,
    Attempt as Attempt,
    Owner as Owner,
    Unlock as Unlock,
    UnlockOutcome as UnlockOutcome,
    rows_removed,
)
from fanout.report import LockHolder

# Advisory lock keys: (namespace, hashtext(schema)). One namespace for the held lock,
# another to serialize the creation of the lock tables by concurrent runners. The schema
# is the one the session started in (its current_schema()), as in earlier versions,
# which computed the key from current_schema() on every call.
_HELD = 1717661295  # "fano"
_SETUP = 1717661296
log = logging.getLogger(__name__)
# Test-only: seconds to sleep before each message of the lock's acquisition and release, so a
# test can prove that no interleaving with a plain yoyo lets both believe they hold the lock.
PAUSE_VARIABLE = "FANOUT_TEST_LOCK_PAUSE"
_PAUSE = float(os.environ.get(PAUSE_VARIABLE) or 0)


# PostgreSQL 16 takes a column's storage in CREATE TABLE. A table whose variable-length columns
# are all PLAIN gets no TOAST table and index: half the relations (and about half the server
# time) of creating fanout's small bookkeeping tables in each of thousands of tenant schemas.
# Their values are short (names, ids, digests), far below the 8 kB a PLAIN row may hold.
PLAIN_STORAGE_SINCE = 160000


def inline_text(connection: Any) -> str:
    """The type of fanout's short text columns: kept inline (no TOAST table) where the server takes it."""
    return "TEXT STORAGE PLAIN" if connection.server_version >= PLAIN_STORAGE_SINCE else "TEXT"


def create_tables(connection: Any, schema: str, *, create_schema: bool, extra: Sequence[str] = ()) -> None:
    """Create the schema (for schema-per-tenant targets), both lock tables and `extra` ones, once, race-free."""
    setup = [*create_once_sql(connection, schema)]
    if create_schema:
        setup.append(f"CREATE SCHEMA IF NOT EXISTS {_quote(schema)}")
    text = inline_text(connection)
    setup += [
        f"CREATE TABLE IF NOT EXISTS {qualified(schema, YOYO_LOCK_TABLE)} "
        '("locked" INT DEFAULT 1, "ctime" TIMESTAMP, "pid" INT NOT NULL, PRIMARY KEY ("locked"))',
        f"CREATE TABLE IF NOT EXISTS {qualified(schema, OWNER_TABLE)} ("
        f'"locked" INT DEFAULT 1 PRIMARY KEY, "pid" INT NOT NULL, "ctime" TIMESTAMP NOT NULL, '
        f'"host" {text} NOT NULL, "run_id" {text} NOT NULL, "backend_pid" INT NOT NULL)',
        *extra,
    ]
    in_one_transaction(connection, setup)


def create_once_sql(connection: Any, schema: str) -> list[str]:
    """What a transaction that creates fanout's tables in `schema` starts with.

    Concurrent runners would otherwise race inside CREATE ... IF NOT EXISTS and one would
    fail on the catalog's unique index; the transaction-scoped advisory lock orders them.
    A plain yoyo creating `yoyo_lock` at the same instant can still collide; the caller retries.
    """
    with connection.cursor() as cursor:
        return [cursor.mogrify("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_SETUP, schema)).decode()]


def try_acquire(connection: Any, me: Owner, schema: str) -> Attempt:
    """Take the shard lock if it is free or provably stale; never waits.

    Nothing is deleted that was not read under this transaction's row lock: a free lock is
    taken by a bare INSERT, so a plain yoyo that inserts its row after our read makes the
    INSERT fail on the primary key (or wait for yoyo's commit, then fail) instead of losing
    its row to an unconditional DELETE while both believe they hold the lock.
    """
    lock_table, owner_table = qualified(schema, YOYO_LOCK_TABLE), qualified(schema, OWNER_TABLE)
    with connection.cursor() as cursor:
        _send(cursor, "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_HELD, schema))
        row = cursor.fetchone()
        if not row or not row[0]:
            return Attempt(False, holder=_current_holder(cursor, schema, alive=True))
        try:
            holder = _current_holder(cursor, schema, alive=False, for_update=True, after="BEGIN")
            if holder is not None and holder.run_id is None:
                _send(cursor, "ROLLBACK")
                _unlock_advisory(cursor, schema)
                return Attempt(False, holder=holder)  # plain yoyo: alive or not, nothing proves it
            # Either free, or held by a fanout session that has ended (we hold its advisory lock).
            since = me.since or datetime.now(UTC).replace(tzinfo=None)
            take = []
            if holder is not None:
                # Exactly the row read FOR UPDATE above (it cannot have changed since).
                take.append(
                    cursor.mogrify(
                        f'DELETE FROM {lock_table} WHERE "pid" = %s AND "ctime" IS NOT DISTINCT FROM %s',
                        (holder.pid, holder.since),
                    ).decode()
                )
            take += [
                # Owner rows are written only under the advisory lock we now hold: any left is stale.
                f"DELETE FROM {owner_table}",
                cursor.mogrify(
                    f'INSERT INTO {lock_table} ("locked", "ctime", "pid") VALUES (1, %s, %s)', (since, me.pid)
                ).decode(),
                cursor.mogrify(
                    f'INSERT INTO {owner_table} ("pid", "ctime", "host", "run_id", "backend_pid") '
                    "VALUES (%s, %s, %s, %s, pg_backend_pid())",
                    (me.pid, since, me.host, me.run_id),
                ).decode(),
                "COMMIT",
            ]
            _send(cursor, ";\n".join(take))
        except psycopg2.errors.UniqueViolation:
            # A plain yoyo inserted its row between our read and our insert: it holds the lock.
            cursor.execute("ROLLBACK")
            _unlock_advisory(cursor, schema)
            return Attempt(False, holder=None)
        except BaseException:
            _rollback_quietly(connection)
            raise
        return Attempt(True, broken=holder)


def release(connection: Any, me: Owner, schema: str, *, before: Sequence[str] = ()) -> None:
    """Give the lock back: both rows in one transaction, then the advisory lock (one round trip).

    `before` goes first in the same message (the caller's session reset).
    """
    with connection.cursor() as cursor:
        statements = [
            cursor.mogrify(f'DELETE FROM {qualified(schema, YOYO_LOCK_TABLE)} WHERE "pid" = %s', (me.pid,)).decode(),
            cursor.mogrify(
                f'DELETE FROM {qualified(schema, OWNER_TABLE)} WHERE "pid" = %s AND "run_id" = %s', (me.pid, me.run_id)
            ).decode(),
        ]
        unlock = cursor.mogrify("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_HELD, schema)).decode()
    _pause()
    in_one_transaction(connection, statements, before=before, then=unlock)


def taken_sql(schema: str) -> str:
    """An expression: whether yoyo's lock row is there (held, or left behind); `read_holder` says by whom."""
    return f"EXISTS (SELECT 1 FROM {qualified(schema, YOYO_LOCK_TABLE)})"


def read_holder(connection: Any, schema: str) -> LockHolder | None:
    """The current holder, with whether its session is alive (None for plain yoyo: unknowable).

    The caller has seen that `yoyo_lock` exists (plan folds that into its first query).
    """
    with connection.cursor() as cursor:
        return _current_holder(cursor, schema, alive=None)


def unlock(connection: Any, schema: str, *, force: bool, terminate: str | None = None) -> Unlock:
    """Remove the lock by hand. Refuses while the holder may be alive, unless `force` or `terminate`.

    `terminate` (a reason) ends the session that holds fanout's advisory lock (the holder's
    recorded server process) with pg_terminate_backend, waits for it to be gone, then removes
    the rows; logged with the reason in fanout_lock_log. A plain yoyo lock records no server
    process, so it can only be forced. A holder is called gone only on evidence this role
    can see: pg_locks for a fanout holder; for plain yoyo, no other session on the database,
    counting those of other roles that pg_stat_activity hides from it.
    """
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (qualified(schema, YOYO_LOCK_TABLE),))
        row = cursor.fetchone()
        if not row or not row[0]:
            return Unlock(UnlockOutcome.NOT_LOCKED, None, "never migrated")
        holder = _current_holder(cursor, schema, alive=None)
        advisory = _advisory_holder(cursor, schema)
        if holder is None and advisory is None:
            return Unlock(UnlockOutcome.NOT_LOCKED, None, "not locked")
        hidden = 0
        if holder is None:
            reason = f"no lock row, but server pid {advisory} holds fanout's advisory lock"
        elif holder.alive is True:
            reason = f"the holder's session (server pid {advisory}) is alive"
        elif holder.alive is None:
            visible, hidden = _other_sessions(cursor)
            parts = []
            if visible:
                parts.append(f"{visible} other session(s) connected to this database")
            if hidden:
                parts.append(
                    f"{hidden} session(s) of other roles whose details this role cannot see (it lacks "
                    "pg_read_all_stats): the holder may be one of them"
                )
            reason = f"plain yoyo lock; {'; '.join(parts)}" if parts else ""
        else:
            reason = ""
        terminated = None
        if terminate is not None and reason:
            if advisory is None:
                return Unlock(
                    UnlockOutcome.REFUSED, holder,
                    f"{reason}; a plain yoyo lock records no server process, so --terminate cannot tell which "
                    "session to end (--force removes the row)", hidden_sessions=hidden,
                )  # fmt: skip
            try:
                terminated = _terminate(cursor, advisory, schema)
            except psycopg2.Error as e:
                message = getattr(getattr(e, "diag", None), "message_primary", None) or str(e).strip()
                return Unlock(
                    UnlockOutcome.REFUSED, holder, f"{reason}; could not end server pid {advisory}: {message}",
                    advisory_holder=advisory, hidden_sessions=hidden,
                )  # fmt: skip
        elif reason and not force:
            return Unlock(
                UnlockOutcome.REFUSED, holder, reason + " (--force removes the rows anyway; --terminate ends a "
                "fanout holder's session)", advisory_holder=advisory, hidden_sessions=hidden,
            )  # fmt: skip
        action = "terminated" if terminated else "forced" if reason else "released"
        deleted = _delete_rows(connection, cursor, schema, holder, action, terminate, terminated)
        still = _advisory_holder(cursor, schema)
        return rows_removed(
            holder, reason, deleted=deleted, still=still, terminated=terminated, hidden=hidden,
            session="server pid", lock="advisory lock",
        )  # fmt: skip


def _delete_rows(
    connection: Any,
    cursor: Any,
    schema: str,
    holder: LockHolder | None,
    action: str,
    reason: str | None,
    terminated: int | None,
) -> int:
    """Delete the holder's rows (if any) and log what was done, in one transaction; the yoyo_lock rows deleted."""
    if holder is None and terminated is None:
        return 0
    logged = True
    try:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {qualified(schema, LOG_TABLE)} ("
            '"id" BIGSERIAL PRIMARY KEY, "action" TEXT NOT NULL, "holder_pid" INT, "run_id" TEXT, '
            '"host" TEXT, "terminated_backend_pid" INT, "reason" TEXT, "by" TEXT NOT NULL, "at" TIMESTAMP NOT NULL)'
        )
    except psycopg2.Error as e:
        logged = False
        log.warning("cannot log the unlock in %s: %s", LOG_TABLE, str(e).strip())
    cursor.execute("BEGIN")
    try:
        deleted = 0
        if holder is not None:
            cursor.execute(
                f'DELETE FROM {qualified(schema, YOYO_LOCK_TABLE)} WHERE "pid" = %s AND "ctime" IS NOT DISTINCT FROM %s',
                (holder.pid, holder.since),
            )
            deleted = int(cursor.rowcount)
        if holder is not None and holder.run_id is not None:
            cursor.execute(f'DELETE FROM {qualified(schema, OWNER_TABLE)} WHERE "run_id" = %s', (holder.run_id,))
        if logged:
            cursor.execute(
                f'INSERT INTO {qualified(schema, LOG_TABLE)} ("action", "holder_pid", "run_id", "host", '
                '"terminated_backend_pid", "reason", "by", "at") '
                "VALUES (%s, %s, %s, %s, %s, %s, %s, (clock_timestamp() AT TIME ZONE 'UTC'))",
                (
                    action,
                    holder.pid if holder else None,
                    holder.run_id if holder else None,
                    holder.host if holder else None,
                    terminated,
                    reason,
                    WHO,
                ),
            )
        cursor.execute("COMMIT")
    except BaseException:
        _rollback_quietly(connection)
        raise
    who = holder.describe() if holder else f"server pid {terminated}"
    log.warning("unlock: %s the migration lock of %s (%s)", action, who, reason or "no reason given")
    return deleted


# SQLSTATE of the check below: a migration released fanout's advisory lock.
LOCK_RELEASED_SQLSTATE = "FN001"


def still_held_sql(cursor: Any, schema: str) -> str:
    """A statement that fails (LOCK_RELEASED_SQLSTATE) unless this session still holds fanout's advisory lock.

    A migration that calls pg_advisory_unlock_all() (or, outside a transaction, DISCARD ALL)
    drops the lock that proves fanout's yoyo_lock row alive: another runner would then see
    the row as stale, break it, and migrate the shard at the same time. Sent with the rows
    that record a migration, in their transaction, it keeps such a migration from being
    recorded (or, when transactional, from being applied at all).
    """
    schema_literal = cursor.mogrify("%s", (schema,)).decode()
    tag = "$fanout$" if "$fanout$" not in schema_literal else "$fanout_lock_check$"
    return (
        f"DO {tag}BEGIN IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted "
        f"AND pid = pg_catalog.pg_backend_pid() AND classid = {_HELD}::oid "
        f"AND objid = (pg_catalog.hashtext({schema_literal}))::oid AND objsubid = 2) THEN "
        f"RAISE EXCEPTION USING ERRCODE = '{LOCK_RELEASED_SQLSTATE}', MESSAGE = 'the migration released fanout''s "
        "shard lock (pg_advisory_unlock_all() or DISCARD ALL): another runner could have taken the shard; "
        f"not recorded'; END IF; END{tag}"
    )


def _advisory_holder(cursor: Any, schema: str) -> int | None:
    """The server pid holding fanout's advisory lock on `schema` (pg_locks is visible to every role)."""
    cursor.execute(
        "SELECT pid FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = %s::oid AND objid = (hashtext(%s))::oid AND objsubid = 2 "
        "AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()) LIMIT 1",
        (_HELD, schema),
    )
    row = cursor.fetchone()
    return int(row[0]) if row else None


def _terminate(cursor: Any, pid: int, schema: str) -> int:
    """End the session `pid` and wait (bounded) until its advisory lock is gone; raises psycopg2.Error if refused."""
    cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))
    if not cursor.fetchone()[0]:
        raise psycopg2.OperationalError(f"pg_terminate_backend({pid}) returned false (no such session?)")
    deadline = time.monotonic() + TERMINATE_WAIT_SECONDS
    while _advisory_holder(cursor, schema) == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def _current_holder(
    cursor: Any, schema: str, *, alive: bool | None, for_update: bool = False, after: str | None = None
) -> LockHolder | None:
    """The lock row joined with its owner row; `alive` None means: ask the server.

    `after` is a statement sent in the same round trip, before the first read (a BEGIN).
    """
    query = f'SELECT "pid", "ctime" FROM {qualified(schema, YOYO_LOCK_TABLE)}' + (" FOR UPDATE" if for_update else "")
    _send(cursor, f"{after};\n{query}" if after else query)
    row = cursor.fetchone()
    if row is None:
        return None
    pid, since = row
    _send(cursor, "SELECT to_regclass(%s) IS NOT NULL", (qualified(schema, OWNER_TABLE),))
    has_owner_table = bool(cursor.fetchone()[0])
    owner = None
    if has_owner_table:
        _send(
            cursor,
            f'SELECT "host", "run_id", "backend_pid" FROM {qualified(schema, OWNER_TABLE)} '
            'WHERE "pid" = %s AND "ctime" = %s',
            (pid, since),
        )
        owner = cursor.fetchone()
    if owner is None:
        return LockHolder(pid=pid, since=since, alive=None)
    host, run_id, backend_pid = owner
    if alive is None:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted AND pid = %s "
            "AND classid = %s::oid AND objid = (hashtext(%s))::oid AND objsubid = 2 "
            "AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()))",
            (backend_pid, _HELD, schema),
        )
        alive = bool(cursor.fetchone()[0])
    return LockHolder(pid=pid, since=since, host=host, run_id=run_id, alive=alive)


def _other_sessions(cursor: Any) -> tuple[int, int]:
    """Other client sessions on this database: (visible, hidden).

    pg_stat_activity shows other roles' sessions without pg_read_all_stats, but with
    backend_type (and most columns) NULL: those are counted as hidden, never as absent.
    Background processes have no role (usesysid NULL) and are not clients.
    """
    cursor.execute(
        "SELECT count(*) FILTER (WHERE backend_type = 'client backend'), "
        "count(*) FILTER (WHERE backend_type IS NULL AND usesysid IS NOT NULL) "
        "FROM pg_catalog.pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    visible, hidden = cursor.fetchone()
    return int(visible), int(hidden)


def _unlock_advisory(cursor: Any, schema: str) -> None:
    _send(cursor, "SELECT pg_advisory_unlock(%s, hashtext(%s))", (_HELD, schema))


def _pause() -> None:
    if _PAUSE:
        time.sleep(_PAUSE)


def _send(cursor: Any, query: str, params: Sequence[Any] | None = None) -> None:
    """One message of the lock protocol (after the test-only pause)."""
    _pause()
    cursor.execute(query, params)


def in_one_transaction(
    connection: Any, statements: Sequence[str], *, before: Sequence[str] = (), then: str | None = None
) -> None:
    """BEGIN; statements; COMMIT (and `then`, after the commit) as one simple-query message: one round trip.

    `before` runs first in the same message; statements that precede a BEGIN in one message
    belong to its transaction, so they commit or roll back with it. The server stops at the
    first error and leaves the transaction aborted; it is rolled back here before the error
    propagates, so either all of it commits or none of it.
    """
    # A newline before each ';': a statement may end in a -- comment.
    message = "\n;\n".join([*before, "BEGIN", *statements, "COMMIT", *([then] if then else [])])
    with connection.cursor() as cursor:
        try:
            cursor.execute(message)
        except BaseException:
            _rollback_quietly(connection)
            raise


def _rollback_quietly(connection: Any) -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("ROLLBACK")
    except psycopg2.Error:
        pass


def qualified(schema: str, table: str) -> str:
    """The table named with its schema (`"schema"."table"`), immune to the session's search_path."""
    return f"{_quote(schema)}.{_quote(table)}"


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
