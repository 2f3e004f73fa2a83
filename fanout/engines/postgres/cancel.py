"""Cancelling a PostgreSQL statement from the watchdog's thread without freezing the process."""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


class PgCancel:
    """A psycopg2 connection's cancel request, sent without holding the GIL.

    psycopg2's `connection.cancel()` keeps the GIL while libpq connects to the server and
    waits for it to close the cancel connection: on a silent server that freezes every
    thread of the process, the watchdog and the signal watcher included. libpq's own
    `PQcancel` is thread-safe, and ctypes releases the GIL around it.
    """

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._libpq = _libpq()
        self._handle = self._libpq.PQgetCancel(ctypes.c_void_p(connection.pgconn_ptr)) if self._libpq else None
        self._sent = False

    def fileno(self) -> int:
        return int(self._connection.fileno())

    def cancel(self) -> None:
        if self._libpq is None or not self._handle:
            self._connection.cancel()  # no libpq found beside psycopg2: the GIL-holding fallback
            return
        self._sent = True
        errors = ctypes.create_string_buffer(256)
        if not self._libpq.PQcancel(self._handle, errors, len(errors)):
            log.debug("cancel request failed: %s", errors.value.decode(errors="replace"))

    def close(self) -> None:
        """Free the cancel handle, unless a cancel request (on another thread) may still use it."""
        if self._libpq is not None and self._handle and not self._sent:
            self._libpq.PQfreeCancel(self._handle)
            self._handle = None


@functools.cache
def _libpq() -> Any:
    """The libpq that psycopg2 is linked with (already loaded in this process), or None."""
    paths = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = [line.split()[-1] for line in maps if "/libpq" in line]
    except OSError:
        pass
    if not paths:  # another libpq than psycopg2's would not know its PGconn
        return None
    try:
        library = ctypes.CDLL(paths[0])
    except OSError:
        return None
    library.PQgetCancel.restype = ctypes.c_void_p
    library.PQgetCancel.argtypes = [ctypes.c_void_p]
    library.PQcancel.restype = ctypes.c_int
    library.PQcancel.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    library.PQfreeCancel.restype = None
    library.PQfreeCancel.argtypes = [ctypes.c_void_p]
    return library
