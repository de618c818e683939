"""Fixtures for whole-system runs: a `Mesh` of real processes, an echo app behind it.

Every process a test starts is stopped in teardown (SIGTERM to its pid, then
SIGKILL), whatever the test did; the echo app runs in the test's nursery.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from harness import Addr, Mesh, Processes, serve_echo


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    procs = Processes()
    try:
        yield Mesh(tmp_path, procs)
    finally:
        await procs.stop_all()


@pytest.fixture
async def app(nursery: trio.Nursery) -> Addr:
    """Where the inbound sidecars forward: an echo server on 127.0.0.1."""
    addr: Addr = await nursery.start(serve_echo)
    return addr
