"""The run's hold on a MySQL/MariaDB session: KILL QUERY as the watchdog's cancel, PROCESSLIST liveness, keepalives.

MySQL has no out-of-band cancel request: the watchdog of the run (fanout/interrupt.py)
cancels a statement with `KILL QUERY` sent on a second connection, and checks a long wait
on information_schema.PROCESSLIST, as it does with a cancel request and pg_stat_activity
on PostgreSQL.
"""

from __future__ import annotations

import logging
import socket
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pymysql
import pymysql.connections
import pymysql.err

from fanout.config import TcpSettings
from fanout.engines import EngineError, watchdog_verdict
from fanout.engines.mysql.core import (
    engine_error,
    error_code,
)
from fanout.interrupt import Interrupt
from fanout.report import ErrorKind, TargetError

log = logging.getLogger(__name__)

# A session the server shows idle (`Sleep`) this long while fanout still waits for its answer lost that answer.
_IDLE_PROOF_SECONDS = 2.0
_KILL_SECONDS = 10.0  # connect and answer bound of the second connection that sends KILL QUERY


@dataclass(frozen=True, slots=True)
class Watching:
    """The run's part in a session: its watchdog and interrupt, the target's deadline, the liveness check."""

    interrupt: Interrupt
    deadline: float | None = None
    target_timeout: float | None = None
    liveness_check: float | None = None
    tcp: TcpSettings | None = None


def timed_out(target_timeout: float | None, what: str) -> EngineError:
    return engine_error(TargetError(ErrorKind.TARGET_TIMEOUT, f"target timeout ({target_timeout or 0:g}s): {what}"))


class TrackedConnection(pymysql.connections.Connection):  # type: ignore[misc]
    """Knows since when it waits for the server: the watchdog's cue to check the session is alive."""

    busy_since: float | None = None

    def query(self, sql: Any, unbuffered: bool = False) -> int:
        self.busy_since = time.monotonic()
        try:
            return int(super().query(sql, unbuffered))
        finally:
            self.busy_since = None


class MySQLCancel:
    """Cancel a session's statement: `KILL QUERY <its connection id>` from a second connection.

    MySQL has no out-of-band cancel request; the second connection is bounded by
    _KILL_SECONDS so that a silent server cannot hold the cancelling thread.
    """

    def __init__(self, connection: Any, kwargs: dict[str, Any]) -> None:
        self._connection = connection
        self._kwargs = {**kwargs, "connect_timeout": min(_KILL_SECONDS, kwargs.get("connect_timeout") or _KILL_SECONDS),
                        "read_timeout": _KILL_SECONDS, "write_timeout": _KILL_SECONDS}  # fmt: skip
        self.thread_id = int(connection.thread_id())

    def fileno(self) -> int:
        sock = self._connection._sock
        if sock is None:
            raise ValueError("connection closed")
        return int(sock.fileno())

    def cancel(self) -> None:
        killer = pymysql.connections.Connection(**self._kwargs)
        try:
            with killer.cursor() as cursor:
                cursor.execute(f"KILL QUERY {self.thread_id}")
        finally:
            killer.close()


def session_alive(kwargs: dict[str, Any], thread_id: int) -> bool:
    """Asked on a second connection: is the server still working for the session that waits?

    A running statement shows a command other than `Sleep` (a lock wait too): alive. A
    session shown sleeping while fanout waits for its answer, a session that is gone, or a
    server that does not accept a connection: not alive.
    """
    try:
        probe = pymysql.connections.Connection(**{**kwargs, "read_timeout": _KILL_SECONDS})
    except pymysql.err.MySQLError as e:
        return error_code(e) not in (2003, 2013)
    try:
        with probe.cursor() as cursor:
            cursor.execute("SELECT `COMMAND`, `TIME` FROM information_schema.PROCESSLIST WHERE `ID` = %s", (thread_id,))
            row = cursor.fetchone()
    except pymysql.err.MySQLError:
        return True  # cannot tell: keep waiting
    finally:
        probe.close()
    if row is None:
        return False
    command, idle_for = row
    return command != "Sleep" or idle_for is None or idle_for < _IDLE_PROOF_SECONDS


def set_tcp(connection: Any, tcp: TcpSettings | None) -> None:
    """Keepalives and TCP_USER_TIMEOUT on the connection's socket, as libpq sets them for PostgreSQL."""
    sock = getattr(connection, "_sock", None)
    if tcp is None or sock is None:
        return
    with suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if tcp.keepalives else 0)
        if tcp.keepalives:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, tcp.keepalives_idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, tcp.keepalives_interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, tcp.keepalives_count)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(tcp.tcp_user_timeout * 1000))


class _Watch:
    """A session's connection under the run's watchdog: the target's deadline, the second signal, liveness."""

    def __init__(self, connection: Any, kwargs: dict[str, Any], watching: Watching) -> None:
        self._watchdog = watching.interrupt.watchdog
        self._watching = watching
        self._cancel = MySQLCancel(connection, kwargs)
        self.handle = self._watchdog.watch(self._cancel, watching.deadline)
        if watching.liveness_check and isinstance(connection, TrackedConnection):
            thread_id = self._cancel.thread_id
            self.handle.alive = lambda: session_alive(kwargs, thread_id)
            self.handle.check_every = watching.liveness_check
            self.handle.busy = lambda: connection.busy_since
        self._released = False

    def untouched(self) -> bool:
        return self.handle.reason is None and not self.handle.abandoned

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._watchdog.release(self.handle)

    def verdict(self) -> EngineError | None:
        """What the watchdog did to the connection, as the target's error (None: nothing)."""
        return watchdog_verdict(
            self.handle,
            grace=self._watchdog.grace,
            target_timeout=self._watching.target_timeout,
            cancel="KILL QUERY",
            still_working="still working: its statement was killed (KILL QUERY)",
        )
