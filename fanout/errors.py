"""The exception hierarchy: every error fanout raises on purpose carries its exit code.

Exit codes are a public interface (see README, "Exit codes"); tests pin them.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_SOURCE = 3
EXIT_DIRECTORY = 4
EXIT_TARGETS_FAILED = 5
# The work is done, but its run record or a requested report could not be stored.
EXIT_NOT_STORED = 6
EXIT_PENDING = 10
EXIT_INTERRUPTED = 130


class FanoutError(Exception):
    """Root of fanout's errors; `str(error)` is the one line a user reads."""

    exit_code: ClassVar[int] = EXIT_INTERNAL


class ConfigError(FanoutError):
    """Bad environment file, unknown environment or service, missing variable, bad option."""

    exit_code = EXIT_CONFIG


class SourceError(FanoutError):
    """The migration set cannot be read: S3 unreachable or denied, empty, unparsable."""

    exit_code = EXIT_SOURCE


class DirectoryError(FanoutError):
    """The shard directory cannot be read or lists no shard."""

    exit_code = EXIT_DIRECTORY


class TargetFailed(FanoutError):
    """A single named target could not be prepared (bootstrap's --create-database)."""

    exit_code = EXIT_TARGETS_FAILED


class Interrupted(FanoutError):
    """The run was stopped by a signal before it finished."""

    exit_code = EXIT_INTERRUPTED
