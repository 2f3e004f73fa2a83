"""A DSN password or token never appears in output, logs, exceptions or repr."""

from __future__ import annotations

import socket

from conftest import MIGRATIONS, Fleet

from fanout.config import load_environment
from fanout.directory import Target
from fanout.secret import Secret, redact

PASSWORD = "Sup3r-Secret-Pa55"


def test_passwords_never_appear_in_any_output_log_or_error(fleet: Fleet) -> None:
    good, wrong = fleet.add_databases(2)
    fleet.query(good, f"CREATE ROLE leaky LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    fleet.publish({**MIGRATIONS, "004-fails.sql": "-- depends: 003-create-order\nSELECT 1/0;"})
    fleet.write_env(
        [
            {"id": "good", "dsn": fleet.dsn(good, user="leaky", password=PASSWORD)},
            {"id": "wrong", "dsn": fleet.dsn(wrong, user="leaky", password=PASSWORD + "x")},
            {"id": "dead", "dsn": f"postgresql://leaky:{PASSWORD}@127.0.0.1:{dead}/db"},
            {"id": "schema", "dsn": fleet.dsn(good, user="leaky", password=PASSWORD), "schema": "missing_schema"},
        ]
    )

    outputs = []
    for command in ("plan", "apply", "status", "shards"):
        for fmt in ("text", "json"):
            result = fleet.cli("-vv", command, "--env", "test", "--format", fmt)
            outputs.append(result.output)
    process = fleet.spawn("-vv", "apply", "--env", "test")
    stdout, stderr = process.communicate(timeout=60)
    outputs += [stdout, stderr]

    combined = "\n".join(outputs)
    assert "division by zero" in combined  # the failures did happen and were reported
    assert "password authentication failed" in combined
    assert PASSWORD not in combined
    assert "Pa55" not in combined
    env = load_environment("test", search_dir=fleet.environments_dir)
    targets = [Target.from_dsn(t.id, t.dsn.reveal()) for t in env.directory.targets]
    assert PASSWORD not in repr(env) + str(env) + repr(targets) + str(targets)


def test_secret_reveals_only_on_request() -> None:
    secret = Secret("tok-abcdef-123")
    assert str(secret) == repr(secret).replace("Secret(", "").replace(")", "").strip("'") == "***"
    assert f"{secret}" == "***"
    assert secret.reveal() == "tok-abcdef-123"
    assert redact("bearer tok-abcdef-123 failed") == "bearer *** failed"


def test_redact_masks_url_passwords_even_when_unregistered() -> None:
    text = "could not connect to postgresql://app:never-registered@db.internal:5432/x"
    assert redact(text) == "could not connect to postgresql://app:***@db.internal:5432/x"
