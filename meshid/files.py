"""Writing state files so that a crash never leaves half a file, and keys are never readable.

The one piece of file I/O both the authority and the sidecar need: a file is
written beside its target and renamed over it, with its final mode from the
first byte on (a key is never 0644 even for a moment).

A write that fails (disk full, read-only filesystem, an I/O error) raises the
`OSError` and leaves the directory as it was: the target untouched, the
temporary file removed. Callers decide whether that ends anything.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_name(path: Path) -> Path:
    """Where `write_atomic` stages `path`: hidden, beside it, unique per write."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_temp_of(candidate: Path, target_name: str) -> bool:
    """True if `candidate` is a staging file `write_atomic` left for `target_name` (a crash)."""
    name = candidate.name
    prefix = f".{target_name}."
    if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
        return False
    token = name[len(prefix) : -len(TMP_SUFFIX)]
    return len(token) == 8 and all(c in "0123456789abcdef" for c in token)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        # The original error is the one worth reporting; a failed clean-up must not hide it.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    """Make the rename durable; best effort, as the data is already safely in place."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """A secret (a private key, a token): mode 0600, replaced atomically."""
    write_atomic(path, data, mode=0o600)
