"""A real MariaDB (Debian's `mariadb-server`) for the MySQL/MariaDB engine tests.

The suite never uses a system service: it initializes its own data folder in a temporary
directory, starts its own `mariadbd` with `--no-defaults` (no my.cnf is read) on 127.0.0.1
with a random port and its own socket, and runs it as `nobody` when the suite runs as root
(mariadbd refuses root, as PostgreSQL does). root@localhost has no password and is reached
only through the private socket; tests connect over TCP as a `migrator` user with a random
password and every privilege on the databases they create.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pymysql
import pytest

from fanout.embedded import UNPRIVILEGED_USER, free_port
from fanout.secret import Secret

DEBIAN_SERVER = Path("/usr/sbin/mariadbd")
MIGRATOR = "migrator"
# Every wait below is bounded: a server that does not come up fails the session, never hangs it.
_INSTALL_SECONDS = 120
_START_SECONDS = 60
_STOP_SECONDS = 30


def binaries() -> tuple[str, str]:
    """(mariadbd, mariadb-install-db); fails under CI=true when missing, skips elsewhere."""
    server = shutil.which("mariadbd") or (str(DEBIAN_SERVER) if DEBIAN_SERVER.is_file() else None)
    install = shutil.which("mariadb-install-db")
    if server is not None and install is not None:
        return server, install
    if os.environ.get("CI") == "true":
        pytest.fail("mariadb-server is not installed: CI must run it (.ci/run and `make test` install it with apt-get)")
    pytest.skip("mariadb-server is not installed (apt-get install mariadb-server; `make test` installs it when it can)")


class MariaDB:
    """One throwaway mariadbd; `started_in` is how long it took to be ready (seconds)."""

    def __init__(self, server: str, install: str) -> None:
        self._server = server
        self._install = install
        self.host = "127.0.0.1"
        self.port = 0
        self.user = MIGRATOR
        self.password = Secret(secrets.token_urlsafe(18))
        self.started_in = 0.0
        self.version = ""
        self._root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MariaDB:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def socket(self) -> str:
        assert self._root is not None
        return str(self._root / "mariadb.sock")

    def start(self) -> None:
        began = time.monotonic()
        run_as = pwd.getpwnam(UNPRIVILEGED_USER) if os.geteuid() == 0 else None
        root = self._root = Path(tempfile.mkdtemp(prefix="fanout-mariadb-"))
        data = root / "data"
        data.mkdir()
        as_user: dict[str, Any] = {}
        if run_as is not None:
            for path in (root, data):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
            as_user = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
        try:
            subprocess.run(
                [
                    self._install, "--no-defaults", "--auth-root-authentication-method=normal", "--skip-test-db",
                    f"--datadir={data}",
                ],
                check=True, capture_output=True, timeout=_INSTALL_SECONDS, cwd=root, **as_user,
            )  # fmt: skip
        except subprocess.CalledProcessError as e:
            self.stop()
            raise RuntimeError(f"mariadb-install-db failed:\n{e.stderr.decode(errors='replace')[-2000:]}") from None
        self.port = free_port(self.host)
        self._process = subprocess.Popen(
            [
                self._server, "--no-defaults", f"--datadir={data}", "--skip-networking=0",
                f"--bind-address={self.host}", f"--port={self.port}", f"--socket={self.socket}",
                f"--pid-file={root / 'mariadbd.pid'}", f"--log-error={root / 'error.log'}",
                "--skip-log-bin", "--innodb-buffer-pool-size=32M", "--skip-name-resolve",
                # Fast, not durable: a test server's data need not survive a crash of the machine.
                "--innodb-flush-log-at-trx-commit=2", "--innodb-buffer-pool-dump-at-shutdown=0",
                "--innodb-buffer-pool-load-at-startup=0", "--innodb-fast-shutdown=2",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root, start_new_session=True, **as_user,
        )  # fmt: skip
        deadline = time.monotonic() + _START_SECONDS
        while time.monotonic() < deadline and self._process.poll() is None:
            try:
                admin = self.admin()
            except pymysql.err.OperationalError:
                time.sleep(0.1)
                continue
            with admin, admin.cursor() as cursor:
                cursor.execute("SELECT VERSION()")
                self.version = str(cursor.fetchone()[0])
                for host in ("127.0.0.1", "localhost"):
                    cursor.execute(f"CREATE USER '{MIGRATOR}'@'{host}' IDENTIFIED BY %s", (self.password.reveal(),))
                    cursor.execute(f"GRANT ALL PRIVILEGES ON *.* TO '{MIGRATOR}'@'{host}'")
            self.started_in = time.monotonic() - began
            return
        log = (root / "error.log").read_text(errors="replace")[-2000:] if (root / "error.log").exists() else ""
        self.stop()
        raise RuntimeError(f"mariadbd did not start within {_START_SECONDS}s:\n{log}")

    def admin(self) -> Any:
        """A root connection over the server's private socket (autocommit)."""
        return pymysql.connect(unix_socket=self.socket, user="root", connect_timeout=5, autocommit=True)

    def create_database(self, name: str) -> None:
        with self.admin() as admin, admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE `{name}`")

    def drop_database(self, name: str) -> None:
        with self.admin() as admin, admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")

    def url(self, database: str, scheme: str = "mysql") -> str:
        """A yoyo URL with the password in it: for the `yoyo` CLI only, never printed."""
        return f"{scheme}://{self.user}:{self.password.reveal()}@{self.host}:{self.port}/{database}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()  # SIGTERM: a clean shutdown
            try:
                self._process.wait(timeout=_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=_STOP_SECONDS)
            self._process = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
