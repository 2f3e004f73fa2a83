"""The run's shard connections: counted against the budgets, and handed from one target to the next.

Engine-neutral: an engine session takes an idle connection of its target's database or
counts the one it opens, and gives it back when it is done (`reuse` only when its session
state is clean). The key saying which targets may share a connection is the engine's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fanout.directory import Target
from fanout.options import RunOptions

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Fact(Generic[T]):
    """The name of something a session reads once for its whole database and shares (`Connections.learn`)."""

    name: str


@dataclass(slots=True)
class Idle:
    connection: Any
    backend_pid: int | None  # from the pooler check it passed when it was opened
    server: str


class Connections:
    """The run's shard connections: counted, and handed from one target to the next of the same database.

    Tenant schemas of one database are targets that differ only in their schema. Opening a
    connection per schema costs a SCRAM exchange, a fresh backend with cold catalog caches,
    the pooler check and the session setup, which at thousands of schemas is most of a run.
    A session that ends cleanly (its lock released, no transaction open, nothing cancelled,
    its session state reset) gives its connection back here; the next target of the same
    database takes it instead of connecting. Anything else is closed, never reused.

    A connection is kept only while a target of its database has yet to start, and the
    connections open (in use and idle) stay within `concurrency` and `per_server`: opening
    one closes an idle one first when the budget is full.
    """

    def __init__(self, targets: Sequence[Target], options: RunOptions, key: Callable[[Target], str]) -> None:
        self._key = key
        self._lock = threading.Lock()
        self._options = options
        self._idle: dict[str, list[Idle]] = {}
        self._waiting: dict[str, int] = {}
        self._targets: dict[str, int] = {}  # per database, as `_waiting` starts
        # Each target's key, computed once: the engine's key digests its connection parameters,
        # and a target asks for it four times (7% of the runner's CPU in a plan over tenant schemas).
        self._keys: dict[int, tuple[Target, str]] = {}
        for target in targets:
            database = self._keys.setdefault(id(target), (target, key(target)))[1]
            self._waiting[database] = self._waiting.get(database, 0) + 1
        self._targets.update(self._waiting)
        self._open: dict[str, int] = {}  # per server: in use and idle
        self._facts: dict[tuple[str, Fact[Any]], Any] = {}
        self._claimed: set[tuple[str, Fact[Any]]] = set()
        self.opened = 0

    def key(self, target: Target) -> str:
        """The database a connection is to (the engine's `connection_key`)."""
        known = self._keys.get(id(target))
        # The target itself is kept with its key, so its id cannot be another object's.
        return known[1] if known is not None and known[0] is target else self._key(target)

    def starting(self, target: Target) -> None:
        with self._lock:
            key = self.key(target)
            self._waiting[key] = self._waiting.get(key, 1) - 1

    def take(self, target: Target) -> Idle | None:
        """An idle connection to the target's database, now in use; None: open one (then call `opening`)."""
        key = self.key(target)
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def opening(self, target: Target) -> None:
        """A connection is about to be opened for `target`: make room within the budget, and count it."""
        evict: list[Idle] = []
        with self._lock:
            limits = self._options.limits
            per_server = limits.per_server or limits.concurrency
            server = target.server
            # Idle connections to the target's server first: closing one frees both budgets.
            for idle in sorted(self._idle.values(), key=lambda pool: not pool or pool[0].server != server):
                while idle and (
                    sum(self._open.values()) - len(evict) >= limits.concurrency
                    or (idle[0].server == server and self._open.get(server, 0) - len(evict) >= per_server)
                ):
                    evict.append(idle.pop())
            for gone in evict:
                self._open[gone.server] -= 1
            self._open[target.server] = self._open.get(target.server, 0) + 1
            self.opened += 1
        for gone in evict:
            with contextlib.suppress(Exception):
                gone.connection.close()

    def not_opened(self, target: Target) -> None:
        """The connection `opening` counted could not be opened (it still counts as an attempt)."""
        with self._lock:
            self._open[target.server] -= 1

    def give_back(self, target: Target, connection: Any, backend_pid: int | None, *, reuse: bool) -> None:
        """The session is done with `connection`: keep it for the next target of its database, or close it."""
        key = self.key(target)
        with self._lock:
            if reuse and self._waiting.get(key, 0) > 0:
                self._idle.setdefault(key, []).append(Idle(connection, backend_pid, target.server))
                return
            self._open[target.server] = self._open.get(target.server, 1) - 1
        with contextlib.suppress(Exception):
            connection.close()

    def targets_of(self, target: Target) -> int:
        """How many of the run's targets are in the target's database."""
        return self._targets.get(self.key(target), 1)

    def fact(self, target: Target, fact: Fact[T]) -> T | None:
        """What a session of this run learned about the target's database (`learn`), or None."""
        key = self.key(target)
        with self._lock:
            known: T | None = self._facts.get((key, fact))
            return known

    def claim(self, target: Target, fact: Fact[T]) -> bool:
        """True for one session of the database at a time: that one reads the fact, then `learn`s it
        or gives the claim back (`unclaim`). The others read what they need their own way meanwhile,
        without waiting: a plan's first sessions of a database start together, and each reading
        the whole database would multiply the query the fact is there to save."""
        key = (self.key(target), fact)
        with self._lock:
            if key in self._facts or key in self._claimed:
                return False
            self._claimed.add(key)
            return True

    def unclaim(self, target: Target, fact: Fact[T]) -> None:
        """The claiming session did not learn the fact (it failed, or left early): another may read it."""
        with self._lock:
            self._claimed.discard((self.key(target), fact))

    def learn(self, target: Target, fact: Fact[T], value: T) -> None:
        """Share a fact about the target's database with the run's later sessions of that database.

        For what is read in one query for the whole database, where reading it once per tenant
        schema costs the server a query per schema. Read-only runs only: a session that writes
        reads its shard's state under its own lock. The value is shared, never copied: a
        read-only type (a Mapping, a tuple) keeps the sessions from changing it under each other.
        """
        key = (self.key(target), fact)
        with self._lock:
            self._facts.setdefault(key, value)
            self._claimed.discard(key)

    def close_idle(self) -> None:
        with self._lock:
            idle = [i for pool in self._idle.values() for i in pool]
            self._idle.clear()
            for gone in idle:
                self._open[gone.server] -= 1
        for gone in idle:
            with contextlib.suppress(Exception):
                gone.connection.close()
