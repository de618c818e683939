"""`meshid sidecar run`: load the config, run the sidecar, drain on SIGTERM."""

from __future__ import annotations

import gc
import signal
import sys
from pathlib import Path
from typing import TextIO

import click
import trio

from meshid.cli import Group
from meshid.clock import Clock
from meshid.errors import ConfigError, MeshIdError
from sidecar.app import Sidecar
from sidecar.config import load_config
from sidecar.events import EventLog
from sidecar.redirect import redirect_cmd

# Container objects allocated (net) before Python's cyclic collector runs a young
# collection. The default, 700, ran one every few new connections, each walking
# the state of every connection in flight: about 1.5 % of a sidecar's CPU under a
# stream of new connections. At 5,000 the same garbage is found for about a third
# of that, in pauses under a millisecond; unreachable cycles live a few thousand
# allocations (some hundreds of KiB) longer. Most of a connection's garbage is
# freed by reference counting at once and never waits for the collector.
GC_YOUNG_THRESHOLD = 5000


def tune_gc() -> None:
    """Raise the young generation's threshold; the older generations keep theirs."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


@click.group("sidecar", cls=Group)
def sidecar_group() -> None:
    """The per-service mTLS proxy."""


async def _run(sidecar: Sidecar) -> None:
    """Run the sidecar and honour SIGTERM/SIGINT in every state.

    The signal receiver is live before the sidecar starts, because starting can
    take as long as the authority is unreachable (enrollment retries with
    backoff). A signal before the sidecar serves stops it at once: there is
    nothing to drain. Once it serves, the first signal drains live connections
    for up to `drain_timeout`; a second one stops at once, cutting them.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            serving = trio.Event()

            async def on_signal() -> None:
                received = 0
                async for signum in signals:
                    received += 1
                    name = signal.Signals(signum).name
                    if serving.is_set() and received == 1:
                        sidecar.events.emit("signal", signal=name, action="drain")
                        sidecar.request_drain()
                        continue
                    sidecar.events.emit("signal", signal=name, action="stop")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signal)
            await nursery.start(sidecar.run)
            serving.set()
            # run() returns after a drain; then stop listening for signals
            await _wait_stopped(sidecar)
            nursery.cancel_scope.cancel()


async def _wait_stopped(sidecar: Sidecar) -> None:
    await sidecar.stopped.wait()


@sidecar_group.command("run")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Sidecar configuration (TOML).",
)
def run_cmd(config_path: Path) -> None:
    """Run a sidecar until SIGTERM, then drain live connections."""
    config = load_config(config_path)
    stream: TextIO = sys.stderr
    if config.log_file is not None:
        try:
            stream = open(config.log_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"log.file: cannot open {config.log_file}: {exc.strerror}") from None
    sidecar = Sidecar(config, events=EventLog(stream), clock=Clock())
    tune_gc()
    try:
        trio.run(_run, sidecar)
    except BaseExceptionGroup as group:
        # Surface our own error (bad credentials, a port in use) as the one-line message.
        matched, _rest = group.split(MeshIdError)
        if matched is not None:
            first = matched.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise


sidecar_group.add_command(redirect_cmd)
