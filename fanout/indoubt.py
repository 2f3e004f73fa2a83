"""Non-transactional migrations: a mark committed before they start, and what a shard holds when one is found.

A `-- transactional: false` migration (CREATE INDEX CONCURRENTLY) commits statement by
statement. A kill, a server crash or a timeout in the middle leaves the shard anywhere
between before and after: nothing done, an index left INVALID, or everything done but
not recorded. yoyo cannot tell these apart, and a re-run then fails forever on "already
exists", or, with `IF NOT EXISTS`, records the migration while its index stays INVALID.

So fanout commits a row in `fanout_in_doubt` (migration, run id, host, pid, server pid,
when, and the INVALID indexes that existed before) before such a migration runs, and
deletes it in the transaction that records the migration. A row found later names a
migration that started and was never recorded: fanout does not run it again blindly,
it reports the shard `in-doubt` with what it finds (the indexes the migration creates,
VALID, INVALID or absent; INVALID indexes that appeared since it started), until an
operator settles it (`fanout mark` / `fanout unmark`) or, opted in, the common case is
repaired (drop the INVALID indexes the migration builds, run it again).

This module holds what the engines share: the table's name and a mark as read back. Each
engine writes and reads the marks and inspects the shard (`fanout/engines/postgres/indoubt.py`,
the MySQL engine). It knows nothing of yoyo.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

TABLE = "fanout_in_doubt"


@dataclass(frozen=True, slots=True)
class Mark:
    """A non-transactional migration that started and was not recorded."""

    migration_id: str
    operation: str  # apply | rollback
    run_id: str
    host: str
    pid: int
    started_at: datetime
    invalid_before: tuple[str, ...]
    # MySQL/MariaDB: a rollback that stopped between two statements, none of them in doubt;
    # `fanout rollback` continues it where it stopped instead of refusing.
    resumable: bool = False
