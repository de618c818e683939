"""Fixtures for the authority's tests: a hand-moved wall clock and a fresh authority."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ca_helpers import TD, Clock
from pg_cluster import PgCluster, running_cluster

from ca.authority import Authority
from ca.backend import Database


@pytest.fixture
def clock() -> Clock:
    # real time, so that openssl and py-spiffe, which read the real clock, agree
    return Clock(datetime.now(UTC).replace(microsecond=0))


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


@pytest.fixture
def backend() -> str:
    """The engine `state` uses: SQLite, unless MESHID_TEST_BACKEND says otherwise, or the
    module runs on every engine (`pytest_generate_tests`)."""
    return os.environ.get("MESHID_TEST_BACKEND", "sqlite")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets `BACKENDS = ("sqlite", "postgresql")` runs each test on each."""
    engines = getattr(metafunc.module, "BACKENDS", None)
    if engines and "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", engines)


@pytest.fixture
def database(backend: str, request: pytest.FixtureRequest) -> Database | None:
    """Where a test's authority keeps its state: a fresh PostgreSQL database, or None (SQLite)."""
    if backend == "postgresql":
        return Database(url=request.getfixturevalue("pg_url"), instance="one")
    return None


@pytest.fixture
def state(tmp_path: Path, clock: Clock, database: Database | None) -> Path:
    """An initialised authority's state directory (no connection left open)."""
    path = tmp_path / "state"
    Authority.init(path, TD, clock=clock, database=database).close()
    return path


@pytest.fixture
def authority(state: Path, clock: Clock) -> Iterator[Authority]:
    opened = Authority.open(state, clock=clock)
    yield opened
    opened.close()


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own (root only), unmounted whatever happens."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
