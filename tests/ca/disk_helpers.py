"""A real full disk for tests: fill a filesystem to its last byte, give the bytes back."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fill(disk: Path) -> Path:
    """Take every free byte of `disk`; the file to remove to give them back."""
    path = disk / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * 65536):
                pass
    finally:
        os.close(fd)
    return path
