"""The plan session: reads yoyo's and fanout's tables inside READ ONLY transactions; creates nothing, takes no lock."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from yoyo.migrations import Migration

from fanout import checksums, indoubt, locking
from fanout.directory import Target
from fanout.engines import EngineError, WritesNothing
from fanout.engines.connections import Connections
from fanout.engines.postgres.connection import (
    TrackedConnection,
    TrackedCursor,
    Watch,
    check_session,
    classify_connect_error,
    connect_kwargs,
    one_message,
    settings_sql,
)
from fanout.engines.postgres.migrations import (
    MIGRATION_TABLE,
    VERSION_TABLE,
    applied_from_json,
    applied_json_sql,
    examine,
)
from fanout.interrupt import Interrupt
from fanout.options import RunOptions
from fanout.report import InDoubt, LockHolder


class ReadOnlySession(WritesNothing):
    """Reads yoyo's tables inside READ ONLY transactions; creates nothing and takes no lock."""

    def __init__(
        self,
        target: Target,
        options: RunOptions,
        run_id: str,
        interrupt: Interrupt,
        deadline: float | None = None,
        connections: Connections | None = None,
    ) -> None:
        # The server enforces read-only: even a bug here could not write.
        kwargs = connect_kwargs(target, options, run_id, read_only=True)
        started = time.monotonic()
        self._target, self._connections = target, connections
        reused = connections.take(target) if connections is not None else None
        if reused is not None:
            self._connection, self._backend_pid = reused.connection, reused.backend_pid
        else:
            if connections is not None:
                connections.opening(target)
            try:
                self._connection = psycopg2.connect(**kwargs, connection_factory=TrackedConnection)
            except psycopg2.Error as e:
                if connections is not None:
                    connections.not_opened(target)
                raise classify_connect_error(e, target) from None
            self._backend_pid = None
        self._connection.cursor_factory = TrackedCursor
        self._watch = Watch(self._connection, interrupt, options, deadline)
        self.initialized = False
        self._schema_only = target.schema is not None
        try:
            if reused is None:
                self._connection.set_session(readonly=True)
                self._backend_pid = check_session(self._connection, target, kwargs, started, self._watch)
            elif self._backend_pid is not None:
                self._watch.check_liveness(self._connection, kwargs, self._backend_pid)
            with self._connection.cursor() as cursor:
                # Settings and the probe of yoyo's tables in one round trip; the tables are looked
                # up in the target's schema, or the one the session starts in (yoyo's default).
                settings = settings_sql(self._connection, target.schema, options.session, watch=False)
                probe = cursor.mogrify(
                    "SELECT s, "
                    + ", ".join(["to_regclass(format('%%I.%%I', s, %s)) IS NOT NULL"] * 5)
                    + " FROM (SELECT coalesce(%s, current_schema()) AS s) AS schema",
                    (
                        MIGRATION_TABLE,
                        VERSION_TABLE,
                        locking.YOYO_LOCK_TABLE,
                        checksums.TABLE,
                        indoubt.TABLE,
                        target.schema,
                    ),
                ).decode()
                cursor.execute(one_message([*settings, probe]))
                row = cursor.fetchone()
            assert row is not None
            self._schema: str = row[0] or ""
            self.initialized, self._has_version_table, self._has_lock_table, self._has_checksums, self._has_marks = (
                bool(v) for v in row[1:]
            )
            self._read_state()
        except psycopg2.Error as e:
            self.close()
            raise self._watch.classify(e) from None
        except EngineError:
            self.close()
            raise

    def _read_state(self) -> None:
        """Read what a plan asks of the shard (lock row, yoyo's records, checksums, INVALID indexes) in one round trip.

        One query of scalar subqueries over the tables the probe found: a plan over thousands of
        tenant schemas paid a round trip for each of them. The rarer reads (who holds a lock, the
        marks of migrations in doubt, a yoyo older than 6) follow only when there is something.
        """
        parts = [f"({indoubt.invalid_sql(self._schema if self._schema_only else None)})"]
        if self._has_lock_table:
            parts.append(locking.taken_sql(self._schema))
        if self.initialized and self._has_version_table:
            parts.append(applied_json_sql(self._schema))
        if self._has_checksums:
            parts.append(checksums.json_sql(self._schema))
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT " + ", ".join(parts))
            row = list(cursor.fetchone() or ())
        self._invalid: tuple[str, ...] = tuple(row.pop(0))
        self._taken = bool(row.pop(0)) if self._has_lock_table else False
        self._applied = applied_from_json(row.pop(0)) if self.initialized and self._has_version_table else None
        self._checksums = checksums.from_json(row.pop(0)) if self._has_checksums else {}

    @contextmanager
    def lock(self, wait: float) -> Iterator[tuple[LockHolder | None, None]]:
        try:
            holder = locking.read_holder(self._connection, self._schema) if self._taken else None
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None
        yield holder, None

    def applied(self) -> dict[str, str]:
        if not self.initialized:
            return {}
        if self._applied is not None:
            return self._applied
        try:
            with self._connection.cursor() as cursor:
                # yoyo < 6 kept ids, not hashes.
                cursor.execute(f'SELECT "id" FROM {locking.qualified(self._schema, MIGRATION_TABLE)}')
                return {hashlib.sha256(row[0].encode()).hexdigest(): row[0] for row in cursor.fetchall()}
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def recorded_checksums(self) -> dict[str, checksums.Recorded]:
        return self._checksums

    def marks_and_invalid(self) -> tuple[dict[str, indoubt.Mark], tuple[str, ...]]:
        if not self._has_marks:
            return {}, self._invalid
        try:
            with self._connection.cursor() as cursor:
                return indoubt.read(cursor, self._schema, only_schema=self._schema_only)
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def in_doubt(self, migration: Migration, mark: indoubt.Mark, *, repair: bool) -> tuple[InDoubt | None, str | None]:
        """Plan mode: say what is there; never repair."""
        try:
            with self._connection.cursor() as cursor:
                return examine(cursor, self._schema, self._schema_only, migration, mark)[0], None
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def close(self, *, reuse: bool = False) -> None:
        self._watch.release()
        try:
            # Everything this session set (search_path, timeouts) was set inside its READ ONLY
            # transaction: the rollback restores the session as it was when it was opened.
            self._connection.rollback()
        except psycopg2.Error:
            reuse = False
        reuse = reuse and self._watch.untouched() and not self._connection.closed
        if self._connections is not None:
            self._connections.give_back(self._target, self._connection, self._backend_pid, reuse=reuse)
            return
        with contextlib.suppress(psycopg2.Error):
            self._connection.close()
