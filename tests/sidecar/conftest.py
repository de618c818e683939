"""Fixtures for the sidecar's end-to-end tests: our authority, running sidecars, a local app.

`pki` is one authority for the whole session (its root is backdated a day so
that expired and not-yet-valid leaves can be signed by it). `mesh` starts real
`Sidecar` objects in static mode, each with its own files, a decision log
captured in memory, listeners on 127.0.0.1 port 0 and short reload/sweep
intervals; they are cancelled with the test's nursery. `pair` is the usual
topology: app -> web's outbound -> api's inbound -> echo backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from sidecar_helpers import (
    TD,
    Backend,
    utcnow,
)
from sidecar_mesh import Mesh, Pair, Pki, start_pair

from ca.authority import Authority
from meshid.clock import ManualClock, system_clock


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    state = tmp_path_factory.mktemp("authority") / "state"
    born = utcnow() - timedelta(days=1)
    Authority.init(state, TD, clock=ManualClock(born)).close()
    authority = Authority.open(state, clock=system_clock())
    _, root, key = authority.signer()
    yield Pki(authority, root, key)
    authority.close()


@pytest.fixture
async def mesh(nursery: trio.Nursery, pki: Pki, tmp_path: Path) -> Mesh:
    return Mesh(nursery, pki, tmp_path / "mesh")


@pytest.fixture
async def backend(nursery: trio.Nursery) -> Backend:
    app = Backend()
    await nursery.start(app.serve)
    return app


@pytest.fixture
async def pair(mesh: Mesh, backend: Backend) -> Pair:
    return await start_pair(mesh, backend)
