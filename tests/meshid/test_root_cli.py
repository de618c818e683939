"""The root command group: version, and bad usage as one line on stderr."""

from __future__ import annotations

import click
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


def _leaf_commands(group: click.Group, ctx: click.Context) -> list[list[str]]:
    paths: list[list[str]] = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            sub = click.Context(command, info_name=name, parent=ctx)
            paths.append([name])
            paths += [[name, *rest] for rest in _leaf_commands(command, sub)]
        else:
            paths.append([name])
    return paths


def test_dash_h_is_help_for_every_command() -> None:
    """Also when a group is invoked on its own first: click caches a command's help option."""
    from sidecar.cli import sidecar_group

    CliRunner().invoke(sidecar_group, ["run", "--help"])
    commands = _leaf_commands(cli, click.Context(cli, info_name="meshid"))
    assert ["ca", "init"] in commands and ["sidecar", "run"] in commands
    for path in [[], *commands]:
        result = CliRunner().invoke(cli, [*path, "-h"])
        assert result.exit_code == 0, (path, result.output)
        assert result.stdout.startswith("Usage: "), path
        assert result.stdout == CliRunner().invoke(cli, [*path, "--help"]).stdout


def test_the_version_reported_is_the_installed_one() -> None:
    from importlib.metadata import version

    from meshid.version import VERSION

    assert VERSION == version("meshid") == __version__
