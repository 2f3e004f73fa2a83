"""The MySQL/MariaDB engine's pieces: endpoints, settings, error classification, statements and fanout's tables.

The sessions that use them are in `session.py`; the module docstring of the package
(`fanout/engines/mysql/__init__.py`) says how progress, the lock and in-doubt work.
"""

from __future__ import annotations

import hashlib
import logging
import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

import pymysql
import pymysql.err
import sqlparse
from yoyo.backends.core.mysql import MySQLBackend
from yoyo.connections import DatabaseURI
from yoyo.migrations import Migration, read_sql_migration

from fanout.checksums import LOG_TABLE as CHECKSUM_LOG_TABLE, TABLE as CHECKSUM_TABLE
from fanout.directory import Target
from fanout.engines import EngineError
from fanout.locking import OWNER_TABLE
from fanout.options import seconds
from fanout.report import ErrorKind, InDoubt, TargetError
from fanout.secret import Secret, error_line, redact

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
    # The longest single answer awaited (a long ALTER). None in a run: the run's watchdog (target
    # timeout, liveness check) and TCP keepalives bound the wait instead, as on PostgreSQL.
    read: float | None = 600.0
    write: float = 60.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Session limits (seconds; None leaves the server's default)."""

    lock_wait_timeout: int | None = None  # metadata locks: how long DDL waits for a table
    innodb_lock_wait_timeout: int | None = None  # row locks
    statement_timeout: float | None = None  # MariaDB: max_statement_time; MySQL 8: max_execution_time (SELECT only)


def settings_from(lock_timeout: str | None, statement_timeout: str | None) -> Settings:
    """The environment's `[session]` limits (PostgreSQL's words) as MySQL's: whole seconds for lock waits."""
    lock = seconds(lock_timeout)
    wait = None if lock is None else max(1, math.ceil(lock))
    return Settings(lock_wait_timeout=wait, innodb_lock_wait_timeout=wait, statement_timeout=seconds(statement_timeout))


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
    1226: ErrorKind.CONNECTION_LIMIT,  # user has exceeded a resource limit (max_connections_per_hour ...)
    1049: ErrorKind.DATABASE,  # unknown database
    1213: ErrorKind.LOCK_TIMEOUT,  # deadlock found: the transaction was rolled back
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


def engine_error(error: TargetError, *, retryable: bool = False, in_doubt: InDoubt | None = None) -> EngineError:
    """An EngineError that says whether another attempt may succeed, and what is in doubt."""
    return EngineError(error, retryable=retryable, in_doubt=in_doubt)


def failure_of(error: BaseException, *, otherwise: ErrorKind = ErrorKind.DATABASE) -> EngineError:
    """A driver error as an EngineError: classified, retryable when another attempt may succeed."""
    return engine_error(classify(error, otherwise=otherwise), retryable=error_code(error) in RETRYABLE)


def is_lost(error: BaseException) -> bool:
    """The connection broke (or never answered): whatever was sent may or may not have run."""
    return error_code(error) in _LOST or isinstance(error, pymysql.err.InterfaceError)


def connect_kwargs(where: Endpoint | Target, timeouts: Timeouts, *, database: bool = True) -> dict[str, Any]:
    """PyMySQL's arguments for an endpoint or a MySQL target (the password is revealed only here)."""
    if isinstance(where, Target):
        kwargs = where.mysql_kwargs(connect_timeout=timeouts.connect, read_timeout=timeouts.read,
                                    write_timeout=timeouts.write)  # fmt: skip
    else:
        kwargs = {
            "host": where.host, "port": where.port, "user": where.user,
            "password": where.password.reveal() if where.password else "", "database": where.database,
            "connect_timeout": timeouts.connect, "read_timeout": timeouts.read, "write_timeout": timeouts.write,
            "autocommit": True, "charset": "utf8mb4",
        }  # fmt: skip
    if not database:
        kwargs["database"] = None
    return kwargs


def connect(
    where: Endpoint | Target,
    timeouts: Timeouts = Timeouts(),
    *,
    database: bool = True,
    factory: type[pymysql.connections.Connection] = pymysql.connections.Connection,
) -> Any:
    """A PyMySQL connection in autocommit mode (fanout's transactions are explicit), or an EngineError.

    Until it is connected (the server's greeting, TLS, authentication, SET NAMES), each answer
    is awaited at most the connect timeout: PyMySQL awaits them for the read timeout, which a
    run leaves unbounded, so a server that accepts and never greets would hold the target
    (and, unwatched yet, a second signal could not end it).
    """
    kwargs = connect_kwargs(where, timeouts, database=database)
    try:
        connection = factory(**{**kwargs, "read_timeout": kwargs["connect_timeout"], "defer_connect": True})
        connection.connect()
        connection._read_timeout = kwargs["read_timeout"]  # PyMySQL sets it on the socket before the next read
        return connection
    except pymysql.err.MySQLError as e:
        code = error_code(e)
        kind = _KINDS.get(code or 0, ErrorKind.UNREACHABLE if code is None or code >= 2000 else ErrorKind.DATABASE)
        message = classify(e).message
        if code == 2013 and "timed out" in message:  # PyMySQL says "during query" of a connection not yet made
            message = f"cannot connect: no answer within {kwargs['connect_timeout']:g}s ({message})"
        raise engine_error(TargetError(kind, message), retryable=code in (2003, 2013)) from None
    except UnicodeEncodeError:
        # PyMySQL sends the password as latin-1, and its error would name the character and where it is.
        message = "cannot connect: the password has a character outside latin-1, which PyMySQL cannot send"
        raise engine_error(TargetError(ErrorKind.DATABASE, message)) from None
    except (OSError, ssl.SSLError, ValueError) as e:  # a TLS file it cannot read, a bad option value
        raise engine_error(TargetError(ErrorKind.DATABASE, redact(f"cannot connect: {error_line(e)}"))) from None


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
            "taken effect. Check the shard, then settle it: `fanout resolve --migration "
            f"{self.migration} --took-effect` (apply continues after it) or `--not-run` (apply runs it again)"
        )

    def report(self, operation: str = "apply") -> InDoubt:
        """As the report's InDoubt: the migration, and the statement by number and first line."""
        return InDoubt(
            self.migration, operation, self.run_id, self.host, self.pid, self.started_at or datetime.min,
            statement=self.number, statement_text=self.first_line,
        )  # fmt: skip


class InDoubtError(EngineError):
    """apply() found a statement in doubt: nothing ran."""

    def __init__(self, doubt: StatementInDoubt, operation: str = "apply") -> None:
        error = TargetError(ErrorKind.IN_DOUBT, f"in doubt: {doubt.describe()}", doubt.migration)
        super().__init__(error, in_doubt=doubt.report(operation))
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
        "`pid` INT NOT NULL, `updated_at` TIMESTAMP(6) NULL, `operation` VARCHAR(10) NOT NULL DEFAULT 'apply', "
        "PRIMARY KEY (`migration_id`, `statement`)) ENGINE=InnoDB"
    )


def create_checksum_sql() -> tuple[str, str]:
    """fanout_checksums and fanout_checksum_log as on PostgreSQL (fanout/engines/postgres/checksums.py): same columns, same meaning."""
    return (
        f"CREATE TABLE IF NOT EXISTS `{CHECKSUM_TABLE}` (`migration_id` VARCHAR(255) NOT NULL PRIMARY KEY, "
        "`sha256` VARCHAR(64) NOT NULL, `service` VARCHAR(255) NOT NULL, `environment` VARCHAR(255) NOT NULL, "
        "`recorded_at` DATETIME(6) NOT NULL, `how` VARCHAR(32) NOT NULL) ENGINE=InnoDB",
        f"CREATE TABLE IF NOT EXISTS `{CHECKSUM_LOG_TABLE}` (`id` BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, "
        "`migration_id` VARCHAR(255) NOT NULL, `old_sha256` VARCHAR(64) NULL, `new_sha256` VARCHAR(64) NOT NULL, "
        "`action` VARCHAR(32) NOT NULL, `reason` TEXT NULL, `by` VARCHAR(255) NOT NULL, `at` DATETIME(6) NOT NULL) "
        "ENGINE=InnoDB",
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

    def quote_identifier(self, identifier: str) -> str:
        # yoyo asks the server for sql_mode (SHOW VARIABLES, a round trip and a slow statement that
        # does not run in parallel) on every call, to use double quotes under ANSI_QUOTES. Backticks
        # quote an identifier under every sql_mode, ANSI_QUOTES included: the statements mean the same.
        return "`" + identifier.replace("`", "``") + "`"


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
    operation: str = "apply"  # apply | rollback


PROGRESS_COLUMNS = (
    "`migration_id`, `statement`, `sha256`, `first_line`, `state`, `run_id`, `host`, `pid`, `updated_at`, `operation`"
)
