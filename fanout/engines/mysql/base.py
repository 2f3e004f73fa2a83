"""What the apply session and the read-only one share: the connection under watch, classification, fanout's tables read."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import pymysql
import pymysql.connections
import pymysql.err
from yoyo.migrations import Migration, read_sql_migration

from fanout import checksums, indoubt
from fanout.checksums import TABLE as CHECKSUM_TABLE
from fanout.directory import Target
from fanout.engines import EngineError
from fanout.engines.mysql.core import (
    PROGRESS_COLUMNS,
    PROGRESS_TABLE,
    Endpoint,
    Flavor,
    ProgressRow,
    Settings,
    Statement,
    StatementInDoubt,
    Timeouts,
    connect,
    connect_kwargs,
    failure_of,
    migration_statements,
    statements,
)
from fanout.engines.mysql.watch import TrackedConnection, Watching, _Watch, set_tcp
from fanout.report import ErrorKind, InDoubt

log = logging.getLogger(__name__)

NO_SETTINGS = Settings()
DEFAULT_TIMEOUTS = Timeouts()


def _rollback_statements(migration: Migration) -> list[Statement]:
    """The statements of the migration's .rollback.sql, in the order yoyo runs them (file order)."""
    path = os.path.splitext(migration.path)[0] + ".rollback.sql"
    if not os.path.exists(path):
        return []
    _, _, sqls = read_sql_migration(path)
    return statements(sqls)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class _Base:
    """What both sessions share: the connection, its watch, error classification, reading fanout's tables."""

    _connection: Any
    _watch: _Watch | None
    # The progress table of fanout before rollbacks were recorded there has no `operation` column.
    _operation = "`operation`"

    @property
    def _progress_columns(self) -> str:
        return PROGRESS_COLUMNS.replace("`operation`", self._operation)

    def _has_operation(self, cursor: Any) -> bool:
        cursor.execute(
            "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = %s "
            "AND column_name = 'operation'",
            (PROGRESS_TABLE,),
        )
        return bool(cursor.fetchone()[0])

    _connections: Any
    _target: Any
    flavor: Flavor
    version: str

    def _connect(self, where: Endpoint | Target, timeouts: Timeouts, watching: Watching | None) -> None:
        self._watch = None
        if self._connections is not None:
            self._connections.opening(self._target)
        try:
            self._connection = connect(where, timeouts, factory=TrackedConnection)
        except EngineError:
            if self._connections is not None:
                self._connections.not_opened(self._target)
            raise
        if watching is not None:
            set_tcp(self._connection, watching.tcp)
            self._watch = _Watch(self._connection, connect_kwargs(where, timeouts), watching)

    def _failure(self, error: BaseException, *, otherwise: ErrorKind = ErrorKind.DATABASE) -> EngineError:
        """What `error` means, given what the watchdog did to the connection (if anything)."""
        verdict = self._watch.verdict() if self._watch is not None else None
        if verdict is not None:
            return verdict
        return failure_of(error, otherwise=otherwise)

    def _tables(self, cursor: Any, names: Sequence[str]) -> set[str]:
        cursor.execute(
            "SELECT `table_name` FROM information_schema.tables WHERE `table_schema` = DATABASE() "
            f"AND `table_name` IN ({', '.join(['%s'] * len(names))})",
            tuple(names),
        )
        return {str(row[0]) for row in cursor.fetchall()}

    def progress(self, migration_id: str | None = None) -> list[ProgressRow]:
        """fanout's statement marks (of one migration, or all), in order."""
        where, params = ("WHERE `migration_id` = %s ", (migration_id,)) if migration_id is not None else ("", ())
        try:
            with self._connection.cursor() as cursor:
                if not self._has_progress(cursor):
                    return []
                cursor.execute(
                    f"SELECT {self._progress_columns} FROM `{PROGRESS_TABLE}` {where}ORDER BY `migration_id`, `statement`",
                    params,
                )
                return [ProgressRow(*row) for row in cursor.fetchall()]
        except pymysql.err.MySQLError as e:
            raise self._failure(e) from None

    def _has_progress(self, cursor: Any) -> bool:
        return True

    def _read_marks(self, cursor: Any, applied_ids: set[str]) -> dict[str, indoubt.Mark]:
        """A mark per migration in doubt: a statement started and never done, or a rollback that stopped midway.

        An apply whose statements are all recorded as done is no mark: apply continues after
        them. A rollback that stopped midway leaves a migration still recorded as applied
        whose effect is half undone: it is a mark (operation rollback) until rolled back on.
        """
        cursor.execute(
            f"SELECT `migration_id`, {self._operation}, `state`, `run_id`, `host`, `pid`, `updated_at` FROM `{PROGRESS_TABLE}` "
            "ORDER BY `migration_id`, `statement`"
        )
        marks: dict[str, indoubt.Mark] = {}
        started: set[str] = set()
        for migration_id, operation, state, run_id, host, pid, updated_at in cursor.fetchall():
            doubtful = state == "started" or (operation == "rollback" and migration_id in applied_ids)
            if doubtful and migration_id not in started:
                if state == "started":
                    started.add(migration_id)
                resumable = state != "started"  # a rollback stopped between statements
                marks[migration_id] = indoubt.Mark(migration_id, operation, run_id, host, pid,
                                                   updated_at or datetime.min, (), resumable)  # fmt: skip
        return marks

    def _doubt(self, migration: Migration, mark: indoubt.Mark) -> InDoubt:
        """The report's InDoubt of a marked migration: the statement started and never done, or where it stopped."""
        rows = self.progress(migration.id)
        operation = mark.operation
        total = len(_rollback_statements(migration) if operation == "rollback" else migration_statements(migration))
        started = next((r for r in rows if r.state == "started"), None)
        if started is not None:
            doubt = StatementInDoubt(migration.id, started.number, total, started.first_line, started.run_id,
                                     started.host, started.pid, started.updated_at)  # fmt: skip
            return doubt.report(operation)
        last = max(rows, key=lambda r: r.number, default=None)
        where = f"its rollback stopped after statement {last.number} of {total} ({last.first_line})" if last else None
        return InDoubt(migration.id, operation, mark.run_id, mark.host, mark.pid, mark.started_at,
                       statement_text=where)  # fmt: skip

    def _read_checksums(self, cursor: Any) -> dict[str, checksums.Recorded]:
        cursor.execute(f"SELECT `migration_id`, `sha256`, `service`, `environment`, `how` FROM `{CHECKSUM_TABLE}`")
        return {str(row[0]): checksums.Recorded(*(str(v) for v in row)) for row in cursor.fetchall()}

    def _close_connection(self, reuse: bool = False) -> None:
        if self._watch is not None:
            self._watch.release()
        connection, self._connection = self._connection, None
        if connection is None:
            return
        with suppress(pymysql.err.Error):
            connection.close()
        if self._connections is not None:
            # MySQL sessions are not handed on: GET_LOCK and session variables would follow the connection.
            self._connections.give_back(self._target, connection, None, reuse=False)
