"""The apply session: yoyo's PostgreSQL backend driven under the shard lock, one migration at a time."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from yoyo.connections import DatabaseURI
from yoyo.migrations import Migration
from yoyo.utils import change_param_style

from fanout.directory import Target
from fanout.engines import (
    ChecksumChange,
    EngineError,
    Recording,
    Settled,
    SettleItem,
    in_doubt_error,
    timed_out,
)
from fanout.engines.connections import Connections
from fanout.engines.postgres import checksums, indoubt, locking
from fanout.engines.postgres.backend import Backend
from fanout.engines.postgres.connection import (
    FINISHED_AT,
    FRESH_SESSION,
    IDLE,
    ORIGINAL_ROLE,
    Watch,
    check_session,
    classify_connect_error,
    classify_database_error,
    connect_kwargs,
    connection_lost,
    one_message,
    pg_message,
    settings_sql,
)
from fanout.engines.postgres.migrations import (
    MIGRATION_TABLE,
    applied_from_json,
    applied_json_sql,
    examine,
    plain_rollback_sql,
    plain_sql,
    sql_statements,
)
from fanout.interrupt import Interrupt
from fanout.options import RunOptions, SessionSettings
from fanout.report import ErrorKind, InDoubt, LockHolder, TargetError

log = logging.getLogger(__name__)

LOCK_POLL_SECONDS = 0.25


class YoyoSession:
    """Applies migrations through yoyo under the shard lock."""

    def __init__(
        self,
        target: Target,
        options: RunOptions,
        run_id: str,
        interrupt: Interrupt,
        deadline: float | None = None,
        connections: Connections | None = None,
    ) -> None:
        kwargs = connect_kwargs(target, options, run_id)
        if target.schema:
            kwargs["schema"] = target.schema
        uri = DatabaseURI("postgresql", None, None, None, None, None, kwargs)
        started = time.monotonic()
        self._target, self._connections = target, connections
        reused = connections.take(target) if connections is not None else None
        if reused is None and connections is not None:
            connections.opening(target)
        try:
            self._backend = Backend(uri, MIGRATION_TABLE, reused.connection if reused else None)
        except psycopg2.Error as e:
            if connections is not None:
                connections.not_opened(target)
            raise classify_connect_error(e, target) from None
        self._connection = self._backend.connection
        self._backend_pid = reused.backend_pid if reused else None
        # False once the lock could not be given back: the connection is then closed, never handed on.
        self._released_cleanly = True
        self._watch = Watch(self._connection, interrupt, options, deadline)
        self._interrupt = interrupt
        self._options = options
        self._owner = locking.Owner(pid=os.getpid(), run_id=run_id)
        self._display = target.display
        # True once a migration may have changed the session (role, search_path, settings,
        # temporary tables, an open transaction): the next message then starts by restoring it.
        self._dirty = False
        self._schema_only = target.schema is not None
        self._repair = options.repair_invalid
        # fanout_checksum_log is created when first written: whether it exists, None until known.
        self._has_log: bool | None = None
        self._yoyo_templates: dict[tuple[str, ...], str] = {}
        # What applied() read for the calls that follow it, each taken once.
        self._next_checksums: dict[str, checksums.Recorded] | None = None
        self._next_marks: tuple[dict[str, indoubt.Mark], tuple[str, ...]] | None = None
        try:
            plain = connect_kwargs(target, options, run_id)
            if reused is None:
                self._backend_pid = check_session(self._connection, target, plain, started, self._watch)
            elif self._backend_pid is not None:
                self._watch.check_liveness(self._connection, plain, self._backend_pid)
            self._settings, self._schema = self._configure(target.schema, options.session)
            self._backend.bookkeeping = self._schema
            self._backend.init_database()
        except psycopg2.Error as e:
            self.close()
            raise self._watch.classify(e) from None
        except EngineError:
            self.close()
            raise
        self.initialized = True

    def _configure(self, schema: str | None, settings: SessionSettings) -> tuple[list[str], str]:
        """Apply the session's settings and find the schema of yoyo's tables, in one round trip.

        Returns the settings as statements (to apply again after each reset) and the schema:
        the target's, or the one the session starts in, which is where yoyo keeps its tables.
        """
        watch = self._connection.server_version >= 140000
        with self._connection.cursor() as cursor:
            for attempt in (watch, False) if watch else (False,):
                statements = settings_sql(self._connection, schema, settings, watch=attempt)
                probe = cursor.mogrify("SELECT coalesce(%s, current_schema())", (schema,)).decode()
                try:
                    cursor.execute(one_message([*statements, probe]))
                except psycopg2.errors.InvalidParameterValue as e:
                    if not attempt:
                        raise
                    # Platforms without the check refuse any non-zero interval; the rest still applies.
                    log.debug("client_connection_check_interval unavailable: %s", e)
                    continue
                row = cursor.fetchone()
                break
        found = row[0] if row else None
        if not found:
            raise EngineError(
                TargetError(ErrorKind.DATABASE, "no schema for yoyo's tables: the search_path names no existing schema")
            )
        return statements, str(found)

    def _prologue(self) -> list[str]:
        """What the next message starts with so that it runs in a fresh session (nothing when it already does)."""
        statements = []
        if self._connection.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            statements.append("ROLLBACK")  # a migration left a transaction open, or aborted
        if self._dirty:
            statements += [*FRESH_SESSION, *self._settings]
        return statements

    def _clean(self) -> None:
        """Restore a fresh session now (one round trip; none when it is fresh already)."""
        prologue = self._prologue()
        if prologue:
            with self._connection.cursor() as cursor:
                cursor.execute(one_message(prologue))
            self._dirty = False
        self._backend._in_transaction = False

    def _commit_clean(self, statements: Sequence[str], *, then: str | None = None) -> None:
        """Commit fanout's own `statements` in a fresh session, all in one round trip."""
        locking.in_one_transaction(self._connection, statements, before=self._prologue(), then=then)
        self._dirty = False

    @contextmanager
    def lock(self, wait: float) -> Iterator[tuple[LockHolder | None, LockHolder | None]]:
        deadline = time.monotonic() + wait
        while True:
            try:
                attempt = locking.try_acquire(self._connection, self._owner, self._schema)
            except psycopg2.Error as e:
                raise self._watch.classify(e) from None
            if attempt.taken:
                break
            if self._interrupt.stopping.is_set():
                raise EngineError(TargetError(ErrorKind.INTERRUPTED, "interrupted while waiting for the shard's lock"))
            if self._watch.deadline is not None and time.monotonic() >= self._watch.deadline:
                who = attempt.holder.describe() if attempt.holder else "another process"
                raise timed_out(self._options, f"still waiting for the shard's lock, held by {who}")
            if time.monotonic() >= deadline:
                who = attempt.holder.describe() if attempt.holder else "another process"
                raise EngineError(TargetError(ErrorKind.LOCKED, f"lock held by {who}; gave up after {wait:g}s"))
            time.sleep(LOCK_POLL_SECONDS * random.uniform(0.5, 1.5))
        if attempt.broken is not None:
            log.warning("%s: broke the stale lock of %s", self._display, attempt.broken.describe())
        self._backend._is_locked = True
        try:
            yield None, attempt.broken
        finally:
            self._backend._is_locked = False
            try:
                locking.release(self._connection, self._owner, self._schema, before=self._prologue())
                self._dirty = False
                self._backend._in_transaction = False
            except psycopg2.Error:
                self._released_cleanly = False
                # Only reachable when the connection broke; the lock is then recognizably stale.
                log.warning("could not release the lock on %s; the next run breaks it", self._display)

    def applied(self) -> dict[str, str]:
        """yoyo's records; the same round trip reads what the runner asks next (checksums, INVALID indexes,
        whether marks and the log exist), kept for the next `recorded_checksums` and `marks_and_invalid`."""
        try:
            self._backend.ensure_internal_schema_updated()  # yoyo creates (or upgrades) its tables here
            with self._connection.cursor() as cursor:
                exist = cursor.mogrify(
                    "to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
                    (
                        locking.qualified(self._schema, indoubt.TABLE),
                        locking.qualified(self._schema, checksums.LOG_TABLE),
                    ),
                ).decode()
                cursor.execute(
                    f"SELECT {applied_json_sql(self._schema)}, {checksums.json_sql(self._schema)}, "  # created with the lock tables
                    f"({indoubt.invalid_sql(self._schema if self._schema_only else None)}), {exist}"
                )
                applied, recorded, invalid, has_marks, has_log = cursor.fetchone()
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None
        self._next_checksums = checksums.from_json(recorded)
        self._next_marks = None if has_marks else ({}, tuple(invalid))
        self._has_log = bool(has_log)
        return applied_from_json(applied)

    def recorded_checksums(self) -> dict[str, checksums.Recorded]:
        found, self._next_checksums = self._next_checksums, None
        if found is not None:
            return found
        try:
            with self._connection.cursor() as cursor:
                return checksums.read(cursor, self._schema, exists=True)  # created with the lock tables
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def marks_and_invalid(self) -> tuple[dict[str, indoubt.Mark], tuple[str, ...]]:
        found, self._next_marks = self._next_marks, None
        if found is not None:
            return found
        try:
            with self._connection.cursor() as cursor:
                return indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=None)
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def in_doubt(self, migration: Migration, mark: indoubt.Mark, *, repair: bool) -> tuple[InDoubt | None, str | None]:
        try:
            self._clean()
            with self._connection.cursor() as cursor:
                doubt, found, only = examine(cursor, self._schema, self._schema_only, migration, mark)
                if not (repair and indoubt.repairable(only, found)):
                    return doubt, None
                for index in found.own_invalid:
                    cursor.execute(indoubt.drop_sql(index))
                cursor.execute(indoubt.clear_sql(cursor, self._schema, migration.id))
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None
        dropped = f"dropped INVALID index {', '.join(found.own_invalid)}, " if found.own_invalid else ""
        return None, f"in doubt since run {mark.run_id}: {dropped}running it again (--repair-invalid)"

    def apply(self, migration: Migration, recording: Recording) -> bool:
        return self._run(
            migration,
            "apply",
            plain_sql(migration),
            lambda: self._records(migration, recording),
            lambda records: self._apply_marked(migration, records),
        )

    def rollback(self, migration: Migration, recorded: Recording, reason: str | None) -> bool:
        """Run the migration's rollback and remove its records (yoyo's and fanout's) in one transaction.

        A non-transactional rollback runs outside a transaction, as in yoyo; its records are
        removed in one transaction afterwards.
        """
        return self._run(
            migration,
            "rollback",
            plain_rollback_sql(migration),
            lambda: self._unrecords(migration, recorded, reason),
            lambda unrecords: self._rollback_marked(migration, unrecords),
        )

    def _run(
        self,
        migration: Migration,
        direction: str,
        statements: list[str] | None,
        rows: Callable[[], list[str]],
        marked: Callable[[list[str]], None],
    ) -> bool:
        """Run a migration in `direction` ("apply" or "rollback") with the `rows` that record it.

        A plain transactional .sql migration: a fresh session, its statements and the rows, one
        transaction in one round trip. Other transactional ones: yoyo's steps (as savepoints) and
        the rows in one transaction. A non-transactional one goes to `marked`, which marks it as
        started first.
        """
        backend = self._backend
        try:
            # Inside the migration's transaction, before the rows: a migration that switched roles
            # must not make fanout record as a role without rights on yoyo's tables.
            with self._connection.cursor() as cursor:
                held = locking.still_held_sql(cursor, self._schema)
            records = [*ORIGINAL_ROLE, *rows(), held]
            if statements is not None:
                prologue = self._prologue()
                self._dirty = True
                locking.in_one_transaction(self._connection, [*statements, *records], before=prologue)
            elif migration.use_transactions:
                self._clean()
                self._dirty = True
                with backend.transaction():
                    migration.process_steps(backend, direction)
                    self._execute(one_message(records))
            else:
                marked(records)
        except psycopg2.Error as e:
            self._reset()
            raise self._watch.classify(e, otherwise=ErrorKind.MIGRATION) from None
        return True

    def _rollback_marked(self, migration: Migration, unrecords: Sequence[str]) -> None:
        """A non-transactional migration's rollback, as `_apply_marked` applies one: marked as started
        (committed, operation "rollback"), run statement by statement, then unrecorded with the mark
        cleared in one transaction. Stopped midway, the mark stays and the next run reports the
        migration in doubt instead of rolling it back blindly again."""
        backend = self._backend
        before = self._mark_started(migration.id, "rollback")
        with self._connection.cursor() as cursor:
            clear = indoubt.clear_sql(cursor, self._schema, migration.id)
        executed = 0
        self._dirty = True
        try:
            with backend.disable_transactions():
                for step in reversed(migration.steps):  # as yoyo: the rollback file's statements in file order
                    step.rollback(backend)
                    # yoyo pairs a migration's statements with its rollback's: an apply statement with
                    # no rollback partner runs nothing here. Anything else (or unknown) counts as run.
                    if getattr(getattr(step, "step", step), "_rollback", "") is not None:
                        executed += 1
        except psycopg2.Error as e:
            failure = self._watch.classify(e, otherwise=ErrorKind.MIGRATION)
            if connection_lost(e) or self._watch.handle.reason is not None:
                raise failure from None  # the mark stays: the next run says what is there
            try:
                self._clean()
                left = tuple(sorted(self._invalid_indexes() - set(before)))
                if not executed and not left:
                    with self._connection.cursor() as cursor:
                        cursor.execute(clear)  # its first statement failed whole: nothing happened, not in doubt
                    raise failure from None
            except psycopg2.Error:
                raise EngineError(failure.error) from None
            gone = f"; left INVALID index {', '.join(left)}" if left else ""
            ran = f"; {executed} of its statements had run" if executed else ""
            message = (
                f"{failure.error.message}{gone}{ran}; marked in doubt: the next run reports it until it is settled "
                "(`fanout mark` if it is still applied, `fanout unmark` if its rollback is complete)"
            )
            raise EngineError(replace(failure.error, message=message, invalid_indexes=left)) from None
        self._commit_clean([*unrecords, clear])

    def _unrecords(self, migration: Migration, recorded: Recording, reason: str | None) -> list[str]:
        """yoyo's `_yoyo_log` "rollback" row and the removal of its `_yoyo_migration` row, as yoyo's
        `rollback_one` writes them, then the removal of fanout's checksum row, logged."""
        backend = self._backend
        self._create_log()
        rows = [
            self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, "rollback")),
            self._yoyo_row(backend.unmark_migration_sql, {"migration_hash": migration.hash}),
        ]
        with self._connection.cursor() as cursor:
            rows.append(checksums.unrecord_sql(cursor, self._schema, migration.id))
            rows.append(
                checksums.log_sql(
                    cursor, self._schema, migration.id, recorded.sha256 or None, "", checksums.How.ROLLED_BACK, reason
                )
            )
        return rows

    def _mark_started(self, migration_id: str, operation: str) -> tuple[str, ...]:
        """Commit the started mark of a non-transactional `operation` in a fresh session, before its
        first statement; returns the INVALID indexes already there (recorded with the mark, so that
        what the operation leaves behind can be told apart later)."""
        # The marks table is created before the first mark (the round trip that restores a fresh session).
        self._create(indoubt.create_sql(self._schema))
        owner = self._owner
        with self._connection.cursor() as cursor:
            _, before = indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)
            cursor.execute(
                indoubt.mark_sql(
                    cursor, self._schema, migration_id, operation=operation, run_id=owner.run_id, host=owner.host,
                    pid=owner.pid, invalid=before,
                )
            )  # fmt: skip
        return before

    def _invalid_indexes(self) -> set[str]:
        """Every INVALID index the session can see (a failed CREATE/DROP INDEX CONCURRENTLY leaves one)."""
        with self._connection.cursor() as cursor:
            return set(indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)[1])

    def _apply_marked(self, migration: Migration, records: Sequence[str]) -> None:
        """A non-transactional migration: marked as started (committed), run, then recorded with the mark cleared.

        Whatever stops it midway, the mark stays and the next run reports the migration in
        doubt instead of running it blindly again; only a failure of its first statement
        that left nothing behind (no new INVALID index) clears the mark, since a single
        statement outside a transaction is atomic but for the INVALID index of a
        CONCURRENTLY build. Never records it while an index it builds is INVALID.
        """
        backend = self._backend
        builds, only = indoubt.index_builds(sql_statements(migration) or [])
        for attempt in itertools.count():
            before = self._mark_started(migration.id, "apply")
            executed = []
            self._dirty = True
            try:
                with backend.disable_transactions():
                    for step in migration.steps:
                        step.apply(backend)
                        executed.append(step)
            except psycopg2.Error as e:
                raise self._failed_midway(migration, e, executed, builds, only, before) from None
            self._clean()  # the migration's session changes must not reach what follows (nor its lookups)
            with self._connection.cursor() as cursor:
                _, now = indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)
                found = indoubt.inspect(cursor, builds, now, before)
                if found.own_invalid and self._repair and attempt == 0 and indoubt.repairable(only, found):
                    # An INVALID index of the same name that IF NOT EXISTS skipped: build it for real.
                    for index in found.own_invalid:
                        cursor.execute(indoubt.drop_sql(index))
                    continue
                clear = indoubt.clear_sql(cursor, self._schema, migration.id)
            if found.own_invalid:
                doubt = InDoubt(
                    migration.id, "apply", self._owner.run_id, self._owner.host, self._owner.pid,
                    datetime.now(UTC).replace(tzinfo=None),
                    found.invalid, found.valid, found.missing,
                )  # fmt: skip
                message = (
                    f"ran, but index {', '.join(found.own_invalid)} is INVALID (CREATE INDEX ... IF NOT EXISTS "
                    "skips an INVALID index of that name): not recorded as applied. "
                    + in_doubt_error(doubt).message.removeprefix("in doubt: ")
                )
                raise EngineError(
                    TargetError(ErrorKind.IN_DOUBT, message, invalid_indexes=found.own_invalid), in_doubt=doubt
                )
            self._commit_clean([*records, clear])
            return

    def _failed_midway(
        self,
        migration: Migration,
        error: psycopg2.Error,
        executed: list[Any],
        builds: list[indoubt.IndexBuild],
        only: bool,
        before: tuple[str, ...],
    ) -> EngineError:
        """Classify a failed non-transactional migration; keep its mark unless nothing can have happened."""
        failure = self._watch.classify(error, otherwise=ErrorKind.MIGRATION)
        if connection_lost(error) or self._watch.handle.reason is not None:
            return failure  # the mark stays: the retry on a new connection finds it and says what is there
        for step in reversed(executed):  # as yoyo does: undo the steps that ran, as far as their rollbacks go
            try:
                step.rollback(self._backend)
            except psycopg2.Error as e:
                log.warning("%s: rollback of a step of %s failed: %s", self._display, migration.id, pg_message(e))
        try:
            self._clean()
            with self._connection.cursor() as cursor:
                _, now = indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)
                found = indoubt.inspect(cursor, builds, now, before)
                if not executed and found.own_invalid and self._repair and only:
                    for index in found.own_invalid:
                        cursor.execute(indoubt.drop_sql(index))
                    _, now = indoubt.read(cursor, self._schema, only_schema=self._schema_only, marks=False)
                    found = indoubt.inspect(cursor, builds, now, before)
                if not executed and not found.invalid:
                    cursor.execute(
                        indoubt.clear_sql(cursor, self._schema, migration.id)
                    )  # nothing happened: not in doubt
                    return failure
        except psycopg2.Error:
            return EngineError(failure.error)  # the mark stays
        left = f"; left INVALID index {', '.join(found.invalid)}" if found.invalid else ""
        ran = f"; {len(executed)} of its {len(migration.steps)} statements had run" if executed else ""
        message = (
            f"{failure.error.message}{left}{ran}; marked in doubt: the next run reports it until it is settled "
            "(`fanout mark`/`fanout unmark`, or drop the INVALID index and `fanout unmark`, or `apply --repair-invalid`)"
        )
        return EngineError(replace(failure.error, message=message, invalid_indexes=found.invalid))

    def adopt(self, changes: Sequence[ChecksumChange], environment: str, reason: str | None) -> None:
        try:
            self._create_log()
            statements = [
                statement
                for c in changes
                for statement in self.checksum_statements(
                    c.migration_id, c.old, c.new, c.service, environment, c.how, reason
                )
            ]
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None
        self.record(statements)

    def settle(self, items: Sequence[SettleItem], *, record: bool, reason: str, force: bool) -> Settled:
        """`fanout mark` (`record`) or `unmark`, in one transaction; see runner.settle."""
        try:
            applied = self.applied()
            marks, _ = self.marks_and_invalid()
            recorded = self.recorded_checksums()
            self._create_log()
            statements, notes, changed, refused = self._settle_rows(
                items, applied, marks, recorded, record, reason, force
            )
        except psycopg2.Error as e:
            raise classify_database_error(e) from None
        self.record(statements)
        return Settled(tuple(changed), tuple(notes), refused)

    def _settle_rows(
        self,
        items: Sequence[SettleItem],
        applied: dict[str, str],
        marks: dict[str, indoubt.Mark],
        recorded: dict[str, checksums.Recorded],
        record: bool,
        reason: str,
        force: bool,
    ) -> tuple[list[str], list[str], list[str], bool]:
        statements: list[str] = []
        notes: list[str] = []
        changed: list[str] = []
        refused = False
        with self._connection.cursor() as cursor:
            for item in items:
                migration, recording = item.migration, item.recording
                migration_id = migration.id
                mark, is_applied = marks.get(migration_id), migration.hash in applied
                sha = recording.sha256
                old = recorded[migration_id].sha256 if migration_id in recorded else None
                if record and is_applied:
                    notes.append(f"{migration_id}: already applied" + ("; cleared its mark" if mark else ""))
                    if mark is None:
                        continue
                elif record:
                    if mark is not None:
                        _, found, _ = examine(cursor, self._schema, self._schema_only, migration, mark)
                        invalid = found.invalid
                    else:
                        builds, _ = indoubt.index_builds(sql_statements(migration) or [])
                        invalid = tuple(i for i in indoubt.inspect(cursor, builds, (), ()).invalid)
                    if invalid and not force:
                        refused = True
                        notes.append(
                            f"{migration_id}: refused: INVALID index {', '.join(invalid)} (drop it and "
                            "`fanout unmark` to run it again, or --force to record it anyway)"
                        )
                        continue
                    statements += self._records(migration, recording, "mark", checksums.How.MARKED)
                    statements.append(
                        checksums.log_sql(cursor, self._schema, migration_id, old, sha, checksums.How.MARKED, reason)
                    )
                    notes.append(f"{migration_id}: recorded as applied")
                elif is_applied:
                    statements += self._unmark_rows(migration)
                    statements.append(
                        checksums.log_sql(cursor, self._schema, migration_id, old, "", checksums.How.UNMARKED, reason)
                    )
                    notes.append(f"{migration_id}: record removed: the next apply runs it")
                elif mark is not None:
                    statements.append(
                        checksums.log_sql(cursor, self._schema, migration_id, old, "", checksums.How.UNMARKED, reason)
                    )
                    notes.append(f"{migration_id}: mark cleared: the next apply runs it")
                else:
                    notes.append(f"{migration_id}: neither applied nor in doubt: nothing to do")
                    continue
                if mark is not None:
                    statements.append(indoubt.clear_sql(cursor, self._schema, migration_id))
                changed.append(migration_id)
        return statements, notes, changed, refused

    def checksum_statements(
        self,
        migration_id: str,
        old: str | None,
        new: str,
        service: str,
        environment: str,
        how: checksums.How,
        reason: str | None,
    ) -> list[str]:
        with self._connection.cursor() as cursor:
            return [
                checksums.record_sql(cursor, self._schema, migration_id, new, service, environment, how),
                checksums.log_sql(cursor, self._schema, migration_id, old, new, how, reason),
            ]

    def record(self, statements: Sequence[str]) -> None:
        """Commit `statements` in one transaction (one round trip)."""
        if not statements:
            return
        try:
            self._commit_clean(statements)
        except psycopg2.Error as e:
            raise self._watch.classify(e) from None

    def _execute(self, statement: str) -> None:
        # Not backend.execute(): it passes {} as parameters, and psycopg2 would then read % in the text.
        with self._connection.cursor() as cursor:
            cursor.execute(statement)

    def _yoyo_row(self, template: str, values: dict[str, Any]) -> str:
        """One of yoyo's statements (its SQL template, its values), as text."""
        # yoyo formats a template's table names and rewrites its parameters with a regex built
        # for each call: a sixth of fanout's CPU per tenant schema. Both are the same for every
        # row of a session (same tables, same parameter names).
        key = (template, *values)
        query = self._yoyo_templates.get(key)
        if query is None:
            query, _ = change_param_style(psycopg2.paramstyle, self._backend.format_sql(template), values)
            self._yoyo_templates[key] = query
        with self._connection.cursor() as cursor:
            return str(cursor.mogrify(query, values).decode())

    def _records(
        self,
        migration: Migration,
        recording: Recording,
        operation: str = "apply",
        how: checksums.How = checksums.How.APPLIED,
    ) -> list[str]:
        """yoyo's `_yoyo_log` and `_yoyo_migration` rows and fanout's checksum row, as statements.

        Their times are the server's clock when they are inserted, after the migration ran.
        `operation` is yoyo's log operation (`apply`, or `mark` for `fanout mark`).
        """
        backend = self._backend
        marked = {"migration_hash": migration.hash, "migration_id": migration.id, "when": FINISHED_AT}
        rows = [
            self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, operation)),
            self._yoyo_row(backend.mark_migration_sql, marked),
        ]
        with self._connection.cursor() as cursor:
            rows.append(
                checksums.record_sql(
                    cursor, self._schema, migration.id, recording.sha256, recording.service, recording.environment,
                    how, at=FINISHED_AT,
                )
            )  # fmt: skip
        return rows

    def _unmark_rows(self, migration: Migration) -> list[str]:
        """yoyo's unmark (its row deleted, `_yoyo_log` says unmark) and fanout's checksum row deleted."""
        backend = self._backend
        rows = [
            self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, "unmark")),
            self._yoyo_row(backend.unmark_migration_sql, {"migration_hash": migration.hash}),
        ]
        with self._connection.cursor() as cursor:
            rows.append(checksums.unrecord_sql(cursor, self._schema, migration.id))
        return rows

    def run_hook(self, migration: Migration) -> None:
        """Run a post-apply hook and log it in `_yoyo_log` as yoyo does (an `apply` row; hooks are never marked)."""
        backend = self._backend
        try:
            self._clean()
            self._dirty = True
            migration.process_steps(backend, "apply")
            self._commit_clean([self._yoyo_row(backend.log_migration_sql, backend.get_log_data(migration, "apply"))])
        except psycopg2.Error as e:
            self._reset()
            raise self._watch.classify(e, otherwise=ErrorKind.MIGRATION) from None

    def failed_hooks(self) -> set[str]:
        if self._has_log is False:
            return set()  # no log table, no failed hook (applied() looked)
        try:
            with self._connection.cursor() as cursor:
                failed = checksums.failed_hooks(cursor, self._schema)
                self._has_log = failed is not None
                return failed or set()
        except psycopg2.Error as e:
            self._reset()
            raise self._watch.classify(e) from None

    def note_hook(self, hook_id: str, sha256: str, *, failed: bool, reason: str | None) -> None:
        action = checksums.How.HOOK_FAILED if failed else checksums.How.HOOK_RAN
        try:
            self._create_log()
            with self._connection.cursor() as cursor:
                statement = checksums.log_sql(cursor, self._schema, hook_id, None, sha256, action, reason)
            self.record([statement])
        except (psycopg2.Error, EngineError) as e:
            # The report still names the failure; only the reminder for the next run is lost.
            log.warning("%s: could not log post-apply hook %s as %s: %s", self._display, hook_id, action.value, e)

    def _create_log(self) -> None:
        """Create fanout_checksum_log before its first row is written (once per session)."""
        if not self._has_log:
            self._create(checksums.create_log_sql(self._schema))
            self._has_log = True

    def _create(self, statement: str) -> None:
        """Create one of the tables fanout creates when first written, in its own transaction, race-free."""
        self._commit_clean([*locking.create_once_sql(self._connection, self._schema), statement])

    def _reset(self) -> None:
        """Leave the connection usable (to release the lock) after a failed statement."""
        with contextlib.suppress(psycopg2.Error):
            self._clean()

    def close(self, *, reuse: bool = False) -> None:
        self._watch.release()
        reuse = (
            reuse
            and self._released_cleanly
            and self._watch.untouched()
            and self._connections is not None
            and not self._connection.closed
        )
        if reuse:
            try:
                # What pgbouncer's server_reset_query does, and no advisory lock survives the
                # target: the next target of this database starts from a fresh session.
                prologue = ["ROLLBACK"] if self._connection.info.transaction_status != IDLE else []
                with self._connection.cursor() as cursor:
                    cursor.execute(
                        one_message([*prologue, *FRESH_SESSION, "SELECT pg_catalog.pg_advisory_unlock_all()"])
                    )
                reuse = self._connection.info.transaction_status == IDLE
            except psycopg2.Error:
                reuse = False
        if self._connections is not None:
            self._connections.give_back(self._target, self._connection, self._backend_pid, reuse=reuse)
            return
        with contextlib.suppress(psycopg2.Error):
            self._connection.close()
