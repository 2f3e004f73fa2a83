"""Environment files: `environments/<env>.toml` -> a validated, frozen `Environment`.

Strings may reference environment variables as `${NAME}` (`$${` writes a literal `${`),
so secrets never live in the repository. They are resolved when the file is loaded; a
variable of the `[source]` or `[directory]` table that is not set is an error only when
a command reads that table, so `publish` (source only) does not need shard passwords.
Values that carry credentials (DSNs, tokens) become `Secret`s at once.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from fanout import lint
from fanout.errors import ConfigError
from fanout.rollout import FailureBudget, Waves
from fanout.secret import Secret

ENVIRONMENTS_DIR_VARIABLE = "FANOUT_ENVIRONMENTS_DIR"
DEFAULT_ENVIRONMENTS_DIR = Path("environments")

_VARIABLE = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SERVICE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# An environment's name is part of S3 keys and of local paths (.fanout/runs/<env>/).
_ENVIRONMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Tables resolved only when a command reads them: a missing variable there is deferred.
_DEFERRED_TABLES = ("source", "directory")


# ---- the public, frozen model -------------------------------------------------------


DEFAULT_LAYOUT = "{prefix}/{service}/{env}"
LAYOUT_PLACEHOLDERS = ("prefix", "service", "env")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class UnpublishedPolicy(StrEnum):
    """What a run does with migrations in the bucket that the release manifest does not list."""

    REFUSE = "refuse"  # apply refuses (exit 3); plan/status/verify list them, verify fails
    REPORT = "report"  # apply runs the release without them; every report lists them, verify fails
    APPLY = "apply"  # applied like published ones (pinned by the listing's ETag), and listed


def layout_prefix(template: str, *, prefix: str, service: str, environment: str) -> str:
    """A layout template filled in: a key prefix ending in "/" (or "" for the bucket's root)."""
    filled = template.format(prefix=prefix, service=service, env=environment)
    parts = [p for p in filled.split("/") if p]
    return "/".join(parts) + "/" if parts else ""


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where each service's migrations live: by default s3://bucket/prefix/<service>/<env>/."""

    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    # Bounds on every S3 call (botocore): an endpoint that accepts and never answers fails
    # the run within about max_attempts * (connect_timeout + read_timeout) plus backoff.
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    max_attempts: int = 3
    layout: str = DEFAULT_LAYOUT
    # service -> its paths (templates like `layout`), merged in order as yoyo-cloud's paths=[...]
    paths: tuple[tuple[str, tuple[str, ...]], ...] = ()
    python_migrations: bool = False  # .py migrations run code inside the runner: opt-in
    unpublished: UnpublishedPolicy = UnpublishedPolicy.REFUSE

    def url(self, service: str, environment: str) -> str:
        return f"s3://{self.bucket}/{self.key_prefix(service, environment)}"

    def urls(self, service: str, environment: str) -> tuple[str, ...]:
        return tuple(f"s3://{self.bucket}/{p}" for p in self.key_prefixes(service, environment))

    def key_prefix(self, service: str, environment: str) -> str:
        """The service's first path: where its release manifest lives."""
        return self.key_prefixes(service, environment)[0]

    def key_prefixes(self, service: str, environment: str) -> tuple[str, ...]:
        templates = dict(self.paths).get(service, (self.layout,))
        return tuple(
            layout_prefix(t, prefix=self.prefix.strip("/"), service=service, environment=environment) for t in templates
        )


@dataclass(frozen=True, slots=True)
class FolderLocation:
    """Migrations in a local folder laid out like the bucket: by default <path>/<service>/<env>/."""

    path: Path
    layout: str = DEFAULT_LAYOUT
    paths: tuple[tuple[str, tuple[str, ...]], ...] = ()
    python_migrations: bool = False
    unpublished: UnpublishedPolicy = UnpublishedPolicy.REFUSE

    def url(self, service: str, environment: str) -> str:
        return self.urls(service, environment)[0]

    def urls(self, service: str, environment: str) -> tuple[str, ...]:
        return tuple(str(p) + "/" for p in self.folders(service, environment))

    def folders(self, service: str, environment: str) -> tuple[Path, ...]:
        templates = dict(self.paths).get(service, (self.layout,))
        return tuple(
            self.path / layout_prefix(t, prefix="", service=service, environment=environment) for t in templates
        )


@dataclass(frozen=True, slots=True)
class SourceRules:
    """How a run treats what it finds in the source (`[source]` and `[lint]`)."""

    python_migrations: bool = False  # .py migrations run code inside the runner: opt-in
    unpublished: UnpublishedPolicy = UnpublishedPolicy.REFUSE
    lint_errors: frozenset[str] = frozenset()  # warning rules raised to errors


@dataclass(frozen=True, slots=True)
class StaticTarget:
    """One entry of a static shard list, as written in the environment file."""

    id: str
    dsn: Secret
    schema: str | None = None
    tenants: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SchemaDiscovery:
    """Expand each database target into one target per tenant schema found in it."""

    pattern: str | None = None  # a LIKE pattern on schema names, e.g. "tenant_%"
    query: str | None = None  # or a query returning schema names, run read-only in each database


@dataclass(frozen=True, slots=True)
class StaticDirectoryConfig:
    targets: tuple[StaticTarget, ...]
    schemas: SchemaDiscovery | None = None
    kind: Literal["static"] = "static"


@dataclass(frozen=True, slots=True)
class HttpDirectoryConfig:
    """A sharding service: list tenants, then resolve each to the database that holds it."""

    endpoint: str
    tenants_path: str = "/tenants"
    resolve_path: str = "/write/{tenant_id}"
    token: Secret | None = None
    timeout: float = 5.0
    retries: int = 3
    concurrency: int = 32
    ca_bundle: str | None = None
    max_pages: int = 10_000  # a tenant list longer than this is a pagination loop
    schemas: SchemaDiscovery | None = None
    kind: Literal["http"] = "http"


@dataclass(frozen=True, slots=True)
class SqlDirectoryConfig:
    """A catalog database with one row per shard."""

    dsn: Secret
    query: str
    user: str | None = None
    password: Secret | None = None
    timeout: float = 10.0  # seconds to connect, and for the query (statement_timeout)
    schemas: SchemaDiscovery | None = None
    kind: Literal["sql"] = "sql"


@dataclass(frozen=True, slots=True)
class PgCatDirectoryConfig:
    """A pgcat.toml: each [pools.<pool>.shards.<n>] primary is a target; replicas never get DDL."""

    config: Path
    pools: tuple[str, ...] = ()
    user: str | None = None
    password: Secret | None = None
    schemas: SchemaDiscovery | None = None
    kind: Literal["pgcat"] = "pgcat"


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """libpq's TCP keepalives and user timeout: how long a dead or cut-off peer can hold a connection.

    Keepalives find a peer that vanished while fanout waits for an answer (a crashed host,
    a dropped route); `tcp_user_timeout` fails a connection whose sent data stays
    unacknowledged. Neither can tell a live but silent peer (a hung proxy) from a long
    statement: `target_timeout` bounds that.
    """

    keepalives: bool = True
    keepalives_idle: int = 30  # seconds of silence before the first probe
    keepalives_interval: int = 10  # seconds between probes
    keepalives_count: int = 3  # unanswered probes before the connection is dead
    tcp_user_timeout: float = 60.0  # seconds sent data may stay unacknowledged

    def libpq(self) -> dict[str, int]:
        """The libpq connection parameters (tcp_user_timeout in milliseconds)."""
        if not self.keepalives:
            return {"keepalives": 0, "tcp_user_timeout": round(self.tcp_user_timeout * 1000)}
        return {
            "keepalives": 1,
            "keepalives_idle": self.keepalives_idle,
            "keepalives_interval": self.keepalives_interval,
            "keepalives_count": self.keepalives_count,
            "tcp_user_timeout": round(self.tcp_user_timeout * 1000),
        }


DirectoryConfig = StaticDirectoryConfig | HttpDirectoryConfig | SqlDirectoryConfig | PgCatDirectoryConfig


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """Defaults for a run; command-line options override them."""

    concurrency: int = 8
    per_server: int | None = None  # None: only the global limit
    lock_wait: float = 60.0  # seconds to wait for a shard's migration lock
    connect_timeout: float = 10.0
    lock_timeout: str | None = None  # PostgreSQL lock_timeout for migrations, e.g. "5s"
    statement_timeout: str | None = None  # PostgreSQL statement_timeout, e.g. "15min"
    retries: int = 3
    retry_backoff: float = 0.5
    waves: str | None = None  # e.g. "1,10%,100%"
    max_failures: str | None = None  # e.g. "0", "5", "2%"
    target_timeout: float | None = None  # seconds one target may take, lock wait included; None: no limit
    liveness_check: float = 30.0  # seconds of waiting for an answer before checking the session is alive; 0: never
    keepalives: bool = True
    keepalives_idle: int = 30
    keepalives_interval: int = 10
    keepalives_count: int = 3
    tcp_user_timeout: float = 60.0
    # A migration in doubt whose only trace is INVALID indexes it builds: drop them, run it again.
    repair_invalid: bool = False

    @property
    def tcp(self) -> TcpSettings:
        return TcpSettings(
            keepalives=self.keepalives,
            keepalives_idle=self.keepalives_idle,
            keepalives_interval=self.keepalives_interval,
            keepalives_count=self.keepalives_count,
            tcp_user_timeout=self.tcp_user_timeout,
        )


@dataclass(frozen=True, slots=True)
class Unresolved:
    """A table of the file that names an environment variable that is not set."""

    path: Path
    where: str
    variable: str

    def error(self) -> ConfigError:
        return ConfigError(f"{self.path}: {self.where}: environment variable {self.variable} is not set")


@dataclass(frozen=True, slots=True)
class Environment:
    name: str
    path: Path
    services: tuple[str, ...]
    source_table: S3Location | FolderLocation | Unresolved = field(repr=False)
    directory_table: DirectoryConfig | Unresolved = field(repr=False)
    runner: RunnerSettings
    # True when nothing in the file named the environment and its file name was taken.
    named_after_file: bool = False
    # [session]: server settings for every shard session, as (name, value) in file order.
    session: tuple[tuple[str, str], ...] = ()
    lint_errors: frozenset[str] = frozenset()  # [lint] errors: warning rules raised to errors

    @property
    def rules(self) -> SourceRules:
        """How runs treat what the source holds ([source] and [lint]); reads the source table."""
        source = self.source
        return SourceRules(source.python_migrations, source.unpublished, self.lint_errors)

    @property
    def source(self) -> S3Location | FolderLocation:
        """Where migrations live. Raises ConfigError when the table names a variable that is not set."""
        if isinstance(self.source_table, Unresolved):
            raise self.source_table.error()
        return self.source_table

    @property
    def directory(self) -> DirectoryConfig:
        """How to list the shards. Raises ConfigError when the table names a variable that is not set."""
        if isinstance(self.directory_table, Unresolved):
            raise self.directory_table.error()
        return self.directory_table

    def select_services(self, requested: Sequence[str] = ()) -> tuple[str, ...]:
        """The requested services in the environment's order (all of them when none is asked for)."""
        unknown = [s for s in requested if s not in self.services]
        if unknown:
            raise ConfigError(
                f"unknown service {unknown[0]!r} in environment {self.name!r} (it has: {', '.join(self.services)})"
            )
        wanted = set(requested) or set(self.services)
        return tuple(s for s in self.services if s in wanted)


# ---- the file schema (private) ------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Source(_Strict):
    bucket: str | None = None
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    connect_timeout: Annotated[float, Field(gt=0, le=600)] | None = None
    read_timeout: Annotated[float, Field(gt=0, le=3600)] | None = None
    max_attempts: Annotated[int, Field(ge=1, le=20)] | None = None
    folder: str | None = None
    layout: str = DEFAULT_LAYOUT
    paths: dict[str, str | Annotated[tuple[str, ...], Field(min_length=1)]] = {}
    python_migrations: pydantic.StrictBool = False  # security-relevant: only a real true opts in
    unpublished: Literal["refuse", "report", "apply"] = "refuse"


class _Lint(_Strict):
    errors: tuple[str, ...] = ()


class _StaticTarget(_Strict):
    id: Annotated[str, Field(min_length=1)]
    dsn: Annotated[str, Field(min_length=1)]
    schema_: Annotated[str | None, Field(alias="schema")] = None
    tenants: tuple[str, ...] = ()


class _Schemas(_Strict):
    pattern: str | None = None
    query: str | None = None


class _StaticDirectory(_Strict):
    kind: Literal["static"]
    targets: Annotated[tuple[_StaticTarget, ...], Field(min_length=1)]
    schemas: _Schemas | None = None


class _HttpDirectory(_Strict):
    kind: Literal["http"]
    endpoint: Annotated[str, Field(pattern=r"^https?://")]
    tenants_path: str = "/tenants"
    resolve_path: Annotated[str, Field(pattern=r"\{tenant_id\}")] = "/write/{tenant_id}"
    token: str | None = None
    timeout: Annotated[float, Field(gt=0)] = 5.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    concurrency: Annotated[int, Field(ge=1, le=256)] = 32
    ca_bundle: str | None = None
    max_pages: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    schemas: _Schemas | None = None


class _SqlDirectory(_Strict):
    kind: Literal["sql"]
    dsn: Annotated[str, Field(min_length=1)]
    query: Annotated[str, Field(min_length=1)]
    user: str | None = None
    password: str | None = None
    timeout: Annotated[float, Field(gt=0, le=3600)] = 10.0
    schemas: _Schemas | None = None


class _PgCatDirectory(_Strict):
    kind: Literal["pgcat"]
    config: Annotated[str, Field(min_length=1)]
    pools: tuple[str, ...] = ()
    user: str | None = None
    password: str | None = None
    schemas: _Schemas | None = None


_DIRECTORY_KINDS = ("static", "http", "sql", "pgcat")
_Directory = Annotated[_StaticDirectory | _HttpDirectory | _SqlDirectory | _PgCatDirectory, Field(discriminator="kind")]


# PostgreSQL's duration syntax for lock_timeout/statement_timeout: 0 (off), 500ms, 5s, 15min, 1h.
_PG_DURATION = r"^\d+\s*(ms|s|min|h|d)?$"

# A PostgreSQL setting name: an identifier, or dotted identifiers for an extension's
# (`citus.enable_schema_based_sharding`) or a custom one (`myapp.tenant_mode`).
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)*$")
# Settings fanout sets itself on every shard session, and why [session] cannot.
OWNED_SETTINGS = {
    "search_path": "the target's schema decides it (fanout's bookkeeping depends on it)",
    "lock_timeout": "set it in [runner] lock_timeout",
    "statement_timeout": "set it in [runner] statement_timeout",
    "client_connection_check_interval": "fanout sets it so the server notices a dead runner",
    "application_name": "fanout names its sessions after the run",
    "default_transaction_read_only": "plan, status and verify rely on read-only sessions",
    "transaction_read_only": "plan, status and verify rely on read-only sessions",
    "role": "fanout records migrations as the role it connects as",
    "session_authorization": "fanout records migrations as the role it connects as",
}


class _Runner(_Strict):
    concurrency: Annotated[int, Field(ge=1, le=512)] = 8
    per_server: Annotated[int, Field(ge=1, le=512)] | None = None
    lock_wait: Annotated[float, Field(gt=0)] = 60.0
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    lock_timeout: Annotated[str, Field(pattern=_PG_DURATION)] | None = None
    statement_timeout: Annotated[str, Field(pattern=_PG_DURATION)] | None = None
    retries: Annotated[int, Field(ge=0, le=20)] = 3
    retry_backoff: Annotated[float, Field(ge=0, le=60)] = 0.5
    waves: str | None = None
    max_failures: str | None = None
    target_timeout: Annotated[float, Field(gt=0)] | None = None
    liveness_check: Annotated[float, Field(ge=0, le=86400)] = 30.0
    keepalives: bool = True
    keepalives_idle: Annotated[int, Field(ge=1, le=7200)] = 30
    keepalives_interval: Annotated[int, Field(ge=1, le=600)] = 10
    keepalives_count: Annotated[int, Field(ge=1, le=100)] = 3
    tcp_user_timeout: Annotated[float, Field(ge=0, le=3600)] = 60.0
    repair_invalid: bool = False


class _EnvironmentFile(_Strict):
    name: str | None = None
    services: Annotated[tuple[Annotated[str, Field(pattern=_SERVICE_NAME)], ...], Field(min_length=1)]
    # Validated on their own (below), so that one with an unset variable can wait for a command that reads it.
    source: dict[str, Any]
    directory: dict[str, Any]
    runner: _Runner = _Runner()
    session: dict[str, Any] = {}
    lint: _Lint = _Lint()


_SOURCE = pydantic.TypeAdapter(_Source)
_DIRECTORY: pydantic.TypeAdapter[_StaticDirectory | _HttpDirectory | _SqlDirectory | _PgCatDirectory] = (
    pydantic.TypeAdapter(_Directory)
)


# ---- loading ------------------------------------------------------------------------


def environments_dir() -> Path:
    return Path(os.environ.get(ENVIRONMENTS_DIR_VARIABLE, DEFAULT_ENVIRONMENTS_DIR))


def _is_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".toml") or os.sep in name_or_path


def resolve_environment_path(name_or_path: str, search_dir: Path | None = None) -> Path:
    """`demo` -> environments/demo.toml; a path ending in .toml is taken as it is."""
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            # As given, not as a Path: Path folds a DSN's `://` into `:/`, where redact() no longer sees a URL.
            raise ConfigError(f"environment file {name_or_path} does not exist")
        return path
    directory = search_dir if search_dir is not None else environments_dir()
    path = directory / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.toml")) if directory.is_dir() else []
        hint = f" (known: {', '.join(known)})" if known else f" (no environment files in {directory})"
        raise ConfigError(f"unknown environment {name_or_path!r}: {path} does not exist{hint}")
    return path


def load_environment(
    name_or_path: str,
    *,
    search_dir: Path | None = None,
    variables: Mapping[str, str] | None = None,
) -> Environment:
    """Read, interpolate and validate an environment file. Raises ConfigError, touching nothing.

    The environment's name is the file's `name` key, else the file's name without `.toml`;
    a file asked for by name (`--env staging`) must not name itself otherwise. A `[source]`
    or `[directory]` table that uses an unset variable is checked when a command reads it
    (`Environment.source`, `Environment.directory` raise the ConfigError then).
    """
    path = resolve_environment_path(name_or_path, search_dir)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    values = os.environ if variables is None else variables
    resolved: dict[str, Any] = {}
    unresolved: dict[str, Unresolved] = {}
    for key, value in raw.items():
        missing: list[tuple[tuple[str | int, ...], str]] = []
        resolved[key] = _interpolate(value, values, path, (key,), missing)
        if missing:
            where, variable = missing[0]
            if key not in _DEFERRED_TABLES or not isinstance(value, dict):
                raise Unresolved(path, _location(where), variable).error()
            unresolved[key] = Unresolved(path, _location(where), variable)
    try:
        parsed = _EnvironmentFile.model_validate(resolved)
    except pydantic.ValidationError as e:
        raise ConfigError(f"{path}: {_describe(e)}") from None
    name = _name(parsed.name, path, name_or_path)
    services = _services(parsed.services, path)
    location = unresolved.get("source") or _build_source(
        _validated(_SOURCE, parsed.source, "source", path), path, services
    )
    directory = unresolved.get("directory") or _build_directory(
        _validated(_DIRECTORY, parsed.directory, "directory", path), path
    )
    return Environment(
        name=name,
        path=path,
        services=services,
        source_table=location,
        directory_table=directory,
        runner=_build_runner(parsed.runner, path),
        named_after_file=parsed.name is None and _is_path(name_or_path),
        session=_build_session(parsed.session, path),
        lint_errors=_lint_errors(parsed.lint, path),
    )


def _lint_errors(parsed: _Lint, path: Path) -> frozenset[str]:
    unknown = [r for r in parsed.errors if r not in lint.WARNING_RULES]
    if unknown:
        hint = "an error already" if unknown[0] in lint.ERROR_RULES else "no such rule"
        raise ConfigError(
            f"{path}: lint.errors: {unknown[0]!r} is {hint} (warning rules: {', '.join(sorted(lint.WARNING_RULES))})"
        )
    return frozenset(parsed.errors)


def _name(key: str | None, path: Path, asked: str) -> str:
    if key is not None and not _ENVIRONMENT_NAME.match(key):
        raise ConfigError(
            f"{path}: name: {key!r} is not a valid environment name "
            "(letters, digits, '_', '.', '-', starting with a letter or digit; at most 63)"
        )
    if key is None and not _ENVIRONMENT_NAME.match(path.stem):
        raise ConfigError(
            f"{path}: the file name {path.stem!r} is not a valid environment name; "
            'name the environment in the file (name = "...")'
        )
    if key is not None and not _is_path(asked) and key != asked:
        raise ConfigError(f"{path}: name: the file names environment {key!r}, not {asked!r}")
    return key or path.stem


def _validated(adapter: pydantic.TypeAdapter[Any], value: dict[str, Any], table: str, path: Path) -> Any:
    try:
        return adapter.validate_python(value)
    except pydantic.ValidationError as e:
        raise ConfigError(f"{path}: {_describe(e, prefix=(table,))}") from None


def interpolate(text: str, *, what: str, variables: Mapping[str, str] | None = None) -> str:
    """Resolve ${VARIABLE}s in a value given outside an environment file (e.g. a DSN on the command line)."""
    return str(_interpolate(text, os.environ if variables is None else variables, Path(what), ()))


def _interpolate(
    value: Any,
    variables: Mapping[str, str],
    path: Path,
    where: tuple[str | int, ...],
    missing: list[tuple[tuple[str | int, ...], str]] | None = None,
) -> Any:
    """Resolve ${NAME}s; an unset one raises ConfigError, or is noted in `missing` when it is given."""
    if isinstance(value, dict):
        return {k: _interpolate(v, variables, path, (*where, k), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, variables, path, (*where, i), missing) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        escaped, name = match.groups()
        if escaped:
            return "${" + name + "}"
        if name not in variables:
            if missing is None:
                raise ConfigError(f"{path}: {_location(where)}: environment variable {name} is not set")
            missing.append((where, name))
            return ""
        return variables[name]

    return _VARIABLE.sub(substitute, value)


def _location(where: Sequence[str | int]) -> str:
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(error: pydantic.ValidationError, prefix: tuple[str, ...] = ()) -> str:
    # Built from loc and msg only: pydantic's own str() echoes input values, which may be secrets.
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        parts = [*prefix, *(p if isinstance(p, int) else str(p) for p in item["loc"])]
        if parts[:1] == ["directory"] and parts[1:2] and parts[1] in _DIRECTORY_KINDS:
            parts.pop(1)  # pydantic names the union member; the file has no such level
        loc = _location(parts)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        problems.append(f"{loc}: {message}")
    return "; ".join(problems)


def _build_source(source: _Source, path: Path, services: Sequence[str]) -> S3Location | FolderLocation:
    if (source.bucket is None) == (source.folder is None):
        raise ConfigError(f"{path}: source: set exactly one of 'bucket' (S3) or 'folder' (local)")
    layout, paths = _build_layout(source, services, path)
    policy = UnpublishedPolicy(source.unpublished)
    if source.folder is not None:
        extras = [
            k
            for k in ("region", "endpoint_url", "profile", "connect_timeout", "read_timeout", "max_attempts")
            if getattr(source, k)
        ]
        if extras or source.prefix:
            raise ConfigError(f"{path}: source: {', '.join(extras or ['prefix'])} only apply to an S3 source")
        folder = Path(source.folder)
        return FolderLocation(
            folder if folder.is_absolute() else (path.parent / folder).resolve(),
            layout=layout,
            paths=paths,
            python_migrations=source.python_migrations,
            unpublished=policy,
        )
    assert source.bucket is not None
    s3 = S3Location(
        bucket=source.bucket,
        prefix=source.prefix.strip("/"),
        region=source.region,
        endpoint_url=source.endpoint_url or None,
        profile=source.profile,
        layout=layout,
        paths=paths,
        python_migrations=source.python_migrations,
        unpublished=policy,
    )
    return dataclasses.replace(
        s3,
        connect_timeout=source.connect_timeout or s3.connect_timeout,
        read_timeout=source.read_timeout or s3.read_timeout,
        max_attempts=source.max_attempts or s3.max_attempts,
    )


def _check_template(template: str, where: str) -> None:
    for name in _PLACEHOLDER.findall(template):
        if name not in LAYOUT_PLACEHOLDERS:
            raise ConfigError(
                f"{where}: unknown placeholder {{{name}}} in {template!r} "
                f"(known: {', '.join('{' + p + '}' for p in LAYOUT_PLACEHOLDERS)})"
            )
    if template.count("{") != template.count("}"):
        raise ConfigError(f"{where}: unbalanced braces in {template!r}")
    if ".." in template.split("/"):
        raise ConfigError(f"{where}: '..' is not allowed in {template!r}")


def _build_layout(
    source: _Source, services: Sequence[str], path: Path
) -> tuple[str, tuple[tuple[str, tuple[str, ...]], ...]]:
    layout = source.layout.strip()
    _check_template(layout, f"{path}: source.layout")
    paths: list[tuple[str, tuple[str, ...]]] = []
    for service, value in source.paths.items():
        if service not in services:
            raise ConfigError(f"{path}: source.paths: {service!r} is not a service of this environment")
        templates = (value,) if isinstance(value, str) else tuple(value)
        for template in templates:
            _check_template(template, f"{path}: source.paths.{service}")
        if len(set(templates)) != len(templates):
            raise ConfigError(f"{path}: source.paths.{service}: a path is listed twice")
        paths.append((service, templates))
    without_paths = [s for s in services if s not in source.paths]
    if len(without_paths) > 1 and "{service}" not in layout:
        raise ConfigError(
            f"{path}: source.layout {layout!r} has no {{service}}, so services "
            f"{', '.join(map(repr, without_paths))} would read the same files; "
            "add {service} or give each service its paths in [source.paths]"
        )
    return layout, tuple(paths)


def _services(services: tuple[str, ...], path: Path) -> tuple[str, ...]:
    if len(set(services)) != len(services):
        raise ConfigError(f"{path}: services: a service is listed twice")
    return services


def _build_runner(parsed: _Runner, path: Path) -> RunnerSettings:
    runner = RunnerSettings(**parsed.model_dump())
    if runner.waves is not None:
        Waves.parse(runner.waves, what=f"{path}: [runner] waves")
    if runner.max_failures is not None:
        FailureBudget.parse(runner.max_failures, what=f"{path}: [runner] max_failures")
    return runner


def _build_session(table: dict[str, Any], path: Path, prefix: str = "") -> tuple[tuple[str, str], ...]:
    """[session] as (name, value) pairs; a dotted key (`citus.x = true`) is a nested table in TOML."""
    settings: list[tuple[str, str]] = []
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            settings += _build_session(value, path, f"{name}.")
            continue
        where = f"{path}: [session] {name!r}"
        if not _SETTING_NAME.match(name):
            raise ConfigError(
                f"{where}: not a PostgreSQL setting name (letters, digits, '_', '$', dot-separated parts)"
            )
        owned = OWNED_SETTINGS.get(name.lower())
        if owned is not None:
            raise ConfigError(f"{where}: fanout sets this one itself: {owned}")
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            raise ConfigError(f"{where}: the value must be a string, a number or true/false")
        if "\x00" in text:
            raise ConfigError(f"{where}: the value contains a NUL character")
        settings.append((name, text))
    return tuple(settings)


def _secret(value: str | None) -> Secret | None:
    return Secret(value) if value else None


def _build_schemas(schemas: _Schemas | None, path: Path) -> SchemaDiscovery | None:
    if schemas is None:
        return None
    if (schemas.pattern is None) == (schemas.query is None):
        raise ConfigError(f"{path}: directory.schemas: set exactly one of 'pattern' or 'query'")
    return SchemaDiscovery(pattern=schemas.pattern, query=schemas.query)


def _build_directory(
    directory: _StaticDirectory | _HttpDirectory | _SqlDirectory | _PgCatDirectory, path: Path
) -> DirectoryConfig:
    schemas = _build_schemas(directory.schemas, path)
    if isinstance(directory, _HttpDirectory):
        return HttpDirectoryConfig(
            endpoint=directory.endpoint.rstrip("/"),
            tenants_path=directory.tenants_path,
            resolve_path=directory.resolve_path,
            token=_secret(directory.token),
            timeout=directory.timeout,
            retries=directory.retries,
            concurrency=directory.concurrency,
            ca_bundle=directory.ca_bundle,
            max_pages=directory.max_pages,
            schemas=schemas,
        )
    if isinstance(directory, _SqlDirectory):
        return SqlDirectoryConfig(
            dsn=Secret(directory.dsn),
            query=directory.query,
            user=directory.user,
            password=_secret(directory.password),
            timeout=directory.timeout,
            schemas=schemas,
        )
    if isinstance(directory, _PgCatDirectory):
        config = Path(directory.config)
        return PgCatDirectoryConfig(
            config=config if config.is_absolute() else (path.parent / config).resolve(),
            pools=directory.pools,
            user=directory.user,
            password=_secret(directory.password),
            schemas=schemas,
        )
    counts = Counter(t.id for t in directory.targets)
    duplicate = next((i for i, count in counts.items() if count > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{path}: directory.targets: target id {duplicate!r} is listed twice")
    return StaticDirectoryConfig(
        targets=tuple(
            # The DSN's password is registered for redaction when the target is parsed; a whole
            # DSN per target would make the redaction pattern grow with the fleet.
            StaticTarget(id=t.id, dsn=Secret(t.dsn, searchable=False), schema=t.schema_, tenants=t.tenants)
            for t in directory.targets
        ),
        schemas=schemas,
    )
