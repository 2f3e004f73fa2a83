"""The CLI surface: help with examples on every command, documented exit codes."""

from __future__ import annotations

from click.testing import CliRunner

from fanout import errors
from fanout.cli import cli


def test_every_command_has_help_with_an_example() -> None:
    runner = CliRunner()
    for name, command in cli.commands.items():
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert command.help and "Example:" in command.help, f"{name} lacks an example"
        assert "fanout" in result.output.split("Example:")[1], name


def test_exit_codes_in_help_match_the_error_hierarchy() -> None:
    text = CliRunner().invoke(cli, ["--help"]).output
    for code in (
        errors.EXIT_CONFIG,
        errors.EXIT_SOURCE,
        errors.EXIT_DIRECTORY,
        errors.EXIT_TARGETS_FAILED,
        errors.EXIT_NOT_STORED,
        errors.EXIT_PENDING,
    ):
        assert f"  {code} " in text
    assert errors.ConfigError.exit_code == 2
    assert errors.SourceError.exit_code == 3
    assert errors.DirectoryError.exit_code == 4


def test_usage_error_exits_2() -> None:
    result = CliRunner().invoke(cli, ["apply"])
    assert result.exit_code == errors.EXIT_CONFIG
    assert "Missing option '--env'" in result.output


def test_usage_errors_are_one_line_and_a_bare_command_still_shows_its_help() -> None:
    runner = CliRunner()
    wrong = runner.invoke(cli, ["plan", "--env", "x", "--concurrency", "0"])
    bare = runner.invoke(cli, [])

    assert wrong.exit_code == errors.EXIT_CONFIG
    assert wrong.stderr.count("\n") == 1 and wrong.stderr.startswith("fanout: error: ")
    assert "Commands:" in bare.output and "Exit codes:" in bare.output
