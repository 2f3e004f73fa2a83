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


def rows_removed(
    holder: LockHolder | None,
    reason: str,
    *,
    deleted: int,
    still: int | None,
    terminated: int | None,
    hidden: int,
    session: str,
    lock: str,
) -> Unlock:
    """What unlock did, once it removed the holder's rows (`deleted` of yoyo's), on any engine.

    `reason` is why the holder may be alive (empty: provably gone); `still`, the server session
    holding fanout's server lock after the removal; `session` and `lock` name those in the
    engine's words ("server pid", "advisory lock").
    """
    what = f"removed {deleted} lock row(s)"
    if still is not None:
        return Unlock(
            UnlockOutcome.STILL_HELD, holder,
            f"{reason}; {what}, but {session} {still} still holds fanout's {lock}, so the shard stays locked for "
            "fanout until that session ends (`fanout unlock --terminate --reason ...` ends it)",
            deleted, still, terminated, hidden,
        )  # fmt: skip
    if terminated:
        return Unlock(
            UnlockOutcome.TERMINATED, holder, f"{reason}; ended {session} {terminated}; {what}",
            deleted, None, terminated, hidden,
        )  # fmt: skip
    if reason:
        return Unlock(UnlockOutcome.FORCED, holder, f"{reason}; {what}", deleted, None, None, hidden)
    gone = "its session has ended" if holder and holder.run_id else "no other session is connected"
    return Unlock(UnlockOutcome.RELEASED, holder, f"the holder is gone ({gone}); {what}", deleted)
