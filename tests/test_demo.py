"""The README's main command: `fanout demo` on the embedded default."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import REPO

from fanout.cli import cli


def test_demo_runs_plan_apply_and_status_on_a_throwaway_stack(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(cli, ["demo"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "== plan: what would run where" in out
    assert "would run 001-create-person" in out
    assert "4 targets × 2 services: 8 applied · 20 migrations applied, 0 pending" in out
    assert "4 targets × 2 services: 8 up-to-date · 0 migrations applied, 0 pending" in out
    assert "stopped the embedded stack" in result.stderr
