"""The SPIFFE bundle endpoint (`https_spiffe`) and the fetcher that reads it.

A real control plane with its bundle endpoint on 127.0.0.1 port 0, fetched
over real TLS: the fetcher authenticates the endpoint with the bundle it
holds and the configured endpoint ID, and a root rollover reaches it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from ca_helpers import TD, Clock

from ca.authority import Authority
from ca.bundle_endpoint import serve_bundle_endpoint
from ca.federation_fetch import fetch_bundle
from ca.roots import BUNDLE_RECHECK
from ca.server import ControlPlane, ServerOptions
from meshid.bundle import TrustBundle
from meshid.errors import MeshIdError
from meshid.federation import take_fetched
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import build_root, generate_key

ENDPOINT_ID = SpiffeId(TD, "/meshid/authority")


@asynccontextmanager
async def endpoint(state: Path, clock: Clock) -> AsyncIterator[tuple[str, Authority]]:
    """The control plane with its bundle endpoint; yields the endpoint's URL."""
    served = Authority.open(state, clock=clock)
    authority = Authority.open(state, clock=clock)
    log: list[dict[str, Any]] = []
    plane = ControlPlane(
        served,
        ServerOptions(host="127.0.0.1", port=0, poll_interval=0.05),
        log=lambda event, **f: log.append({"event": event, **f}),
        clock=clock,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        async with trio.open_nursery() as own:
            await own.start(plane.serve)
            _, port = await own.start(serve_bundle_endpoint, sock, plane, plane.log)
            yield f"https://127.0.0.1:{port}/", authority
            own.cancel_scope.cancel()
    finally:
        authority.close()
        served.close()


async def test_the_fetcher_reads_the_bundle_authenticated_by_the_held_one(
    state: Path, clock: Clock
) -> None:
    async with endpoint(state, clock) as (url, authority):
        held = authority.bundle()
        with trio.fail_after(10):
            fetched = await fetch_bundle(url, ENDPOINT_ID, held)
        assert fetched.same_roots(held)
        assert fetched.sequence == held.sequence
        assert fetched.refresh_hint == held.refresh_hint
        # A root rollover: the next root is published in the bundle the endpoint
        # serves, and the endpoint stays reachable with the bundle fetched before.
        authority.rotate(timedelta(hours=1))
        clock.advance(timedelta(seconds=BUNDLE_RECHECK + 1))  # the server's bundle cache
        rolled = authority.bundle()
        with trio.fail_after(10):
            again = await fetch_bundle(url, ENDPOINT_ID, take_fetched(held, fetched))
        assert again.sequence > fetched.sequence
        assert again.same_roots(rolled)
        assert len(again.roots) > len(fetched.roots)


async def test_a_wrong_endpoint_id_is_refused(state: Path, clock: Clock) -> None:
    async with endpoint(state, clock) as (url, authority):
        with trio.fail_after(10), pytest.raises(MeshIdError) as caught:
            await fetch_bundle(url, SpiffeId(TD, "/somebody/else"), authority.bundle())
    assert caught.value.reason == Reason.WRONG_ENDPOINT_ID


async def test_an_endpoint_outside_the_held_bundle_is_refused(state: Path, clock: Clock) -> None:
    stranger = build_root(
        TD,
        generate_key(),
        not_before=clock() - timedelta(days=1),
        not_after=clock() + timedelta(days=1),
    )
    async with endpoint(state, clock) as (url, _):
        with trio.fail_after(10), pytest.raises(MeshIdError) as caught:
            await fetch_bundle(url, ENDPOINT_ID, TrustBundle(TD, (stranger,)))
    assert caught.value.reason == Reason.UNTRUSTED_CERTIFICATE


async def test_an_unreachable_endpoint_says_so(authority: Authority) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))  # bound, never listening: refused
    port = sock.getsockname()[1]
    with trio.fail_after(10), pytest.raises(MeshIdError) as caught:
        await fetch_bundle(f"https://127.0.0.1:{port}/", ENDPOINT_ID, authority.bundle())
    sock.close()
    assert caught.value.reason == Reason.BUNDLE_ENDPOINT_UNREACHABLE
    assert "\n" not in caught.value.message


def test_a_sequence_going_backwards_is_not_taken(authority: Authority) -> None:
    held = authority.bundle()
    newer = TrustBundle(TD, held.roots, sequence=held.sequence + 1)
    assert take_fetched(held, newer) is newer
    with pytest.raises(MeshIdError) as caught:
        take_fetched(newer, held)
    assert caught.value.reason == Reason.BUNDLE_SEQUENCE_BACKWARDS
    with pytest.raises(MeshIdError) as caught:
        take_fetched(held, TrustBundle(TrustDomain("b.example"), held.roots, held.sequence + 1))
    assert caught.value.reason == Reason.INVALID_BUNDLE
