"""The read-only session of a MySQL/MariaDB shard (plan, status, verify): creates nothing, takes no lock, writes nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pymysql
import pymysql.connections
import pymysql.err
from yoyo.migrations import Migration

from fanout import checksums, indoubt
from fanout.checksums import LOG_TABLE as CHECKSUM_LOG_TABLE, TABLE as CHECKSUM_TABLE
from fanout.directory import Target
from fanout.engines import WritesNothing
from fanout.engines.mysql.base import DEFAULT_TIMEOUTS, NO_SETTINGS, _Base
from fanout.engines.mysql.core import (
    MIGRATION_TABLE,
    PROGRESS_TABLE,
    Endpoint,
    Settings,
    Timeouts,
    flavor_of,
    lock_name,
    settings_sql,
)
from fanout.engines.mysql.watch import Watching
from fanout.locking import OWNER_TABLE, YOYO_LOCK_TABLE
from fanout.report import InDoubt, LockHolder
from fanout.secret import register


class ReadOnlySession(WritesNothing, _Base):
    """Reads yoyo's and fanout's tables inside READ ONLY transactions; creates nothing and takes no lock.

    Works as a user with only SELECT: a plan, status or verify never writes a shard.
    """

    def __init__(
        self,
        target: Endpoint | Target,
        *,
        settings: Settings = NO_SETTINGS,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        watching: Watching | None = None,
        connections: Any = None,
    ) -> None:
        if target.password is not None:
            register(target.password.reveal())
        self._target = target
        self._connections = connections
        self._database = target.dbname if isinstance(target, Target) else target.database
        self._connection = None
        self._connect(target, timeouts, watching)
        self.initialized = False
        try:
            with self._connection.cursor() as cursor:
                cursor.execute("SELECT VERSION()")
                self.version = str(cursor.fetchone()[0])
                self.flavor = flavor_of(self.version)
                for statement in settings_sql(self.flavor, settings):
                    cursor.execute(statement)
                cursor.execute("START TRANSACTION READ ONLY")
                self._found = self._tables(
                    cursor, (MIGRATION_TABLE, YOYO_LOCK_TABLE, OWNER_TABLE, PROGRESS_TABLE, CHECKSUM_TABLE,
                             CHECKSUM_LOG_TABLE, "_yoyo_version"),
                )  # fmt: skip
                if MIGRATION_TABLE in self._found:
                    cursor.execute(
                        "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() "
                        "AND table_name = %s AND column_name = 'migration_hash'",
                        (MIGRATION_TABLE,),
                    )
                    self._hashed = bool(cursor.fetchone()[0])
                if PROGRESS_TABLE in self._found and not self._has_operation(cursor):
                    self._operation = "'apply'"
        except pymysql.err.MySQLError as e:
            failure = self._failure(e)
            self._close_connection()
            raise failure from None
        self.initialized = MIGRATION_TABLE in self._found
        self._lock_name = lock_name(self._database)

    def _has_progress(self, cursor: Any) -> bool:
        return PROGRESS_TABLE in self._found

    @contextmanager
    def lock(self, wait: float) -> Iterator[tuple[LockHolder | None, None]]:
        """Takes no lock: yields the holder, if any, with whether its session is alive."""
        holder = None
        try:
            with self._connection.cursor() as cursor:
                if YOYO_LOCK_TABLE in self._found:
                    cursor.execute(f"SELECT `pid`, `ctime` FROM `{YOYO_LOCK_TABLE}`")
                    row = cursor.fetchone()
                    if row is not None:
                        holder = LockHolder(pid=row[0], since=row[1])
                        if OWNER_TABLE in self._found:
                            cursor.execute(
                                f"SELECT `host`, `run_id`, `ctime` FROM `{OWNER_TABLE}` WHERE `pid` = %s", (row[0],)
                            )
                            owner = cursor.fetchone()
                            if owner is not None:
                                cursor.execute("SELECT IS_USED_LOCK(%s)", (self._lock_name,))
                                alive = cursor.fetchone()[0] is not None
                                holder = LockHolder(row[0], owner[2], owner[0], owner[1], alive)
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None
        yield holder, None

    def applied(self) -> dict[str, str]:
        if not self.initialized:
            return {}
        try:
            with self._connection.cursor() as cursor:
                if self._hashed:
                    cursor.execute(f"SELECT `migration_hash`, `migration_id` FROM `{MIGRATION_TABLE}`")
                    return {str(h): str(i) for h, i in cursor.fetchall()}
                # yoyo < 6 kept ids, not hashes.
                cursor.execute(f"SELECT `id` FROM `{MIGRATION_TABLE}`")
                return {hashlib.sha256(str(r[0]).encode()).hexdigest(): str(r[0]) for r in cursor.fetchall()}
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None

    def recorded_checksums(self) -> dict[str, checksums.Recorded]:
        if CHECKSUM_TABLE not in self._found:
            return {}
        try:
            with self._connection.cursor() as cursor:
                return self._read_checksums(cursor)
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None

    def marks_and_invalid(self) -> tuple[dict[str, indoubt.Mark], tuple[str, ...]]:
        if PROGRESS_TABLE not in self._found:
            return {}, ()
        applied_ids = set(self.applied().values())
        try:
            with self._connection.cursor() as cursor:
                return self._read_marks(cursor, applied_ids), ()
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None

    def in_doubt(self, migration: Migration, mark: indoubt.Mark, *, repair: bool) -> tuple[InDoubt | None, str | None]:
        return self._doubt(migration, mark), None

    def close(self, *, reuse: bool = False) -> None:
        if self._connection is not None:
            with suppress(pymysql.err.MySQLError):
                self._connection.rollback()
        self._close_connection()
