"""Applies a migration folder to one MySQL/MariaDB database with fanout/engines/mysql.py; killed by tests.

Usage: mysql_apply_child.py HOST PORT USER DATABASE FOLDER RUN_ID (password in $FANOUT_TEST_MYSQL_PASSWORD).
Prints `locked` once it holds the shard lock (with `broke <run id>` when it broke a dead
fanout's lock first). Exit 0: everything applied; 3: a statement is in doubt (one JSON line
names it); 4: any other engine error (one line).
"""

from __future__ import annotations

import json
import os
import sys

from yoyo import read_migrations

from fanout.engines import EngineError
from fanout.engines.mysql import Endpoint, InDoubtError, MySQLSession
from fanout.locking import Owner
from fanout.secret import Secret


def main() -> int:
    host, port, user, database, folder, run_id = sys.argv[1:7]
    endpoint = Endpoint(host, database, user, Secret(os.environ["FANOUT_TEST_MYSQL_PASSWORD"]), int(port))
    migrations = sorted(read_migrations(folder), key=lambda m: m.id)
    try:
        session = MySQLSession(endpoint, Owner(pid=os.getpid(), run_id=run_id))
        try:
            with session.lock(wait=30) as (_, broken):
                if broken is not None:
                    print(f"broke {broken.run_id}", flush=True)
                print("locked", flush=True)
                applied = session.applied()
                for migration in migrations:
                    if migration.hash not in applied:
                        session.apply(migration)
        finally:
            session.close()
    except InDoubtError as e:
        doubt = e.doubt
        print(json.dumps({"migration": doubt.migration, "number": doubt.number, "first_line": doubt.first_line}))
        return 3
    except EngineError as e:
        print(f"error {e.kind}: {e}", flush=True)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
