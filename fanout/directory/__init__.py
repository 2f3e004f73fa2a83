"""Shard directories: where fanout learns which databases make up an environment.

Every backend yields `Target`s, each of one engine: PostgreSQL (`postgresql://`) or
MySQL/MariaDB (`mysql://`, `mariadb://`: one engine, the server's flavor is found when
connecting); `deduplicate()` folds targets that name the same
database (same host, port, dbname and schema) into one, so a database that serves
many tenants is migrated once. Directories never connect to a tenant database to
migrate it: they only enumerate.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from fanout.config import (
    DirectoryConfig,
    HttpDirectoryConfig,
    PgCatDirectoryConfig,
    SqlDirectoryConfig,
    TcpSettings,
)
from fanout.errors import ConfigError, DirectoryError
from fanout.secret import MASK, Secret, register

DEFAULT_PORT = 5432
MYSQL_PORT = 3306
PG_NAME_BYTES = 63  # NAMEDATALEN - 1
DEFAULT_TCP = TcpSettings()
POSTGRESQL = "postgresql"
MYSQL = "mysql"
ENGINES = (POSTGRESQL, MYSQL)
# DSN scheme -> engine. MySQL and MariaDB are one engine: the flavor is the server's, read at connect.
_SCHEMES = {"postgresql": POSTGRESQL, "postgres": POSTGRESQL, "mysql": MYSQL, "mariadb": MYSQL}
# A directory's `flavor` (the HTTP service's field, the SQL catalog's column) -> engine, case-insensitive.
FLAVORS = {"postgresql": POSTGRESQL, "postgres": POSTGRESQL, "pg": POSTGRESQL, "mysql": MYSQL, "mariadb": MYSQL}
FLAVORS_HELP = "neither PostgreSQL (postgresql, postgres, pg) nor MySQL/MariaDB (mysql, mariadb)"
# What a mysql:// DSN may carry in its query: TLS and the character set. Anything else is
# refused before the run (a typo would otherwise be silently ignored by the driver).
MYSQL_OPTIONS = frozenset({"ssl_mode", "ssl_ca", "ssl_cert", "ssl_key", "charset"})
# As the mysql client's --ssl-mode; PyMySQL's own default is `preferred` (TLS when the server offers it).
MYSQL_SSL_MODES = ("disabled", "preferred", "required", "verify_ca", "verify_identity")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# What libpq accepts in a DSN's query (PostgreSQL 17's list), so a typo is a configuration
# error before the run, not an `unreachable` shard; host, port, dbname, user and password
# belong in the DSN's other parts.
LIBPQ_OPTIONS = frozenset(
    {
        "passfile",
        "channel_binding",
        "connect_timeout",
        "client_encoding",
        "options",
        "application_name",
        "fallback_application_name",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "replication",
        "gssencmode",
        "sslmode",
        "requiressl",
        "sslnegotiation",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslcertmode",
        "sslpassword",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "require_auth",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "service",
        "target_session_attrs",
        "load_balance_hosts",
        "hostaddr",
    }
)


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
    # libpq connection parameters such as sslmode; never holds the password nor sslpassword.
    options: tuple[tuple[str, str], ...] = ()
    tenants: tuple[str, ...] = ()
    # Ids of other directory entries that named this same database.
    aliases: tuple[str, ...] = ()
    engine: str = POSTGRESQL  # POSTGRESQL | MYSQL (MySQL or MariaDB)
    # libpq's sslpassword (the passphrase of the client key), kept apart from options as a secret.
    ssl_password: Secret | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dsn(
        cls,
        target_id: str,
        dsn: str,
        *,
        schema: str | None = None,
        tenants: Iterable[str] = (),
        what: str | None = None,
        engines: Collection[str] = ENGINES,
    ) -> Target:
        """Parse `postgresql://user:password@host:port/dbname?sslmode=require&schema=s`,
        or `mysql://user:password@host:port/dbname?ssl_mode=required` (`mariadb://` alike).

        Strict where a lenient parse would misplace a credential: a user or password must
        percent-encode `/ ? # @ %`, every `%` must start a valid UTF-8 escape, and every
        refusal shows the DSN with its password masked (`masked_dsn`). `what` names the DSN
        in messages (default: the target); `engines` are those the caller accepts.
        """
        what = what or f"target {target_id!r}"
        scheme, separator, _ = dsn.partition("://")
        engine = _SCHEMES.get(scheme) if separator else None
        if engine is None or engine not in engines:
            wanted = " or ".join(f"{s}://" for s, e in _SCHEMES.items() if e in engines and s != "postgres")
            # What precedes `://` is shown only when it looks like a scheme: in a key=value string
            # (`host=h password=a://b`) it would be a piece of the password.
            got = f"{scheme} scheme" if separator and _SCHEME.fullmatch(scheme) else "no scheme"
            raise ConfigError(f"{what}: DSN must start with {wanted} (got {got})")

        def refuse(problem: str) -> ConfigError:
            _register_credentials(dsn)
            return ConfigError(f"{what}: {problem}: {masked_dsn(dsn)}")

        try:
            parts = urlsplit(dsn)
        except ValueError:
            raise refuse(
                "malformed host in DSN (an IPv6 address goes in brackets, [::1]; "
                "a '[' or ']' in the user or password must be percent-encoded)"
            ) from None
        if "@" in parts.path + parts.query + parts.fragment:
            raise refuse("the DSN's user or password holds a character that must be percent-encoded (/ ? # @ %)")
        try:
            port = parts.port or (MYSQL_PORT if engine == MYSQL else DEFAULT_PORT)
        except ValueError as e:
            # urllib's own message may quote a piece of the DSN; say what is wrong in our words.
            raise refuse(
                "malformed IPv6 host in DSN (an IPv6 address goes in brackets, [::1])"
                if "IPv6" in str(e)
                else "invalid port in DSN"
            ) from None
        try:
            dbname = _decoded(parts.path.lstrip("/"))
            user = _decoded(parts.username) if parts.username else None
            password = _decoded(parts.password) if parts.password is not None else None
            options = dict(parse_qsl(parts.query, errors="strict"))
        except UnicodeDecodeError:
            raise refuse("DSN has a %XX escape that is not UTF-8") from None
        except ValueError as e:
            raise refuse(f"DSN is not valid ({e})") from None
        if not parts.hostname or not dbname:
            raise refuse("DSN must name a host and a database")
        if "password" in options:
            raise refuse("put the password in the DSN's user:password@ part")
        schema = schema or options.pop("schema", None)
        if engine == MYSQL:
            if schema:
                raise refuse("a MySQL/MariaDB database has no schemas: name the database in the DSN's path")
            unknown = sorted(set(options) - MYSQL_OPTIONS)
            if unknown:
                raise refuse(
                    f"unknown connection option {', '.join(map(repr, unknown))} in DSN "
                    f"(a mysql:// DSN takes {', '.join(sorted(MYSQL_OPTIONS))})"
                )
            if options.get("ssl_mode", "preferred") not in MYSQL_SSL_MODES:
                raise refuse(f"ssl_mode {options['ssl_mode']!r} is not one of {', '.join(MYSQL_SSL_MODES)}")
            if "/" in dbname or len(dbname) > 64:
                raise refuse("a MySQL/MariaDB database name has at most 64 characters and no '/'")
        else:
            unknown = sorted(set(options) - LIBPQ_OPTIONS)
            if unknown:
                raise refuse(f"unknown connection option {', '.join(map(repr, unknown))} in DSN")
            if options.get("sslmode", "prefer") not in SSL_MODES:
                raise refuse(f"sslmode {options['sslmode']!r} is not one of {', '.join(SSL_MODES)}")
            # The server cuts a longer name to its first 63 bytes without a word: two targets
            # would name one database or schema, and nothing fanout reads back would match.
            for kind, name in (("database", dbname), ("schema", schema)):
                if name and len(name.encode()) > PG_NAME_BYTES:
                    raise refuse(
                        f"the {kind} name has {len(name.encode())} bytes, and PostgreSQL keeps only the first {PG_NAME_BYTES}"
                    )
        if parts.password and parts.password != password:
            register(parts.password)  # the encoded form too, should anything print the DSN itself
        ssl_password = options.pop("sslpassword", None)
        return cls(
            id=target_id,
            host=parts.hostname,
            port=port,
            dbname=dbname,
            user=user,
            password=Secret(password) if password else None,
            schema=schema or None,
            options=tuple(sorted(options.items())),
            tenants=tuple(tenants),
            engine=engine,
            ssl_password=Secret(ssl_password) if ssl_password else None,
        )

    def libpq_kwargs(
        self,
        *,
        application_name: str,
        connect_timeout: float,
        read_only: bool = False,
        tcp: TcpSettings = DEFAULT_TCP,
    ) -> dict[str, Any]:
        """Keyword arguments for psycopg2.connect; the only place the password is revealed.

        `read_only` makes the server refuse writes for the whole session, whatever the caller does.
        `tcp` sets keepalives and tcp_user_timeout, unless the target's own DSN parameters do.
        """
        if self.engine != POSTGRESQL:
            raise ValueError(f"target {self.id!r} is not a PostgreSQL database")
        kwargs: dict[str, Any] = {**tcp.libpq(), **dict(self.options)}
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
        if self.ssl_password is not None:
            kwargs["sslpassword"] = self.ssl_password.reveal()
        if read_only:
            kwargs["options"] = (kwargs.get("options", "") + " -c default_transaction_read_only=on").strip()
        return kwargs

    def mysql_kwargs(
        self, *, connect_timeout: float, read_timeout: float | None, write_timeout: float
    ) -> dict[str, Any]:
        """Keyword arguments for pymysql.connect (a MySQL/MariaDB target); the only place its password is revealed.

        `ssl_mode` is read as the mysql client reads it: `required` encrypts without checking
        the certificate, `verify_ca` checks it against `ssl_ca` (or the system's CAs),
        `verify_identity` checks the host name too.
        """
        if self.engine != MYSQL:
            raise ValueError(f"target {self.id!r} is not a MySQL/MariaDB database")
        options = dict(self.options)
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "database": self.dbname,
            "connect_timeout": max(1.0, connect_timeout),
            "read_timeout": read_timeout,
            "write_timeout": write_timeout,
            "charset": options.get("charset", "utf8mb4"),
            "autocommit": True,
        }
        if self.user:
            kwargs["user"] = self.user
        if self.password is not None:
            kwargs["password"] = self.password.reveal()
        # As the mysql client: an ssl_ca without an ssl_mode means verify_ca.
        mode = options.get("ssl_mode") or ("verify_ca" if "ssl_ca" in options else "preferred")
        if mode == "disabled":
            kwargs["ssl_disabled"] = True
        elif mode != "preferred" or "ssl_cert" in options:
            # Raises OSError / ssl.SSLError for a file it cannot read: the engine reports it as the target's error.
            context = ssl.create_default_context(cafile=options.get("ssl_ca"))
            context.check_hostname = mode == "verify_identity"
            if mode in ("preferred", "required"):
                context.verify_mode = ssl.CERT_NONE
            if "ssl_cert" in options:
                context.load_cert_chain(options["ssl_cert"], options.get("ssl_key"))
            kwargs["ssl"] = context
        return kwargs

    @property
    def server(self) -> str:
        """The database server (host:port) that holds this target: per-server caps count by it."""
        return f"{self.host}:{self.port}"

    @property
    def database_key(self) -> tuple[str, int, str, str | None]:
        return (self.host.lower(), self.port, self.dbname, self.schema)

    @property
    def display(self) -> str:
        """A DSN without the password, for reports and logs."""
        user = f"{self.user}@" if self.user else ""
        suffix = f"#{self.schema}" if self.schema else ""
        return f"{self.engine}://{user}{self.server}/{self.dbname}{suffix}"


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.:-]*")  # jdbc:postgresql too
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_QUERY_PASSWORD = re.compile(r"(?i)(password=)[^&\s]*")


def _decoded(text: str) -> str:
    """Percent-decoding that refuses what libpq would refuse (a stray `%`, bytes that are not UTF-8)."""
    if _ESCAPE.search(text):
        raise ValueError("a '%' that does not start a %XX escape; write a literal '%' as %25")
    return unquote(text, errors="strict")


def _credentials_part(dsn: str) -> tuple[str, str, str] | None:
    """(`scheme://user`, password, `@rest`) by the last `@`, however badly the rest is encoded."""
    scheme, separator, rest = dsn.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not separator or not at:
        return None
    user, colon, password = userinfo.partition(":")
    return (f"{scheme}://{user}", password if colon else "", f"@{host}")


def masked_dsn(dsn: str) -> str:
    """The DSN with everything that may be its password masked, even when it cannot be parsed.

    Everything between the user's `:` and the last `@` is masked: a password with an
    unencoded `/`, `?` or `@` cannot shift a piece of itself into the host or database.
    """
    found = _credentials_part(dsn)
    masked = dsn if found is None else f"{found[0]}{':' + MASK if found[1] else ''}{found[2]}"
    return _QUERY_PASSWORD.sub(lambda m: m.group(1) + MASK, masked)


def _register_credentials(dsn: str) -> None:
    """Make a refused DSN's password redactable everywhere, in its raw and its decoded form."""
    found = _credentials_part(dsn)
    candidates = [found[1]] if found is not None and found[1] else []
    candidates += [m.group(0).partition("=")[2] for m in _QUERY_PASSWORD.finditer(dsn)]
    for value in candidates:
        register(value)
        register(unquote(value))


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
