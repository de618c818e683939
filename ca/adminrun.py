"""Running an operator's command for it: the same command line, against our own state.

Theory of operation: `ca.adminapi.authorise_run` has checked the caller
against the operator list and the call against `ca.remotetable`. Here the
call is admitted or refused (the operator busy), audited as such through
the `audit` it is given (`ca.adminapi.audit_run`, in the database thread),
and, admitted, the command runs as a child process of the control plane,
``meshid --acting-operator ID WORDS… --state OUR_STATE_DIR ARGS…``, so it
is exactly the command an operator would run on this host: same checks,
same output, same exit status, and every audit row it writes names the
operator. A child, not a call in this process: the command prints to its
own stdout and may take its time (a federation fetch) without holding the
server's database thread; at most `MAX_RUNS` at once per worker, each
stopped after `RUN_TIMEOUT`, and one per operator (`RunSlots`): an operator
who starts a slow command, then more, is refused the second at once rather
than taking every slot from the other operators.

Files the client sent by value are written to a private temporary
directory (0700, files 0600) for the child to read, and their paths in the
output are turned back into the names the operator typed.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ca.api import Reply, error, error_for
from meshid.adminwire import MAX_ARG, MAX_FILES, MAX_OUTPUT, RunAnswer, RunCall
from meshid.errors import MeshIdError
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId

RUN_TIMEOUT = 60.0
MAX_RUNS = 2  # per worker: each is a Python process of its own
ENTRY = "from meshid.cli import main; main()"
# What is read of each output: past the cap by the length of a few temporary paths,
# which are replaced by the names the operator typed before the cut (each may be longer).
KEEP = MAX_OUTPUT + MAX_FILES * MAX_ARG
# Not passed to the child: no command of the table signs, so it needs no root
# passphrase; a traceback (MESHID_DEBUG) would show the host's internals to a
# remote caller; and the state directory is named on its command line, never
# found in the environment. The rest (libpq's PGPASSWORD, PATH) it needs as the
# server does.
WITHHELD = ("MESHID_CA_PASSPHRASE", "MESHID_DEBUG", "MESHID_CA_STATE")


# Writes a run's audit row (see `run_for_operator`); raises when it cannot.
RunAudit = Callable[..., Awaitable[None]]


@dataclass
class RunSlots:
    """The worker's run slots, and which operators hold or wait for one."""

    limit: int
    limiter: trio.CapacityLimiter = field(init=False)
    busy: set[SpiffeId] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.limiter = trio.CapacityLimiter(self.limit)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in WITHHELD}


def _capped(data: bytes, what: str, *, dropped: bool) -> tuple[bytes, bytes]:
    """At most MAX_OUTPUT bytes, and a note on stderr when cut (or `dropped` as read)."""
    if len(data) <= MAX_OUTPUT and not dropped:
        return data, b""
    note = f"note: the authority cut the command's {what} at {MAX_OUTPUT} bytes\n"
    return data[:MAX_OUTPUT], note.encode()


def _status(returncode: int) -> int:
    """A shell's exit status: 128+N for a child ended by signal N."""
    return returncode if returncode >= 0 else 128 + min(-returncode, 127)


async def run_for_operator(
    operator: SpiffeId,
    call: RunCall,
    state_dir: Path,
    slots: RunSlots,
    *,
    audit: RunAudit,
    entry: str = ENTRY,
    time_limit: float | None = None,
) -> Reply:
    """The command's output and exit status as a `RunAnswer`, 504 past `time_limit`
    (`RUN_TIMEOUT` by default), or 429 while the same operator has a command running
    or waiting.

    `audit(**outcome)` writes the call's audit row: with no outcome once it is
    admitted, before the command runs (a run that cannot be audited does not
    run); with `refused=` or `stopped=` and the reason otherwise. `entry` is the
    Python the child runs (the command line's `main`; a test puts a stand-in there).
    """
    if operator in slots.busy:
        await audit(refused=Reason.REMOTE_CALL_BUSY)
        return error(
            429,
            Reason.REMOTE_CALL_BUSY,
            f"{operator} already has a command running on the authority; retry when it ends",
        )
    limit = RUN_TIMEOUT if time_limit is None else time_limit
    slots.busy.add(operator)
    try:
        # The slot first, then the admission: an operator removed or revoked while its
        # call waited for a slot is refused by the admitting `audit` (it checks again).
        async with slots.limiter:
            try:
                await audit()
            except MeshIdError as exc:
                return error_for(exc)
            reply = await _run(operator, call, state_dir, entry, limit)
        if reply.status == 504:
            await audit(stopped=Reason.REMOTE_CALL_TIMEOUT)
        return reply
    finally:
        slots.busy.discard(operator)


async def _run(
    operator: SpiffeId,
    call: RunCall,
    state_dir: Path,
    entry: str,
    time_limit: float,
) -> Reply:
    with tempfile.TemporaryDirectory(prefix="meshid-run-") as tmp:
        args = list(call.args)
        names: dict[bytes, bytes] = {}
        for n, sent in enumerate(call.files):
            path = Path(tmp) / f"file-{n}"
            _write_private(path, sent.data)
            names[str(path).encode()] = args[sent.at].encode()
            args[sent.at] = str(path)
        argv = [
            sys.executable,
            "-c",
            entry,
            "--acting-operator",
            str(operator),
            *call.command,
            # Before the operator's arguments: a last option given without its value
            # would otherwise take "--state" as that value.
            "--state",
            str(state_dir),
            *args,
        ]
        with trio.move_on_after(time_limit) as scope:
            returncode, out, err = await _child(argv)
        if scope.cancelled_caught:
            return error(
                504,
                Reason.REMOTE_CALL_TIMEOUT,
                f"'{' '.join(call.command)}' ran past {time_limit:.0f}s on the authority "
                "and was stopped",
            )
    stdout, stderr = bytes(out), bytes(err)
    for written, name in names.items():
        stdout, stderr = stdout.replace(written, name), stderr.replace(written, name)
    stdout, cut_out = _capped(stdout, "output", dropped=len(out) > KEEP)
    stderr, cut_err = _capped(stderr, "error output", dropped=len(err) > KEEP)
    answer = RunAnswer(_status(returncode), stdout, stderr + cut_out + cut_err)
    return Reply(200, answer.to_json())


async def _child(argv: list[str]) -> tuple[int, bytearray, bytearray]:
    """Run `argv`: its exit status, and what it printed up to a little past `MAX_OUTPUT`.

    The rest is read and dropped, so that the child never blocks on a full pipe
    and the control plane never holds more than the cap of it.
    """
    out, err = bytearray(), bytearray()
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                env=_child_env(),
                deliver_cancel=_terminate,
            )
        )
        assert process.stdout is not None and process.stderr is not None  # PIPE
        nursery.start_soon(_keep, process.stdout, out)
        nursery.start_soon(_keep, process.stderr, err)
    assert process.returncode is not None  # run_process returns once it has ended
    return process.returncode, out, err


async def _keep(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    """Up to one byte past `KEEP` (which says the rest was dropped) of `stream`."""
    async for chunk in stream:
        if len(into) <= KEEP:
            into += chunk[: KEEP + 1 - len(into)]


async def _terminate(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL if the command has not ended within a few seconds."""
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(5):
        await process.wait()
        return
    process.kill()
