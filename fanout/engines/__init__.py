"""Database engines: one module per engine, behind the session the runner drives.

Only `mysql` lives here so far (MySQL and MariaDB shards, not yet used by the runner);
PostgreSQL is still driven by fanout/runner.py directly. An engine never imports the
runner: the types both need live here or in fanout/report.py.
"""

from __future__ import annotations

from fanout.report import ErrorKind, TargetError


class EngineError(Exception):
    """A target-level failure raised by an engine: the runner turns it into a failed shard."""

    def __init__(self, error: TargetError) -> None:
        super().__init__(error.message)
        self.error = error

    @property
    def kind(self) -> ErrorKind:
        return self.error.kind
