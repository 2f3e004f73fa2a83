"""MySQL and MariaDB shards: connection, session settings, yoyo's tables, the lock, and statement-by-statement progress.

Not used by the runner yet: this is the engine's groundwork, tested on its own against a
real MariaDB (tests/test_mysql_engine.py). Its method names mirror the runner's `_Session`
(`lock`, `applied`, `in_doubt`, `apply`, `close`) so that it can be plugged in later.

MySQL and MariaDB commit implicitly at every DDL statement, so a migration cannot commit
atomically with the row recording it, and a crash in the middle leaves a shard between
two statements. fanout therefore records its progress statement by statement in
`fanout_progress`: a DDL statement is marked `started` (committed) before it runs and
`done` (committed) after; a DML statement runs in one transaction with its `done` mark.
A `started` mark found later names the one statement that may or may not have taken
effect: it is never run again and never skipped silently; `resolve()` records the
operator's answer and `apply()` continues. A migration made only of DML runs in one
transaction with its yoyo records, as on PostgreSQL.

The lock is yoyo's own `yoyo_lock` row (so fanout and plain yoyo exclude each other),
taken while holding a session-scoped `GET_LOCK`: the server releases it the moment the
session ends, which proves a holder gone, so a `yoyo_lock` row left by a dead fanout
(with its `fanout_lock` owner row) is broken automatically. A row without an owner row
belongs to plain yoyo and is never broken automatically.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

import pymysql
import pymysql.err
import sqlparse
from yoyo import internalmigrations
from yoyo.backends.core.mysql import MySQLBackend
from yoyo.connections import DatabaseURI
from yoyo.internalmigrations import v2
from yoyo.migrations import Migration, read_sql_migration

from fanout.engines import EngineError
from fanout.locking import OWNER_TABLE, YOYO_LOCK_TABLE, Attempt, Owner
from fanout.report import ErrorKind, LockHolder, TargetError
from fanout.secret import Secret, error_line, redact, register

log = logging.getLogger(__name__)

MIGRATION_TABLE = "_yoyo_migration"  # yoyo's default (get_backend's migration_table)
PROGRESS_TABLE = "fanout_progress"
LOCK_POLL_SECONDS = 0.5
SCHEMES = ("mysql", "mariadb")
_FIRST_LINE_CHARS = 200
# Statements that do not commit implicitly: they run in one transaction with their record.
_DML = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE", "SELECT"})


class Flavor(StrEnum):
    MARIADB = "mariadb"
    MYSQL = "mysql"


def flavor_of(version: str) -> Flavor:
    """The server's flavor from `SELECT VERSION()` ("10.11.6-MariaDB-0+deb12u1", "8.0.36")."""
    return Flavor.MARIADB if "mariadb" in version.lower() else Flavor.MYSQL


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a MySQL/MariaDB shard is; the password never shows in repr."""

    host: str
    database: str
    user: str
    password: Secret | None = field(default=None, repr=False)
    port: int = 3306

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """Parse `mysql://user:password@host:port/database` (or `mariadb://`); errors never echo the URL."""
        try:
            parts = urlsplit(url)
            port = parts.port or 3306
        except ValueError:
            raise ValueError("not a mysql:// URL (unparsable host or port)") from None
        if parts.scheme not in SCHEMES:
            raise ValueError(f"scheme {parts.scheme!r} is not one of {', '.join(SCHEMES)}")
        database = unquote(parts.path.lstrip("/"))
        if not parts.hostname or not database or not parts.username:
            raise ValueError("a mysql:// URL needs a user, a host and a database")
        password = None
        if parts.password is not None:
            password = Secret(unquote(parts.password))
        return cls(parts.hostname, database, unquote(parts.username), password, port)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """PyMySQL's socket timeouts (seconds): every wait on the server is bounded."""

    connect: float = 10.0
    read: float = 600.0  # the longest single answer awaited (a long ALTER); the target's budget
    write: float = 60.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Session limits (seconds; None leaves the server's default)."""

    lock_wait_timeout: int | None = None  # metadata locks: how long DDL waits for a table
    innodb_lock_wait_timeout: int | None = None  # row locks
    statement_timeout: float | None = None  # MariaDB: max_statement_time; MySQL 8: max_execution_time (SELECT only)


def settings_sql(flavor: Flavor, settings: Settings) -> list[str]:
    """The SET statements of a session: UTC timestamps always, then the limits given."""
    statements = ["SET SESSION time_zone = '+00:00'"]
    if settings.lock_wait_timeout is not None:
        statements.append(f"SET SESSION lock_wait_timeout = {int(settings.lock_wait_timeout)}")
    if settings.innodb_lock_wait_timeout is not None:
        statements.append(f"SET SESSION innodb_lock_wait_timeout = {int(settings.innodb_lock_wait_timeout)}")
    if settings.statement_timeout is not None:
        if flavor is Flavor.MARIADB:
            statements.append(f"SET SESSION max_statement_time = {float(settings.statement_timeout):g}")
        else:
            statements.append(f"SET SESSION max_execution_time = {round(settings.statement_timeout * 1000)}")
    return statements


# Server error numbers (MySQL and MariaDB share them) and what they mean for a shard.
_KINDS = {
    1045: ErrorKind.AUTHENTICATION,  # access denied
    1040: ErrorKind.CONNECTION_LIMIT,  # too many connections
    1203: ErrorKind.CONNECTION_LIMIT,  # user has more than max_user_connections
    1205: ErrorKind.LOCK_TIMEOUT,  # lock wait timeout (row or metadata lock)
    1969: ErrorKind.STATEMENT_TIMEOUT,  # MariaDB: max_statement_time exceeded
    3024: ErrorKind.STATEMENT_TIMEOUT,  # MySQL: max_execution_time exceeded
    2003: ErrorKind.UNREACHABLE,  # cannot connect
    2006: ErrorKind.UNREACHABLE,  # server has gone away
    2013: ErrorKind.UNREACHABLE,  # lost connection during query
}
# Worth another attempt of the whole target: nothing half-done is left by these.
RETRYABLE = frozenset({1205, 1213, 2006, 2013})
# The connection broke: whatever was sent may or may not have run.
_LOST = frozenset({2006, 2013, 2003, 2055})


def error_code(error: BaseException) -> int | None:
    args = getattr(error, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def classify(error: BaseException, *, otherwise: ErrorKind = ErrorKind.DATABASE) -> TargetError:
    """A driver error as a target error: its kind by server error number, its message redacted."""
    code = error_code(error)
    args: tuple[Any, ...] = tuple(getattr(error, "args", ()))
    text = str(args[1]) if len(args) > 1 else error_line(error)
    return TargetError(_KINDS.get(code or 0, otherwise), redact(f"({code}) {text}" if code else text))


def connect(endpoint: Endpoint, timeouts: Timeouts = Timeouts()) -> Any:
    """A PyMySQL connection in autocommit mode (fanout's transactions are explicit), or an EngineError."""
    try:
        return pymysql.connect(
            host=endpoint.host,
            port=endpoint.port,
            user=endpoint.user,
            password=endpoint.password.reveal() if endpoint.password else "",
            database=endpoint.database,
            connect_timeout=timeouts.connect,
            read_timeout=timeouts.read,
            write_timeout=timeouts.write,
            autocommit=True,
            charset="utf8mb4",
        )
    except pymysql.err.MySQLError as e:
        raise EngineError(classify(e, otherwise=ErrorKind.UNREACHABLE)) from None


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a migration as yoyo splits it, numbered from 1."""

    number: int
    sql: str
    sha256: str
    first_line: str
    dml: bool


def first_line(sql: str) -> str:
    """The first line of a statement that is not blank nor a comment (what a human recognizes it by)."""
    for line in sql.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("--", "#")):
            return stripped[:_FIRST_LINE_CHARS]
    return sql.strip()[:_FIRST_LINE_CHARS]


def statements(sqls: Sequence[str]) -> list[Statement]:
    """Number, hash and classify statements; anything not plainly DML is taken to commit implicitly."""
    found = []
    for number, sql in enumerate(sqls, 1):
        kind = sqlparse.parse(sql)[0].get_type() if sql.strip() else "UNKNOWN"  # type: ignore[no-untyped-call]
        digest = hashlib.sha256(sql.encode()).hexdigest()
        found.append(Statement(number, sql, digest, first_line(sql), kind in _DML))
    return found


def migration_statements(migration: Migration) -> list[Statement]:
    """A .sql migration's statements, split by yoyo itself (sqlparse, directives stripped as yoyo does)."""
    if not migration.is_raw_sql():
        raise EngineError(
            TargetError(ErrorKind.MIGRATION, "Python migrations are not supported on MySQL/MariaDB", migration.id)
        )
    _, _, sqls = read_sql_migration(migration.path)
    return statements(sqls)


@dataclass(frozen=True, slots=True)
class StatementInDoubt:
    """A statement marked as started and never done: it may or may not have taken effect."""

    migration: str
    number: int
    total: int
    first_line: str
    run_id: str
    host: str
    pid: int
    started_at: datetime | None

    def describe(self) -> str:
        return (
            f"{self.migration}: statement {self.number} of {self.total} ({self.first_line}) was started by run "
            f"{self.run_id} (pid {self.pid} on {self.host}) and never recorded as done; it may or may not have "
            "taken effect. Check the shard, then resolve it (took effect: continue after it; did not: run it)"
        )


class InDoubtError(EngineError):
    """apply() found a statement in doubt: nothing ran."""

    def __init__(self, doubt: StatementInDoubt) -> None:
        super().__init__(TargetError(ErrorKind.IN_DOUBT, f"in doubt: {doubt.describe()}", doubt.migration))
        self.doubt = doubt


def _create_owner_sql() -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS `{OWNER_TABLE}` (`pid` INT NOT NULL, `ctime` TIMESTAMP(6) NULL, "
        "`host` VARCHAR(255) NOT NULL, `run_id` VARCHAR(64) NOT NULL, `connection_id` BIGINT NOT NULL, "
        "PRIMARY KEY (`pid`, `run_id`)) ENGINE=InnoDB"
    )


def _create_progress_sql() -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS `{PROGRESS_TABLE}` (`migration_id` VARCHAR(255) NOT NULL, "
        "`statement` INT NOT NULL, `sha256` CHAR(64) NOT NULL, `first_line` VARCHAR(255) NOT NULL, "
        "`state` VARCHAR(10) NOT NULL, `run_id` VARCHAR(64) NOT NULL, `host` VARCHAR(255) NOT NULL, "
        "`pid` INT NOT NULL, `updated_at` TIMESTAMP(6) NULL, "
        "PRIMARY KEY (`migration_id`, `statement`)) ENGINE=InnoDB"
    )


def lock_name(database: str) -> str:
    """The GET_LOCK name of a database's migration lock (names are server-wide, at most 64 characters)."""
    name = f"fanout:{database}"
    return name if len(name) <= 64 else "fanout:" + hashlib.sha256(database.encode()).hexdigest()[:40]


class _Backend(MySQLBackend):  # type: ignore[misc]
    """yoyo's own MySQL backend on fanout's connection: it creates and upgrades yoyo's tables exactly as yoyo does."""

    def __init__(self, connection: Any, database: str) -> None:
        self._given = connection
        super().__init__(DatabaseURI("mysql", None, None, None, None, database, {}), MIGRATION_TABLE)

    def connect(self, dburi: DatabaseURI) -> Any:
        return self._given

    def _check_transactional_ddl(self) -> bool:
        # yoyo finds out by creating and dropping a table; MySQL and MariaDB never roll DDL back.
        return False


@dataclass(frozen=True, slots=True)
class ProgressRow:
    migration: str
    number: int
    sha256: str
    first_line: str
    state: str  # started | done
    run_id: str
    host: str
    pid: int
    updated_at: datetime | None


class MySQLSession:
    """A MySQL/MariaDB shard, opened for applying: connected, limited, with yoyo's and fanout's tables."""

    def __init__(
        self, endpoint: Endpoint, owner: Owner, *, settings: Settings = Settings(), timeouts: Timeouts = Timeouts()
    ) -> None:
        if endpoint.password is not None:
            register(endpoint.password.reveal())
        self._endpoint = endpoint
        self._owner = owner
        self._connection = connect(endpoint, timeouts)
        self.initialized = False
        try:
            with self._connection.cursor() as cursor:
                cursor.execute("SELECT VERSION()")
                self.version = str(cursor.fetchone()[0])
                self.flavor = flavor_of(self.version)
                for statement in settings_sql(self.flavor, settings):
                    cursor.execute(statement)
                cursor.execute(_create_owner_sql())
                cursor.execute(_create_progress_sql())
            self._backend = _Backend(self._connection, endpoint.database)
            self._backend.init_database()  # yoyo_lock, as yoyo creates it
        except pymysql.err.MySQLError as e:
            self.close()
            raise EngineError(classify(e)) from None
        self._lock_name = lock_name(endpoint.database)
        self.initialized = True

    # -- the lock --------------------------------------------------------------------------

    def try_lock(self) -> Attempt:
        """Take the shard lock if it is free or provably stale; never waits."""
        me = self._owner
        try:
            with self._connection.cursor() as cursor:
                cursor.execute("SELECT GET_LOCK(%s, 0)", (self._lock_name,))
                if cursor.fetchone()[0] != 1:
                    return Attempt(False, holder=self._holder(cursor, alive=True))
                try:
                    cursor.execute("START TRANSACTION")
                    holder = self._holder(cursor, alive=False, for_update=True)
                    if holder is not None and holder.run_id is None:
                        cursor.execute("ROLLBACK")
                        cursor.execute("SELECT RELEASE_LOCK(%s)", (self._lock_name,))
                        return Attempt(False, holder=holder)  # plain yoyo: nothing proves it gone
                    since = me.since or datetime.now(UTC).replace(tzinfo=None)
                    if holder is not None:
                        cursor.execute(f"DELETE FROM `{YOYO_LOCK_TABLE}` WHERE `pid` = %s", (holder.pid,))
                    # Owner rows are written only under GET_LOCK, which we now hold: any left is stale.
                    cursor.execute(f"DELETE FROM `{OWNER_TABLE}`")
                    cursor.execute(
                        f"INSERT INTO `{YOYO_LOCK_TABLE}` (`locked`, `ctime`, `pid`) VALUES (1, %s, %s)",
                        (since, me.pid),
                    )
                    cursor.execute(
                        f"INSERT INTO `{OWNER_TABLE}` (`pid`, `ctime`, `host`, `run_id`, `connection_id`) "
                        "VALUES (%s, %s, %s, %s, CONNECTION_ID())",
                        (me.pid, since, me.host, me.run_id),
                    )
                    cursor.execute("COMMIT")
                except pymysql.err.IntegrityError:
                    # A plain yoyo inserted its row between our read and our insert: it holds the lock.
                    cursor.execute("ROLLBACK")
                    cursor.execute("SELECT RELEASE_LOCK(%s)", (self._lock_name,))
                    return Attempt(False)
                except BaseException:
                    self._rollback_quietly()
                    raise
        except pymysql.err.MySQLError as e:
            raise EngineError(classify(e)) from None
        if holder is not None:
            log.warning("%s: broke the stale lock of %s", self._endpoint.database, holder.describe())
        return Attempt(True, broken=holder)

    def _holder(self, cursor: Any, *, alive: bool | None, for_update: bool = False) -> LockHolder | None:
        suffix = " FOR UPDATE" if for_update else ""
        cursor.execute(f"SELECT `pid`, `ctime` FROM `{YOYO_LOCK_TABLE}`{suffix}")
        row = cursor.fetchone()
        if row is None:
            return None
        cursor.execute(f"SELECT `host`, `run_id`, `ctime` FROM `{OWNER_TABLE}` WHERE `pid` = %s{suffix}", (row[0],))
        owner = cursor.fetchone()
        if owner is None:
            return LockHolder(pid=row[0], since=row[1])
        return LockHolder(pid=row[0], since=owner[2], host=owner[0], run_id=owner[1], alive=alive)

    def holder(self) -> LockHolder | None:
        """Who holds the lock now, and whether its session is alive (None for plain yoyo: unknowable)."""
        try:
            with self._connection.cursor() as cursor:
                cursor.execute("SELECT IS_USED_LOCK(%s)", (self._lock_name,))
                used = cursor.fetchone()[0]
                return self._holder(cursor, alive=used is not None)
        except pymysql.err.MySQLError as e:
            raise EngineError(classify(e)) from None

    def release(self) -> None:
        """Give the lock back: both rows in one transaction, then GET_LOCK."""
        me = self._owner
        try:
            with self._connection.cursor() as cursor:
                cursor.execute("START TRANSACTION")
                cursor.execute(f"DELETE FROM `{YOYO_LOCK_TABLE}` WHERE `pid` = %s", (me.pid,))
                cursor.execute(f"DELETE FROM `{OWNER_TABLE}` WHERE `pid` = %s AND `run_id` = %s", (me.pid, me.run_id))
                cursor.execute("COMMIT")
                cursor.execute("SELECT RELEASE_LOCK(%s)", (self._lock_name,))
        except pymysql.err.MySQLError as e:
            raise EngineError(classify(e)) from None

    @contextmanager
    def lock(self, wait: float) -> Iterator[tuple[LockHolder | None, LockHolder | None]]:
        """Hold the shard's migration lock; yields (holder seen, stale lock broken), as the runner's sessions do."""
        deadline = time.monotonic() + wait
        while True:
            attempt = self.try_lock()
            if attempt.taken:
                break
            if time.monotonic() >= deadline:
                who = attempt.holder.describe() if attempt.holder else "another process"
                raise EngineError(TargetError(ErrorKind.LOCKED, f"lock held by {who}; gave up after {wait:g}s"))
            time.sleep(min(LOCK_POLL_SECONDS * random.uniform(0.5, 1.5), max(0.0, deadline - time.monotonic())))
        self._backend._is_locked = True  # yoyo's own upgrade of its tables must not take the lock again
        try:
            yield None, attempt.broken
        finally:
            self._backend._is_locked = False
            try:
                self.release()
            except EngineError:
                # Only reachable when the connection broke; the server then released GET_LOCK: the rows are stale.
                log.warning("could not release the lock on %s; the next run breaks it", self._endpoint.database)

    # -- what is applied ---------------------------------------------------------------------

    def _ensure_yoyo_tables(self) -> None:
        """Create yoyo's tables at yoyo's current schema version, with yoyo's own statements, resumably.

        yoyo builds them by upgrading through its versions (create a v1 table, then drop and
        recreate it); on MySQL every step commits on its own, so a kill in the middle of a
        shard's very first apply would leave tables neither yoyo nor fanout could upgrade.
        Creating each missing table of the last version instead lets a re-run finish the job.
        An older yoyo's tables (a `_yoyo_migration` without `migration_hash`) are upgraded by yoyo.
        """
        backend = self._backend
        with self._connection.cursor() as cursor:
            cursor.execute(
                "SELECT table_name, SUM(column_name = 'migration_hash') FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name IN (%s, %s, %s) GROUP BY table_name",
                (MIGRATION_TABLE, backend.log_table, backend.version_table),
            )
            found = {str(name): bool(hashed) for name, hashed in cursor.fetchall()}
            if found.get(MIGRATION_TABLE) is False:
                backend.ensure_internal_schema_updated()
                return
            if backend.log_table not in found:
                v2.create_log_table(backend)
            if backend.version_table not in found:
                v2.create_version_table(backend)
            if MIGRATION_TABLE not in found:
                v2.create_migration_table(backend)
            cursor.execute(f"SELECT COUNT(*) FROM `{backend.version_table}`")
            if not cursor.fetchone()[0]:
                internalmigrations.mark_schema_version(backend, max(internalmigrations.schema_versions))
        backend._internal_schema_updated = True

    def applied(self) -> dict[str, str]:
        """yoyo's applied migrations: hash -> id (creates yoyo's tables first when missing)."""
        try:
            if not self._backend._internal_schema_updated:
                self._ensure_yoyo_tables()
            with self._connection.cursor() as cursor:
                cursor.execute(f"SELECT `migration_hash`, `migration_id` FROM `{MIGRATION_TABLE}`")
                return {str(h): str(i) for h, i in cursor.fetchall()}
        except pymysql.err.MySQLError as e:
            raise EngineError(classify(e)) from None

    def progress(self, migration_id: str | None = None) -> list[ProgressRow]:
        """fanout's statement marks (of one migration, or all), in order."""
        where, params = ("WHERE `migration_id` = %s ", (migration_id,)) if migration_id is not None else ("", ())
        try:
            with self._connection.cursor() as cursor:
                cursor.execute(
                    "SELECT `migration_id`, `statement`, `sha256`, `first_line`, `state`, `run_id`, `host`, `pid`, "
                    f"`updated_at` FROM `{PROGRESS_TABLE}` {where}ORDER BY `migration_id`, `statement`",
                    params,
                )
                return [ProgressRow(*row) for row in cursor.fetchall()]
        except pymysql.err.MySQLError as e:
            raise EngineError(classify(e)) from None

    def in_doubt(self, migration: Migration) -> StatementInDoubt | None:
        """The statement of `migration` marked as started and never done, if any."""
        total = len(migration_statements(migration))
        for row in self.progress(migration.id):
            if row.state == "started":
                return StatementInDoubt(
                    row.migration, row.number, total, row.first_line, row.run_id, row.host, row.pid, row.updated_at
                )
        return None

    # -- apply -------------------------------------------------------------------------------

    def apply(self, migration: Migration) -> bool:
        """Run what is left of `migration` and record it as yoyo does; call it holding the lock.

        DML-only: one transaction with its records. Otherwise statement by statement, each
        marked before and after; a statement found in doubt raises InDoubtError and runs nothing.
        """
        found = migration_statements(migration)
        if all(s.dml for s in found):
            self._apply_atomically(migration, found)
            return True
        done = self._check_progress(migration, found)
        for statement in found:
            if statement.number in done:
                continue
            self._run_statement(migration, statement)
        self._transaction([*self._record_statements(migration), self._clear_progress(migration)])
        return True

    def _check_progress(self, migration: Migration, found: Sequence[Statement]) -> set[int]:
        """The statements already done; refuses a statement in doubt or one changed since it ran."""
        by_number = {s.number: s for s in found}
        done = set()
        for row in self.progress(migration.id):
            if row.state == "started":
                raise InDoubtError(
                    StatementInDoubt(
                        row.migration, row.number, len(found), row.first_line, row.run_id, row.host, row.pid,
                        row.updated_at,
                    )
                )  # fmt: skip
            statement = by_number.get(row.number)
            if statement is None or statement.sha256 != row.sha256:
                raise EngineError(
                    TargetError(
                        ErrorKind.DRIFT,
                        f"{migration.id}: statement {row.number} ({row.first_line}) ran in an earlier run and has "
                        "changed since (or is gone): the migration cannot continue where it stopped",
                        migration.id,
                    )
                )
            done.add(row.number)
        return done

    def _run_statement(self, migration: Migration, statement: Statement) -> None:
        me = self._owner
        mark = (
            f"INSERT INTO `{PROGRESS_TABLE}` (`migration_id`, `statement`, `sha256`, `first_line`, `state`, `run_id`, "
            "`host`, `pid`, `updated_at`) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))"
        )
        params = (migration.id, statement.number, statement.sha256, statement.first_line[:255])
        owner = (me.run_id, me.host, me.pid)
        marked = ran = False
        try:
            with self._connection.cursor() as cursor:
                if statement.dml:
                    # No implicit commit: the statement and its mark are one transaction.
                    cursor.execute("START TRANSACTION")
                    cursor.execute(statement.sql)
                    cursor.execute(mark, (*params, "done", *owner))
                    cursor.execute("COMMIT")
                    return
                cursor.execute(mark, (*params, "started", *owner))  # autocommit: committed before the statement
                marked = True
                cursor.execute(statement.sql)
                ran = True
                cursor.execute(
                    f"UPDATE `{PROGRESS_TABLE}` SET `state` = 'done', `updated_at` = UTC_TIMESTAMP(6) "
                    "WHERE `migration_id` = %s AND `statement` = %s",
                    (migration.id, statement.number),
                )
        except pymysql.err.MySQLError as e:
            failure = classify(e, otherwise=ErrorKind.MIGRATION)
            self._rollback_quietly()
            where = f"{migration.id}: statement {statement.number} ({statement.first_line})"
            if statement.dml:
                message = f"{where}: {failure.message} (it commits with its mark or not at all: the next run knows)"
            elif not marked:
                message = f"{where} did not run (its started mark could not be written): {failure.message}"
            elif not ran and self._refused_whole(e) and self._forget_failed(migration, statement):
                message = f"{where} failed: {failure.message}"
            else:
                message = f"{where}: {failure.message}; it may have taken effect: left in doubt"
            raise EngineError(TargetError(failure.kind, message, migration.id)) from None

    def _refused_whole(self, error: BaseException) -> bool:
        """Did the server refuse the statement before changing anything?

        MySQL 8 makes each DDL statement atomic, so any error it answers means no effect. MariaDB
        can fail a statement over several tables halfway (`DROP TABLE a, b` drops `a`, then fails
        on `b`), so there only a parse error or a lock wait timeout proves that nothing happened.
        """
        code = error_code(error)
        if code in _LOST:
            return False
        return self.flavor is Flavor.MYSQL or code in (1064, 1205)

    def _forget_failed(self, migration: Migration, statement: Statement) -> bool:
        """Remove the `started` mark of a statement the server answered with an error; False when unreachable."""
        try:
            with self._connection.cursor() as cursor:
                cursor.execute(
                    f"DELETE FROM `{PROGRESS_TABLE}` WHERE `migration_id` = %s AND `statement` = %s AND `state` = 'started'",
                    (migration.id, statement.number),
                )
            return True
        except pymysql.err.MySQLError:
            return False

    def _apply_atomically(self, migration: Migration, found: Sequence[Statement]) -> None:
        try:
            self._transaction([*(s.sql for s in found), *self._record_statements(migration)])
        except pymysql.err.MySQLError as e:
            failure = classify(e, otherwise=ErrorKind.MIGRATION)
            raise EngineError(TargetError(failure.kind, f"{migration.id}: {failure.message}", migration.id)) from None

    def _record_statements(self, migration: Migration) -> list[tuple[str, dict[str, Any]]]:
        """yoyo's `_yoyo_migration` and `_yoyo_log` rows for an applied migration, as yoyo's apply_one writes them."""
        backend = self._backend
        self.applied()  # yoyo's tables exist before anything is recorded in them
        when = datetime.now(UTC).replace(tzinfo=None)
        mark = {"migration_hash": migration.hash, "migration_id": migration.id, "when": when}
        return [
            (backend.format_sql(backend.mark_migration_sql), mark),
            (backend.format_sql(backend.log_migration_sql), backend.get_log_data(migration, "apply")),
        ]

    def _clear_progress(self, migration: Migration) -> tuple[str, dict[str, Any]]:
        return (f"DELETE FROM `{PROGRESS_TABLE}` WHERE `migration_id` = :id", {"id": migration.id})

    def _transaction(self, statements: Sequence[str | tuple[str, dict[str, Any]]]) -> None:
        """Run statements (SQL, or yoyo-style SQL with :named parameters) in one transaction."""
        from yoyo.utils import change_param_style

        try:
            with self._connection.cursor() as cursor:
                cursor.execute("START TRANSACTION")
                for statement in statements:
                    if isinstance(statement, str):
                        cursor.execute(statement)
                    else:
                        sql, params = change_param_style("pyformat", *statement)
                        cursor.execute(sql, params)
                cursor.execute("COMMIT")
        except BaseException:
            self._rollback_quietly()
            raise

    def resolve(self, migration: Migration, *, took_effect: bool) -> StatementInDoubt:
        """Settle the statement in doubt: recorded as done (apply continues after it) or forgotten (apply runs it).

        Call it holding the lock, after checking the shard by hand; raises when nothing is in doubt.
        """
        doubt = self.in_doubt(migration)
        if doubt is None:
            raise EngineError(
                TargetError(ErrorKind.DATABASE, f"{migration.id}: no statement is in doubt", migration.id)
            )
        if took_effect:
            sql = (
                f"UPDATE `{PROGRESS_TABLE}` SET `state` = 'done', `updated_at` = UTC_TIMESTAMP(6) "
                "WHERE `migration_id` = %s AND `statement` = %s AND `state` = 'started'"
            )
        else:
            sql = (
                f"DELETE FROM `{PROGRESS_TABLE}` WHERE `migration_id` = %s AND `statement` = %s AND `state` = 'started'"
            )
        try:
            with self._connection.cursor() as cursor:
                cursor.execute(sql, (migration.id, doubt.number))
        except pymysql.err.MySQLError as e:
            raise EngineError(classify(e)) from None
        return doubt

    def _rollback_quietly(self) -> None:
        with suppress(pymysql.err.MySQLError):
            self._connection.rollback()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with suppress(pymysql.err.Error):
                connection.close()
