"""What a run is asked to do: the options the runner and every engine read.

Kept apart from the runner so that engine modules (which never import the runner) and
the command layer share one definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fanout import rollout
from fanout.config import TcpSettings
from fanout.report import Mode, RollbackRequest

_UNITS = {"us": 1e-6, "ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_INTERVAL = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")


def seconds(value: str | None) -> float | None:
    """A PostgreSQL duration setting ("5s", "500ms", "2min"; a bare number is milliseconds) in seconds; 0: no limit."""
    if value is None:
        return None
    found = _INTERVAL.fullmatch(value.lower())
    if found is None or found[2] not in {"", *_UNITS}:
        raise ValueError(f"not a duration: {value!r}")
    amount = float(found[1]) * _UNITS.get(found[2] or "ms", 0.001)
    return amount or None


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Settings for every session fanout opens on a shard (None: the server's default).

    `settings` are the environment's own (`[session]`): (name, value) pairs, set on every
    session after fanout's, and again whenever the session is reset between migrations.
    """

    lock_timeout: str | None = None
    statement_timeout: str | None = None
    settings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RunOptions:
    mode: Mode
    limits: rollout.Limits = field(default_factory=rollout.Limits)
    lock_wait: float = 60.0  # seconds to wait for a shard's migration lock
    connect_timeout: float = 10.0
    session: SessionSettings = field(default_factory=SessionSettings)
    retries: int = 3
    retry_backoff: float = 0.5  # first delay; doubles each retry, with jitter
    # Seconds one target may take, lock wait included; past it the statement in flight is
    # cancelled and the target fails (target-timeout, or unresponsive if the shard does not answer).
    target_timeout: float | None = None
    # Seconds an answer may be awaited before a second connection checks that the server is
    # still working on it (a long migration is; a session whose answer a hung proxy swallowed
    # is not, and fails `unresponsive`). None or 0: no check.
    liveness_check: float | None = 30.0
    tcp: TcpSettings = field(default_factory=TcpSettings)
    # Every service of the environment is in the run: a migration yoyo recorded that no
    # set knows is then drift (with a subset, it may belong to a service left out).
    all_services: bool = True
    # Mode.ROLLBACK (or a dry run of it: Mode.PLAN with this set): what to roll back.
    rollback: RollbackRequest | None = None
    # verify --at: the version each named migration's service is meant to be at.
    at: tuple[str, ...] = ()
    # rollback --release R of a release that is no longer a service's current one: service -> ids it added.
    release_added: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # `.py` migrations may be imported and run (their code runs inside the runner).
    python_migrations: bool = False
    # A migration in doubt whose only trace is INVALID indexes it builds: drop them and run it again.
    repair_invalid: bool = False
    # apply --to ID: only that migration and what it depends on, in the service that has it (yoyo's -r).
    up_to: str | None = None

    @property
    def concurrency(self) -> int:
        return self.limits.concurrency
