"""yoyo's PostgreSQL backend, adjusted for a runner that opens hundreds of them (the apply session drives it)."""

from __future__ import annotations

import getpass
import socket
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import psycopg2
import psycopg2.errors
from yoyo import exceptions as yoyo_exceptions, internalmigrations
from yoyo.backends import PostgresqlBackend
from yoyo.connections import DatabaseURI
from yoyo.internalmigrations import v2 as internal_v2
from yoyo.migrations import Migration

from fanout.engines.postgres import checksums, locking
from fanout.engines.postgres.connection import FINISHED_AT, TrackedConnection, TrackedCursor

yoyo_exceptions.register(psycopg2.DatabaseError)


class QuietCursor(TrackedCursor):
    """yoyo prints the rows of any statement that returns some to sys.stdout; a runner never prints."""

    @property
    def description(self) -> None:
        return None


class Backend(PostgresqlBackend):  # type: ignore[misc]
    """yoyo's PostgreSQL backend, adjusted for a runner that opens hundreds of them.

    Its tables are named with their schema (`bookkeeping`, resolved once per session), so
    yoyo's own statements, on the paths that use them (Python steps, non-transactional
    migrations, the upgrade of its tables), reach them whatever a migration did to the
    session's search_path.
    """

    _driver = psycopg2  # skip yoyo's per-instance driver import and error registration
    _schema_checked = False
    _hostname = socket.getfqdn()
    _username = getpass.getuser()
    bookkeeping = ""  # the schema of yoyo's tables; set by the session before any use

    def __init__(self, dburi: DatabaseURI, migration_table: str, connection: Any = None) -> None:
        self._reused = connection
        super().__init__(dburi, migration_table)

    def connect(self, dburi: DatabaseURI) -> Any:
        kwargs = dict(dburi.args)
        self.schema = kwargs.pop("schema", None)
        if self._reused is not None:
            return self._reused  # handed on by the target before, in a fresh session
        connection = psycopg2.connect(**kwargs, connection_factory=TrackedConnection)
        connection.autocommit = True
        connection.cursor_factory = QuietCursor
        return connection

    def init_connection(self, connection: Any) -> None:
        # yoyo calls this after connecting and after every rollback to set search_path; the
        # session sets it (with everything else a fresh session needs) before each migration.
        pass

    @property
    def migration_table_quoted(self) -> str:
        return locking.qualified(self.bookkeeping, self.migration_table)

    @property
    def log_table_quoted(self) -> str:
        return locking.qualified(self.bookkeeping, self.log_table)

    @property
    def version_table_quoted(self) -> str:
        return locking.qualified(self.bookkeeping, self.version_table)

    @property
    def lock_table_quoted(self) -> str:
        return locking.qualified(self.bookkeeping, self.lock_table)

    def list_tables(self, **kwargs: Any) -> list[str]:
        # yoyo asks only whether its own tables exist. information_schema.tables, filtered by
        # schema, reads all of pg_class: per tenant schema, a cost that grows with the database.
        # By name, the lookup is an index scan. (yoyo also asks for current_schema first, a
        # round trip; the schema is known.)
        names = [self.migration_table, self.version_table, self.log_table, self.lock_table]
        cursor = self.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = :schema AND c.relname = ANY(:names) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            {"schema": self.bookkeeping, "names": names},
        )
        return [row[0] for row in cursor.fetchall()]

    def init_database(self) -> None:
        # PostgreSQL has transactional DDL; yoyo's probe costs a table creation per connection.
        self.has_transactional_ddl = True
        for attempt in range(3):
            try:
                locking.create_tables(
                    self.connection,
                    self.bookkeeping,
                    create_schema=bool(self.schema),
                    extra=(checksums.create_sql(self.bookkeeping, locking.inline_text(self.connection)),),
                )
                return
            except (psycopg2.errors.UniqueViolation, psycopg2.errors.DuplicateObject, psycopg2.errors.DuplicateTable):
                # A plain yoyo created yoyo_lock at the same instant (fanout runners serialize).
                if attempt == 2:
                    raise

    def ensure_internal_schema_updated(self) -> None:
        # yoyo re-checks (two queries) on every call unless it upgraded; once is enough per connection.
        if self._schema_checked:
            return
        present = set(self.list_tables())
        if self._is_locked and present.isdisjoint({self.migration_table, self.version_table, self.log_table}):
            self._create_internal_tables()
        else:
            super().ensure_internal_schema_updated()
        self._schema_checked = True

    def _create_internal_tables(self) -> None:
        """yoyo's tables at its current version, created with yoyo's own statements, in one message.

        yoyo gets there by upgrading through its versions: it creates `_yoyo_migration` at
        version 1, then the log and version tables, reads, drops and recreates the first: 11
        round trips and a table created for nothing on every new schema (measured on one
        connection: 19-25 ms of server CPU per schema for all of fanout's and yoyo's tables,
        14 ms this way). The end state is the same; an older yoyo's tables still go through
        yoyo's upgrade. The caller holds yoyo's lock, which yoyo upgrades under.
        """
        statements: list[str] = []
        collector = SimpleNamespace(  # what yoyo's table definitions use of a backend; collects their DDL
            quote_identifier=self.quote_identifier,
            log_table_quoted=self.log_table_quoted,
            version_table_quoted=self.version_table_quoted,
            migration_table_quoted=self.migration_table_quoted,
            execute=lambda sql, params=None: statements.append(sql),
        )
        for create in (
            internal_v2.create_log_table,
            internal_v2.create_version_table,
            internal_v2.create_migration_table,
        ):
            create(collector)
        version = max(internalmigrations.schema_versions)
        with self.connection.cursor() as cursor:
            statements.append(
                cursor.mogrify(
                    f"INSERT INTO {self.version_table_quoted} VALUES (%s, %s)",
                    (version, datetime.now(UTC).replace(tzinfo=None)),
                ).decode()
            )
        locking.in_one_transaction(self.connection, statements)
        self._internal_schema_updated = True

    def get_log_data(self, migration: Migration | None = None, operation: str = "apply") -> dict[str, Any]:
        # yoyo resolves the FQDN (a DNS lookup) for every log row; resolve it once per process.
        return {
            "id": str(uuid.uuid1()),
            "migration_id": migration.id if migration else None,
            "migration_hash": migration.hash if migration else None,
            "username": self._username,
            "hostname": self._hostname,
            "created_at_utc": FINISHED_AT,
            "operation": operation,
        }
