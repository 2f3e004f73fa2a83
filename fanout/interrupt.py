"""Signals and deadlines: what stops a run, and what ends a wait that would never end.

The first SIGINT/SIGTERM stops scheduling in every phase: a directory listing or an S3
snapshot in progress is abandoned (nothing was touched yet), and the fan-out starts no
new target while in-flight migrations finish (or roll back) and release their locks.
The second signal aborts: every statement in flight gets a PostgreSQL cancel request
(the server rolls the migration back), and a connection that still has not answered
`CANCEL_GRACE_SECONDS` later is shut down, so the run always ends and writes its report.

The signal handler itself does nothing: Python's C-level handler writes the signal
number to a socket, and a watcher thread acts on it. A handler that logs, takes a lock
or sends a cancel request can block (or deadlock on a lock its own thread holds); the
second SIGTERM of a hung run used to block exactly there.

A per-target deadline works the same way: the watchdog cancels the watched connection's
statement when its deadline passes and shuts the connection down if the server does not
answer the cancel either; the worker then reads the verdict from its `Watched`.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Protocol, TypeVar

from fanout.errors import Interrupted

log = logging.getLogger(__name__)

T = TypeVar("T")
CANCEL_GRACE_SECONDS = 5.0  # how long a cancelled statement may take to answer before its connection is cut
CANCEL_REQUEST_SECONDS = 10.0  # a cancel request that takes longer is abandoned (it runs off the handler)
_TICK_SECONDS = 0.1


class Cancellable(Protocol):
    def cancel(self) -> None: ...

    def fileno(self) -> int: ...


class Reason(enum.Enum):
    DEADLINE = "deadline"
    ABORT = "abort"
    SILENT = "silent"  # waited `check_every` for an answer, and a check found the server not working on it


@dataclass(slots=True, eq=False)
class Watched:
    """One connection under watch; the watchdog fills in what it did to it."""

    connection: Cancellable
    deadline: float | None  # time.monotonic() value; None: only an abort ends it
    # Liveness: `busy()` is since when the connection waits for an answer (None: it does not);
    # waiting longer than `check_every`, `alive()` (a blocking check, run on its own thread)
    # tells whether the server is still working on it. False cuts the connection.
    busy: Callable[[], float | None] | None = None
    alive: Callable[[], bool] | None = None
    check_every: float | None = None
    reason: Reason | None = None  # why it was cancelled, if it was
    cancelled_at: float | None = None
    abandoned: bool = False  # the cancel went unanswered (or the peer was silent) and the connection was shut down
    checking: bool = False
    checked_at: float = 0.0
    silent_for: float = 0.0  # seconds without an answer when the check found the server not working on it

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class Watchdog:
    """Cancels watched connections past their deadline (or all of them on abort), then cuts the silent ones."""

    def __init__(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        self.grace = grace
        self._lock = threading.Lock()
        self._watched: set[Watched] = set()
        self._aborting = False
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, connection: Cancellable, deadline: float | None) -> Iterator[Watched]:
        handle = self.watch(connection, deadline)
        try:
            yield handle
        finally:
            self.release(handle)

    def watch(
        self,
        connection: Cancellable,
        deadline: float | None,
        *,
        busy: Callable[[], float | None] | None = None,
        alive: Callable[[], bool] | None = None,
        check_every: float | None = None,
    ) -> Watched:
        handle = Watched(connection, deadline, busy=busy, alive=alive, check_every=check_every)
        with self._lock:
            self._watched.add(handle)
            self._ensure_thread()
        return handle

    def release(self, handle: Watched) -> None:
        """Stop watching; call before closing the connection (its socket number may be reused)."""
        with self._lock:
            self._watched.discard(handle)

    def abort(self) -> None:
        with self._lock:
            self._aborting = True
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="fanout-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            time.sleep(_TICK_SECONDS)
            now = time.monotonic()
            with self._lock:
                if not self._watched:
                    idle_since = idle_since or now
                    if now - idle_since > 1.0:
                        self._thread = None
                        return
                    continue
                idle_since = None
                for handle in self._watched:
                    if handle.cancelled_at is None:
                        reason = Reason.ABORT if self._aborting else Reason.DEADLINE if handle.expired() else None
                        if reason is not None:
                            handle.reason, handle.cancelled_at = reason, now
                            _cancel_off_thread(handle.connection)
                        else:
                            self._maybe_check(handle, now)
                    elif not handle.abandoned and now - handle.cancelled_at >= self.grace:
                        handle.abandoned = True
                        _shut_down(handle.connection)

    def _maybe_check(self, handle: Watched, now: float) -> None:
        if handle.busy is None or handle.alive is None or not handle.check_every or handle.checking:
            return
        since = handle.busy()
        if since is None or now - max(since, handle.checked_at) < handle.check_every:
            return
        handle.checking, handle.checked_at = True, now
        threading.Thread(target=self._check, args=(handle, since), name="fanout-liveness", daemon=True).start()

    def _check(self, handle: Watched, since: float) -> None:
        assert handle.alive is not None and handle.busy is not None
        try:
            alive = handle.alive()
        except Exception as e:  # a check that fails proves nothing
            log.debug("liveness check failed: %s", e)
            alive = True
        with self._lock:
            handle.checking = False
            # Only if the connection still waits for that very answer and nothing else acted on it.
            if alive or handle not in self._watched or handle.cancelled_at is not None or handle.busy() != since:
                return
            now = time.monotonic()
            handle.reason, handle.cancelled_at, handle.silent_for = Reason.SILENT, now, now - since
            handle.abandoned = True
            _shut_down(handle.connection)


def _cancel_off_thread(connection: Cancellable) -> None:
    # A cancel request opens a new connection to the server, which may itself hang: never wait for it.
    threading.Thread(target=_cancel, args=(connection,), name="fanout-cancel", daemon=True).start()


def _cancel(connection: Cancellable) -> None:
    try:
        connection.cancel()
    except Exception as e:  # a closed connection has nothing to cancel
        log.debug("cancel failed: %s", e)


def _shut_down(connection: Cancellable) -> None:
    """Unblock whatever waits on the connection's socket: its next read returns end-of-file."""
    try:
        duplicate = socket.socket(fileno=os.dup(connection.fileno()))
    except (OSError, ValueError) as e:  # already closed
        log.debug("cannot shut the connection down: %s", e)
        return
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError as e:
        log.debug("shutdown failed: %s", e)
    finally:
        duplicate.close()


class Interrupt:
    """Shared by the scheduler and every worker of one run."""

    def __init__(self, watchdog: Watchdog | None = None) -> None:
        self.stopping = threading.Event()
        self.aborting = threading.Event()
        self.watchdog = watchdog or Watchdog()

    def stop(self) -> None:
        self.stopping.set()

    def abort(self) -> None:
        self.stopping.set()
        self.aborting.set()
        self.watchdog.abort()

    def until_stopped(self, work: Callable[[], T], what: str) -> T:
        """`work()`'s result, unless the run is stopped first: then Interrupted, leaving `work` behind.

        For phases before the fan-out (directory, source), which touch no shard: a request
        stuck on a silent endpoint must not keep a stopped run alive.
        """
        if self.stopping.is_set():
            raise Interrupted(f"interrupted before {what}; nothing was touched")
        outcome: list[T] = []
        failure: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                outcome.append(work())
            except BaseException as e:
                failure.append(e)
            finally:
                done.set()

        threading.Thread(target=run, name="fanout-phase", daemon=True).start()
        while not done.wait(_TICK_SECONDS):
            if self.stopping.is_set():
                raise Interrupted(f"interrupted while {what}; nothing was touched")
        if failure:
            raise failure[0]
        return outcome[0]


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    """The Python-level handler: the wakeup socket already told the watcher thread."""


@contextmanager
def signals_handled(interrupt: Interrupt) -> Iterator[Interrupt]:
    """Route SIGINT and SIGTERM to `interrupt` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    previous = {s: signal.signal(s, _ignore) for s in (signal.SIGINT, signal.SIGTERM)}
    watcher = threading.Thread(target=_watch_signals, args=(reader, interrupt), name="fanout-signals", daemon=True)
    watcher.start()
    try:
        yield interrupt
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)
        writer.close()  # the watcher reads end-of-file and ends
        watcher.join(timeout=1.0)
        reader.close()


def _watch_signals(reader: socket.socket, interrupt: Interrupt) -> None:
    received = 0
    while True:
        try:
            data = reader.recv(64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            received += 1
            name = signal.Signals(signum).name
            if received == 1:
                interrupt.stop()
                log.warning("%s: starting no new target; in-flight migrations finish, then the report", name)
            elif received == 2:
                interrupt.abort()
                log.warning("%s again: cancelling in-flight migrations, releasing locks", name)
