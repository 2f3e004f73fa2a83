"""A real PgBouncer (Debian's `pgbouncer`) in front of the suite's PostgreSQL, for the pooler tests.

It listens on 127.0.0.1 on a random port, with its own ini and auth file in a temporary
folder, and runs as `nobody` when the suite runs as root (PgBouncer refuses root, as
PostgreSQL does; see fanout/embedded.py).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg2
import pytest

from fanout.embedded import UNPRIVILEGED_USER, EmbeddedPostgres, free_port

DEBIAN_BINARY = Path("/usr/sbin/pgbouncer")


def binary() -> str:
    """The pgbouncer executable; fails under CI=true when it is missing, skips elsewhere."""
    found = shutil.which("pgbouncer") or (str(DEBIAN_BINARY) if DEBIAN_BINARY.is_file() else None)
    if found is not None:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("pgbouncer is not installed: CI must run it (.ci/run and `make test` install it with apt-get)")
    pytest.skip("pgbouncer is not installed (apt-get install pgbouncer; `make test` installs it when it can)")


class PgBouncer:
    def __init__(
        self, executable: str, postgres: EmbeddedPostgres, pool_mode: str, *, pool_size: int = 20,
        query_wait_timeout: int = 120,
    ) -> None:  # fmt: skip
        self._executable = executable
        self._postgres = postgres
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.query_wait_timeout = query_wait_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self._root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        run_as = pwd.getpwnam(UNPRIVILEGED_USER) if os.geteuid() == 0 else None
        root = self._root = Path(tempfile.mkdtemp(prefix="fanout-pgbouncer-"))
        self.port = free_port(self.host)
        password = self._postgres.password.reveal()
        (root / "userlist.txt").write_text(f'"{self._postgres.user}" "{password}"\n')
        (root / "pgbouncer.ini").write_text(
            textwrap.dedent(f"""\
                [databases]
                * = host={self._postgres.host} port={self._postgres.port}

                [pgbouncer]
                listen_addr = {self.host}
                listen_port = {self.port}
                unix_socket_dir =
                auth_type = scram-sha-256
                auth_file = {root / "userlist.txt"}
                pool_mode = {self.pool_mode}
                admin_users = {self._postgres.user}
                default_pool_size = {self.pool_size}
                query_wait_timeout = {self.query_wait_timeout}
                max_client_conn = 200
                ignore_startup_parameters = extra_float_digits,options
                logfile = {root / "pgbouncer.log"}
                """)
        )
        as_user: dict[str, Any] = {}
        for path in (root, root / "userlist.txt", root / "pgbouncer.ini"):
            path.chmod(0o700 if path.is_dir() else 0o600)
            if run_as is not None:
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
        if run_as is not None:
            as_user = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
        self._process = subprocess.Popen(
            [self._executable, str(root / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=root,
            start_new_session=True,
            **as_user,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        log = (root / "pgbouncer.log").read_text(errors="replace")[-2000:] if (root / "pgbouncer.log").exists() else ""
        self.stop()
        raise RuntimeError(f"pgbouncer did not start:\n{log}")

    def waiting_clients(self) -> int:
        """Clients PgBouncer keeps waiting for a server session (its admin console's SHOW CLIENTS)."""
        console = psycopg2.connect(
            host=self.host, port=self.port, dbname="pgbouncer", user=self._postgres.user,
            password=self._postgres.password.reveal(),
        )  # fmt: skip
        try:
            console.autocommit = True
            with console.cursor() as cursor:
                cursor.execute("SHOW CLIENTS")
                names = [column.name for column in cursor.description or ()]
                rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            console.close()
        return sum(1 for row in rows if row["state"] == "waiting")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
