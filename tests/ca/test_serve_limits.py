"""`meshid ca serve --limit NAME=N`: the admission caps, sized to the mesh by the operator.

The defaults suit a mesh of a few thousand sidecars; a larger one, or sidecars
reaching the authority through a few NAT addresses, needs them higher. Raised
or lowered, a cap stays a cap: zero, negative and absurd values are refused.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
import trio
from ca_helpers import MESHID, TD, events_in, serving_process, wait_event

from ca.authority import Authority
from ca.plane import ServerOptions, parse_limits
from meshid.clock import system_clock
from meshid.errors import InvalidInput
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_to_pem, generate_key, key_to_pem
from meshid.wire import WatchQuery
from sidecar.control import ControlClient, ControlPlaneError, HeldIdentity


def test_limits_parse_into_server_options() -> None:
    limits = parse_limits(["max_watches=40000", "max_per_source=512", "max_watches=50000"])
    assert limits == {"max_watches": 50000, "max_per_source": 512}  # the last one wins
    options = ServerOptions("127.0.0.1", 0, **limits)
    assert (options.max_watches, options.max_per_source) == (50000, 512)
    assert options.max_connections == ServerOptions("127.0.0.1", 0).max_connections


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("max_watches", "--limit 'max_watches': expected NAME=N"),
        ("max_sockets=5", "--limit max_sockets: unknown; one of max_authenticated, "),
        ("max_watches=0", "--limit max_watches: must be a whole number from 1 to 1000000"),
        ("max_watches=-5", "--limit max_watches: must be a whole number from 1 to 1000000"),
        ("max_watches=lots", "--limit max_watches: must be a whole number from 1 to 1000000"),
        ("max_watches=1000001", "--limit max_watches: must be a whole number from 1 to 1000000"),
    ],
)
def test_a_bad_limit_is_refused_naming_it(item: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_limits([item])
    assert info.value.message.startswith(message), info.value.message
    assert info.value.reason == "invalid_input"


def _identity(state: Path, sid: SpiffeId) -> tuple[HeldIdentity, bytes]:
    authority = Authority.open(state, clock=system_clock())
    try:
        key = generate_key()
        issued = authority.issue(sid, key.public_key())
        return HeldIdentity(key_to_pem(key) + certs_to_pem(issued.chain)), issued.bundle.to_pem()
    finally:
        authority.close()


def _parked(metrics: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return float(re.search(r"^meshid_ca_watches (\S+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]


async def test_serve_enforces_the_limit_it_was_given(state: Path, tmp_path: Path) -> None:
    """`--limit max_watches_per_identity=1`: a second watch by one identity is refused 429,
    while another identity's watch is answered (the positive twin)."""
    web, api = SpiffeId(TD, "/web"), SpiffeId(TD, "/api")
    (web_id, bundle), (api_id, _) = _identity(state, web), _identity(state, api)
    log = tmp_path / "ca.log"
    extra = ("--limit", "max_watches_per_identity=1", "--metrics", "127.0.0.1:0")
    with serving_process(state, log, *extra) as proc:
        host, port = str(wait_event(log, "serving", proc, 30)["listen"]).rsplit(":", 1)
        metrics = str(wait_event(log, "metrics_serving", proc, 30)["listen"])
        client = ControlClient(host, int(port), TD)

        async def watch(identity: HeldIdentity, wait: float) -> dict[str, object]:
            return await client.request(
                "GET",
                WatchQuery(*versions, wait=wait).target() if versions else "/v1/watch",
                None,
                bundle_pem=bundle,
                now=system_clock().wall(),
                identity=identity,
                wait=wait + 10,
            )

        versions: tuple[int, int, int] | None = None
        first = await watch(web_id, 0)
        versions = (
            int(first["policy_version"]),  # type: ignore[call-overload]
            int(first["revocation_version"]),  # type: ignore[call-overload]
            int(first["bundle_sequence"]),  # type: ignore[call-overload]
        )
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, web_id, 25)
                while await trio.to_thread.run_sync(_parked, metrics) < 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                with pytest.raises(ControlPlaneError) as info:
                    await watch(web_id, 1)
                assert (info.value.status, info.value.reason) == (429, "too_many_watches")
                assert (await watch(api_id, 0.2))["policy_version"] == versions[0]
                nursery.cancel_scope.cancel()
    assert not events_in(log, "internal_error")


def test_serve_refuses_a_bad_limit_in_one_line(state: Path) -> None:
    done = subprocess.run(
        [
            MESHID,
            "ca",
            "serve",
            "--state",
            str(state),
            "--listen",
            "127.0.0.1:0",
            "--limit",
            "max_watches=0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "--limit max_watches: must be a whole number" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
