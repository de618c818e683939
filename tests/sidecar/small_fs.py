"""A tiny real filesystem for host-fault tests: a tmpfs that can be filled and made read-only.

Real faults rather than mocks: the kernel answers ENOSPC and EROFS exactly as it
would on a node whose disk filled up. Mounting needs root; without it (or when
the mount fails, as in some containers) the test is skipped, not passed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = ".filler"


class SmallFs:
    def __init__(self, root: Path) -> None:
        self.root = root

    def fill(self) -> None:
        """Take every free byte (bounded: a tmpfs of a few hundred KiB fills in a few writes)."""
        chunk = b"\0" * 4096
        with (self.root / FILLER).open("ab", buffering=0) as handle:
            for _ in range(100_000):
                try:
                    handle.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
            else:
                raise AssertionError("the filesystem never filled")
        # A few bytes may still fit in the last partial page; take those too.
        with (self.root / FILLER).open("ab", buffering=0) as handle:
            for _ in range(4096):
                try:
                    handle.write(b"\0")
                except OSError:
                    break

    def free(self) -> None:
        (self.root / FILLER).unlink(missing_ok=True)

    def read_only(self) -> None:
        _run("mount", "-o", "remount,ro", str(self.root))

    def read_write(self) -> None:
        _run("mount", "-o", "remount,rw", str(self.root))

    def stray_temps(self) -> list[str]:
        """Files a failed write must not leave behind (write_atomic stages as .NAME.XXXX.tmp)."""
        return sorted(
            str(p.relative_to(self.root)) for p in self.root.rglob(".*.tmp") if p.is_file()
        )


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def small_fs(where: Path, size_kib: int = 256) -> Iterator[SmallFs]:
    """Mount a `size_kib` tmpfs on `where` for the duration; always unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield SmallFs(where)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30, check=False)
