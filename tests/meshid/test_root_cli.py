"""The root command group: version, and bad usage as one line on stderr."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from meshid import __version__
from meshid.cli import cli


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["ca", "no-such-command"],
        ["ca", "init"],  # missing required options
        ["ca", "init", "--state", "x", "--trust-domain", "example.org", "--svid-ttl", "1x"],
        ["ca", "token", "--state", "x", "web", "--ttl", "1.5h"],
        ["ca", "bundle", "--state", "x", "--format", "der"],
        ["policy", "allow", "web"],
    ],
)
def test_usage_errors_are_one_line(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "--help" in lines[0]  # the hint survives, folded into the line
    assert result.stdout == ""


def test_help_still_prints_usage() -> None:
    result = CliRunner().invoke(cli, ["ca", "init", "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.stdout
    assert "--trust-domain" in result.stdout
