"""`meshid sidecar redirect`: install, remove or print the capture rules, with the `nft` tool.

A thin shell over the pure rule text of `sidecar.transparent`: the rules are
piped to `nft -f -` (Debian's `nftables`), one transaction, in the current
network namespace. `--print` runs nothing and changes nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import click

from meshid.errors import ConfigError, MeshIdError
from sidecar.config import load_config
from sidecar.transparent import nft_remove, nft_ruleset

NFT_TIMEOUT = 30.0


def run_nft(text: str) -> None:
    """Pipe a ruleset to `nft -f -`; its failure is one line naming nft's own message."""
    nft = shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if Path(p).is_file()), None
    )
    if nft is None:
        raise MeshIdError("redirect: the nft command is missing (Debian package nftables)")
    try:
        done = subprocess.run(  # noqa: S603 - a fixed argv, our own rule text on stdin
            [nft, "-f", "-"], input=text.encode(), capture_output=True, timeout=NFT_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MeshIdError(f"redirect: cannot run nft: {exc}") from None
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        first = message[0] if message else f"exit status {done.returncode}"
        raise MeshIdError(f"redirect: nft failed: {first[:200]}")


@click.command("redirect")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Sidecar configuration (TOML) with a [transparent] table.",
)
@click.option("--apply", "action", flag_value="apply", help="Install the rules (idempotent).")
@click.option("--remove", "action", flag_value="remove", help="Remove the rules.")
@click.option("--print", "action", flag_value="print", help="Print the rules; change nothing.")
def redirect_cmd(config_path: Path, action: str | None) -> None:
    """Capture the app's connections into the sidecar (nftables table `meshid`)."""
    if action is None:
        raise click.UsageError("give one of --apply, --remove or --print")
    config = load_config(config_path)
    if config.transparent is None:
        raise ConfigError(f"{config_path}: no [transparent] table")
    if action == "print":
        click.echo(nft_ruleset(config.transparent), nl=False)
    elif action == "apply":
        run_nft(nft_ruleset(config.transparent))
    else:
        run_nft(nft_remove())
