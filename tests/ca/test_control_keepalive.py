"""The sidecar's control client keeps its TLS connection to the authority alive.

Real TLS on 127.0.0.1 against a real `ControlPlane`, which counts the
connections it accepted and the client certificate each one carried.
"""

from __future__ import annotations

import os
import resource
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from ca_helpers import TD, Clock
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ca.authority import Authority
from ca.server import ControlPlane, ServerOptions
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_to_pem, generate_key, key_to_pem
from meshid.wire import BUNDLE, RENEW, WatchQuery
from sidecar.control import ControlClient, ControlPlaneError, HeldIdentity
from sidecar.controlpool import POOL_IDLE, POOL_SIZE
from sidecar.dynamic import build_csr

WEB = SpiffeId(TD, "/web")


class CountingPlane(ControlPlane):
    """The control plane, noting every authenticated connection: its certificate, its end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.serials: list[int] = []
        self.closed = 0
        self.changed = trio.Event()

    async def _serve_http(
        self, stream: trio.SSLStream[trio.SocketStream], source: str, cert: x509.Certificate | None
    ) -> None:
        if cert is not None:
            self.serials.append(cert.serial_number)
        try:
            await super()._serve_http(stream, source, cert)
        finally:
            self.closed += 1
            self.changed.set()
            self.changed = trio.Event()


@dataclass
class Served:
    server: CountingPlane
    authority: Authority
    port: int
    bundle_pem: bytes
    clock: Clock
    client: ControlClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = ControlClient("127.0.0.1", self.port, TD, pool_size=POOL_SIZE)

    async def get(self, identity: HeldIdentity, target: str = BUNDLE) -> dict[str, Any]:
        return await self.client.request(
            "GET", target, None, bundle_pem=self.bundle_pem, now=self.clock(), identity=identity
        )

    async def wait_closed(self, count: int) -> None:
        with trio.fail_after(5):
            while self.server.closed < count:
                await self.server.changed.wait()


def held(authority: Authority, sid: SpiffeId = WEB) -> HeldIdentity:
    key = generate_key()
    issued = authority.issue(sid, key.public_key())
    return HeldIdentity(key_to_pem(key) + certs_to_pem(issued.chain))


def serial(identity: HeldIdentity) -> int:
    return x509.load_pem_x509_certificate(identity.pem).serial_number


async def open_plane(
    state: Path, clock: Clock, nursery: trio.Nursery, **options: Any
) -> tuple[CountingPlane, int]:
    server = CountingPlane(
        Authority.open(state, clock=clock),
        ServerOptions(host="127.0.0.1", request_timeout=1.0, poll_interval=0.05, **options),
        log=lambda event, **f: None,
        clock=clock,
    )
    _host, port = await nursery.start(server.serve)
    return server, port


@asynccontextmanager
async def serving(state: Path, clock: Clock, **options: Any) -> AsyncIterator[Served]:
    """A control plane on a free port, and the authority beside it the test changes."""
    authority = Authority.open(state, clock=clock)
    async with trio.open_nursery() as own:
        server, port = await open_plane(state, clock, own, port=0, **options)
        served = Served(server, authority, port, authority.bundle().to_pem(), clock)
        yield served
        served.client.drop()
        own.cancel_scope.cancel()
    server.authority.close()
    authority.close()


@pytest.fixture
async def served(state: Path, clock: Clock) -> AsyncIterator[Served]:
    async with serving(state, clock, idle_timeout=0.5) as served:
        yield served


async def test_sequential_requests_share_one_connection(served: Served) -> None:
    ident = held(served.authority)
    with trio.fail_after(20):
        for _ in range(20):
            assert "keys" in await served.get(ident)
    assert served.server.serials == [serial(ident)]


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """This process holds over 1,024 descriptors, as a sidecar proxying many connections
    does: the next socket's number is past what select() can watch."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("RLIMIT_NOFILE too low to hold 1,100 descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_connection_numbered_past_1024_is_kept_too(
    served: Served, many_descriptors: None
) -> None:
    """Whether the authority closed an idle connection is asked without select(), whose
    sets stop at 1,024: past it every kept connection looked closed, and each request
    paid a new handshake."""
    ident = held(served.authority)
    with trio.fail_after(20):
        for _ in range(5):
            assert "keys" in await served.get(ident)
    assert served.server.serials == [serial(ident)]


async def test_another_identity_gets_its_own_connection(served: Served) -> None:
    first, second = held(served.authority), held(served.authority)
    with trio.fail_after(10):
        await served.get(first)
        await served.get(second)
        await served.get(second)
        # the connection of the identity no longer used is closed, not kept
        await served.wait_closed(1)
    assert served.server.serials == [serial(first), serial(second)]


async def test_after_a_renewal_new_connections_carry_the_new_svid(served: Served) -> None:
    ident = held(served.authority)
    with trio.fail_after(10):
        await served.get(ident)
        key = generate_key()
        reply = await served.client.request(
            "POST",
            RENEW,
            {"csr": build_csr(key, WEB).decode()},
            bundle_pem=served.bundle_pem,
            now=served.clock(),
            identity=ident,
        )
        renewed = HeldIdentity(key_to_pem(key) + reply["svid"].encode())
        await served.get(renewed)
        await served.wait_closed(1)
    assert served.server.serials == [serial(ident), serial(renewed)]
    assert serial(renewed) != serial(ident)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_connection_the_server_closed_idle_is_replaced(served: Served, method: str) -> None:
    ident = held(served.authority)
    with trio.fail_after(10):
        await served.get(ident)
        await served.wait_closed(1)  # the authority's idle timeout (0.5 s here)
        if method == "GET":
            assert "keys" in await served.get(ident)
        else:
            reply = await served.client.request(
                "POST",
                RENEW,
                {"csr": build_csr(generate_key(), WEB).decode()},
                bundle_pem=served.bundle_pem,
                now=served.clock(),
                identity=ident,
            )
            assert "svid" in reply
    assert served.server.serials == [serial(ident)] * 2


async def test_an_authority_restarted_on_the_same_port_is_reached_again(
    state: Path, clock: Clock
) -> None:
    authority = Authority.open(state, clock=clock)
    ident = held(authority)
    try:
        with trio.fail_after(15):
            async with trio.open_nursery() as first:
                server, port = await open_plane(state, clock, first, port=0)
                served = Served(server, authority, port, authority.bundle().to_pem(), clock)
                await served.get(ident)
                first.cancel_scope.cancel()
            server.authority.close()
            async with trio.open_nursery() as second:
                again, _ = await open_plane(state, clock, second, port=port)
                assert "keys" in await served.get(ident)
                assert again.serials == [serial(ident)]
                assert served.client.idle() == 1
                served.client.drop()
                second.cancel_scope.cancel()
            again.authority.close()
    finally:
        authority.close()


async def test_a_kept_connection_does_not_outlive_a_revocation(served: Served) -> None:
    """The authority judges the caller's certificate on every request, not only at the
    handshake: the request after a revocation, on the same connection, is refused."""
    ident = held(served.authority)
    feed = WatchQuery(wait=0).target()
    with trio.fail_after(10):
        assert "policy_version" in await served.get(ident, feed)
        served.authority.revoke(WEB)
        with pytest.raises(ControlPlaneError) as info:
            await served.get(ident, feed)
    assert info.value.reason == "identity_revoked"
    assert served.server.serials == [serial(ident)]  # the same connection


async def test_a_connection_idle_past_our_own_timeout_is_not_used(served: Served) -> None:
    """Ours is shorter than the authority's, so it is not the authority that closes a
    connection just as a request goes out on it."""
    assert ServerOptions("127.0.0.1", 0).idle_timeout > POOL_IDLE
    ident = held(served.authority)
    served.client.pool_idle = 0.0  # every kept connection has been idle too long
    with trio.fail_after(10):
        await served.get(ident)
        await served.get(ident)
        await served.wait_closed(1)  # closed by us, not left to the authority
    assert served.server.serials == [serial(ident)] * 2


async def test_the_callers_id_is_read_once_per_kept_connection(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every watch on a kept connection carries the same certificate: the ID in it and its
    fingerprint are read when the connection starts, not by each watch (a change wakes
    them all at once)."""
    import ca.dispatch
    import ca.httpshell
    import ca.issuance

    read: list[object] = []

    def counted(module: Any) -> None:
        real = module.leaf_spiffe_id

        def leaf_spiffe_id(cert: x509.Certificate) -> SpiffeId:
            read.append(cert)
            return real(cert)

        monkeypatch.setattr(module, "leaf_spiffe_id", leaf_spiffe_id)

    counted(ca.dispatch)
    counted(ca.httpshell)
    given: list[bytes | None] = []  # the fingerprint each check was handed
    verified_caller = ca.issuance.Issuance.verified_caller

    def handed(self: Any, cert: x509.Certificate, *args: Any, **kwargs: Any) -> SpiffeId:
        given.append(kwargs.get("fingerprint"))
        return verified_caller(self, cert, *args, **kwargs)

    monkeypatch.setattr(ca.issuance.Issuance, "verified_caller", handed)
    ident = held(served.authority)
    target = WatchQuery(*served.authority.versions(), wait=0).target()
    with trio.fail_after(20):
        for _ in range(4):
            feed = await served.get(ident, target)
            assert feed["policy_version"] == served.authority.versions()[0]
    assert served.server.serials == [serial(ident)]
    assert len(read) == 1
    cert = x509.load_pem_x509_certificate(ident.pem)
    assert len(given) >= 4 and set(given) == {cert.fingerprint(hashes.SHA256())}
