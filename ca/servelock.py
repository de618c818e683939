"""One `meshid ca serve` per state directory.

Two control planes on one state directory would be two writers of one
database, each with its own view of the signer, the failure limits and the
root schedule. `ca serve` therefore holds an exclusive `flock` on
`STATE/serve.lock` for its whole life and writes its pid there, so that a
second one can say which process to stop. The lock belongs to the open file
description: the workers of `--workers N` inherit it from the parent, and the
kernel drops it when the last of them exits, however it exits (no stale lock
after a crash, unlike a bare pid file).

Other commands (`policy allow`, `ca token`, ...) never take this lock: they
write the database under its own transactions and the short `.lock` and
`.rotate.lock` locks, which are other files, so nothing here can deadlock
with them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from meshid.errors import StateError, StorageUnavailable

SERVE_LOCK = "serve.lock"


class ServeLock:
    """Held while the process (or a forked worker of it) lives; `release` lets go early."""

    def __init__(self, handle: IO[str]) -> None:
        self._handle = handle

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


def hold_serve_lock(state_dir: Path) -> ServeLock:
    """Take the state directory's serve lock, or fail in one line naming the holder's pid."""
    path = state_dir / SERVE_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageUnavailable(f"{path}: cannot open: {exc.strerror}") from None
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        handle.close()
        who = f"pid {holder}" if holder else "pid unknown"
        raise StateError(
            f"another meshid ca serve ({who}) is using {state_dir}; stop it first",
            reason="state_in_use",
        ) from None
    except OSError as exc:
        handle.close()
        raise StorageUnavailable(f"{path}: cannot lock: {exc.strerror}") from None
    with contextlib.suppress(OSError):  # the pid is a courtesy; the lock is what counts
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    return ServeLock(handle)


def _holder(handle: IO[str]) -> int | None:
    """The pid the holder wrote, if it has yet (it writes just after locking)."""
    try:
        handle.seek(0)
        text = handle.read(32).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
