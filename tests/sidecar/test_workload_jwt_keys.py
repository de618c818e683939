"""An enrolled sidecar's JWT keys: a token validated while the first fetch is in flight.

The sidecar fetches the trust domain's JWT keys from the authority as it
starts. A workload that mints a token and validates it at once used to find
no key for its kid and was refused, because a fetch had "just" been made (the
one still in flight) and another was not yet due. Now it waits for that
fetch. Real keys and tokens; the authority's answer is held back by the test.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import ec

from meshid.events import EventLog
from meshid.jwtsvid import claims, key_id, public_jwk, sign
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.wire import BUNDLE
from sidecar.workload.jwt import ControlPlaneJwt
from sidecar.workload.service import WorkloadFeed

TD = TrustDomain("example.org")
WEB = SpiffeId(TD, "/web")
NOW = datetime.now(UTC).replace(microsecond=0)


class Host:
    identity = WEB
    events = EventLog(io.StringIO())

    def wall_now(self) -> datetime:
        return NOW


async def test_a_token_validated_during_the_first_fetch_waits_for_it() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    kid = key_id(key.public_key())
    answer = trio.Event()
    asked: list[str] = []

    async def call(method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        asked.append(path)
        await answer.wait()  # the authority's answer, held back
        return {"keys": [public_jwk(key.public_key(), kid)]}

    keys = ControlPlaneJwt(Host(), call, WorkloadFeed(), min_refetch=5.0)
    token = sign(claims(WEB, ["db"], NOW), key, kid)
    validated: list[tuple[str, dict[str, object]]] = []

    async def validate() -> None:
        validated.append(await keys.validate(token, "db"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keys.fetch)  # the first fetch, as the sidecar starts
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(validate)  # a token minted meanwhile
            await trio.testing.wait_all_tasks_blocked()
            assert validated == []  # waiting for the keys, not refused
            answer.set()
    [(subject, verified)] = validated
    assert subject == str(WEB) and verified["aud"] == ["db"]
    assert asked == [BUNDLE]  # one fetch served both
