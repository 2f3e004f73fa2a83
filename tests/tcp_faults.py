"""Real TCP peers that misbehave, on 127.0.0.1, for the tests of every bounded wait.

- `StallingProxy` forwards to a real server until a client sends a marker, then stops
  forwarding that connection in both directions while keeping it open: the client sees
  a shard that accepted its statement and never answers (a hung proxy, a stopped host
  whose kernel still acknowledges).
- `SilentBodyProxy` forwards HTTP to a real server; the answer to the request that holds a
  marker gets its headers through, and then its body never comes (an S3 endpoint that
  stalls mid-download).
- `SilentListener` accepts connections and never sends a byte.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class StallingProxy:
    def __init__(self, upstream: tuple[str, int], marker: bytes) -> None:
        self._upstream = upstream
        self._marker = marker
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.stalled = threading.Event()  # set when a connection sent the marker and was frozen

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def __enter__(self) -> StallingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closing every socket ends the server's sessions, so their locks go with them."""
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            frozen = threading.Event()
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, frozen, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, frozen, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, frozen: threading.Event, watch: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if watch and self._marker in data:
                frozen.set()
                self.stalled.set()
            if frozen.is_set():
                continue  # swallowed: the connection stays open, nothing gets through any more
            try:
                sink.sendall(data)
            except OSError:
                return


class SilentBodyProxy(StallingProxy):
    def _pump(self, source: socket.socket, sink: socket.socket, frozen: threading.Event, watch: bool) -> None:
        headers_sent = False
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if watch and self._marker in data:
                frozen.set()
            elif not watch and frozen.is_set():
                if headers_sent:
                    continue  # the body: swallowed
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    continue  # a response split mid-headers: not worth handling in a test peer
                data, headers_sent = data[: end + 4], True
                self.stalled.set()
            try:
                sink.sendall(data)
            except OSError:
                return


class SilentListener:
    """Accepts TCP connections and never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._accepted: list[socket.socket] = []
        self._closed = threading.Event()
        self.connections = 0

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def __enter__(self) -> SilentListener:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._accepted:
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._accepted.append(client)
