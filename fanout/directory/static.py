"""The static directory: targets listed in the environment file itself."""

from __future__ import annotations

from fanout.config import StaticDirectoryConfig
from fanout.directory import Target


class StaticDirectory:
    """Targets written in `[[directory.targets]]`; DSN errors are configuration errors."""

    def __init__(self, config: StaticDirectoryConfig) -> None:
        self._config = config

    def targets(self) -> list[Target]:
        return [
            Target.from_dsn(entry.id, entry.dsn.reveal(), schema=entry.schema, tenants=entry.tenants)
            for entry in self._config.targets
        ]
