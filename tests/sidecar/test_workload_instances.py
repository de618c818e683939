"""The Workload API of sidecars on two instances of one trust domain (PostgreSQL).

Each authority instance signs JWT-SVIDs with keys of its own; a token minted
through one instance's sidecar must validate in a sidecar of the other. Two
control planes in this process, one sidecar on each, py-spiffe as the client.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from sidecar_helpers import TD, LogCapture, fmt, utcnow
from spiffe import WorkloadApiClient
from spiffe.workloadapi.errors import ValidateJwtSvidError
from workload_helpers import short_dir

from ca.authority import Authority
from ca.backend import Database
from ca.server import ControlPlane, ServerOptions
from meshid.clock import ManualClock, system_clock
from meshid.events import EventLog
from meshid.jwtsvid import claims, sign
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.dynamic import Pacing
from sidecar.schedule import Schedule
from tests.ca.pg_cluster import PgCluster, running_cluster

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg: PgCluster) -> Iterator[str]:
    name = pg.create_database()
    yield pg.url(name)
    pg.drop_database(name)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


async def _serve_sidecar(
    nursery: trio.Nursery, tmp_path: Path, socket: Path, authority: Authority, who: SpiffeId
) -> None:
    """A sidecar for `who`, enrolled through `authority`'s own control plane."""
    plane = ControlPlane(
        authority,
        ServerOptions(host="127.0.0.1", port=0, poll_interval=0.05, request_timeout=5.0),
        log=lambda event, **fields: None,
        clock=system_clock(),
    )
    addr = await nursery.start(plane.serve)
    config_dir = tmp_path / who.path.strip("/")
    config_dir.mkdir()
    (config_dir / "bundle.pem").write_bytes(authority.bundle().to_pem())
    (config_dir / "token").write_text(authority.create_token(who))
    doc = {
        "identity": who.path.strip("/"),
        "trust_domain": TD.name,
        "authority": {
            "server": fmt(addr),
            "bundle": "bundle.pem",
            "token_file": "token",
            "state_dir": str(config_dir / "state"),
        },
        "workload_api": {"socket": str(socket), "allow_uids": [os.getuid()]},
    }
    sidecar = Sidecar(
        parse_config(doc, config_dir),
        events=EventLog(LogCapture()),
        pacing=Pacing(schedule=Schedule(backoff_initial=0.02, backoff_max=0.05)),
    )
    await nursery.start(sidecar.run)


@pytest.fixture
async def two_sidecars(
    tmp_path: Path, pg_url: str, sock_dir: Path
) -> AsyncIterator[tuple[Path, Path]]:
    """The Workload API sockets of a sidecar on instance one and one on instance two."""
    born = ManualClock(utcnow() - timedelta(days=1))
    Authority.init(tmp_path / "one", TD, clock=born, database=Database(pg_url, "one")).close()
    Authority.join(
        tmp_path / "two",
        Database(pg_url, "two"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(0),
        clock=born,
    ).close()
    one = Authority.open(tmp_path / "one", clock=system_clock())
    two = Authority.open(tmp_path / "two", clock=system_clock())
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await _serve_sidecar(nursery, tmp_path, sock_dir / "one.sock", one, WEB)
                await _serve_sidecar(nursery, tmp_path, sock_dir / "two.sock", two, API)
            yield sock_dir / "one.sock", sock_dir / "two.sock"
            nursery.cancel_scope.cancel()
    finally:
        one.close()
        two.close()


async def test_a_jwt_svid_from_one_instance_validates_in_a_sidecar_of_the_other(
    two_sidecars: tuple[Path, Path],
) -> None:
    on_one, on_two = two_sidecars
    unknown_key = generate_key()
    forged = sign(claims(API, ["db"], utcnow()), unknown_key, "a-kid-no-instance-published")

    def run() -> dict[str, str]:
        results: dict[str, str] = {}
        with (
            WorkloadApiClient(f"unix://{on_one}") as one,
            WorkloadApiClient(f"unix://{on_two}") as two,
        ):
            by_two = two.fetch_jwt_svid({"db"}).token  # signed by instance two
            by_one = one.fetch_jwt_svid({"db"}).token
            results["two_in_one"] = str(one.validate_jwt_svid(by_two, "db").spiffe_id)
            results["one_in_two"] = str(two.validate_jwt_svid(by_one, "db").spiffe_id)
            try:
                one.validate_jwt_svid(forged, "db")
                results["forged"] = "accepted"
            except ValidateJwtSvidError as exc:
                results["forged"] = str(exc)
        return results

    with trio.fail_after(30):
        results = await trio.to_thread.run_sync(run)
    assert results["two_in_one"] == str(API)
    assert results["one_in_two"] == str(WEB)
    assert results["forged"] != "accepted" and "kid" in results["forged"].lower()
