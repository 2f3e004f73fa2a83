"""The plan session: reads yoyo's and fanout's tables inside READ ONLY transactions; creates nothing, takes no lock."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, NamedTuple

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from yoyo.migrations import Migration

from fanout.directory import Target
from fanout.engines import EngineError, WritesNothing
from fanout.engines.connections import Connections, Fact
from fanout.engines.postgres import checksums, indoubt, locking
from fanout.engines.postgres.connection import (
    TrackedConnection,
    TrackedCursor,
    Watch,
    check_session,
    classify_connect_error,
    connect_kwargs,
    connection_lost,
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


class Shape(NamedTuple):
    """Which of yoyo's and fanout's tables a shard holds, in the order the probe reads them (`_PROBED`)."""

    migrations: bool
    versions: bool
    lock: bool
    checksums: bool
    marks: bool


_PROBED = (MIGRATION_TABLE, VERSION_TABLE, locking.YOYO_LOCK_TABLE, checksums.TABLE, indoubt.TABLE)
# What the run's sessions of a database share (`Connections.fact`): its INVALID indexes by schema.
_INVALID_BY_SCHEMA: Fact[Mapping[str, tuple[str, ...]]] = Fact("postgres: INVALID indexes by schema")
# How many of a database's tenant schemas a plan must hold before one session reads the INVALID
# indexes of the whole database for all of them. That read scans pg_index (10-20 ms at 10,000
# schemas, in proportion to the database's indexes); each schema's own costs about 0.47 ms, so a
# plan of a few schemas in a large database reads theirs alone.
_DATABASE_WIDE_FROM = 100
# The schema read, then whether each of `_PROBED` is there. The names are constants that need no
# quoting as literals: only the schema is quoted, per target.
_PROBE_COLUMNS = "SELECT s, " + ", ".join(f"to_regclass(format('%I.%I', s, '{t}')) IS NOT NULL" for t in _PROBED)


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
        self._options = options
        # A tenant schema's INVALID indexes: when the plan holds many schemas of its database, read
        # for all of them by one session (the one that claims it) and shared; meanwhile, and for a
        # few schemas, each session reads its schema's own.
        self._invalid_of_database: Mapping[str, tuple[str, ...]] | None = None
        self._reads_database_invalid = False
        if connections is not None and self._schema_only:
            self._invalid_of_database = connections.fact(target, _INVALID_BY_SCHEMA)
            self._reads_database_invalid = (
                self._invalid_of_database is None
                and connections.targets_of(target) >= _DATABASE_WIDE_FROM
                and connections.claim(target, _INVALID_BY_SCHEMA)
            )
        try:
            if reused is None:
                # Transactions are explicit (BEGIN READ ONLY in the probe's message), or implicit in
                # one message: psycopg2's own BEGIN would cost a round trip per target. The session
                # default (default_transaction_read_only, set at connect) still makes every one read-only.
                self._connection.autocommit = True
                self._backend_pid = check_session(self._connection, target, kwargs, started, self._watch)
            elif self._backend_pid is not None:
                self._watch.check_liveness(self._connection, kwargs, self._backend_pid)
            if not self._read_in_one_message():
                self._read_in_transaction()
        except psycopg2.Error as e:
            self.close()
            raise self._watch.classify(e) from None
        except EngineError:
            self.close()
            raise

    def _probe_from(self, cursor: TrackedCursor) -> str:
        """The FROM of the probe (`_PROBE_COLUMNS`): the target's schema, or the one the session starts in."""
        return cursor.mogrify(
            " FROM (SELECT coalesce(%s, current_schema()) AS s) AS schema", (self._target.schema,)
        ).decode()

    def _read_in_one_message(self) -> bool:
        """The plan's reads of a tenant schema in one round trip, when its tables are where the last schema's were.

        Tenant schemas of one database almost always hold the same tables, so the state query is
        built for the tables the connection's previous schema held and sent with the probe and
        the settings (SET LOCAL, in the message's implicit transaction). False when the guess
        was wrong or the shard needs more than these reads (a lock row, marks, a yoyo older
        than 6): the caller then reads it the long way, in a transaction.
        """
        connection, schema = self._connection, self._target.schema
        guess = connection.shape if isinstance(connection, TrackedConnection) else None
        # Before PostgreSQL 13 a message keeps the statement_timeout it started with: the SET LOCAL
        # of the environment's would not bound the SELECT after it.
        if schema is None or guess is None or connection.server_version < 130000:
            return False
        settings = settings_sql(connection, schema, self._options.session, watch=False, local=True)
        # A schema with none of the tables (never migrated) has no part: only the probe's columns.
        columns = ", ".join([_PROBE_COLUMNS, *self._state_sql(schema, guess)])
        try:
            with connection.cursor() as cursor:
                cursor.execute(one_message([*settings, columns + self._probe_from(cursor)]))
                row = list(cursor.fetchone() or ())
        except psycopg2.Error as e:
            # A table of the guess missing (undefined table, column or schema: classes 42 and 3F,
            # as is a setting refused by name): the long way reads it again and says what is wrong.
            # Anything the watchdog did, a lost connection, or any other error is final.
            if not self._watch.untouched() or connection_lost(e) or (e.pgcode or "")[:2] not in ("42", "3F"):
                raise
            return False
        if Shape(*(bool(v) for v in row[1 : 1 + len(_PROBED)])) != guess:
            return False
        self._schema = row[0]
        self._found(guess)
        self._take_state(row[1 + len(_PROBED) :])
        return not (self._taken or self._marked or (self.initialized and self._applied is None))

    def _read_in_transaction(self) -> None:
        """Probe, then read, inside one READ ONLY transaction (ended by `close`)."""
        with self._connection.cursor() as cursor:
            # Settings and the probe of yoyo's tables in one round trip; the tables are looked
            # up in the target's schema, or the one the session starts in (yoyo's default).
            settings = settings_sql(self._connection, self._target.schema, self._options.session, watch=False)
            cursor.execute(one_message(["BEGIN READ ONLY", *settings, _PROBE_COLUMNS + self._probe_from(cursor)]))
            row = cursor.fetchone()
        assert row is not None
        self._schema = row[0] or ""
        shape = Shape(*(bool(v) for v in row[1:]))
        self._found(shape)
        if isinstance(self._connection, TrackedConnection) and self._target.schema is not None:
            self._connection.shape = shape
        parts = self._state_sql(self._schema, shape)
        if not parts:  # none of the tables, and the INVALID indexes already shared: nothing to read
            self._take_state([])
            return
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT " + ", ".join(parts))
            self._take_state(list(cursor.fetchone() or ()))

    def _found(self, shape: Shape) -> None:
        self.initialized, self._has_version_table, self._has_lock_table = shape.migrations, shape.versions, shape.lock
        self._has_checksums, self._has_marks = shape.checksums, shape.marks

    def _state_sql(self, schema: str, shape: Shape) -> list[str]:
        """What a plan asks of the shard, as scalar expressions over the tables `shape` says are there.

        The lock row, yoyo's records, the checksums, the INVALID indexes and whether any mark is
        left: a plan over thousands of tenant schemas paid a round trip for each of them. The
        rarer reads (who holds a lock, the marks themselves, a yoyo older than 6) follow only
        when there is something to read.
        """
        if self._reads_database_invalid:
            parts = [f"({indoubt.INVALID_BY_SCHEMA_SQL})"]
        elif self._invalid_of_database is None:
            parts = [f"({indoubt.invalid_sql(schema if self._schema_only else None)})"]
        else:
            parts = []
        if shape.lock:
            parts.append(locking.taken_sql(schema))
        if shape.migrations and shape.versions:
            parts.append(applied_json_sql(schema))
        if shape.checksums:
            parts.append(checksums.json_sql(schema))
        if shape.marks:
            # The marks table stays once created: only a mark in it is worth the long way.
            parts.append(f"EXISTS (SELECT 1 FROM {locking.qualified(schema, indoubt.TABLE)})")
        return parts

    def _take_state(self, row: list[Any]) -> None:
        if self._reads_database_invalid:
            self._invalid_of_database = MappingProxyType(indoubt.invalid_by_schema(row.pop(0)))
            self._reads_database_invalid = False  # the long way, if taken after this, need not read it again
            if self._connections is not None:
                self._connections.learn(self._target, _INVALID_BY_SCHEMA, self._invalid_of_database)
        if self._invalid_of_database is not None:
            self._invalid: tuple[str, ...] = self._invalid_of_database.get(self._schema, ())
        else:
            self._invalid = tuple(row.pop(0))
        self._taken = bool(row.pop(0)) if self._has_lock_table else False
        self._applied = applied_from_json(row.pop(0)) if self.initialized and self._has_version_table else None
        self._checksums = checksums.from_json(row.pop(0)) if self._has_checksums else {}
        # The marks table stays once created: only a mark in it is worth reading.
        self._marked = bool(row.pop(0)) if self._has_marks else False

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
        if not self._marked:
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
        if self._reads_database_invalid and self._connections is not None:
            self._connections.unclaim(self._target, _INVALID_BY_SCHEMA)  # failed before it read them
            self._reads_database_invalid = False
        try:
            # Everything this session set (search_path, timeouts) was set inside its READ ONLY
            # transaction (or its one message's): the rollback restores the session as it was opened.
            status = self._connection.info.transaction_status
            if status in (
                psycopg2.extensions.TRANSACTION_STATUS_INTRANS,
                psycopg2.extensions.TRANSACTION_STATUS_INERROR,
            ):
                with self._connection.cursor() as cursor:
                    cursor.execute("ROLLBACK")
            elif status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                reuse = False
        except psycopg2.Error:
            reuse = False
        reuse = reuse and self._watch.untouched() and not self._connection.closed
        if self._connections is not None:
            self._connections.give_back(self._target, self._connection, self._backend_pid, reuse=reuse)
            return
        with contextlib.suppress(psycopg2.Error):
            self._connection.close()
