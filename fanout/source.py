"""Migration sources: S3 (the real one) and a local folder (for development).

A run takes one `Snapshot`: each service's prefix is listed once and each object
fetched once, in parallel, whatever the number of shards. The bytes are written to a
private folder and checksummed; that folder is the only thing any shard sees during
the run, so an object overwritten in S3 mid-run cannot reach half the fleet.

Conventions are yoyo's and yoyo-cloud's, so an existing bucket works as it is: the
objects directly under a service's path whose name ends in `.sql` or `.py` are
migrations (`.py` ones only where the environment allows them), `NAME.rollback.sql` is
the rollback of `NAME.sql`, names starting with `post-apply` are post-apply hooks, and
the migration id is the file name without its extension. Where a service's files are
is the environment's choice (`layout`, or several `paths` merged in order, as
yoyo-cloud's `paths=[...]`); by default `<prefix>/<service>/<env>/`.
This module knows nothing of databases.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fanout import lint
from fanout.config import Environment, FolderLocation, S3Location, UnpublishedPolicy
from fanout.errors import Interrupted, SourceError
from fanout.secret import register

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

FETCH_WORKERS = 16
SQL_SUFFIX = lint.SQL_SUFFIX
ROLLBACK_SUFFIX = lint.ROLLBACK_SUFFIX


@dataclass(frozen=True, slots=True)
class MigrationFile:
    """One file of a migration set, as it was fetched for this run."""

    name: str
    key: str
    size: int
    sha256: str
    etag: str | None = None
    version_id: str | None = None
    path: int = 0  # which of the service's paths it comes from (several are merged in order)

    @property
    def is_rollback(self) -> bool:
        return self.name.endswith(ROLLBACK_SUFFIX)

    @property
    def migration_id(self) -> str:
        return lint.migration_id(self.name)


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
    # The release manifest the files were pinned by (fanout publish), if the prefix has one.
    manifest: str | None = None
    release: str | None = None
    # The migration ids that release added to the set (None: no manifest, or one written before fanout recorded it).
    added: tuple[str, ...] | None = None
    # Every path of the service, in yoyo's order, and the local folder holding each one's files.
    urls: tuple[str, ...] = ()
    folders: tuple[Path, ...] = ()
    # Migrations in the bucket that the manifest does not list (uploaded outside publish),
    # and what the environment does with them (config.UnpublishedPolicy).
    unpublished: tuple[str, ...] = ()
    unpublished_policy: str | None = None

    def local(self, file: MigrationFile) -> Path:
        """Where the run's copy of `file` is."""
        return (self.folders[file.path] if self.folders else self.folder) / file.name

    def display(self, file: MigrationFile) -> str:
        """How lint and errors name `file`: its name, with its path when the service merges several."""
        return file.name if len(self.folders) <= 1 else file.key


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
    return _snapshot_s3(env.source, env.name, services, workdir, env.rules.unpublished)


def s3_client(location: S3Location) -> S3Client:
    """A client on the standard credential chain (env, profile, SSO, instance role).

    Every call is bounded by the location's connect/read timeouts and attempts, so an
    endpoint that accepts connections and never answers fails the run instead of holding it.
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=location.profile, region_name=location.region)
    config = Config(
        retries={"mode": "standard", "max_attempts": location.max_attempts},
        connect_timeout=location.connect_timeout,
        read_timeout=location.read_timeout,
        max_pool_connections=FETCH_WORKERS,
    )
    try:
        client = session.client("s3", endpoint_url=location.endpoint_url, config=config)
    except Exception as e:  # botocore raises ProfileNotFound, ValueError for a bad endpoint, ...
        raise SourceError(f"cannot create an S3 client: {e}") from e

    def register_credentials(**_: Any) -> None:
        # botocore's debug log (-vv) prints each request's canonical form and headers, session
        # token included. Registered before each signing: refreshed credentials are new values.
        credentials = session.get_credentials()
        if credentials is not None:
            frozen = credentials.get_frozen_credentials()
            for value in (frozen.secret_key, frozen.token):
                if value:
                    register(value)

    client.meta.events.register("before-sign.s3", register_credentials)
    return client


MANIFEST_NAME = "_manifest.json"
MANIFEST_SCHEMA = "fanout/manifest/v1"


@dataclass(frozen=True, slots=True)
class LocalFile:
    name: str
    data: bytes
    sha256: str


@dataclass(frozen=True, slots=True)
class KeptFile:
    """A migration in one of a service's other paths: publish does not write it, the manifest pins it."""

    key: str
    sha256: str
    size: int
    etag: str
    version_id: str | None


@dataclass(frozen=True, slots=True)
class PublishPlan:
    """What publishing one service's folder would change in the bucket."""

    service: str
    environment: str
    url: str
    added: tuple[str, ...]
    changed: tuple[str, ...]  # published with other content: refused unless forced
    removed: tuple[str, ...]  # published, gone from the folder: refused unless forced
    unchanged: tuple[str, ...]
    problems: tuple[lint.Problem, ...]
    files: tuple[LocalFile, ...] = field(repr=False, default=())
    published_sha256: dict[str, str] = field(repr=False, default_factory=dict)
    # The migrations in the service's other paths (several merged): pinned by the manifest as they are.
    kept: tuple[KeptFile, ...] = ()

    @property
    def refused(self) -> tuple[str, ...]:
        return self.changed + self.removed


def plan_publish(
    location: S3Location,
    folder: Path,
    service: str,
    environment: str,
    *,
    python: bool = False,
    raised: frozenset[str] = frozenset(),
) -> PublishPlan:
    """Compare `folder/<service>/<environment>/` with what is published; lint it. Writes nothing."""
    local_folder = folder / service / environment
    if not local_folder.is_dir():
        raise SourceError(f"no local migrations for service {service!r} at {local_folder}")
    files, nested = [], []
    for path in sorted(local_folder.iterdir()):
        if path.is_dir():
            nested.append(path.name + "/")
        elif path.is_file():
            data = path.read_bytes()
            files.append(LocalFile(path.name, data, hashlib.sha256(data).hexdigest()))
    client = s3_client(location)
    # New migrations go to the last path (merged paths apply in order); the others are pinned as they are.
    *others, prefix = location.key_prefixes(service, environment)
    published = _published(client, location, prefix)
    kept, kept_data = [], {}
    for other in others:
        for name, (etag, version_id) in sorted(_latest_versions(client, location, other).items()):
            if lint.is_migration_file(name):
                data = _get(client, location, other + name)
                kept.append(KeptFile(other + name, hashlib.sha256(data).hexdigest(), len(data), etag, version_id))
                kept_data[other + name] = data
    problems = lint.lint(
        {f.name: f.data for f in files} | kept_data,
        folders=nested,
        published=[lint.migration_id(name) for name in published if not name.endswith(ROLLBACK_SUFFIX)],
        python=python,
        errors=raised,
    )
    local = {f.name: f for f in files if lint.is_migration_file(f.name)}
    same = {
        n: _same_content(client, location, prefix + n, etag, local[n]) for n, etag in published.items() if n in local
    }
    changed = tuple(n for n in local if n in published and not same[n])
    removed = tuple(n for n in published if n not in local)
    return PublishPlan(
        service=service,
        environment=environment,
        url=f"s3://{location.bucket}/{prefix}",
        added=tuple(n for n in local if n not in published),
        changed=changed,
        removed=removed,
        unchanged=tuple(n for n in local if same.get(n)),
        problems=tuple(problems),
        files=tuple(local.values()),
        published_sha256={n: hashlib.sha256(_get(client, location, prefix + n)).hexdigest() for n in changed + removed},
        kept=tuple(kept),
    )


def execute_publish(
    location: S3Location, plan: PublishPlan, *, force_reason: str | None, who: str, stop: threading.Event | None = None
) -> str:
    """Upload what `plan` adds (and, forced, what it changes or removes), then the manifest. Returns its URL.

    Once `stop` is set, no further object is written (the one in flight finishes, within the
    S3 bounds): Interrupted, without a manifest. Publishing again finishes the job: the files
    already uploaded are then unchanged.
    """
    client = s3_client(location)
    prefix = location.key_prefixes(plan.service, plan.environment)[-1]
    manifest_prefix = location.key_prefix(plan.service, plan.environment)
    if plan.refused and not force_reason:
        raise SourceError("refusing to change published migrations without --force")
    uploads = [f for f in plan.files if f.name in plan.added or f.name in plan.changed]
    total, done = len(uploads) + len(plan.removed), 0

    def unless_stopped() -> None:
        if stop is not None and stop.is_set():
            raise Interrupted(
                f"interrupted while publishing service {plan.service!r}: {done} of {total} file change(s) made, "
                "no manifest written; publish again to finish"
            )

    for file in uploads:
        unless_stopped()
        _s3_call(
            location,
            functools.partial(client.put_object, Bucket=location.bucket, Key=prefix + file.name, Body=file.data),
        )
        done += 1
    for name in plan.removed:
        unless_stopped()
        _s3_call(location, functools.partial(client.delete_object, Bucket=location.bucket, Key=prefix + name))
        done += 1
    unless_stopped()
    versions = _latest_versions(client, location, prefix)
    release = _release_id(plan)
    added = [n[: -len(SQL_SUFFIX)] for n in plan.added if not n.endswith(ROLLBACK_SUFFIX)]
    if not plan.added and not plan.refused:
        # The same release published again: keep what it added (what `fanout rollback --release` undoes).
        try:
            previous = _manifest(client, location, manifest_prefix)
        except SourceError:
            previous = {}
        if previous.get("release") == release:
            added = list(previous.get("added") or [])
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "release": release,
        "added": added,
        "service": plan.service,
        "environment": plan.environment,
        "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "published_by": who,
        "files": [
            {
                "name": f.name,
                "key": prefix + f.name,
                "sha256": f.sha256,
                "size": len(f.data),
                "etag": versions.get(f.name, (None, None))[0],
                "version_id": versions.get(f.name, (None, None))[1],
            }
            for f in plan.files
        ]
        + [
            {
                "name": k.key.rsplit("/", 1)[-1],
                "key": k.key,
                "sha256": k.sha256,
                "size": k.size,
                "etag": k.etag,
                "version_id": k.version_id,
            }
            for k in plan.kept
        ],
        "forced": [
            {
                "file": name,
                "change": "changed" if name in plan.changed else "removed",
                "old_sha256": plan.published_sha256.get(name),
                "new_sha256": next((f.sha256 for f in plan.files if f.name == name), None),
                "reason": force_reason,
            }
            for name in plan.refused
        ],
    }
    body = json.dumps(manifest, indent=2).encode()
    # Every release is kept, so `rollback --release` can name one that is no longer current.
    history = release_key(location, plan.service, plan.environment, release)
    _s3_call(
        location,
        functools.partial(
            client.put_object, Bucket=location.bucket, Key=history, Body=body, ContentType="application/json"
        ),
    )
    key = manifest_prefix + MANIFEST_NAME
    _s3_call(
        location,
        functools.partial(
            client.put_object, Bucket=location.bucket, Key=key, Body=body, ContentType="application/json"
        ),
    )
    return f"s3://{location.bucket}/{key}"


def _release_id(plan: PublishPlan) -> str:
    """The same files give the same release id, whoever publishes them and when."""
    lines = [f"{f.name} {f.sha256}" for f in plan.files] + [f"{k.key} {k.sha256}" for k in plan.kept]
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return digest[:16]


def _published(client: S3Client, location: S3Location, prefix: str) -> dict[str, str]:
    """Published .sql objects directly under `prefix`: name -> ETag."""
    paginator = client.get_paginator("list_objects_v2")
    found = {}
    for page in _s3_iter(location, paginator.paginate(Bucket=location.bucket, Prefix=prefix, Delimiter="/")):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :]
            if lint.is_migration_file(name):
                found[name] = obj["ETag"].strip('"')
    return found


def _same_content(client: S3Client, location: S3Location, key: str, etag: str, local: LocalFile) -> bool:
    # A single-part upload's ETag is the MD5 of its content; only multipart objects need a GET.
    if "-" not in etag:
        return hashlib.md5(local.data, usedforsecurity=False).hexdigest() == etag
    return hashlib.sha256(_get(client, location, key)).hexdigest() == local.sha256


def _get(client: S3Client, location: S3Location, key: str) -> bytes:
    def get() -> bytes:
        body: bytes = client.get_object(Bucket=location.bucket, Key=key)["Body"].read()
        return body

    data: bytes = _s3_call(location, get)
    return data


def _latest_versions(client: S3Client, location: S3Location, prefix: str) -> dict[str, tuple[str, str | None]]:
    """name -> (ETag, VersionId or None when the bucket is not versioned)."""
    paginator = client.get_paginator("list_object_versions")
    latest: dict[str, tuple[str, str | None]] = {}
    for page in _s3_iter(location, paginator.paginate(Bucket=location.bucket, Prefix=prefix, Delimiter="/")):
        for version in page.get("Versions", []):
            if version.get("IsLatest"):
                version_id = version.get("VersionId")
                latest[version["Key"][len(prefix) :]] = (
                    version["ETag"].strip('"'),
                    None if version_id in (None, "null") else version_id,
                )
    return latest


def _snapshot_folder(location: FolderLocation, environment: str, services: Sequence[str], workdir: Path) -> Snapshot:
    sets = []
    for service in services:
        origins = location.folders(service, environment)
        root = _service_folder(workdir, service)
        folders = tuple(root / str(i) for i in range(len(origins)))
        files, ignored = [], []
        for index, (origin, folder) in enumerate(zip(origins, folders, strict=True)):
            folder.mkdir()
            if not origin.is_dir():
                continue
            for path in sorted(origin.iterdir()):
                shown = path.name if len(origins) == 1 else str(path)
                if path.is_dir():
                    ignored.append(shown + "/")
                elif not (path.is_file() and lint.is_migration_file(path.name)):
                    ignored.append(shown)
                else:
                    data = path.read_bytes()
                    (folder / path.name).write_bytes(data)
                    sha256 = hashlib.sha256(data).hexdigest()
                    files.append(MigrationFile(path.name, str(path), len(data), sha256, path=index))
        urls = location.urls(service, environment)
        sets.append(_migration_set(service, environment, urls, files, root, folders, ignored))
    return Snapshot(tuple(sets), FetchStats())


@dataclass(frozen=True, slots=True)
class _Listing:
    """What one service's paths hold: migration objects (path index, listing entry), the rest, LIST pages."""

    objects: list[tuple[int, dict[str, Any]]]
    ignored: list[str]
    pages: int
    has_manifest: bool


def _snapshot_s3(
    location: S3Location,
    environment: str,
    services: Sequence[str],
    workdir: Path,
    policy: UnpublishedPolicy = UnpublishedPolicy.REFUSE,
) -> Snapshot:
    client = s3_client(location)
    listings = {service: _list(client, location, service, environment) for service in services}
    list_requests = sum(listing.pages for listing in listings.values())
    manifests = {
        service: _manifest(client, location, location.key_prefix(service, environment))
        for service, listing in listings.items()
        if listing.has_manifest
    }
    wanted: list[tuple[str, int, dict[str, Any]]] = []
    unpublished: dict[str, tuple[str, ...]] = {}
    for service, listing in listings.items():
        manifest = manifests.get(service)
        if manifest is None:
            wanted += [(service, index, obj) for index, obj in listing.objects]
            continue
        prefixes = location.key_prefixes(service, environment)
        pinned = [_pinned_object(location, prefixes, entry) for entry in manifest["files"]]
        pinned_keys = {obj["Key"] for _, obj in pinned}
        outside = [(index, obj) for index, obj in listing.objects if obj["Key"] not in pinned_keys]
        if outside:
            names = tuple(_shown(prefixes, index, obj["Key"]) for index, obj in outside)
            unpublished[service] = names
            handling = {
                UnpublishedPolicy.REFUSE: 'refused by [source] unpublished = "refuse"',
                UnpublishedPolicy.REPORT: "not applied",
                UnpublishedPolicy.APPLY: 'applied, as [source] unpublished = "apply" says',
            }[policy]
            log.warning(
                "service %r: %s in S3 but not in release %s (uploaded outside fanout publish): %s",
                service, ", ".join(names), manifest["release"], handling,
            )  # fmt: skip
            if policy is UnpublishedPolicy.APPLY:
                pinned += outside
        wanted += [(service, index, obj) for index, obj in pinned]
    roots = {service: _service_folder(workdir, service) for service in services}
    folders = {
        service: tuple(roots[service] / str(i) for i in range(len(location.key_prefixes(service, environment))))
        for service in services
    }
    for service_folders in folders.values():
        for folder in service_folders:
            folder.mkdir()

    def fetch(item: tuple[str, int, dict[str, Any]]) -> tuple[str, MigrationFile]:
        service, index, obj = item
        return service, dataclasses.replace(_fetch(client, location, obj, folders[service][index]), path=index)

    with ThreadPoolExecutor(max_workers=FETCH_WORKERS, thread_name_prefix="fanout-s3") as pool:
        fetched = list(pool.map(fetch, wanted))

    sets = []
    for service in services:
        files = [f for s, f in fetched if s == service]
        migration_set = _migration_set(
            service,
            environment,
            location.urls(service, environment),
            files,
            roots[service],
            folders[service],
            listings[service].ignored,
        )
        manifest = manifests.get(service)
        if manifest is not None:
            url = f"s3://{location.bucket}/{location.key_prefix(service, environment)}{MANIFEST_NAME}"
            added = manifest.get("added")
            migration_set = dataclasses.replace(
                migration_set, manifest=url, release=manifest["release"],
                added=None if added is None else tuple(str(m) for m in added),
                unpublished=unpublished.get(service, ()), unpublished_policy=policy.value,
            )  # fmt: skip
        sets.append(migration_set)
    stats = FetchStats(
        list_requests=list_requests,
        get_requests=len(fetched) + len(manifests),
        bytes_fetched=sum(f.size for _, f in fetched),
    )
    return Snapshot(tuple(sets), stats)


def _manifest(client: S3Client, location: S3Location, prefix: str) -> dict[str, Any]:
    key = prefix + MANIFEST_NAME
    try:
        manifest: dict[str, Any] = json.loads(_get(client, location, key))
        if manifest.get("schema") != MANIFEST_SCHEMA:
            raise ValueError(f"schema {manifest.get('schema')!r}")
        for entry in manifest["files"]:
            entry["name"], entry["sha256"]
        manifest["release"] = str(manifest["release"])
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"s3://{location.bucket}/{key} is not a fanout manifest ({type(e).__name__}: {e})") from None
    return manifest


def _pinned_object(location: S3Location, prefixes: Sequence[str], entry: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A manifest entry in the shape of a listing entry, carrying what pins it, with its path's index."""
    key = entry.get("key") or prefixes[0] + entry["name"]
    index = next((i for i, p in enumerate(prefixes) if key.startswith(p) and "/" not in key[len(p) :]), None)
    if index is None:
        raise SourceError(
            f"s3://{location.bucket}/{prefixes[0]}{MANIFEST_NAME} lists {key}, which is in none of the "
            "service's paths (did the layout change? publish again)"
        )
    return index, {
        "Key": key,
        "ETag": entry.get("etag") or "",
        "VersionId": entry.get("version_id"),
        "sha256": entry["sha256"],
    }


def _shown(prefixes: Sequence[str], index: int, key: str) -> str:
    """A file's name, or its key when the service merges several paths."""
    return key[len(prefixes[index]) :] if len(prefixes) == 1 else key


def _list(client: S3Client, location: S3Location, service: str, environment: str) -> _Listing:
    prefixes = location.key_prefixes(service, environment)
    objects: list[tuple[int, dict[str, Any]]] = []
    ignored: list[str] = []
    pages = 0
    has_manifest = False
    paginator = client.get_paginator("list_objects_v2")
    for index, prefix in enumerate(prefixes):
        # Delimiter="/" keeps nested "folders" out of the listing, as yoyo-cloud does.
        iterator = paginator.paginate(Bucket=location.bucket, Prefix=prefix, Delimiter="/")
        for page in _s3_iter(location, iterator):
            pages += 1
            _require_s3_answer(location, page)
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix) :]
                if name and lint.is_migration_file(name):
                    objects.append((index, obj))
                elif name:
                    has_manifest = has_manifest or (index == 0 and name == MANIFEST_NAME)
                    ignored.append(_shown(prefixes, index, obj["Key"]))
            ignored.extend(_shown(prefixes, index, p["Prefix"]) for p in page.get("CommonPrefixes", []))
    if not objects:
        raise SourceError(
            f"no migrations for service {service!r} in environment {environment!r} at "
            + ", ".join(location.urls(service, environment))
        )
    return _Listing(objects, ignored, pages, has_manifest)


def _require_s3_answer(location: S3Location, page: dict[str, Any]) -> None:
    """A web server at the endpoint answers 200 with a page that botocore reads as an empty listing."""
    headers = page.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    content_type = str(headers.get("content-type", ""))
    if "html" in content_type.lower() or not page.get("Name"):
        raise SourceError(_not_s3(location, content_type or "response"))


def _not_s3(location: S3Location, what: str) -> str:
    return (
        f"the S3 endpoint {location.endpoint_url or 'of the region'} did not answer like S3 "
        f"(a {what} that is no S3 answer, e.g. a web page): check [source] endpoint_url"
    )


def _fetch(client: S3Client, location: S3Location, obj: dict[str, Any], folder: Path) -> MigrationFile:
    key: str = obj["Key"]
    etag: str = obj["ETag"]
    version_id: str | None = obj.get("VersionId")
    if version_id:
        # The exact version the release was published as, whatever was uploaded since.
        pin: dict[str, str] = {"VersionId": version_id}
    else:
        # IfMatch pins the object to the listing (or manifest): an overwrite fails loudly.
        pin = {"IfMatch": etag if etag.startswith('"') else f'"{etag}"'}

    def get() -> tuple[bytes, str | None]:
        # The body is read inside the call: a download that stalls mid-body is the source's error, not a crash.
        response = client.get_object(Bucket=location.bucket, Key=key, **pin)  # type: ignore[arg-type]
        return response["Body"].read(), response.get("VersionId")

    data, got_version = _s3_call(location, get)
    plain_etag = etag.strip('"')
    if plain_etag and "-" not in plain_etag and hashlib.md5(data, usedforsecurity=False).hexdigest() != plain_etag:
        raise SourceError(f"s3://{location.bucket}/{key}: content does not match its ETag (corrupted download)")
    sha256 = hashlib.sha256(data).hexdigest()
    if obj.get("sha256") and obj["sha256"] != sha256:
        raise SourceError(f"s3://{location.bucket}/{key}: content differs from its release manifest")
    name = key.rsplit("/", 1)[-1]
    (folder / name).write_bytes(data)
    return MigrationFile(
        name=name,
        key=key,
        size=len(data),
        sha256=sha256,
        etag=plain_etag,
        version_id=got_version,
    )


def _migration_set(
    service: str,
    environment: str,
    urls: tuple[str, ...],
    files: list[MigrationFile],
    root: Path,
    folders: tuple[Path, ...],
    ignored: list[str],
) -> MigrationSet:
    if not any(not f.is_rollback for f in files):
        raise SourceError(f"no migrations for service {service!r} in environment {environment!r} at {', '.join(urls)}")
    return MigrationSet(
        service=service,
        environment=environment,
        url=urls[0],
        files=tuple(sorted(files, key=lambda f: (f.path, f.name))),
        folder=root,
        ignored=tuple(sorted(ignored)),
        urls=urls,
        folders=folders,
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
    from botocore.parsers import ResponseParserError

    where = f"s3://{location.bucket}"
    try:
        return call()
    except ClientError as e:
        content_type = str(e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("content-type", ""))
        if "html" in content_type.lower():
            raise SourceError(_not_s3(location, content_type)) from None
        code = e.response.get("Error", {}).get("Code", "Unknown")
        messages = {
            "NoSuchBucket": f"bucket {location.bucket!r} does not exist",
            "NoSuchKey": f"no such object in {where}",
            "AccessDenied": f"access denied to {where}",
            "InvalidAccessKeyId": f"the AWS access key is not valid for {where}",
            "SignatureDoesNotMatch": f"the AWS secret key is not valid for {where}",
            "PreconditionFailed": f"an object under {where} changed since it was listed or published "
            "(overwritten outside fanout publish?)",
        }
        raise SourceError(messages.get(code, f"S3 error {code} on {where}")) from None
    except NoCredentialsError:
        raise SourceError("no AWS credentials found (environment, profile, SSO or instance role)") from None
    except EndpointConnectionError as e:
        raise SourceError(f"cannot reach the S3 endpoint for {where}: {e}") from None
    except ResponseParserError:
        raise SourceError(_not_s3(location, "response")) from None
    except BotoCoreError as e:
        raise SourceError(f"S3 request to {where} failed: {e}") from None


# ---- run records --------------------------------------------------------------------

# A service name cannot start with "_", so run records never mix with migrations.
RUNS_FOLDER = "_runs"
RELEASES_FOLDER = "_releases"


def release_key(location: S3Location, service: str, environment: str, release: str) -> str:
    """Where publish keeps every release's manifest, outside the service's prefix (which holds only migrations)."""
    parts = [p for p in (location.prefix.strip("/"), RELEASES_FOLDER, service, environment) if p]
    return "/".join(parts) + f"/{release}.json"


def release_added(location: S3Location, service: str, environment: str, release: str) -> tuple[str, ...] | None:
    """The migration ids a published release of a service added, from its kept manifest.

    None when the service has no such release (or it was published before fanout kept them).
    """
    from botocore.exceptions import ClientError

    client = s3_client(location)
    key = release_key(location, service, environment, release)

    def get() -> bytes | None:
        try:
            body: bytes = client.get_object(Bucket=location.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return body

    body: bytes | None = _s3_call(location, get)
    if body is None:
        return None
    try:
        added = json.loads(body)["added"]
        return tuple(str(m) for m in added)
    except (ValueError, KeyError, TypeError):
        raise SourceError(f"s3://{location.bucket}/{key} is not a fanout manifest") from None


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


# ---- reports stored anywhere in S3 (--report-to, report merge) -------------------------


def _split_s3_url(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket:
        raise SourceError(f"{url!r} is not an s3://bucket/key URL")
    return bucket, key


def _located(url: str, like: S3Location | None) -> tuple[S3Location, str]:
    """The bucket of `url`, reached with the endpoint, region and profile of `like` (the environment's)."""
    bucket, key = _split_s3_url(url)
    location = dataclasses.replace(like, bucket=bucket) if like else S3Location(bucket=bucket)
    return location, key


def put_object(url: str, body: bytes, *, like: S3Location | None, content_type: str) -> None:
    location, key = _located(url, like)
    if not key or key.endswith("/"):
        raise SourceError(f"{url!r} names a folder; give the object's full key")
    client = s3_client(location)
    _s3_call(
        location,
        functools.partial(client.put_object, Bucket=location.bucket, Key=key, Body=body, ContentType=content_type),
    )


def get_objects(url: str, *, like: S3Location | None, suffix: str) -> list[tuple[str, bytes]]:
    """One object (s3://bucket/key) or every object under a prefix ending in / with `suffix`, as (url, body)."""
    location, key = _located(url, like)
    client = s3_client(location)
    if key and not key.endswith("/"):
        keys = [key]
    else:
        paginator = client.get_paginator("list_objects_v2")
        keys = [
            obj["Key"]
            for page in _s3_iter(location, paginator.paginate(Bucket=location.bucket, Prefix=key))
            for obj in page.get("Contents", ())
            if obj["Key"].endswith(suffix)
        ]
        if not keys:
            raise SourceError(f"no {suffix} object under {url}")
    return [(f"s3://{location.bucket}/{one}", _get(client, location, one)) for one in keys]
