"""A TCP proxy on 127.0.0.1 that adds a fixed delay to every chunk, in both directions.

    python bench/latency_proxy.py --target 127.0.0.1:5432 --one-way-ms 1    # prints its port, then serves

With a one-way delay of 1 ms, every round trip through the proxy costs 2 ms more, the way a
database one network hop away does. Chunks keep their order and are not throttled: each is
forwarded at (arrival + delay), so a pipelined stream pays the delay once, as on a real link.

Threads and time.sleep rather than asyncio: the event loop's timers round up to whole
milliseconds (epoll), which turned a 1 ms delay into 1.25. It runs in its own process so its
CPU use does not take the GIL from the runner it measures.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import sys
import threading
import time


def _pipe(source: socket.socket, sink: socket.socket, delay: float) -> None:
    chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def forward() -> None:
        while True:
            due, data = chunks.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    sender = threading.Thread(target=forward, daemon=True)
    sender.start()
    while True:
        try:
            data = source.recv(1 << 16)
        except OSError:
            data = b""
        chunks.put((time.monotonic() + delay, data))
        if not data:
            break
    sender.join()


def _connection(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    with client:
        try:
            server = socket.create_connection(target)
        except OSError:
            return
        with server:
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = threading.Thread(target=_pipe, args=(client, server, delay), daemon=True)
            upstream.start()
            _pipe(server, client, delay)
            upstream.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--one-way-ms", type=float, default=1.0, help="delay added each way (RTT = twice this)")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    target, delay = (host, int(port)), args.one_way_ms / 1000
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as listener:
        print(listener.getsockname()[1], flush=True)
        try:
            while True:
                client, _ = listener.accept()
                threading.Thread(target=_connection, args=(client, target, delay), daemon=True).start()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
