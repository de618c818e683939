"""`meshid federation add|list|remove|refresh` against a real bundle endpoint.

b.example's authority serves its bundle endpoint in this process; the CLI
runs for example.org's state in a worker thread (it runs its own event loop).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import trio
from ca_helpers import Clock, run, snapshot
from click.testing import Result
from test_bundle_endpoint import endpoint

from ca.authority import Authority
from ca.roots import BUNDLE_RECHECK
from meshid.spiffeid import TrustDomain

B = TrustDomain("b.example")
B_ENDPOINT = "spiffe://b.example/meshid/authority"


@pytest.fixture
def b_state(tmp_path: Path, clock: Clock) -> Path:
    path = tmp_path / "b-state"
    Authority.init(path, B, clock=clock).close()
    return path


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` (the caller bounds the wait with trio.fail_after)."""
    for _ in range(10_000):
        if condition():
            return
        await trio.sleep(0.05)
    raise AssertionError("condition never held")


async def cli(*args: str) -> Result:
    return await trio.to_thread.run_sync(partial(run, *args))


def _bootstrap(b_state: Path, clock: Clock, tmp_path: Path) -> Path:
    b = Authority.open(b_state, clock=clock)
    try:
        path = tmp_path / "b-bundle.json"
        path.write_text(b.bundle().to_spiffe_json())
    finally:
        b.close()
    return path


async def test_add_list_refresh_remove(
    state: Path, b_state: Path, clock: Clock, tmp_path: Path
) -> None:
    bundle = _bootstrap(b_state, clock, tmp_path)
    async with endpoint(b_state, clock) as (url, b_authority):
        with trio.fail_after(30):
            added = await cli(
                "federation", "add", "b.example", "--url", url,
                "--endpoint-id", B_ENDPOINT, "--bundle", str(bundle), "--state", str(state),
            )  # fmt: skip
            assert added.exit_code == 0, added.output
            listed = await cli("federation", "list", "--json", "--state", str(state))
            [row] = json.loads(listed.output)
            assert row["trust_domain"] == "b.example"
            assert row["endpoint_id"] == B_ENDPOINT
            assert row["stale"] is False
            first = row["sequence"]
            b_authority.rotate(timedelta(hours=1))  # a root rollover in b.example
            clock.advance(timedelta(seconds=BUNDLE_RECHECK + 1))  # the server's bundle cache
            refreshed = await cli("federation", "refresh", "b.example", "--state", str(state))
            assert refreshed.exit_code == 0, refreshed.output
            [row] = json.loads(
                (await cli("federation", "list", "--json", "--state", str(state))).output
            )
            assert row["sequence"] > first
            assert row["roots"] == 2
    # The endpoint is gone: a refresh fails, says so, and keeps the last good bundle.
    with trio.fail_after(30):
        failed = await cli("federation", "refresh", "--state", str(state))
        assert failed.exit_code == 1
        assert "bundle_endpoint_unreachable" in failed.output
        assert f"keeping bundle sequence {row['sequence']}" in failed.output
        [after] = json.loads(
            (await cli("federation", "list", "--json", "--state", str(state))).output
        )
        assert after["sequence"] == row["sequence"]
        assert after["failures"] == 1
        assert after["last_error"] == "bundle_endpoint_unreachable"
        removed = await cli("federation", "remove", "b.example", "--state", str(state))
        assert removed.exit_code == 0, removed.output
        listed = await cli("federation", "list", "--json", "--state", str(state))
        assert json.loads(listed.output) == []


@pytest.mark.parametrize("case", ["own_domain", "malformed_bundle", "unreachable", "wrong_id"])
async def test_bad_input_is_one_line_and_changes_nothing(
    case: str, state: Path, b_state: Path, clock: Clock, tmp_path: Path
) -> None:
    bundle = _bootstrap(b_state, clock, tmp_path)
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"keys": [{"use": "x509-svid", "x5c": ["not base64!"]}]}')
    async with endpoint(b_state, clock) as (url, _):
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        closed = f"https://127.0.0.1:{sock.getsockname()[1]}/"
        td, where, eid, file = {
            "own_domain": ("example.org", url, "spiffe://example.org/meshid/authority", bundle),
            "malformed_bundle": ("b.example", url, B_ENDPOINT, garbage),
            "unreachable": ("b.example", closed, B_ENDPOINT, bundle),
            "wrong_id": ("b.example", url, "spiffe://b.example/someone", bundle),
        }[case]
        before = snapshot(state)
        with trio.fail_after(30):
            result = await cli(
                "federation", "add", td, "--url", where, "--endpoint-id", eid,
                "--bundle", str(file), "--state", str(state),
            )  # fmt: skip
        sock.close()
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert snapshot(state) == before


async def test_the_serving_authority_refreshes_when_due_and_keeps_the_last_good(
    state: Path, b_state: Path, clock: Clock, tmp_path: Path
) -> None:
    from ca.federation_refresh import refresh_federated_bundles
    from ca.server import ControlPlane, ServerOptions

    bundle = _bootstrap(b_state, clock, tmp_path)
    a = Authority.open(state, clock=clock)
    log: list[dict[str, object]] = []
    plane = ControlPlane(
        a,
        ServerOptions(host="127.0.0.1", port=0),
        log=lambda event, **f: log.append({"event": event, **f}),
        clock=clock,
    )
    try:
        async with endpoint(b_state, clock) as (url, _):
            with trio.fail_after(30):
                added = await cli(
                    "federation", "add", "b.example", "--url", url,
                    "--endpoint-id", B_ENDPOINT, "--bundle", str(bundle), "--state", str(state),
                )  # fmt: skip
                assert added.exit_code == 0, added.output
                first = a.federation(B)
                assert first.fetched_at is not None
                async with trio.open_nursery() as nursery:
                    await nursery.start(refresh_federated_bundles, plane, plane.log)
                    await trio.sleep(0.3)
                    assert a.federation(B).fetched_at == first.fetched_at  # not due yet
                    # `federation add` ran as a command, on the host's clock: move ours
                    # past the refresh it scheduled, however long the command took.
                    clock.advance(
                        max(first.next_refresh - clock.wall(), timedelta(0)) + timedelta(seconds=1)
                    )
                    await until(lambda: a.federation(B).fetched_at != first.fetched_at)
                    nursery.cancel_scope.cancel()
        refreshed = a.federation(B)
        assert (refreshed.failures, refreshed.last_error) == (0, None)
        assert refreshed.next_refresh > first.next_refresh
        # The endpoint is gone: the next due refresh fails and keeps the last good bundle.
        good = a.federation(B)
        clock.advance(max(good.next_refresh - clock.wall(), timedelta(0)) + timedelta(seconds=1))
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(refresh_federated_bundles, plane, plane.log)
                await until(lambda: a.federation(B).failures > 0)
                nursery.cancel_scope.cancel()
        after = a.federation(B)
        assert after.bundle.sequence == good.bundle.sequence
        assert after.last_error == "bundle_endpoint_unreachable"
        assert after.next_refresh > good.next_refresh  # backed off
        [failed] = [e for e in log if e["event"] == "federation_refresh_failed"]
        assert failed["reason"] == "bundle_endpoint_unreachable"
        assert failed["keeping_sequence"] == good.bundle.sequence
        # Two refresh hints without a good fetch: `ca status` warns, naming the domain.
        from ca.status import render_status

        assert not any("stale" in line for line in render_status(a))
        clock.advance(timedelta(seconds=2 * good.bundle.refresh_hint))
        [stale] = [line for line in render_status(a) if "stale" in line]
        assert "b.example" in stale
        assert "bundle_endpoint_unreachable" in stale
    finally:
        a.close()
