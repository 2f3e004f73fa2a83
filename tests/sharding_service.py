"""A real HTTP sharding service on 127.0.0.1 for the directory tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class ShardingState:
    token: str | None = None
    pages: list[list[Any]] = field(default_factory=list)
    databases: dict[str, dict[str, Any]] = field(default_factory=dict)  # tenant -> resolve answer
    raw_resolve: dict[str, bytes] = field(default_factory=dict)  # tenant -> raw body (malformed cases)
    failures_before_success: int = 0  # 503s served before each first success, per path
    retry_after: str | None = None  # the Retry-After header of those 503s
    requests: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    delay: float = 0.0
    resolve_delay: float = 0.0  # seconds each /write/ answer waits (a directory that stalls mid-resolution)
    next_is_self: bool = False  # every page's `next` points back to the page itself (a pagination loop)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _failed: dict[str, int] = field(default_factory=dict)


def _handler(state: ShardingState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            """Quiet."""

        def do_GET(self) -> None:
            with state.lock:
                state.requests.append(self.path)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self._serve()
            finally:
                with state.lock:
                    state.in_flight -= 1

        def _serve(self) -> None:
            if state.delay:
                threading.Event().wait(state.delay)
            if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
                return self._send(401, b'{"error": "unauthorized"}')
            with state.lock:
                failed = state._failed.get(self.path, 0)
                if failed < state.failures_before_success:
                    state._failed[self.path] = failed + 1
                    return self._send(503, b"busy", retry_after=state.retry_after)
            url = urlsplit(self.path)
            if url.path == "/tenants":
                page = int(parse_qs(url.query).get("page", ["0"])[0])
                next_url = f"/tenants?page={page + 1}" if page + 1 < len(state.pages) else None
                if state.next_is_self:
                    next_url = self.path
                items = state.pages[page] if state.pages else []
                return self._send(200, json.dumps({"tenants": items, "next": next_url}).encode())
            if url.path.startswith("/write/"):
                if state.resolve_delay:
                    threading.Event().wait(state.resolve_delay)
                tenant = unquote(url.path[len("/write/") :])
                if tenant in state.raw_resolve:
                    return self._send(200, state.raw_resolve[tenant])
                if tenant in state.databases:
                    return self._send(200, json.dumps(state.databases[tenant]).encode())
            return self._send(404, b'{"error": "not found"}')

        def _send(self, status: int, body: bytes, *, retry_after: str | None = None) -> None:
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


class ShardingService:
    def __init__(self) -> None:
        self.state = ShardingState()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ShardingService:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def requests_matching(self, predicate: Callable[[str], bool]) -> int:
        return sum(1 for path in self.state.requests if predicate(path))
