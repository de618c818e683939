"""The root `meshid` command group.

Subcommand groups live with the package that owns them (`ca.cli`,
`sidecar.cli`) and are imported only when named, so the kernel never depends
on them and `meshid sidecar …` does not load the authority's code. This is
also the one place where errors become a one-line message and an exit code:
a MeshIdError exits 1, a usage error exits 2 (click's convention), and both
print exactly one line on stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from meshid import __version__
from meshid.errors import MeshIdError

_SUBCOMMANDS = {
    "ca": ("ca.cli", "ca_group"),
    "policy": ("ca.policy_cli", "policy_group"),
    "federation": ("ca.federation_cli", "federation_group"),
    "service": ("ca.service_cli", "service_group"),
    "sidecar": ("sidecar.cli", "sidecar_group"),
    "workload": ("sidecar.workload.cli", "workload_group"),
    "doctor": ("meshid.cli", "doctor_cmd"),
}


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """Fold click's usage block and help hint into the error line itself.

    click prints a usage error as four lines (usage, hint, blank, error); we
    promise operators and scripts one. Help shown for a bare group is not an
    error and is left alone.
    """
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as exc:
        if exc.ctx is None:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')"
        raise click.UsageError(exc.format_message() + hint) from None


# `-h` works everywhere. Each command carries it in its own context settings, not
# only through the root's context: click caches a command's help option from the
# first context that asks, which need not be one under the root.
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


RAW_ARGS = "meshid.raw_args"
ACTING_OPERATOR = "meshid.acting_operator"


class Command(click.Command):
    """A command that knows `-h` whatever context first parses it, and keeps its arguments
    as typed (in `ctx.meta[RAW_ARGS]`), so that `--server` can send them on as they are."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**HELP_OPTIONS, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[RAW_ARGS] = tuple(args)
        return super().parse_args(ctx, args)


class Group(click.Group):
    """A group whose commands and subgroups know `-h` too (see `Command`)."""

    command_class = Command
    group_class = type  # subgroups are of this class as well

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**HELP_OPTIONS, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)


class _RootGroup(Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        command = getattr(importlib.import_module(target[0]), target[1])
        assert isinstance(command, click.Command)
        return command

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _one_line_usage_errors():
                return super().invoke(ctx)
        except MeshIdError as exc:
            raise click.ClickException(exc.message) from None


@click.group(cls=_RootGroup)
@click.version_option(__version__, prog_name="meshid")
@click.option("--acting-operator", hidden=True)
@click.pass_context
def cli(ctx: click.Context, acting_operator: str | None) -> None:
    """meshid: SPIFFE workload identity and mTLS for microservices."""
    # Set only by the control plane when it runs a command for an operator: the
    # operator the command's audit rows name (see `ca.cliopts`).
    if acting_operator is not None:
        ctx.meta[ACTING_OPERATOR] = acting_operator


def main() -> None:
    try:
        cli.main(prog_name="meshid")
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the last guard: an operator sees one line, not a traceback
        if os.environ.get("MESHID_DEBUG"):
            raise
        click.echo(
            f"Error: internal error ({type(exc).__name__}); set MESHID_DEBUG=1 for details",
            err=True,
        )
        sys.exit(70)


@click.command("doctor", cls=Command)
@click.option(
    "--state",
    type=click.Path(file_okay=False),
    help="Check the authority in this state directory.",
)
@click.option(
    "--config", type=click.Path(dir_okay=False), help="Check the sidecar with this config."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def doctor_cmd(state: str | None, config: str | None, as_json: bool) -> None:
    """Check an authority (--state) or a sidecar (--config): one line per check, ✓ or ✗.

    Exits 1 if any check fails. The checks live with the side they check
    (`ca.doctor`, `sidecar.doctor`), loaded only when named.
    """
    import json

    from meshid.doctor import document, render

    if (state is None) == (config is None):
        raise click.UsageError("give either --state DIR or --config FILE")
    from meshid.clock import system_clock

    if state is not None:
        checks = importlib.import_module("ca.doctor").check_state(_path(state), system_clock())
    else:
        checks = importlib.import_module("sidecar.doctor").check_config(
            _path(str(config)), clock=system_clock()
        )
    if as_json:
        click.echo(json.dumps(document(checks)))
    else:
        for line in render(checks):
            click.echo(line)
    if not all(check.ok for check in checks):
        sys.exit(1)


def _path(text: str) -> Any:
    return importlib.import_module("pathlib").Path(text)
