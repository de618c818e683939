"""Writing state files so that a crash never leaves half a file, and keys are never readable.

The one piece of file I/O both the authority and the sidecar need: a file is
written beside its target and renamed over it, with its final mode from the
first byte on (a key is never 0644 even for a moment).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_private(path: Path, data: bytes) -> None:
    """A secret (a private key, a token): mode 0600, replaced atomically."""
    write_atomic(path, data, mode=0o600)
