"""Graceful interrupts: the first SIGINT/SIGTERM stops scheduling, the second cancels.

A run polls `stopping` between targets and between migrations, so in-flight migrations
finish (or roll back) and every lock is released before the report is written. The
second signal also cancels the statements in flight (a PostgreSQL cancel request, so
the server rolls the migration back) instead of waiting for them.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Protocol

log = logging.getLogger(__name__)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Interrupt:
    """Shared by the scheduler and every worker of one run."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.aborting = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: set[Cancellable] = set()

    def stop(self) -> None:
        self.stopping.set()

    def abort(self) -> None:
        self.stopping.set()
        self.aborting.set()
        with self._lock:
            in_flight = list(self._in_flight)
        for connection in in_flight:
            _cancel(connection)

    @contextmanager
    def cancellable(self, connection: Cancellable) -> Iterator[None]:
        """While inside, `abort()` cancels what `connection` is running."""
        with self._lock:
            self._in_flight.add(connection)
        if self.aborting.is_set():
            _cancel(connection)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight.discard(connection)


def _cancel(connection: Cancellable) -> None:
    try:
        connection.cancel()
    except Exception as e:  # a closed connection has nothing to cancel
        log.debug("cancel failed: %s", e)


@contextmanager
def signals_handled(interrupt: Interrupt) -> Iterator[Interrupt]:
    """Route SIGINT and SIGTERM to `interrupt` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        # Act before logging: a second signal can run this handler again mid-way through the first.
        name = signal.Signals(signum).name
        if interrupt.stopping.is_set():
            interrupt.abort()
            log.warning("%s again: cancelling in-flight migrations, releasing locks", name)
        else:
            interrupt.stop()
            log.warning("%s: starting no new target; in-flight migrations finish, then the report", name)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupt
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
