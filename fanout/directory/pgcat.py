"""The PgCat directory: shards from a pgcat.toml, as PgCat's sharding setup declares them.

For each `[pools.<pool>.shards.<n>]`, the server whose role is "primary" and the shard's
`database` make a target; replicas never receive DDL. Credentials come from the
directory's `user`/`password` settings, else from the pool's first user.
"""

from __future__ import annotations

import tomllib
from typing import Any

from fanout.config import PgCatDirectoryConfig
from fanout.directory import Target
from fanout.errors import DirectoryError
from fanout.secret import Secret


class PgCatDirectory:
    def __init__(self, config: PgCatDirectoryConfig) -> None:
        self._config = config

    def targets(self) -> list[Target]:
        path = self._config.config
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise DirectoryError(f"cannot read the PgCat configuration {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise DirectoryError(f"{path}: not valid TOML: {e}") from None
        pools = document.get("pools")
        if not isinstance(pools, dict) or not pools:
            raise DirectoryError(f"{path}: no [pools] section")
        wanted = self._config.pools or tuple(pools)
        unknown = [p for p in wanted if p not in pools]
        if unknown:
            raise DirectoryError(f"{path}: no pool named {unknown[0]!r} (it has: {', '.join(pools)})")
        targets = []
        for pool_name in wanted:
            pool = pools[pool_name]
            shards = pool.get("shards") if isinstance(pool, dict) else None
            if not isinstance(shards, dict) or not shards:
                raise DirectoryError(f"{path}: pool {pool_name!r} has no shards")
            user, password = self._credentials(pool_name, pool)
            for number in sorted(shards, key=_shard_order):
                targets.append(self._target(pool_name, number, shards[number], user, password))
        return targets

    def _credentials(self, pool_name: str, pool: dict[str, Any]) -> tuple[str | None, Secret | None]:
        if self._config.user:
            return self._config.user, self._config.password
        users = pool.get("users") or {}
        first = users.get("0") if isinstance(users, dict) else None
        if not isinstance(first, dict) or "username" not in first:
            return None, self._config.password
        password = first.get("password")
        return str(first["username"]), Secret(str(password)) if password else self._config.password

    def _target(self, pool: str, number: str, shard: Any, user: str | None, password: Secret | None) -> Target:
        where = f"{self._config.config}: pools.{pool}.shards.{number}"
        if not isinstance(shard, dict) or not shard.get("database"):
            raise DirectoryError(f"{where}: no database")
        primaries = [s for s in shard.get("servers", []) if isinstance(s, list) and len(s) == 3 and s[2] == "primary"]
        if len(primaries) != 1:
            raise DirectoryError(f"{where}: expected exactly one primary server, found {len(primaries)}")
        host, port, _ = primaries[0]
        return Target(
            id=f"{pool}/shard-{number}",
            host=str(host),
            port=int(port),
            dbname=str(shard["database"]),
            user=user,
            password=password,
            tenants=(),
        )


def _shard_order(number: str) -> tuple[int, str]:
    return (int(number), number) if number.isdigit() else (1 << 30, number)
