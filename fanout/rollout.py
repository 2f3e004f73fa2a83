"""Rollout policy: slices, waves, the failure budget, and concurrency caps per server.

Pure scheduling, no database: `schedule()` runs a callable on items under the limits
and reports which items were never started and why. The runner plugs its per-target
procedure into it; tests drive it with plain functions.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Generic, TypeVar

from fanout.errors import ConfigError

T = TypeVar("T")
R = TypeVar("R")

_STEP = re.compile(r"^\s*(\d+(?:\.\d+)?)(%?)\s*$")
# How often the scheduling loop wakes to notice an interrupt while targets run.
_TICK_SECONDS = 0.1


_SLICE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, slots=True)
class Slice:
    """Slice K of N (K from 1): the targets whose stable hash of their id falls in bucket K.

    A target stays in its slice across runs, runners and machines (no state, no
    coordination), so N runners given 1/N..N/N cover the fleet once between them. Waves,
    budgets and caps then apply within each slice.
    """

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str, *, what: str = "--slice") -> Slice:
        match = _SLICE.match(text)
        if not match:
            raise ConfigError(f"{what}: {text.strip()!r} is not K/N (e.g. 2/4)")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise ConfigError(f"{what}: {text.strip()!r}: N must be at least 1")
        if not 1 <= index <= count:
            raise ConfigError(f"{what}: {text.strip()!r}: K must be between 1 and N")
        return cls(index, count)

    def contains(self, target_id: str) -> bool:
        if self.count == 1:
            return True
        # sha256, not hash(): Python salts str hashes per process.
        bucket = int.from_bytes(hashlib.sha256(target_id.encode()).digest()[:8], "big") % self.count
        return bucket == self.index - 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE_FLEET = Slice()


@dataclass(frozen=True, slots=True)
class Waves:
    """Cumulative wave boundaries: `1,10%,100%` = 1 target, then up to 10% of them, then the rest.

    The first wave is the canary. A final 100% wave is implied when the last step is smaller.
    """

    steps: tuple[tuple[float, bool], ...] = ((100.0, True),)  # (value, is_percent)

    @classmethod
    def parse(cls, text: str, *, what: str = "--waves") -> Waves:
        steps: list[tuple[float, bool]] = []
        for part in text.split(","):
            match = _STEP.match(part)
            if not match or float(match.group(1)) <= 0:
                raise ConfigError(f"{what}: {part.strip()!r} is not a positive count or percentage (e.g. 1,10%,100%)")
            value, percent = float(match.group(1)), match.group(2) == "%"
            if percent and value > 100:
                raise ConfigError(f"{what}: {part.strip()!r} is more than 100%")
            if not percent and not value.is_integer():
                raise ConfigError(f"{what}: {part.strip()!r}: a count must be a whole number")
            earlier = [v for v, p in steps if p == percent]
            if earlier and value <= max(earlier):
                # Cumulative boundaries: a smaller one would silently start no wave at all.
                raise ConfigError(
                    f"{what}: {part.strip()!r} is not more than an earlier wave ({max(earlier):g}{'%' if percent else ''}); "
                    "waves are cumulative, e.g. 1,10%,50%,100%"
                )
            steps.append((value, percent))
        return cls(tuple(steps))

    def sizes(self, total: int) -> list[int]:
        """How many items each wave starts; waves that would add nothing are dropped."""
        sizes, done = [], 0
        for value, percent in self.steps:
            boundary = math.ceil(total * value / 100) if percent else int(value)
            boundary = min(total, max(boundary, done))
            if boundary > done:
                sizes.append(boundary - done)
                done = boundary
        if done < total:
            sizes.append(total - done)
        return sizes

    def __str__(self) -> str:
        return ",".join(f"{v:g}%" if p else f"{v:g}" for v, p in self.steps)


@dataclass(frozen=True, slots=True)
class FailureBudget:
    """How many failed items a run tolerates before it stops starting new ones (None: no limit)."""

    count: int | None = None
    ratio: float | None = None

    @classmethod
    def parse(cls, text: str, *, what: str = "--max-failures") -> FailureBudget:
        match = _STEP.match(text)
        if not match:
            raise ConfigError(f"{what}: {text!r} is not a count or a percentage (e.g. 0, 5, 2%)")
        value, percent = float(match.group(1)), match.group(2) == "%"
        if percent:
            if value > 100:
                raise ConfigError(f"{what}: {text!r} is more than 100%")
            return cls(ratio=value / 100)
        if not value.is_integer():
            raise ConfigError(f"{what}: {text!r}: a count must be a whole number")
        return cls(count=int(value))

    @property
    def unlimited(self) -> bool:
        return self.count is None and self.ratio is None

    def limit(self, total: int) -> float:
        if self.count is not None:
            return self.count
        if self.ratio is not None:
            return math.floor(total * self.ratio)
        return math.inf

    def exceeded(self, failures: int, total: int) -> bool:
        return failures > self.limit(total)

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        if self.ratio is not None:
            return f"{self.ratio * 100:g}%"
        return "unlimited"


@dataclass(frozen=True, slots=True)
class Limits:
    concurrency: int = 8
    per_server: int | None = None  # None: only the global limit
    waves: Waves = field(default_factory=Waves)
    budget: FailureBudget = field(default_factory=FailureBudget)


@dataclass(slots=True)
class Outcome(Generic[R]):
    """What `schedule()` did: a result per started item (None for items never started) and why it stopped."""

    results: list[R | None]
    stop_reason: str | None = None
    waves_run: int = 0
    peak_in_flight: int = 0
    peak_per_server: dict[str, int] = field(default_factory=dict)


def schedule(
    items: Sequence[T],
    work: Callable[[T], R],
    *,
    server_of: Callable[[T], str],
    failed: Callable[[R], bool],
    limits: Limits,
    stop: threading.Event | None = None,
) -> Outcome[R]:
    """Run `work` on every item, at most `concurrency` at once and `per_server` per server.

    Waves start one after another; a wave starts only when the failures so far are within
    the budget. The budget is checked as results arrive, so a run stops starting new items
    as soon as it is exceeded; items already running finish. Setting `stop` does the same.
    """
    outcome: Outcome[R] = Outcome(results=[None] * len(items))
    per_server_cap = limits.per_server or limits.concurrency
    failures = 0
    running: Counter[str] = Counter()
    # Futures arrive here from their done callbacks as they finish: cheaper than
    # concurrent.futures.wait, which hooks a waiter into every running future each time one
    # finishes (at 10,000 tenant schemas, a tenth of the runner's CPU in a plan).
    finished: SimpleQueue[Future[R]] = SimpleQueue()
    start = 0
    with ThreadPoolExecutor(max_workers=max(1, limits.concurrency), thread_name_prefix="fanout-target") as pool:
        for size in limits.waves.sizes(len(items)):
            queue = list(range(start, start + size))
            start += size
            outcome.waves_run += 1
            in_flight: dict[Future[R], int] = {}
            while queue or in_flight:
                if outcome.stop_reason is None:
                    outcome.stop_reason = _stop_reason(stop, failures, len(items), limits.budget)
                if outcome.stop_reason is None:
                    _fill(
                        queue, in_flight, pool, work, items, server_of, running, per_server_cap, limits.concurrency,
                        finished.put,
                    )  # fmt: skip
                    outcome.peak_in_flight = max(outcome.peak_in_flight, len(in_flight))
                    for server, count in running.items():
                        outcome.peak_per_server[server] = max(outcome.peak_per_server.get(server, 0), count)
                elif not in_flight:
                    break
                for future in _finished(finished, _TICK_SECONDS):
                    index = in_flight.pop(future)
                    running[server_of(items[index])] -= 1
                    result = future.result()
                    outcome.results[index] = result
                    failures += failed(result)
            if outcome.stop_reason is None:
                outcome.stop_reason = _stop_reason(stop, failures, len(items), limits.budget)
            if outcome.stop_reason is not None:
                break
    return outcome


def _fill(
    queue: list[int],
    in_flight: dict[Future[R], int],
    pool: ThreadPoolExecutor,
    work: Callable[[T], R],
    items: Sequence[T],
    server_of: Callable[[T], str],
    running: Counter[str],
    per_server_cap: int,
    concurrency: int,
    when_done: Callable[[Future[R]], object],
) -> None:
    """Start queued items, in order, skipping over those whose server is at its cap."""
    position = 0
    while len(in_flight) < concurrency and position < len(queue):
        index = queue[position]
        server = server_of(items[index])
        if running[server] >= per_server_cap:
            position += 1
            continue
        queue.pop(position)
        running[server] += 1
        future = pool.submit(work, items[index])
        in_flight[future] = index
        future.add_done_callback(when_done)


def _finished(finished: SimpleQueue[Future[R]], timeout: float) -> list[Future[R]]:
    """The futures that finished: waits up to `timeout` for the first (so a stop is seen within it)."""
    try:
        done = [finished.get(timeout=timeout)]
    except Empty:
        return []
    while True:
        try:
            done.append(finished.get_nowait())
        except Empty:
            return done


def _stop_reason(stop: threading.Event | None, failures: int, total: int, budget: FailureBudget) -> str | None:
    if stop is not None and stop.is_set():
        return "interrupted"
    if budget.exceeded(failures, total):
        return f"failure budget exceeded: {failures} failed, {budget} allowed"
    return None
