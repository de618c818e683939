"""Fixtures for whole-system runs: a `Mesh` of real processes, an echo app behind it,
and a throwaway PostgreSQL server for the authority's instances.

Every process a test starts is stopped in teardown (SIGTERM to its pid, then
SIGKILL), whatever the test did; the echo app runs in the test's nursery.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from harness import Addr, Mesh, Processes, serve_echo

from tests.ca.pg_cluster import PgCluster, running_cluster  # the authority tests' server


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


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL server per test worker, started on first use."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh, empty database on the worker's server, dropped after the test."""
    name = pg_cluster.create_database()
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)
