"""The shard lock: yoyo's `yoyo_lock` row, made recoverable after a crash (what it is; each engine takes it).

yoyo locks a shard by inserting the single row of `yoyo_lock`, keyed by the OS pid of
the process, and deletes it when done; a process that dies in between leaves the row
behind, and nothing tells a live holder from a dead one. fanout keeps taking that same
row, so fanout and plain yoyo still exclude each other, and adds two things:

- while it holds the row, fanout's session also holds a lock of the server's own, which
  the server drops the moment that session ends, whatever killed it (an advisory lock on
  PostgreSQL, `GET_LOCK` on MySQL/MariaDB);
- a `fanout_lock` row, written in the same transaction as the yoyo row, names the
  holder (host, pid, run id, since).

So a yoyo row that has a matching `fanout_lock` row while nobody holds the server's lock
was left by a fanout session that no longer exists: it is provably stale and is broken
automatically. A row without a `fanout_lock` row belongs to plain yoyo (or to someone's
hand): nothing proves it dead, so it is never broken automatically; `fanout unlock`
removes it when no other session is connected to the database, or when forced.

The engines' modules take it (`fanout/engines/postgres/locking.py`, the MySQL engine);
this one holds what they share: the tables' names, who takes a lock, and what unlock did.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from fanout.report import LockHolder

YOYO_LOCK_TABLE = "yoyo_lock"
OWNER_TABLE = "fanout_lock"
LOG_TABLE = "fanout_lock_log"  # what `fanout unlock` removed by hand, by whom and why

HOSTNAME = socket.gethostname()
WHO = f"{getpass.getuser()}@{HOSTNAME}"
# Seconds to wait for a session ended by `unlock --terminate` to be gone (and its lock with it).
TERMINATE_WAIT_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Owner:
    """Who takes a lock: this process, in this run."""

    pid: int
    run_id: str
    host: str = HOSTNAME
    since: datetime | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at the lock: taken or not, the stale holder broken to take it, or the holder in the way."""

    taken: bool
    broken: LockHolder | None = None
    holder: LockHolder | None = None


class UnlockOutcome(StrEnum):
    NOT_LOCKED = "not-locked"
    RELEASED = "released"  # the holder was provably gone
    FORCED = "forced"  # released although the holder may be alive
    TERMINATED = "terminated"  # the holder's session was ended (--terminate), then the lock removed
    STILL_HELD = "still-held"  # rows removed, but a live session still holds fanout's server lock
    REFUSED = "refused"  # the holder is (or may be) alive; --force or --terminate to override


@dataclass(frozen=True, slots=True)
class Unlock:
    """What unlock found and really did."""

    outcome: UnlockOutcome
    holder: LockHolder | None
    reason: str
    rows_deleted: int = 0  # yoyo_lock rows removed
    advisory_holder: int | None = None  # server pid holding fanout's server lock when unlock ended (None: free)
    terminated: int | None = None  # server pid ended by --terminate
    hidden_sessions: int = 0  # sessions of other roles whose details this role cannot see
