"""Reads a shard's live schema from PostgreSQL's catalog, read-only; and makes the scratch
database (or schema) that `inspect --reference build` builds its reference in.

The only inspect module that talks to the driver. A shard costs one connection and
three round trips, all in one READ ONLY transaction: one message opens it, sets its bounds
and search_path with SET LOCAL, and runs the one query that builds the whole description
server-side (json_agg) and says whether yoyo's tables exist; then the applied migration
ids; then ROLLBACK. SET LOCAL and a single transaction leave no state on the server
session, so a transaction-mode pooler (PgBouncer) between fanout and the shard is harmless:
the transaction keeps its server session throughout, and the next client of that session
inherits nothing. The session is also read-only on the server
(default_transaction_read_only), takes no lock of its own, and reads only the catalog and
yoyo's table, so a role with CONNECT, USAGE and SELECT is enough.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import psycopg2
from psycopg2 import sql

from fanout.directory import Target
from fanout.engines import EngineError
from fanout.engines.postgres.connection import Watch, classify_connect_error, watched_session
from fanout.engines.postgres.migrations import MIGRATION_TABLE
from fanout.interrupt import Interrupt, Reason
from fanout.options import RunOptions, seconds
from fanout.report import ErrorKind, TargetError
from fanout.secret import error_line

HOME_SCHEMA = "public"  # the home of a database target: what its names are relative to
SCRATCH_PREFIX = "fanout_scratch_"
# Bounds for a catalog read when the environment sets none: a pending ACCESS EXCLUSIVE lock
# (an ALTER TABLE waiting) must not hang the inspection of the whole fleet.
DEFAULT_LOCK_TIMEOUT = "10s"
DEFAULT_STATEMENT_TIMEOUT = "60s"
# The server ends the catalog query and the read of the applied ids at statement_timeout each;
# a shard still silent this long after both is not working on them (a hung proxy, a stopped
# server whose kernel still acknowledges), and its connection is cancelled, then cut.
SILENCE_SLACK_SECONDS = 5.0

# Objects in the shard's namespaces: the target's schema, or every schema but the system ones.
# fanout's and yoyo's own tables (and what hangs off them) and extension members are left out.
_CATALOG_SQL = r"""
WITH ns AS (
  SELECT oid, nspname FROM pg_namespace
  WHERE CASE WHEN %(schema)s::text IS NULL
             THEN nspname NOT LIKE 'pg\_%%' AND nspname <> 'information_schema'
                  AND nspname NOT LIKE 'fanout\_scratch\_%%'  -- a build's scratch, until it is dropped
             ELSE nspname = %(schema)s::text END
), rel AS (
  SELECT c.oid, c.relname, c.relkind, c.relpersistence, n.nspname
  FROM pg_class c JOIN ns n ON n.oid = c.relnamespace
  WHERE c.relname NOT LIKE '\_yoyo\_%%' AND c.relname <> 'yoyo_lock' AND c.relname NOT LIKE 'fanout\_%%'
    AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
), objects AS (
  SELECT 'table' AS kind, nspname AS schema, relname::text AS name, NULL::text AS tbl,
         json_build_object('kind', CASE relkind WHEN 'p' THEN 'partitioned' WHEN 'f' THEN 'foreign' ELSE 'ordinary' END,
                           'unlogged', relpersistence = 'u') AS attrs
  FROM rel WHERE relkind IN ('r', 'p', 'f')
  UNION ALL
  SELECT 'column', r.nspname, a.attname, r.relname,
         json_build_object('type', format_type(a.atttypid, a.atttypmod), 'not_null', a.attnotnull,
                           'default', pg_get_expr(d.adbin, d.adrelid),
                           'identity', nullif(a.attidentity::text, ''), 'generated', nullif(a.attgenerated::text, ''))
  FROM rel r JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  WHERE r.relkind IN ('r', 'p', 'f')
  UNION ALL
  SELECT 'index', r.nspname, c.relname, r.relname,
         json_build_object('definition', pg_get_indexdef(i.indexrelid), 'unique', i.indisunique, 'valid', i.indisvalid)
  FROM rel r JOIN pg_index i ON i.indrelid = r.oid JOIN pg_class c ON c.oid = i.indexrelid
  UNION ALL
  SELECT 'constraint', r.nspname, k.conname, r.relname,
         json_build_object('definition', pg_get_constraintdef(k.oid), 'validated', k.convalidated)
  FROM rel r JOIN pg_constraint k ON k.conrelid = r.oid
  WHERE k.contype <> 'n'  -- NOT NULL (a constraint row since PostgreSQL 18) is the column's not_null
  UNION ALL
  SELECT CASE relkind WHEN 'v' THEN 'view' ELSE 'materialized view' END, nspname, relname, NULL,
         json_build_object('definition', pg_get_viewdef(oid))
  FROM rel WHERE relkind IN ('v', 'm')
  UNION ALL
  SELECT 'sequence', r.nspname, r.relname, NULL,
         json_build_object('type', format_type(s.seqtypid, NULL), 'start', s.seqstart::text,
                           'increment', s.seqincrement::text, 'min', s.seqmin::text, 'max', s.seqmax::text,
                           'cache', s.seqcache::text, 'cycle', s.seqcycle)
  FROM rel r JOIN pg_sequence s ON s.seqrelid = r.oid
  UNION ALL
  SELECT 'function', n.nspname, p.proname || '(' || oidvectortypes(p.proargtypes) || ')', NULL,
         json_build_object('kind', p.prokind::text, 'returns', pg_get_function_result(p.oid), 'language', l.lanname,
                           'body', md5(coalesce(p.prosrc, '') || coalesce(p.probin, '')),
                           'volatility', p.provolatile::text, 'security_definer', p.prosecdef, 'strict', p.proisstrict)
  FROM pg_proc p JOIN ns n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
  WHERE NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
  UNION ALL
  SELECT 'trigger', r.nspname, t.tgname, r.relname,
         json_build_object('definition', pg_get_triggerdef(t.oid), 'enabled', t.tgenabled::text)
  FROM rel r JOIN pg_trigger t ON t.tgrelid = r.oid WHERE NOT t.tgisinternal
  UNION ALL
  SELECT 'enum', n.nspname, t.typname, NULL,
         json_build_object('labels', (SELECT json_agg(e.enumlabel ORDER BY e.enumsortorder)
                                      FROM pg_enum e WHERE e.enumtypid = t.oid))
  FROM pg_type t JOIN ns n ON n.oid = t.typnamespace
  WHERE t.typtype = 'e' AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                        WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e')
  UNION ALL
  SELECT 'extension', n.nspname, x.extname, NULL, json_build_object('version', x.extversion)
  FROM pg_extension x JOIN ns n ON n.oid = x.extnamespace
)
SELECT coalesce((SELECT json_agg(json_build_object('kind', kind, 'schema', schema, 'name', name, 'table', tbl,
                                                   'attrs', attrs)) FROM objects), '[]'::json),
       to_regclass(format('%%I.%%I', home.s, '_yoyo_migration')) IS NOT NULL,
       to_regclass(format('%%I.%%I', home.s, '_yoyo_version')) IS NOT NULL, home.s
FROM (SELECT coalesce(%(schema)s, current_schema()) AS s) AS home
"""


@dataclass(frozen=True, slots=True)
class Catalog:
    """What one shard's catalog says: its objects (rows for `fanout.schema.describe`) and its applied migrations."""

    rows: tuple[dict[str, Any], ...]
    applied: frozenset[str]  # migration ids yoyo recorded
    initialized: bool  # yoyo's tables exist
    home: str  # the schema names are relative to


class CatalogError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def home_of(target: Target) -> str:
    return target.schema or HOME_SCHEMA


def read(
    target: Target,
    options: RunOptions,
    interrupt: Interrupt,
    *,
    application_name: str,
    deadline: float | None = None,
) -> Catalog:
    """Describe the target's namespace and read its applied migration ids. Raises CatalogError.

    Every wait is bounded: the connection by `connect_timeout`, the reads by the
    environment's `statement_timeout` (else 60 s) on the server and, should the shard go
    silent, twice that and SILENCE_SLACK_SECONDS here; `deadline` (the target timeout) and a
    second interrupt cancel the read, as they do a plan's.
    """
    if target.engine != "postgresql":
        raise CatalogError(
            ErrorKind.DATABASE,
            f"{target.display}: schema inspection reads PostgreSQL catalogs only (not MySQL/MariaDB)",
        )
    kwargs = target.libpq_kwargs(
        application_name=application_name, connect_timeout=options.connect_timeout, read_only=True, tcp=options.tcp
    )
    lock_timeout = options.session.lock_timeout or DEFAULT_LOCK_TIMEOUT
    statement_timeout = options.session.statement_timeout or DEFAULT_STATEMENT_TIMEOUT
    try:
        connection = psycopg2.connect(**kwargs)
    except psycopg2.Error as e:
        failure = classify_connect_error(e, target)
        raise CatalogError(failure.kind, failure.error.message) from None
    limit = seconds(statement_timeout)  # None: statement_timeout = 0, no limit asked for
    silence = None if limit is None else 2 * limit + SILENCE_SLACK_SECONDS
    silent_at = None if silence is None else time.monotonic() + silence
    watch = Watch(
        connection, interrupt, options, min((t for t in (deadline, silent_at) if t is not None), default=None)
    )
    # Autocommit, so that psycopg2 sends no BEGIN of its own (a round trip): the explicit one
    # travels with the settings and the catalog query in one message.
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            setup = [
                sql.SQL("BEGIN READ ONLY"),
                sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)),
                sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(statement_timeout)),
            ]
            if target.schema:
                setup.append(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(target.schema)))
            # The cursor keeps the last statement's result: the catalog query's.
            query = sql.SQL("; ").join([*setup, sql.SQL(_CATALOG_SQL)])
            cursor.execute(query, {"schema": target.schema})
            row = cursor.fetchone()
            assert row is not None
            rows, has_migrations, has_version, bookkeeping = row
            applied: frozenset[str] = frozenset()
            if has_migrations:
                column = "migration_id" if has_version else "id"  # yoyo < 6 kept ids only
                # Named with its schema, as the runner does: the search_path may list another one first.
                table = sql.Identifier(bookkeeping, MIGRATION_TABLE)
                cursor.execute(sql.SQL("SELECT {} FROM {}").format(sql.Identifier(column), table))
                applied = frozenset(str(r[0]) for r in cursor.fetchall())
            cursor.execute("ROLLBACK")
    except psycopg2.Error as e:
        silent = watch.handle.reason is Reason.DEADLINE and silent_at is not None and silent_at == watch.deadline
        failure = _silent(silence, abandoned=watch.handle.abandoned) if silent else watch.classify(e)
        raise CatalogError(failure.kind, failure.error.message) from None
    finally:
        watch.release()
        with contextlib.suppress(psycopg2.Error):
            connection.close()
    return Catalog(tuple(rows), applied, bool(has_migrations), home_of(target))


def _silent(silence: float | None, *, abandoned: bool) -> EngineError:
    then = "connection abandoned" if abandoned else "cancelled"
    return EngineError(
        TargetError(
            ErrorKind.UNRESPONSIVE,
            f"the shard stopped answering: no answer within {silence or 0:g}s (twice statement_timeout, and "
            f"{SILENCE_SLACK_SECONDS:g}s); {then}",
        )
    )


@contextlib.contextmanager
def scratch(target: Target, options: RunOptions, interrupt: Interrupt) -> Iterator[Target]:
    """A new, empty namespace like `target`'s, dropped on exit: a scratch schema in the target's
    database for a schema-per-tenant target, else a scratch database on the target's server.

    The only place inspect writes. Needs CREATE on the database (schema targets) or CREATEDB.
    Raises CatalogError when the scratch cannot be made. Its creation is watched as a run's
    statements are (the liveness check, `interrupt`'s second signal); its drop only by the
    liveness check, so that a second signal still leaves no scratch behind.
    """
    name = f"{SCRATCH_PREFIX}{secrets.token_hex(4)}"
    if target.schema:
        create = sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name))
        drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
        built = replace(target, id="build", schema=name, tenants=(), aliases=())
        what = f"schema {name} in {target.display}"
    else:
        create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        drop = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
        built = replace(target, id="build", dbname=name, tenants=(), aliases=())
        what = f"database {name} on {target.server}"
    _execute(target, create, options, interrupt, f"cannot create the scratch {what}")
    try:
        yield built
    finally:
        _execute(target, drop, options, Interrupt(), f"cannot drop the scratch {what}; drop it by hand")


def _execute(
    target: Target, statement: sql.Composable, options: RunOptions, interrupt: Interrupt, failure: str
) -> None:
    if target.engine != "postgresql":
        raise CatalogError(ErrorKind.DATABASE, f"{failure}: schema inspection builds on PostgreSQL only")
    kwargs = target.libpq_kwargs(
        application_name="fanout inspect build", connect_timeout=options.connect_timeout, tcp=options.tcp
    )
    try:
        connection, watch = watched_session(kwargs, options, interrupt)
    except psycopg2.Error as e:
        raise CatalogError(ErrorKind.UNREACHABLE, f"{failure}: {error_line(e)}") from None
    except EngineError as e:
        raise CatalogError(e.error.kind, f"{failure}: {e.error.message}") from None
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
    except psycopg2.Error as e:
        acted = watch.acted()
        if acted is not None:
            raise CatalogError(acted.error.kind, f"{failure}: {acted.error.message}") from None
        primary = getattr(getattr(e, "diag", None), "message_primary", None) or error_line(e)
        raise CatalogError(ErrorKind.DATABASE, f"{failure}: {primary}") from None
    finally:
        watch.release()
        with contextlib.suppress(psycopg2.Error):
            connection.close()
