"""Migration sources: S3 (the real one) and a local folder (for development).

A run takes one `Snapshot`: each service's prefix is listed once and each object
fetched once, in parallel, whatever the number of shards. The bytes are written to a
private folder and checksummed; that folder is the only thing any shard sees during
the run, so an object overwritten in S3 mid-run cannot reach half the fleet.

Layout and conventions are yoyo-cloud's, so an existing yoyo-cloud bucket works as it
is: only `*.sql` objects directly under `<prefix>/<service>/<env>/` are migrations,
`NAME.rollback.sql` is the rollback of `NAME.sql`, names starting with `post-apply`
are post-apply hooks, and the migration id is the file name without `.sql`.
This module knows nothing of databases.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fanout.config import Environment, FolderLocation, S3Location
from fanout.errors import SourceError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

FETCH_WORKERS = 16
SQL_SUFFIX = ".sql"
ROLLBACK_SUFFIX = ".rollback.sql"


@dataclass(frozen=True, slots=True)
class MigrationFile:
    """One file of a migration set, as it was fetched for this run."""

    name: str
    key: str
    size: int
    sha256: str
    etag: str | None = None
    version_id: str | None = None

    @property
    def is_rollback(self) -> bool:
        return self.name.endswith(ROLLBACK_SUFFIX)

    @property
    def migration_id(self) -> str:
        return self.name[: -len(SQL_SUFFIX)]


@dataclass(frozen=True, slots=True)
class MigrationSet:
    """The pinned files of one service in one environment, and the folder that holds their bytes."""

    service: str
    environment: str
    url: str
    files: tuple[MigrationFile, ...]
    folder: Path
    # Objects under the prefix that are not migrations (wrong extension, nested): never applied.
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FetchStats:
    list_requests: int = 0
    get_requests: int = 0
    bytes_fetched: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    sets: tuple[MigrationSet, ...]
    stats: FetchStats


def take_snapshot(env: Environment, services: Sequence[str], workdir: Path) -> Snapshot:
    """Fetch every selected service's migrations once into `workdir`. Raises SourceError."""
    if isinstance(env.source, FolderLocation):
        return _snapshot_folder(env.source, env.name, services, workdir)
    return _snapshot_s3(env.source, env.name, services, workdir)


def s3_client(location: S3Location) -> S3Client:
    """A client on the standard credential chain (env, profile, SSO, instance role)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=location.profile, region_name=location.region)
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=FETCH_WORKERS,
    )
    try:
        return session.client("s3", endpoint_url=location.endpoint_url, config=config)
    except Exception as e:  # botocore raises ProfileNotFound, ValueError for a bad endpoint, ...
        raise SourceError(f"cannot create an S3 client: {e}") from e


def publish_folder(location: S3Location, folder: Path, services: Sequence[str], environment: str) -> list[str]:
    """Upload `folder/<service>/<environment>/*.sql` to the bucket; returns the keys written."""
    client = s3_client(location)
    written = []
    for service in services:
        local = folder / service / environment
        if not local.is_dir():
            raise SourceError(f"no local migrations for service {service!r} at {local}")
        for path in sorted(local.glob(f"*{SQL_SUFFIX}")):
            key = location.key_prefix(service, environment) + path.name
            body = path.read_bytes()
            _s3_call(location, functools.partial(client.put_object, Bucket=location.bucket, Key=key, Body=body))
            written.append(key)
    return written


def _snapshot_folder(location: FolderLocation, environment: str, services: Sequence[str], workdir: Path) -> Snapshot:
    sets = []
    for service in services:
        origin = location.path / service / environment
        url = location.url(service, environment)
        if not origin.is_dir():
            raise SourceError(
                f"no migrations for service {service!r} in environment {environment!r}: {url} does not exist"
            )
        folder = _service_folder(workdir, service)
        files, ignored = [], []
        for path in sorted(origin.iterdir()):
            if not (path.is_file() and path.name.endswith(SQL_SUFFIX)):
                ignored.append(path.name)
                continue
            data = path.read_bytes()
            (folder / path.name).write_bytes(data)
            files.append(MigrationFile(path.name, str(path), len(data), hashlib.sha256(data).hexdigest()))
        sets.append(_migration_set(service, environment, url, files, folder, ignored))
    return Snapshot(tuple(sets), FetchStats())


def _snapshot_s3(location: S3Location, environment: str, services: Sequence[str], workdir: Path) -> Snapshot:
    client = s3_client(location)
    listings = {service: _list(client, location, service, environment) for service in services}
    list_requests = sum(pages for _, _, pages in listings.values())
    wanted = [(service, obj) for service, (objects, _, _) in listings.items() for obj in objects]
    folders = {service: _service_folder(workdir, service) for service in services}

    def fetch(item: tuple[str, dict[str, Any]]) -> tuple[str, MigrationFile]:
        service, obj = item
        return service, _fetch(client, location, obj, folders[service])

    with ThreadPoolExecutor(max_workers=FETCH_WORKERS, thread_name_prefix="fanout-s3") as pool:
        fetched = list(pool.map(fetch, wanted))

    sets = []
    for service in services:
        files = [f for s, f in fetched if s == service]
        _, ignored, _ = listings[service]
        sets.append(
            _migration_set(service, environment, location.url(service, environment), files, folders[service], ignored)
        )
    stats = FetchStats(
        list_requests=list_requests,
        get_requests=len(fetched),
        bytes_fetched=sum(f.size for _, f in fetched),
    )
    return Snapshot(tuple(sets), stats)


def _list(
    client: S3Client, location: S3Location, service: str, environment: str
) -> tuple[list[dict[str, Any]], list[str], int]:
    prefix = location.key_prefix(service, environment)
    objects: list[dict[str, Any]] = []
    ignored: list[str] = []
    pages = 0
    paginator = client.get_paginator("list_objects_v2")
    # Delimiter="/" keeps nested "folders" out of the listing, as yoyo-cloud does.
    iterator = paginator.paginate(Bucket=location.bucket, Prefix=prefix, Delimiter="/")
    for page in _s3_iter(location, iterator):
        pages += 1
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if name.endswith(SQL_SUFFIX) and name != SQL_SUFFIX:
                objects.append(obj)
            else:
                ignored.append(name)
        ignored.extend(p["Prefix"][len(prefix) :] for p in page.get("CommonPrefixes", []))
    if not objects:
        raise SourceError(
            f"no migrations for service {service!r} in environment {environment!r} at {location.url(service, environment)}"
        )
    return objects, ignored, pages


def _fetch(client: S3Client, location: S3Location, obj: dict[str, Any], folder: Path) -> MigrationFile:
    key: str = obj["Key"]
    etag: str = obj["ETag"]
    # IfMatch pins the object to the listing: an overwrite between LIST and GET fails loudly.
    response = _s3_call(location, lambda: client.get_object(Bucket=location.bucket, Key=key, IfMatch=etag))
    data: bytes = response["Body"].read()
    plain_etag = etag.strip('"')
    if "-" not in plain_etag and hashlib.md5(data, usedforsecurity=False).hexdigest() != plain_etag:
        raise SourceError(f"s3://{location.bucket}/{key}: content does not match its ETag (corrupted download)")
    name = key.rsplit("/", 1)[-1]
    (folder / name).write_bytes(data)
    return MigrationFile(
        name=name,
        key=key,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        etag=plain_etag,
        version_id=response.get("VersionId"),
    )


def _migration_set(
    service: str, environment: str, url: str, files: list[MigrationFile], folder: Path, ignored: list[str]
) -> MigrationSet:
    if not any(not f.is_rollback for f in files):
        raise SourceError(f"no migrations for service {service!r} in environment {environment!r} at {url}")
    return MigrationSet(
        service=service,
        environment=environment,
        url=url,
        files=tuple(sorted(files, key=lambda f: f.name)),
        folder=folder,
        ignored=tuple(sorted(ignored)),
    )


def _service_folder(workdir: Path, service: str) -> Path:
    folder = workdir / service
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _s3_iter(location: S3Location, iterator: Any) -> Any:
    """Iterate a paginator, translating botocore errors as `_s3_call` does."""
    pages = iter(iterator)
    while True:
        try:
            page = _s3_call(location, lambda: next(pages))
        except StopIteration:
            return
        yield page


def _s3_call(location: S3Location, call: Callable[[], Any]) -> Any:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    where = f"s3://{location.bucket}"
    try:
        return call()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "Unknown")
        messages = {
            "NoSuchBucket": f"bucket {location.bucket!r} does not exist",
            "AccessDenied": f"access denied to {where}",
            "InvalidAccessKeyId": f"the AWS access key is not valid for {where}",
            "SignatureDoesNotMatch": f"the AWS secret key is not valid for {where}",
            "PreconditionFailed": f"an object under {where} changed while it was being read; run again",
        }
        raise SourceError(messages.get(code, f"S3 error {code} on {where}")) from None
    except NoCredentialsError:
        raise SourceError("no AWS credentials found (environment, profile, SSO or instance role)") from None
    except EndpointConnectionError as e:
        raise SourceError(f"cannot reach the S3 endpoint for {where}: {e}") from None
    except BotoCoreError as e:
        raise SourceError(f"S3 request to {where} failed: {e}") from None


# ---- run records --------------------------------------------------------------------

# A service name cannot start with "_", so run records never mix with migrations.
RUNS_FOLDER = "_runs"


def run_record_key(location: S3Location, environment: str, run_id: str) -> str:
    parts = [p for p in (location.prefix.strip("/"), RUNS_FOLDER, environment) if p]
    return "/".join(parts) + f"/{run_id}.json"


def save_run_record(location: S3Location, environment: str, run_id: str, body: bytes) -> str:
    """Store a run's report next to the migrations; returns its s3:// URL."""
    client = s3_client(location)
    key = run_record_key(location, environment, run_id)
    _s3_call(
        location,
        functools.partial(
            client.put_object, Bucket=location.bucket, Key=key, Body=body, ContentType="application/json"
        ),
    )
    return f"s3://{location.bucket}/{key}"


def load_run_record(location: S3Location, environment: str, run_id: str) -> bytes | None:
    """A run's stored report, or None when there is none."""
    from botocore.exceptions import ClientError

    client = s3_client(location)
    key = run_record_key(location, environment, run_id)

    def get() -> bytes | None:
        try:
            body: bytes = client.get_object(Bucket=location.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return body

    result: bytes | None = _s3_call(location, get)
    return result
