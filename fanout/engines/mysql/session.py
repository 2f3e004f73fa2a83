"""The session that applies on a MySQL/MariaDB shard, under the lock: statement-by-statement progress, records, by-hand settling.

It raises only EngineError (classified; `retryable` when another attempt may succeed),
never a driver exception.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import pymysql
import pymysql.connections
import pymysql.err
from yoyo import internalmigrations
from yoyo.internalmigrations import v2
from yoyo.migrations import Migration
from yoyo.utils import change_param_style

from fanout import checksums, indoubt
from fanout.checksums import LOG_TABLE as CHECKSUM_LOG_TABLE, TABLE as CHECKSUM_TABLE
from fanout.directory import Target
from fanout.engines import ChecksumChange, EngineError, Recording, Settled, SettleItem
from fanout.engines.mysql.base import DEFAULT_TIMEOUTS, NO_SETTINGS, _Base, _now, _rollback_statements
from fanout.engines.mysql.core import (
    MIGRATION_TABLE,
    PROGRESS_TABLE,
    Endpoint,
    Flavor,
    InDoubtError,
    Settings,
    Statement,
    StatementInDoubt,
    Timeouts,
    _Backend,
    _create_owner_sql,
    _create_progress_sql,
    create_checksum_sql,
    engine_error,
    error_code,
    flavor_of,
    is_lost,
    lock_name,
    migration_statements,
    settings_sql,
)
from fanout.engines.mysql.watch import Watching, timed_out
from fanout.locking import OWNER_TABLE, YOYO_LOCK_TABLE, Attempt, Owner
from fanout.report import ErrorKind, InDoubt, LockHolder, TargetError
from fanout.secret import register

log = logging.getLogger(__name__)


class _Killed(pymysql.err.OperationalError):  # type: ignore[misc]
    """Raised (and caught) inside the session: the watchdog killed the statement, the server answered anyway."""


LOCK_POLL_SECONDS = 0.5


class MySQLSession(_Base):
    """A MySQL/MariaDB shard, opened for applying: connected, limited, with yoyo's and fanout's tables."""

    def __init__(
        self,
        endpoint: Endpoint | Target,
        owner: Owner,
        *,
        settings: Settings = NO_SETTINGS,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        watching: Watching | None = None,
        connections: Any = None,
    ) -> None:
        password = endpoint.password
        if password is not None:
            register(password.reveal())
        self._target = endpoint
        self._connections = connections
        self._database = endpoint.dbname if isinstance(endpoint, Target) else endpoint.database
        self._owner = owner
        self._watching = watching
        self._connection = None
        self._connect(endpoint, timeouts, watching)
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
                if not self._has_operation(cursor):
                    cursor.execute(
                        f"ALTER TABLE `{PROGRESS_TABLE}` ADD COLUMN `operation` VARCHAR(10) NOT NULL DEFAULT 'apply'"
                    )
                for statement in create_checksum_sql():
                    cursor.execute(statement)
            self._backend = _Backend(self._connection, self._database)
            self._backend.init_database()  # yoyo_lock, as yoyo creates it
        except pymysql.err.MySQLError as e:
            failure = self._failure(e)
            self._close_connection()
            raise failure from None
        self._lock_name = lock_name(self._database)
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
                    since = me.since or _now()
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
            raise self._failure(e) from None
        if holder is not None:
            log.warning("%s: broke the stale lock of %s", self._database, holder.describe())
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
            raise self._failure(e) from None

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
            raise self._failure(e) from None

    @contextmanager
    def lock(self, wait: float) -> Iterator[tuple[LockHolder | None, LockHolder | None]]:
        """Hold the shard's migration lock; yields (holder seen, stale lock broken), as the runner's sessions do."""
        deadline = time.monotonic() + wait
        watching = self._watching
        while True:
            attempt = self.try_lock()
            if attempt.taken:
                break
            who = attempt.holder.describe() if attempt.holder else "another process"
            if watching is not None and watching.interrupt.stopping.is_set():
                raise engine_error(TargetError(ErrorKind.INTERRUPTED, "interrupted while waiting for the shard's lock"))
            if watching is not None and watching.deadline is not None and time.monotonic() >= watching.deadline:
                raise timed_out(watching.target_timeout, f"still waiting for the shard's lock, held by {who}")
            if time.monotonic() >= deadline:
                raise engine_error(TargetError(ErrorKind.LOCKED, f"lock held by {who}; gave up after {wait:g}s"))
            time.sleep(min(LOCK_POLL_SECONDS * random.uniform(0.5, 1.5), max(0.0, deadline - time.monotonic())))
        self._backend._is_locked = True  # yoyo's own upgrade of its tables must not take the lock again
        try:
            yield None, attempt.broken
        finally:
            self._backend._is_locked = False
            try:
                self._rollback_quietly()
                self.release()
            except EngineError:
                # Only reachable when the connection broke; the server then released GET_LOCK: the rows are stale.
                log.warning("could not release the lock on %s; the next run breaks it", self._database)

    # -- what is applied and recorded ----------------------------------------------------------

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
            raise self._failure(e) from None

    def recorded_checksums(self) -> dict[str, checksums.Recorded]:
        try:
            with self._connection.cursor() as cursor:
                return self._read_checksums(cursor)
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None

    def marks_and_invalid(self) -> tuple[dict[str, indoubt.Mark], tuple[str, ...]]:
        """Migrations in doubt (see `_read_marks`); MySQL has no INVALID indexes."""
        applied_ids = set(self.applied().values())
        try:
            with self._connection.cursor() as cursor:
                return self._read_marks(cursor, applied_ids), ()
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None

    def in_doubt(self, migration: Migration, mark: indoubt.Mark, *, repair: bool) -> tuple[InDoubt | None, str | None]:
        """What is in doubt of a marked migration; never repaired automatically (`repair` is PostgreSQL's)."""
        return self._doubt(migration, mark), None

    def statement_in_doubt(self, migration: Migration) -> StatementInDoubt | None:
        """The statement of `migration` (apply, or rollback) marked as started and never done, if any."""
        rows = self.progress(migration.id)
        started = next((r for r in rows if r.state == "started"), None)
        if started is None:
            return None
        found = _rollback_statements(migration) if started.operation == "rollback" else migration_statements(migration)
        return StatementInDoubt(started.migration, started.number, len(found), started.first_line, started.run_id,
                                started.host, started.pid, started.updated_at)  # fmt: skip

    # -- apply and roll back -----------------------------------------------------------------

    def apply(self, migration: Migration, recording: Recording | None = None) -> bool:
        """Run what is left of `migration` and record it as yoyo does (and its checksum); call it holding the lock.

        DML-only: one transaction with its records. Otherwise statement by statement, each
        marked before and after; a statement found in doubt raises InDoubtError and runs nothing.
        """
        found = migration_statements(migration)
        records = self._records(migration, "apply", recording, checksums.How.APPLIED)
        self._run(migration, found, "apply", records)
        return True

    def rollback(self, migration: Migration, recorded: Recording, reason: str | None) -> bool:
        """Run the migration's .rollback.sql as apply runs a migration, then unrecord it (yoyo's rows and the checksum).

        yoyo's "rollback" log row, the removal of its `_yoyo_migration` row and of fanout's
        checksum row (logged) commit with the last statement when the rollback is DML-only,
        else in one transaction after it.
        """
        found = _rollback_statements(migration)
        backend = self._backend
        unrecords = [
            self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, "rollback")),
            self._yoyo_row(backend.unmark_migration_sql, {"migration_hash": migration.hash}),
            (f"DELETE FROM `{CHECKSUM_TABLE}` WHERE `migration_id` = %s", (migration.id,)),
            self._log_row(migration.id, recorded.sha256 or None, "", checksums.How.ROLLED_BACK, reason),
        ]
        self._run(migration, found, "rollback", unrecords)
        return True

    def _run(
        self, migration: Migration, found: Sequence[Statement], operation: str, records: Sequence[tuple[str, Any]]
    ) -> None:
        if all(s.dml for s in found):
            self._check_progress(migration, found, operation)  # a DML-only file edited midway is drift
            self._atomically(migration, found, records)
            return
        done = self._check_progress(migration, found, operation)
        for statement in found:
            if statement.number not in done:
                self._run_statement(migration, statement, operation)
        try:
            self._transaction([*records, self._clear_progress(migration)])
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None

    def _check_progress(self, migration: Migration, found: Sequence[Statement], operation: str) -> set[int]:
        """The statements already done; refuses a statement in doubt or one changed since it ran."""
        by_number = {s.number: s for s in found}
        done = set()
        for row in self.progress(migration.id):
            if row.state == "started":
                raise InDoubtError(
                    StatementInDoubt(row.migration, row.number, len(found), row.first_line, row.run_id, row.host,
                                     row.pid, row.updated_at),
                    row.operation,
                )  # fmt: skip
            statement = by_number.get(row.number)
            if row.operation != operation or statement is None or statement.sha256 != row.sha256:
                what = "of its rollback " if row.operation == "rollback" else ""
                raise engine_error(
                    TargetError(
                        ErrorKind.DRIFT,
                        f"{migration.id}: statement {what}{row.number} ({row.first_line}) ran in an earlier "
                        f"{row.operation} and has changed since (or is gone, or this is not a {row.operation}): "
                        "it cannot continue where it stopped",
                        migration.id,
                    )
                )
            done.add(row.number)
        return done

    def _run_statement(self, migration: Migration, statement: Statement, operation: str = "apply") -> None:
        me = self._owner
        mark = (
            f"INSERT INTO `{PROGRESS_TABLE}` (`migration_id`, `statement`, `sha256`, `first_line`, `state`, `run_id`, "
            "`host`, `pid`, `updated_at`, `operation`) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6), %s)"
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
                    self._raise_if_killed()
                    cursor.execute(mark, (*params, "done", *owner, operation))
                    cursor.execute("COMMIT")
                    return
                cursor.execute(mark, (*params, "started", *owner, operation))  # autocommit: committed before it runs
                marked = True
                cursor.execute(statement.sql)
                ran = True
                self._raise_if_killed()  # it may have finished: its mark stays `started`
                cursor.execute(
                    f"UPDATE `{PROGRESS_TABLE}` SET `state` = 'done', `updated_at` = UTC_TIMESTAMP(6) "
                    "WHERE `migration_id` = %s AND `statement` = %s",
                    (migration.id, statement.number),
                )
        except pymysql.err.MySQLError as e:
            failure = self._failure(e, otherwise=ErrorKind.MIGRATION)
            lost = is_lost(e) or (self._watch is not None and not self._watch.untouched())
            if not lost:
                self._rollback_quietly()
            what = "rollback statement" if operation == "rollback" else "statement"
            where = f"{migration.id}: {what} {statement.number} ({statement.first_line})"
            text = failure.error.message
            doubt: InDoubt | None = None
            retryable = failure.retryable
            if statement.dml:
                message = f"{where}: {text} (it commits with its mark or not at all: the next run knows)"
            elif not marked:
                message = f"{where} did not run (its started mark could not be written): {text}"
            elif not ran and not lost and self._refused_whole(e) and self._forget_failed(migration, statement):
                message = f"{where} failed: {text}"
            else:
                total = len(
                    _rollback_statements(migration) if operation == "rollback" else migration_statements(migration)
                )
                me = self._owner
                doubt = StatementInDoubt(migration.id, statement.number, total, statement.first_line, me.run_id,
                                         me.host, me.pid, _now()).report(operation)  # fmt: skip
                message = (
                    f"{where}: {text}; it may have taken effect: left in doubt (`fanout resolve --migration "
                    f"{migration.id} --took-effect` or `--not-run` once checked)"
                )
                # Lost: the runner starts over on a new connection and reports the doubt from the shard's marks.
                retryable = retryable and failure.error.kind is ErrorKind.UNREACHABLE
            kind = (
                failure.error.kind
                if doubt is None or failure.error.kind is not ErrorKind.MIGRATION
                else ErrorKind.IN_DOUBT
            )
            raise engine_error(TargetError(kind, message, migration.id), retryable=retryable, in_doubt=doubt) from None

    def _raise_if_killed(self) -> None:
        """After the run's watchdog sent KILL QUERY, nothing more commits, even when the server answered as if the
        statement had finished (a killed SLEEP returns 1, not an error)."""
        if self._watch is not None and self._watch.handle.reason is not None:
            raise _Killed(1317, "Query execution was interrupted")

    def _refused_whole(self, error: BaseException) -> bool:
        """Did the server refuse the statement before changing anything?

        MySQL 8 makes each DDL statement atomic, so any error it answers means no effect. MariaDB
        can fail a statement over several tables halfway (`DROP TABLE a, b` drops `a`, then fails
        on `b`), so there only a parse error or a lock wait timeout proves that nothing happened.
        """
        code = error_code(error)
        if is_lost(error):
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

    def _atomically(self, migration: Migration, found: Sequence[Statement], records: Sequence[tuple[str, Any]]) -> None:
        try:
            self._transaction([*((s.sql, None) for s in found), *records, self._clear_progress(migration)])
        except pymysql.err.MySQLError as e:
            failure = self._failure(e, otherwise=ErrorKind.MIGRATION)
            raise engine_error(
                TargetError(failure.error.kind, f"{migration.id}: {failure.error.message}", migration.id),
                retryable=failure.retryable,
            ) from None

    # -- fanout's and yoyo's rows ----------------------------------------------------------------

    def _yoyo_row(self, template: str, values: dict[str, Any]) -> tuple[str, Any]:
        """One of yoyo's statements (its SQL template, its values), in PyMySQL's parameter style."""
        backend = self._backend
        sql, params = change_param_style("pyformat", backend.format_sql(template), values)
        return str(sql), params

    def _records(
        self, migration: Migration, operation: str, recording: Recording | None, how: checksums.How
    ) -> list[tuple[str, Any]]:
        """yoyo's `_yoyo_migration` and `_yoyo_log` rows (as yoyo's apply_one writes them) and fanout's checksum row."""
        backend = self._backend
        self.applied()  # yoyo's tables exist before anything is recorded in them
        marked = {"migration_hash": migration.hash, "migration_id": migration.id, "when": _now()}
        rows = [
            self._yoyo_row(backend.mark_migration_sql, marked),
            self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, operation)),
        ]
        if recording is not None:
            rows.append(
                self._checksum_row(migration.id, recording.sha256, recording.service, recording.environment, how)
            )
        return rows

    def _checksum_row(
        self, migration_id: str, sha256: str, service: str, environment: str, how: checksums.How
    ) -> tuple[str, Any]:
        return (
            f"INSERT INTO `{CHECKSUM_TABLE}` (`migration_id`, `sha256`, `service`, `environment`, `recorded_at`, `how`) "
            "VALUES (%s, %s, %s, %s, UTC_TIMESTAMP(6), %s) ON DUPLICATE KEY UPDATE `sha256` = VALUES(`sha256`), "
            "`service` = VALUES(`service`), `environment` = VALUES(`environment`), "
            "`recorded_at` = VALUES(`recorded_at`), `how` = VALUES(`how`)",
            (migration_id, sha256, service, environment, how.value),
        )

    def _log_row(
        self, migration_id: str, old: str | None, new: str, action: checksums.How, reason: str | None
    ) -> tuple[str, Any]:
        return (
            f"INSERT INTO `{CHECKSUM_LOG_TABLE}` (`migration_id`, `old_sha256`, `new_sha256`, `action`, `reason`, "
            "`by`, `at`) VALUES (%s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))",
            (migration_id, old, new, action.value, reason, checksums.WHO),
        )

    def _clear_progress(self, migration: Migration | str) -> tuple[str, Any]:
        migration_id = migration if isinstance(migration, str) else migration.id
        return (f"DELETE FROM `{PROGRESS_TABLE}` WHERE `migration_id` = %s", (migration_id,))

    def _transaction(self, statements: Sequence[str | tuple[str, Any]]) -> None:
        """Run statements (SQL, or SQL with PyMySQL parameters) in one transaction."""
        try:
            with self._connection.cursor() as cursor:
                cursor.execute("START TRANSACTION")
                for statement in statements:
                    if isinstance(statement, str):
                        cursor.execute(statement)
                    else:
                        cursor.execute(*statement)
                self._raise_if_killed()
                cursor.execute("COMMIT")
        except BaseException:
            self._rollback_quietly()
            raise

    def record(self, statements: Sequence[tuple[str, Any]]) -> None:
        """Commit `statements` in one transaction."""
        if not statements:
            return
        try:
            self._transaction(statements)
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None

    # -- hooks ------------------------------------------------------------------------------

    def run_hook(self, migration: Migration) -> None:
        """Run a post-apply hook's statements and log it in `_yoyo_log` as yoyo does (an `apply` row; never marked)."""
        backend = self._backend
        found = migration_statements(migration)
        try:
            with self._connection.cursor() as cursor:
                for statement in found:
                    cursor.execute(statement.sql)
            self.applied()
            self._transaction([self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, "apply"))])
        except pymysql.err.MySQLError as e:
            self._rollback_quietly()
            raise self._failure(e, otherwise=ErrorKind.MIGRATION) from None

    def failed_hooks(self) -> set[str]:
        """Post-apply hooks whose last run on this shard failed."""
        try:
            with self._connection.cursor() as cursor:
                cursor.execute(
                    f"SELECT l.`migration_id`, l.`action` FROM `{CHECKSUM_LOG_TABLE}` l JOIN (SELECT `migration_id`, "
                    f"MAX(`id`) AS `id` FROM `{CHECKSUM_LOG_TABLE}` WHERE `action` IN (%s, %s) GROUP BY `migration_id`) "
                    "last ON last.`id` = l.`id`",
                    (checksums.How.HOOK_FAILED.value, checksums.How.HOOK_RAN.value),
                )
                return {str(m) for m, action in cursor.fetchall() if action == checksums.How.HOOK_FAILED.value}
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None

    def note_hook(self, hook_id: str, sha256: str, *, failed: bool, reason: str | None) -> None:
        action = checksums.How.HOOK_FAILED if failed else checksums.How.HOOK_RAN
        try:
            self.record([self._log_row(hook_id, None, sha256, action, reason)])
        except EngineError as e:
            # The report still names the failure; only the reminder for the next run is lost.
            log.warning("%s: could not log post-apply hook %s as %s: %s", self._database, hook_id, action.value, e)

    # -- by hand: accept, baseline, mark, unmark, resolve ----------------------------------------

    def adopt(self, changes: Sequence[ChecksumChange], environment: str, reason: str | None) -> None:
        """accept/baseline: record each change's checksum (and log it) in one transaction."""
        rows: list[tuple[str, Any]] = []
        for change in changes:
            rows.append(self._checksum_row(change.migration_id, change.new, change.service, environment, change.how))
            rows.append(self._log_row(change.migration_id, change.old, change.new, change.how, reason))
        self.record(rows)

    def settle(self, items: Sequence[SettleItem], *, record: bool, reason: str, force: bool) -> Settled:
        """mark (`record`) or unmark migrations by hand; never refused.

        Recording writes yoyo's rows (logged as
        `mark`), the checksum and the log row, and clears the migration's progress marks.
        Unmarking removes yoyo's record and the checksum (a rollback that stopped midway is
        then complete as far as fanout knows), or clears an apply's progress marks, so that
        the next apply runs the migration from its first statement. Nothing is refused on
        MySQL (`force` is PostgreSQL's, for INVALID indexes).
        """
        applied = self.applied()
        marks, _ = self.marks_and_invalid()
        progress = {row.migration for row in self.progress()}
        recorded = self.recorded_checksums()
        backend = self._backend
        rows: list[tuple[str, Any]] = []
        changed: list[str] = []
        notes: list[str] = []
        for item in items:
            migration, recording = item.migration, item.recording
            is_applied, has_progress = migration.hash in applied, migration.id in progress
            old = recorded[migration.id].sha256 if migration.id in recorded else None
            if record and is_applied:
                notes.append(
                    f"{migration.id}: already applied" + ("; cleared its progress marks" if has_progress else "")
                )
                if not has_progress:
                    continue
            elif record:
                rows += self._records(migration, "mark", recording, checksums.How.MARKED)
                rows.append(self._log_row(migration.id, old, recording.sha256, checksums.How.MARKED, reason))
                notes.append(f"{migration.id}: recorded as applied")
            elif is_applied:
                rows += [
                    self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, "unmark")),
                    self._yoyo_row(backend.unmark_migration_sql, {"migration_hash": migration.hash}),
                    (f"DELETE FROM `{CHECKSUM_TABLE}` WHERE `migration_id` = %s", (migration.id,)),
                    self._log_row(migration.id, old, "", checksums.How.UNMARKED, reason),
                ]
                notes.append(f"{migration.id}: record removed: the next apply runs it")
            elif has_progress:
                rows.append(self._log_row(migration.id, old, "", checksums.How.UNMARKED, reason))
                done = "in doubt" if migration.id in marks else "partly applied"
                notes.append(
                    f"{migration.id}: progress marks cleared ({done}): the next apply runs it from its first statement"
                )
            else:
                notes.append(f"{migration.id}: neither applied nor in doubt: nothing to do")
                continue
            if has_progress:
                rows.append(self._clear_progress(migration))
            changed.append(migration.id)
        self.record(rows)
        return Settled(tuple(changed), tuple(notes))

    def resolve(self, migration: Migration, *, took_effect: bool, reason: str | None = None) -> StatementInDoubt:
        """Settle the statement in doubt: recorded as done (apply continues after it) or forgotten (apply runs it).

        Call it holding the lock, after checking the shard by hand; raises when nothing is in
        doubt. Logged in fanout_checksum_log (`resolved-done` / `resolved-not-run`) with `reason`.
        """
        doubt = self.statement_in_doubt(migration)
        if doubt is None:
            raise engine_error(
                TargetError(ErrorKind.DATABASE, f"{migration.id}: no statement is in doubt", migration.id)
            )
        where = "`migration_id` = %s AND `statement` = %s AND `state` = 'started'"
        if took_effect:
            sql = f"UPDATE `{PROGRESS_TABLE}` SET `state` = 'done', `updated_at` = UTC_TIMESTAMP(6) WHERE {where}"
        else:
            sql = f"DELETE FROM `{PROGRESS_TABLE}` WHERE {where}"
        action = "resolved-done" if took_effect else "resolved-not-run"
        self.record(
            [
                (sql, (migration.id, doubt.number)),
                (
                    f"INSERT INTO `{CHECKSUM_LOG_TABLE}` (`migration_id`, `old_sha256`, `new_sha256`, `action`, "
                    "`reason`, `by`, `at`) VALUES (%s, NULL, %s, %s, %s, %s, UTC_TIMESTAMP(6))",
                    (migration.id, f"statement {doubt.number}", action, reason, checksums.WHO),
                ),
            ]
        )
        return doubt

    def resolve_statement(self, migration: Migration, *, took_effect: bool, reason: str) -> str | None:
        """`fanout resolve`: settle the statement in doubt (see `resolve`); None when nothing is in doubt."""
        if self.statement_in_doubt(migration) is None:
            return None
        doubt = self.resolve(migration, took_effect=took_effect, reason=reason)
        what = "rollback statement" if self._operation_of(migration) == "rollback" else "statement"
        if took_effect:
            return f"{migration.id}: {what} {doubt.number} ({doubt.first_line}) recorded as done: the next run continues after it"
        return f"{migration.id}: {what} {doubt.number} ({doubt.first_line}) recorded as not run: the next run runs it"

    def _operation_of(self, migration: Migration) -> str:
        return next((r.operation for r in self.progress(migration.id)), "apply")

    def _rollback_quietly(self) -> None:
        with suppress(pymysql.err.MySQLError):
            if self._connection is not None:
                self._connection.rollback()

    def close(self, *, reuse: bool = False) -> None:
        self._close_connection()
