"""Database engines: one module per engine, behind the session the runner drives.

The runner orchestrates (which targets, in which order, retries, reports) and talks to a
shard only through the engine `for_target` returns: `postgres` (psycopg2) or `mysql`
(PyMySQL, for MySQL and MariaDB). Engine modules never import the runner; what both
need lives here, in fanout/options.py, or in fanout/report.py. This module imports no
database driver.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

from fanout.interrupt import Reason
from fanout.report import ErrorKind, InDoubt, LockHolder, TargetError

if TYPE_CHECKING:
    from yoyo.migrations import Migration

    from fanout import checksums, indoubt, locking
    from fanout.config import TcpSettings
    from fanout.directory import Target
    from fanout.engines.connections import Connections
    from fanout.interrupt import Interrupt, Watched
    from fanout.options import RunOptions


class EngineError(Exception):
    """A classified target-level failure: the runner turns it into a failed (or retried) shard.

    `retryable` with kind UNREACHABLE means the connection is gone and the target starts
    over on a new session; other retryable kinds (lock timeout, deadlock, serialization)
    are retried per migration. `in_doubt` says what the shard holds of a migration that
    may have partly run.
    """

    def __init__(self, error: TargetError, *, retryable: bool = False, in_doubt: InDoubt | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable
        self.in_doubt = in_doubt

    @property
    def kind(self) -> ErrorKind:
        return self.error.kind


def timed_out(options: RunOptions, what: str) -> EngineError:
    return EngineError(TargetError(ErrorKind.TARGET_TIMEOUT, f"target timeout ({options.target_timeout:g}s): {what}"))


def in_doubt_error(doubt: InDoubt) -> TargetError:
    if doubt.statement is not None and doubt.statement_text is not None and doubt.run_id:
        # MySQL/MariaDB: one statement is in doubt; once checked, apply (or rollback) continues from there.
        again = "`fanout rollback` continues the rollback" if doubt.operation == "rollback" else "apply continues"
        return TargetError(
            ErrorKind.IN_DOUBT,
            f"in doubt: {doubt.describe()}. Not run again: check the shard, then `fanout resolve --migration "
            f"{doubt.migration} --took-effect` ({again} after it) or `--not-run` ({again} with it)",
        )
    if doubt.statement is None and doubt.statement_text is not None:
        # MySQL/MariaDB: a rollback stopped between two statements; rolling back again continues it.
        return TargetError(
            ErrorKind.IN_DOUBT,
            f"in doubt: {doubt.describe()}. `fanout rollback` selecting it continues the rollback where it stopped; "
            f"or settle it with `fanout mark --migration {doubt.migration}` (it is still applied) or "
            f"`fanout unmark --migration {doubt.migration}` (its rollback is complete)",
        )
    if doubt.operation == "rollback":
        return TargetError(
            ErrorKind.IN_DOUBT,
            f"in doubt: {doubt.describe()}. Settle it with `fanout mark --migration {doubt.migration}` (it is "
            f"still applied) or `fanout unmark --migration {doubt.migration}` (its rollback is complete)",
            invalid_indexes=doubt.invalid_indexes,
        )
    return TargetError(
        ErrorKind.IN_DOUBT,
        f"in doubt: {doubt.describe()}. Not run again: settle it with `fanout mark --migration {doubt.migration}` "
        f"(it is done) or `fanout unmark --migration {doubt.migration}` (run it again), or `apply --repair-invalid`",
        invalid_indexes=doubt.invalid_indexes,
    )


@dataclass(frozen=True, slots=True)
class Recording:
    """What fanout records next to yoyo's row when it applies (or rolls back) a migration."""

    sha256: str
    service: str
    environment: str


@dataclass(frozen=True, slots=True)
class ChecksumChange:
    """One checksum row `accept` or `baseline` (re)records, without running anything."""

    migration_id: str
    old: str | None  # what was recorded (None: nothing)
    new: str
    service: str
    how: checksums.How


@dataclass(frozen=True, slots=True)
class SettleItem:
    """A migration `mark`/`unmark` settles, with what recording it writes."""

    migration: Migration
    recording: Recording


@dataclass(frozen=True, slots=True)
class Settled:
    changed: tuple[str, ...]  # migration ids whose record or mark changed
    notes: tuple[str, ...]  # one line per migration
    refused: bool = False  # a migration was left as it was (an INVALID index, without force)


@dataclass(frozen=True, slots=True)
class UnlockResult:
    target: str
    database: str
    outcome: locking.UnlockOutcome | None  # None: could not connect or query
    holder: LockHolder | None
    message: str
    rows_deleted: int = 0
    advisory_holder: int | None = None  # server session still holding fanout's session lock (None: free)
    terminated: int | None = None  # server session ended by --terminate
    hidden_sessions: int = 0  # sessions of other roles this role cannot see


class Session(Protocol):
    """One target's session: the runner's only way to its shard. Raises only EngineError."""

    initialized: bool

    def lock(self, wait: float) -> AbstractContextManager[tuple[LockHolder | None, LockHolder | None]]:
        """Hold the target's migration lock; yields (holder seen, stale lock broken)."""
        ...

    def applied(self) -> dict[str, str]:
        """yoyo's applied migrations: hash -> id."""
        ...

    def recorded_checksums(self) -> dict[str, checksums.Recorded]: ...

    def marks_and_invalid(self) -> tuple[dict[str, indoubt.Mark], tuple[str, ...]]:
        """Migrations marked as started and never recorded, and every INVALID index of the target."""
        ...

    def in_doubt(self, migration: Migration, mark: indoubt.Mark, *, repair: bool) -> tuple[InDoubt | None, str | None]:
        """What the shard holds of a marked migration; (None, what was done) when `repair` settled it."""
        ...

    def apply(self, migration: Migration, recording: Recording) -> bool:
        """True when the migration ran (apply), False when it was only planned."""
        ...

    def rollback(self, migration: Migration, recorded: Recording, reason: str | None) -> bool:
        """True when the migration was rolled back and unrecorded, False when it was only planned."""
        ...

    def run_hook(self, migration: Migration) -> None: ...

    def failed_hooks(self) -> set[str]:
        """Post-apply hooks whose last run on the shard failed."""
        ...

    def note_hook(self, hook_id: str, sha256: str, *, failed: bool, reason: str | None) -> None:
        """Log that a hook failed (it stays due) or ran after failing; best effort, never raises."""
        ...

    def adopt(self, changes: Sequence[ChecksumChange], environment: str, reason: str | None) -> None:
        """Record `changes` (accept, baseline) and log them, in one transaction."""
        ...

    def settle(self, items: Sequence[SettleItem], *, record: bool, reason: str, force: bool) -> Settled:
        """Record migrations as applied (`record`, fanout mark) or not (fanout unmark), logged with `reason`."""
        ...

    def close(self, *, reuse: bool = False) -> None: ...


@runtime_checkable
class Resolving(Protocol):
    """A session whose engine records progress statement by statement (MySQL/MariaDB): a statement in doubt
    can be settled alone, so that the migration continues from there (`fanout resolve`)."""

    def resolve_statement(self, migration: Migration, *, took_effect: bool, reason: str) -> str | None:
        """Settle the statement of `migration` in doubt; what was done, or None when nothing is in doubt."""
        ...


class WritesNothing:
    """The writing half of a Session for a read-only (plan) session: it runs and records nothing.

    A dry run goes through the runner's own procedure; only these answers differ.
    """

    def apply(self, migration: Migration, recording: Recording | None = None) -> bool:
        """Plan mode: record nothing, run nothing."""
        return False

    def rollback(self, migration: Migration, recorded: Recording, reason: str | None) -> bool:
        """Plan mode: a dry run of a rollback rolls nothing back."""
        return False

    def run_hook(self, migration: Migration) -> None:
        """Plan mode: hooks are not run."""

    def failed_hooks(self) -> set[str]:
        return set()  # plan runs no hook, so it has none to remember

    def note_hook(self, hook_id: str, sha256: str, *, failed: bool, reason: str | None) -> None:
        """Plan mode: nothing is written."""

    def adopt(self, changes: Sequence[ChecksumChange], environment: str, reason: str | None) -> None:
        raise EngineError(TargetError(ErrorKind.INTERNAL, "a read-only session records nothing"))

    def settle(self, items: Sequence[SettleItem], *, record: bool, reason: str, force: bool) -> Settled:
        raise EngineError(TargetError(ErrorKind.INTERNAL, "a read-only session records nothing"))


def watchdog_verdict(
    handle: Watched, *, grace: float, target_timeout: float | None, cancel: str, still_working: str
) -> EngineError | None:
    """What the run's watchdog did to a session's connection, as the target's error (None: nothing).

    `cancel` names how the engine cancels a statement ("a cancel request", "KILL QUERY");
    `still_working` is what a statement cancelled at the target timeout left behind.
    """
    if handle.reason is None:
        return None
    cut = (
        f"no answer {grace:g}s after {cancel}: connection abandoned "
        "(the server frees the shard's lock when it ends the session)"
    )
    if handle.reason is Reason.ABORT:
        message = "cancelled by a second interrupt" + (f"; {cut}" if handle.abandoned else "")
        return EngineError(TargetError(ErrorKind.INTERRUPTED, message))
    if handle.reason is Reason.SILENT:
        return EngineError(
            TargetError(
                ErrorKind.UNRESPONSIVE,
                f"the shard stopped answering: no answer for {handle.silent_for:.0f}s, and a second connection "
                "found the server no longer working on it; connection abandoned (the server frees the "
                "shard's lock when it ends the session)",
            )
        )
    if handle.abandoned:
        return EngineError(
            TargetError(
                ErrorKind.UNRESPONSIVE,
                f"the shard stopped answering: still waiting at the target timeout ({target_timeout or 0:g}s), "
                f"then {cut}",
            )
        )
    return EngineError(
        TargetError(ErrorKind.TARGET_TIMEOUT, f"target timeout ({target_timeout or 0:g}s): {still_working}")
    )


class Engine(Protocol):
    """What an engine module provides."""

    NAME: str  # how a message names the engine's shards: "PostgreSQL", "MySQL/MariaDB"
    # Its sessions set the environment's `[session]` settings (PostgreSQL settings by name and value).
    SESSION_SETTINGS: bool
    # It records progress statement by statement, so its apply sessions are Resolving: `fanout resolve`
    # opens one only on such an engine (on any other there is nothing to settle, and no shard to touch).
    RESOLVING: bool

    def open_session(
        self,
        target: Target,
        options: RunOptions,
        run_id: str,
        interrupt: Interrupt,
        deadline: float | None = None,
        connections: Connections | None = None,
    ) -> Session:
        """A read-only session when `options.mode` is PLAN (creates nothing, takes no lock), else one that applies."""
        ...

    def ensure_database(
        self, target: Target, *, connect_timeout: float, tcp: TcpSettings, interrupt: Interrupt | None = None
    ) -> bool:
        """Create the target's database when it does not exist; True when it was created."""
        ...

    def unlock(
        self,
        target: Target,
        *,
        force: bool,
        terminate: str | None,
        connect_timeout: float,
        tcp: TcpSettings,
        lock_timeout: str | None,
        interrupt: Interrupt,
    ) -> UnlockResult:
        """Remove the target's lock by hand; its waits are bounded, and end at the second signal where the engine can."""
        ...

    def connection_key(self, target: Target, options: RunOptions, run_id: str) -> str:
        """Targets with the same key may share one connection, one after the other."""
        ...


_MODULES = {"postgresql": "fanout.engines.postgres", "mysql": "fanout.engines.mysql"}


def for_target(target: Target) -> Engine:
    """The engine that speaks to `target`'s database."""
    return cast("Engine", importlib.import_module(_MODULES[target.engine]))
