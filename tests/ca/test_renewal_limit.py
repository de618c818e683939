"""How often one identity may renew: a budget per SPIFFE ID, over real TLS to the real API.

A workload holding a valid SVID could otherwise renew in a loop, each time
with a fresh key, and grow the authority's tables and audit log at signing
speed. Past its budget it gets `429 renewal_rate_limited` with Retry-After,
and nothing is written; other identities are not touched; the budget comes
back with time. The budget lives in the database: every worker and every
instance spends from the same one.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from ca_helpers import Clock, query
from cryptography import x509
from test_server import API, WEB, csr_pem, refused, write_identity
from test_server_abuse import exchange, head_fields, post, serving

from ca.api import ControlApi, Request
from ca.authority import Authority
from ca.plane import parse_limits
from meshid.errors import InvalidInput
from meshid.ratelimit import TokenBucket

BACKENDS = ("sqlite", "postgresql")  # every test here runs on both engines


def _rows(state: Path) -> tuple[int, int]:
    svids = query(state, "SELECT COUNT(*) FROM svids")[0][0]
    audit = query(state, "SELECT COUNT(*) FROM audit")[0][0]
    assert isinstance(svids, int) and isinstance(audit, int)
    return svids, audit


async def test_renewing_in_a_loop_is_refused_past_the_budget_and_writes_nothing(
    state: Path, clock: Clock, tmp_path: Path
) -> None:
    # 3 renewals per SVID lifetime (1 h): a burst of 3, then one every 20 minutes
    async with serving(state, clock, renewals_per_identity=3) as plane:
        ident = write_identity(tmp_path / "web", plane.authority, WEB)
        before = _rows(state)
        with trio.fail_after(30):
            for _ in range(3):
                await plane.call("POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
            after_budget = _rows(state)
            for _ in range(7):  # a bounded loop past the budget
                raw = await exchange(
                    plane,
                    post("/v1/renew", json.dumps({"csr": csr_pem()}).encode()),
                    identity=ident,
                )
                status, fields, body = head_fields(raw)
                assert (status, json.loads(body)["error"]) == (429, "renewal_rate_limited")
                assert 1 <= int(fields["retry-after"]) <= 1200
        # three SVIDs (and their audit rows) were written, none for the seven refused
        assert after_budget[0] == before[0] + 3
        assert _rows(state) == after_budget
        refusals = [
            e
            for e in plane.log
            if e["event"] == "request" and e["reason"] == "renewal_rate_limited"
        ]
        assert len(refusals) == 7 and refusals[0]["spiffe_id"] == str(WEB)
        metrics = plane.server.metrics.registry.get_sample_value
        assert metrics("meshid_ca_refusals_total", {"reason": "renewal_rate_limited"}) == 7
        assert metrics("meshid_ca_renewals_total", {"result": "renewal_rate_limited"}) == 7

        # another identity has a budget of its own
        other = write_identity(tmp_path / "api", plane.authority, API)
        with trio.fail_after(10):
            await plane.call("POST", "/v1/renew", {"csr": csr_pem(API)}, identity=other)

        # a token comes back every 20 minutes (the SVID is still valid then)
        clock.advance(timedelta(minutes=19))
        err = await refused(plane, "POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
        assert (err.status, err.reason) == (429, "renewal_rate_limited")
        assert err.retry_after == pytest.approx(60, abs=1)  # as the sidecar's client reads it
        clock.advance(timedelta(minutes=1, seconds=1))
        with trio.fail_after(10):
            await plane.call("POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)


async def test_a_refused_renewal_spends_no_budget(
    state: Path, clock: Clock, tmp_path: Path
) -> None:
    """Only a renewal that is granted spends: a refused one (here, a CSR for another
    identity; or no client certificate at all) leaves the budget as it was."""
    async with serving(state, clock, renewals_per_identity=1) as plane:
        ident = write_identity(tmp_path / "web", plane.authority, WEB)
        with trio.fail_after(10):
            err = await refused(plane, "POST", "/v1/renew", {"csr": csr_pem()})
            assert err.reason == "no_client_certificate"
            for _ in range(3):
                err = await refused(
                    plane, "POST", "/v1/renew", {"csr": csr_pem(API)}, identity=ident
                )
                assert err.reason == "csr_identity_mismatch"
            await plane.call("POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
            err = await refused(plane, "POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
            assert err.reason == "renewal_rate_limited"


def test_the_renewal_budget_is_a_limit_an_operator_sets() -> None:
    assert parse_limits(["renewals_per_identity=50"]) == {"renewals_per_identity": 50}
    with pytest.raises(InvalidInput, match="renewals_per_identity: must be a whole number"):
        parse_limits(["renewals_per_identity=0"])


async def test_every_worker_spends_from_the_same_budget(
    state: Path, clock: Clock, tmp_path: Path
) -> None:
    """Two serving processes on one state (workers, or instances on PostgreSQL)."""
    async with (
        serving(state, clock, renewals_per_identity=2) as one,
        serving(state, clock, renewals_per_identity=2) as two,
    ):
        ident = write_identity(tmp_path / "web", one.authority, WEB)
        with trio.fail_after(20):
            await one.call("POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
            await two.call("POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
            for plane in (one, two):
                err = await refused(plane, "POST", "/v1/renew", {"csr": csr_pem()}, identity=ident)
                assert (err.status, err.reason) == (429, "renewal_rate_limited")


def test_the_last_renewal_left_is_spent_once_when_two_are_signed_together(
    state: Path, clock: Clock, tmp_path: Path
) -> None:
    """Both pass the look before signing; the transaction that records them lets one by."""
    authority = Authority.open(state, clock=clock)
    try:
        write_identity(tmp_path / "web", authority, WEB)
        cert = x509.load_pem_x509_certificates((tmp_path / "web" / "svid.pem").read_bytes())[0]
        api = ControlApi(authority, clock, clock.monotonic, renewals=TokenBucket(1, 3600.0))
        body = lambda: json.dumps({"csr": csr_pem()}).encode()  # noqa: E731
        batch = [Request("POST", "/v1/renew", {}, body(), "127.0.0.1", cert) for _ in range(2)]
        first, second = api.handle_batch(batch)
        assert first.status == 200
        assert (second.status, second.body["error"]) == (429, "renewal_rate_limited")
        assert ("retry-after", "3600") in second.headers
        serials = query(state, "SELECT COUNT(*) FROM svids WHERE how = 'renew'")
        assert serials == [(1,)]
    finally:
        authority.close()
