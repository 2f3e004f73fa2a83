"""The HTTP sharding service: list tenants, resolve each one to the database that holds it.

Protocol (the common pattern of in-house sharding services):
- `GET {endpoint}{tenants_path}` -> `{"tenants": ["t1", ...], "next": "<url or path>" | null}`
  (or a bare JSON list; tenant items may be strings or objects with an "id"). `next` is
  followed until it is null.
- `GET {endpoint}/write/{tenant_id}` -> `{"host", "port", "flavor", "user", "password",
  "database"}` (and optionally "schema"), the database that holds the tenant's writes.
  `flavor` is `postgres`/`postgresql`/`pg`, or `mysql`/`mariadb` (one engine: the server's
  own flavor is read when connecting; a MySQL database has no schema).

Tenants that resolve to the same database collapse into one target that keeps their ids.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from fanout.config import HttpDirectoryConfig
from fanout.directory import FLAVORS, FLAVORS_HELP, MYSQL, Target
from fanout.errors import DirectoryError
from fanout.secret import Secret, redact, register

REQUIRED_FIELDS = ("host", "port", "flavor", "user", "password", "database")
# Query parameters whose value is a credential: api_key, access_token, X-Amz-Signature, ...
_CREDENTIAL_NAME = re.compile(r"(?i)token|secret|passw|pwd|signature|api[_-]?key|access[_-]?key|^key$|^auth$|^sig$")


class HttpDirectory:
    def __init__(self, config: HttpDirectoryConfig) -> None:
        self._config = config
        self._session = requests.Session()
        retry = Retry(
            total=config.retries,
            connect=config.retries,
            read=config.retries,
            status=config.retries,
            backoff_factor=0.2,
            backoff_jitter=0.1,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET"}),
            raise_on_status=False,
            # urllib3 would sleep for a 503's Retry-After, up to 6 hours per retry: the service
            # would decide how long a run waits. Retries keep to their own short backoff.
            respect_retry_after_header=False,
        )
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=config.concurrency)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["Accept"] = "application/json"
        if config.token is not None:
            self._session.headers["Authorization"] = f"Bearer {config.token.reveal()}"
        if config.ca_bundle:
            self._session.verify = config.ca_bundle
        for url in (config.endpoint, config.tenants_path, config.resolve_path):
            _register_credentials(url)

    def targets(self) -> list[Target]:
        try:
            tenants = list(dict.fromkeys(self._tenants()))  # a tenant listed twice is resolved once
            with ThreadPoolExecutor(
                max_workers=self._config.concurrency, thread_name_prefix="fanout-directory"
            ) as pool:
                return list(pool.map(self._resolve, tenants))
        finally:
            self._session.close()

    def _tenants(self) -> Iterator[str]:
        url: str | None = self._config.endpoint + self._config.tenants_path
        seen: set[str] = set()
        while url is not None:
            # A `next` that points back to a page already read would be followed forever.
            if url in seen:
                raise DirectoryError(
                    f"the tenant list loops: page {len(seen)}'s 'next' link points back to {redact(url)}, already read"
                )
            if len(seen) >= self._config.max_pages:
                raise DirectoryError(
                    f"the tenant list did not end after {self._config.max_pages} pages (max_pages); a pagination loop?"
                )
            seen.add(url)
            _register_credentials(url)  # a `next` link may carry its own
            body = self._get_json(url, "the tenant list")
            items, next_url = (body, None) if isinstance(body, list) else _page(body, url)
            for item in items:
                tenant = item.get("id") if isinstance(item, dict) else item
                if not isinstance(tenant, (str, int)) or isinstance(tenant, bool) or str(tenant) == "":
                    # An object is not shown: a service may list tenants with their credentials.
                    shown = (
                        f"an object with keys {', '.join(map(repr, item))}" if isinstance(item, dict) else repr(item)
                    )
                    raise DirectoryError(f"the tenant list at {url} holds an entry that is not a tenant id: {shown}")
                yield str(tenant)
            url = urljoin(url, next_url) if next_url else None

    def _resolve(self, tenant: str) -> Target:
        path = self._config.resolve_path.replace("{tenant_id}", quote(tenant, safe=""))
        body = self._get_json(self._config.endpoint + path, f"tenant {tenant!r}")
        if not isinstance(body, dict):
            raise DirectoryError(
                f"tenant {tenant!r}: the sharding service answered {type(body).__name__}, not an object"
            )
        missing = [f for f in REQUIRED_FIELDS if body.get(f) in (None, "")]
        if missing:
            raise DirectoryError(f"tenant {tenant!r}: the sharding service's answer lacks {', '.join(missing)}")
        flavor = str(body["flavor"]).lower()
        engine = FLAVORS.get(flavor)
        if engine is None:
            raise DirectoryError(f"tenant {tenant!r}: flavor {body['flavor']!r} is {FLAVORS_HELP}")
        try:
            port = int(body["port"])
        except (TypeError, ValueError):
            raise DirectoryError(f"tenant {tenant!r}: port {body['port']!r} is not a number") from None
        for field in ("host", "user", "database"):
            if not isinstance(body[field], str):
                raise DirectoryError(f"tenant {tenant!r}: field {field!r} is not a string")
        schema = body.get("schema") or None
        if engine == MYSQL and schema is not None:
            raise DirectoryError(f"tenant {tenant!r}: a {flavor} database has no schema (got schema {schema!r})")
        database = f"{body['host']}:{port}/{body['database']}" + (f"#{schema}" if schema else "")
        return Target(
            id=database,
            host=body["host"],
            port=port,
            dbname=body["database"],
            user=body["user"],
            password=Secret(str(body["password"])),
            schema=schema,
            tenants=(tenant,),
            engine=engine,
        )

    def _get_json(self, url: str, what: str) -> Any:
        try:
            response = self._session.get(url, timeout=self._config.timeout)
        except requests.Timeout:
            raise DirectoryError(
                f"sharding service unreachable for {what}: no answer from {self._config.endpoint} "
                f"within {self._config.timeout:g}s (after {self._config.retries} retries)"
            ) from None
        except requests.RequestException as e:
            raise DirectoryError(
                f"sharding service unreachable for {what}: {_reason(e)} at {self._config.endpoint} "
                f"(after {self._config.retries} retries)"
            ) from None
        if response.status_code == 404:
            raise DirectoryError(f"sharding service has no {what} ({url}: 404)")
        if response.status_code in (401, 403):
            raise DirectoryError(f"sharding service refused the token for {what} ({response.status_code})")
        if response.status_code >= 400:
            raise DirectoryError(f"sharding service failed for {what}: HTTP {response.status_code}")
        try:
            return response.json()
        except ValueError:
            raise DirectoryError(f"sharding service returned malformed JSON for {what}") from None


def _register_credentials(url: str) -> None:
    """Make a URL's password and its query values that look like credentials redactable.

    An API key in `tenants_path` (`/tenants?api_key=${KEY}`) would otherwise be in urllib3's
    debug log of each request (-vv) and in an error line that names the page.
    """
    parts = urlsplit(url)
    if parts.password:
        register(unquote(parts.password))
        register(parts.password)
    for name, value in parse_qsl(parts.query):
        if _CREDENTIAL_NAME.search(name):
            register(value)
            register(quote(value, safe=""))


def _page(body: Any, url: str) -> tuple[list[Any], str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("tenants"), list):
        raise DirectoryError(f"the tenant list at {url} is neither a list nor an object with a 'tenants' list")
    next_url = body.get("next")
    if next_url is not None and not isinstance(next_url, str):
        raise DirectoryError(f"the tenant list at {url} has a 'next' that is not a URL")
    return body["tenants"], next_url or None


def _reason(error: requests.RequestException) -> str:
    """The innermost cause ("Connection refused"), not urllib3's nested repr."""
    cause: BaseException | None = error
    while cause is not None and (cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)):
        nested = getattr(cause, "reason", None)
        cause = nested if isinstance(nested, BaseException) else (cause.__cause__ or cause.__context__)
    text = str(cause) if cause is not None else str(error)
    return redact(text.rsplit(": ", 1)[-1].strip("\"')") or type(error).__name__)
