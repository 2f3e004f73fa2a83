"""Progress on stderr while a run goes: a live bar on a terminal, lines or JSON events elsewhere.

stdout carries the report only, so a progress display can never garble it. On a
terminal, rich draws one live line (targets done/total, failures, current wave, ETA)
and erases it at the end. Without a terminal (CI), there are no control characters: a
line per target that needs attention and a summary line every 10% (`--log-format
text`), or one JSON object per event (`--log-format json`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from fanout.report import Status, TargetResult
from fanout.secret import redact

_TROUBLE = (Status.FAILED, Status.IN_DOUBT, Status.DRIFTED, Status.SKIPPED)


class Progress:
    """Receives the run's events (from worker threads) and shows them."""

    def __init__(self, *, log_format: str = "text", stream: TextIO | None = None, live: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._json = log_format == "json"
        self._live = (self._stream.isatty() if live is None else live) and not self._json
        self._lock = threading.Lock()
        self._total = 0
        self._waves: list[int] = []
        self._done: set[str] = set()
        # Separate counts: a target skipped by the failure budget or an interrupt did not fail.
        self._failed: set[str] = set()
        self._skipped: set[str] = set()
        self._drifted: set[str] = set()
        self._started = time.monotonic()
        self._running = False  # start() was called: a run that never began has nothing to finish
        self._next_line = 0.1
        self._bar: Any = None
        self._task: Any = None

    def start(self, total: int, waves: Sequence[int] = ()) -> None:
        with self._lock:
            self._total, self._waves, self._started = total, list(waves), time.monotonic()
            self._running = True
            if self._json:
                self._event({"event": "start", "targets": total, "waves": self._waves})
            elif self._live:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                console = Console(file=self._stream, force_terminal=True)
                self._bar = Progress(
                    TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[failed]} failed · wave {task.fields[wave]}"), TimeRemainingColumn(),
                    console=console, transient=True,
                )  # fmt: skip
                self._task = self._bar.add_task("targets", total=total, failed=0, wave=self._wave())
                self._bar.start()

    def result(self, result: TargetResult) -> None:
        with self._lock:
            first = result.target not in self._done
            self._done.add(result.target)
            {Status.FAILED: self._failed, Status.SKIPPED: self._skipped, Status.DRIFTED: self._drifted}.get(
                result.status, set()
            ).add(result.target)
            if self._json:
                self._event(
                    {"event": "result", "target": result.target, "service": result.service,
                     "status": result.status.value, "ran": [m.id for m in result.ran], "pending": len(result.pending),
                     "rolled_back": [m.id for m in result.rolled_back],
                     "error": result.error.message if result.error else None, "done": len(self._done),
                     "total": self._total, **self._counts()}
                )  # fmt: skip
            elif self._bar is not None:
                if first:
                    self._bar.update(self._task, advance=1, failed=len(self._failed), wave=self._wave())
            else:
                if result.status in _TROUBLE:
                    reason = f": {result.error.message}" if result.error else ""
                    self._line(f"{result.target} {result.service} {result.status.value}{reason}")
                if first and self._total and len(self._done) / self._total >= self._next_line:
                    self._next_line = len(self._done) / self._total + 0.1
                    self._line(self._summary())

    def finish(self) -> None:
        with self._lock:
            if self._json and self._running:
                self._event({"event": "finish", "done": len(self._done), "total": self._total,
                             **self._counts(), "seconds": round(time.monotonic() - self._started, 3)})  # fmt: skip
            elif self._bar is not None:
                self._bar.stop()
                self._bar = None

    def _counts(self) -> dict[str, int]:
        """Targets per kind of trouble; a target that failed one service and skipped the next counts as failed."""
        return {
            "failed": len(self._failed),
            "skipped": len(self._skipped - self._failed),
            "drifted": len(self._drifted - self._failed - self._skipped),
        }

    def _wave(self) -> str:
        if len(self._waves) <= 1:
            return "1/1"
        reached, boundary = 1, 0
        for number, size in enumerate(self._waves, start=1):
            boundary += size
            reached = number
            if len(self._done) < boundary:
                break
        return f"{reached}/{len(self._waves)}"

    def _summary(self) -> str:
        elapsed = time.monotonic() - self._started
        done = len(self._done)
        eta = elapsed / done * (self._total - done) if done else 0.0
        counts = ", ".join(f"{n} {kind}" for kind, n in self._counts().items() if n or kind == "failed")
        return (f"progress: {done}/{self._total} targets, {counts}, wave {self._wave()}, "
                f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left")  # fmt: skip

    def _line(self, text: str) -> None:
        self._stream.write(redact(text) + "\n")
        self._stream.flush()

    def _event(self, event: dict[str, Any]) -> None:
        event["time"] = round(time.time(), 3)
        self._line(json.dumps(event))


@contextmanager
def shown(progress: Progress | None) -> Iterator[Progress | None]:
    """Stop the live display whatever happens, so the terminal is left clean."""
    try:
        yield progress
    finally:
        if progress is not None:
            progress.finish()
