"""Is this shard session fanout's alone? Detects a transaction-mode pooler before any lock.

fanout keeps state in its session across transactions: the advisory lock that proves a
lock row's holder alive, `search_path` for a schema-per-tenant target, `lock_timeout` and
`statement_timeout`. Behind a pooler in transaction mode (PgBouncer `pool_mode =
transaction`, and the like), each transaction may run on another server session: the
advisory lock stays on a pooled connection that someone else then uses, and `search_path`
is gone at the next statement, so yoyo's tables land in `public`.

The probe, in two steps, each cheap where it runs:

1. Every session (one query): the server process reports its pid and how long ago it
   started. libpq learned a pid too, from the BackendKeyData message of the connection
   start. Connected directly, or through a plain TCP proxy or NAT, the two are the same
   and the process is no older than the connection. A pooler cannot pass the server's
   key through (a client of a transaction pool has no server of its own to cancel on):
   PgBouncer, Odyssey and PgCat all send keys of their own, so the pids differ. A
   process older than the connection was pooled as well.
2. Only then (one more connection, three queries): session A learns its backend pid
   (step 1 did) and ends its transaction; session B opens a transaction and keeps it;
   A asks for its pid again. A session-mode pool (or a plain proxy) pins A to its server,
   so B gets another backend and A keeps its own. A transaction-mode pool hands A's
   backend, idle again, to B (PgBouncer reuses the most recently released server
   first), or, B holding it, gives A another one. Either shows.

No server-side observation on one connection can prove pinning: a quiet transaction
pool hands one client the same backend every time. Step 2 makes the pool choose while
another client holds a transaction. A server found pooled once is remembered for the rest
of the process, so a concurrent probe that happened to see nothing cannot let a later
target through.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

# A backend older than its connection by more than this was there before we connected.
_AGE_TOLERANCE_SECONDS = 1.0
_pooled: set[str] = set()
_pooled_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class SessionCheck:
    backend_pid: int | None  # the server process behind the session (through a pooler, libpq reports another)
    refused: str | None  # why the session is not fanout's alone across transactions; None when it is


class NoServerSession(Exception):
    """The second connection of the check got no server session in time (`other_session`)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no server session within {seconds:g} s")
        self.seconds = seconds


def check_session(
    connection: Any,
    other_session: Callable[[], AbstractContextManager[int | None]],
    connection_age: Callable[[], float],
    server: str,
) -> SessionCheck:
    """The session's server process, and why `connection` is not a session of its own (None when it is).

    `other_session()` opens another connection like it, inside a transaction, and gives its server
    process (closed on exit; NoServerSession when no server session came in time); `connection_age()` is the
    seconds since the connection was started; `server` names it (host:port) for the memo.
    The caller's transaction state is left as found: each probe query ends its transaction.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_backend_pid(), extract(epoch FROM clock_timestamp() - backend_start)::float8 "
            "FROM pg_catalog.pg_stat_activity WHERE pid = pg_backend_pid()"
        )
        row = cursor.fetchone()
    _end_transaction(connection)
    if row is None:  # only a server that hides one's own session would do this
        return SessionCheck(None, None)
    pid, backend_age = row
    if connection.info.backend_pid == pid and backend_age <= connection_age() + _AGE_TOLERANCE_SECONDS:
        return SessionCheck(pid, None)
    with _pooled_lock:
        known = server in _pooled
    if known:
        return SessionCheck(pid, f"a transaction-mode pooler serves {server} (found earlier in this run)")
    try:
        with other_session() as held_by_other:  # its transaction stays open: it holds a server session
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                row_a = cursor.fetchone()
            _end_transaction(connection)
    except NoServerSession as e:
        # A transaction-mode pool would have given it the server session this connection left
        # idle; a session-mode pool with none left never does. Either way, nothing is proven.
        return SessionCheck(
            pid,
            f"cannot tell whether a transaction-mode pooler serves {server}: a second connection got no server "
            f"session within {e.seconds:g} s, as from a session-mode pool with none left (its pool_size must "
            "exceed the connections fanout holds: lower the concurrency or raise pool_size)",
        )
    now = row_a[0] if row_a else None
    if held_by_other != pid and now == pid:
        return SessionCheck(pid, None)
    with _pooled_lock:
        _pooled.add(server)
    seen = (
        f"another client's transaction ran on this session's server process (pid {pid})"
        if held_by_other == pid
        else f"this session moved from server process {pid} to {now} between two transactions"
    )
    return SessionCheck(pid, f"a transaction-mode pooler serves {server}: {seen}")


def _end_transaction(connection: Any) -> None:
    if not connection.autocommit:
        connection.rollback()
