"""Shard directories: where fanout learns which databases make up an environment.

Every backend yields `Target`s; `deduplicate()` folds targets that name the same
database (same host, port, dbname and schema) into one, so a database that serves
many tenants is migrated once. Directories never connect to a tenant database to
migrate it: they only enumerate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from fanout.config import DirectoryConfig, HttpDirectoryConfig, PgCatDirectoryConfig, SqlDirectoryConfig
from fanout.errors import ConfigError, DirectoryError
from fanout.secret import Secret

DEFAULT_PORT = 5432
_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True, slots=True)
class Target:
    """One database (or one schema inside a database) to migrate."""

    id: str
    host: str
    port: int
    dbname: str
    user: str | None = None
    password: Secret | None = field(default=None, repr=False, compare=False)
    schema: str | None = None
    # libpq connection parameters such as sslmode; never holds the password.
    options: tuple[tuple[str, str], ...] = ()
    tenants: tuple[str, ...] = ()
    # Ids of other directory entries that named this same database.
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_dsn(
        cls,
        target_id: str,
        dsn: str,
        *,
        schema: str | None = None,
        tenants: Iterable[str] = (),
    ) -> Target:
        """Parse `postgresql://user:password@host:port/dbname?sslmode=require&schema=s`."""
        parts = urlsplit(dsn)
        if parts.scheme not in _SCHEMES:
            raise ConfigError(
                f"target {target_id!r}: DSN must start with postgresql:// (got {parts.scheme or 'no'} scheme)"
            )
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as e:
            raise ConfigError(f"target {target_id!r}: invalid port in DSN") from e
        dbname = unquote(parts.path.lstrip("/"))
        if not parts.hostname or not dbname:
            raise ConfigError(f"target {target_id!r}: DSN must name a host and a database")
        options = dict(parse_qsl(parts.query))
        if "password" in options:
            raise ConfigError(f"target {target_id!r}: put the password in the DSN's user:password@ part")
        schema = schema or options.pop("schema", None)
        password = unquote(parts.password) if parts.password is not None else None
        return cls(
            id=target_id,
            host=parts.hostname,
            port=port,
            dbname=dbname,
            user=unquote(parts.username) if parts.username else None,
            password=Secret(password) if password else None,
            schema=schema or None,
            options=tuple(sorted(options.items())),
            tenants=tuple(tenants),
        )

    def libpq_kwargs(self, *, application_name: str, connect_timeout: float, read_only: bool = False) -> dict[str, Any]:
        """Keyword arguments for psycopg2.connect; the only place the password is revealed.

        `read_only` makes the server refuse writes for the whole session, whatever the caller does.
        """
        kwargs: dict[str, Any] = dict(self.options)
        kwargs.update(
            host=self.host,
            port=self.port,
            dbname=self.dbname,
            connect_timeout=max(1, round(connect_timeout)),
            application_name=application_name[:63],
        )
        if self.user:
            kwargs["user"] = self.user
        if self.password is not None:
            kwargs["password"] = self.password.reveal()
        if read_only:
            kwargs["options"] = (kwargs.get("options", "") + " -c default_transaction_read_only=on").strip()
        return kwargs

    @property
    def server(self) -> str:
        """The PostgreSQL server (host:port) that holds this target."""
        return f"{self.host}:{self.port}"

    @property
    def database_key(self) -> tuple[str, int, str, str | None]:
        return (self.host.lower(), self.port, self.dbname, self.schema)

    @property
    def display(self) -> str:
        """A DSN without the password, for reports and logs."""
        user = f"{self.user}@" if self.user else ""
        suffix = f"#{self.schema}" if self.schema else ""
        return f"postgresql://{user}{self.server}/{self.dbname}{suffix}"


class ShardDirectory(Protocol):
    """A source of targets. Implementations must be read-only."""

    def targets(self) -> list[Target]:
        """Every target of the environment; raises DirectoryError when the directory cannot answer."""
        ...


def deduplicate(targets: Iterable[Target]) -> tuple[Target, ...]:
    """Fold targets that point at the same database into the first one, keeping every tenant.

    Order is preserved (first occurrence wins the id), so runs are reproducible.
    """
    merged: dict[tuple[str, int, str, str | None], Target] = {}
    for target in targets:
        key = target.database_key
        seen = merged.get(key)
        if seen is None:
            merged[key] = target
            continue
        tenants = seen.tenants + tuple(t for t in target.tenants if t not in seen.tenants)
        aliases = seen.aliases
        if target.id != seen.id and target.id not in aliases:
            aliases += (target.id,)
        merged[key] = replace(seen, tenants=tenants, aliases=aliases)
    return tuple(merged.values())


def open_directory(config: DirectoryConfig, environment: str) -> ShardDirectory:
    """The directory backend that `config` describes."""
    from fanout.directory.http import HttpDirectory
    from fanout.directory.pgcat import PgCatDirectory
    from fanout.directory.sql import SqlDirectory
    from fanout.directory.static import StaticDirectory

    if isinstance(config, HttpDirectoryConfig):
        return HttpDirectory(config)
    if isinstance(config, SqlDirectoryConfig):
        return SqlDirectory(config, environment)
    if isinstance(config, PgCatDirectoryConfig):
        return PgCatDirectory(config)
    return StaticDirectory(config)


def list_targets(config: DirectoryConfig, environment: str) -> tuple[Target, ...]:
    """Every distinct target of the directory; an empty directory is an error, not a no-op."""
    targets = deduplicate(open_directory(config, environment).targets())
    if config.schemas is not None and targets:
        from fanout.directory.schemas import discover_schemas

        targets = deduplicate(discover_schemas(targets, config.schemas))
    if not targets:
        raise DirectoryError("the shard directory lists no target")
    return targets
