"""The audit log tells the truth about management calls, and no workload can flood it.

An operator's run is audited once admitted, as refused when the operator is
busy, and again when it is stopped at its time limit. A workload knocking on
the management routes is audited once per window, the calls it made meanwhile
counted in the next row and every one in the refusal metric. A workload whose
reports keep changing the addresses it advertises changes the map (an audit
row, and a policy version that wakes every watch) once per interval. Real TLS
on 127.0.0.1, the real control plane and API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from ca_helpers import TD, Clock
from test_server import Plane, write_identity
from test_server_abuse import serving

from ca import adminrun
from ca.api import ADVERTISE_CHANGE_INTERVAL, REFUSAL_AUDIT_WINDOW
from meshid.spiffeid import SpiffeId
from sidecar.control import ClientIdentity, ControlPlaneError

WEB = SpiffeId(TD, "/web")
ALICE = SpiffeId(TD, "/meshid/operator/alice")
RUN_LIST = {"command": ["policy", "list"], "args": [], "files": []}
POLICY_CHECK = {"action": "check", "from": "/web", "to": "/api"}


@pytest.fixture
async def plane(state: Path, clock: Clock) -> AsyncIterator[Plane]:
    async with serving(state, clock) as p:
        yield p


async def _refusal(plane: Plane, *args: Any, **kwargs: Any) -> ControlPlaneError:
    with pytest.raises(ControlPlaneError) as info:
        await plane.call(*args, **kwargs)
    return info.value


def _calls(plane: Plane, since: int = 0) -> list[dict[str, object]]:
    """The `operator_call` rows after the first `since` rows of the audit log."""
    entries = plane.authority.store.audit_entries()[since:]
    return [e.details for e in entries if e.action == "operator_call"]


def _refused_metric(plane: Plane, reason: str) -> float:
    value = plane.server.metrics.registry.get_sample_value(
        "meshid_ca_refusals_total", {"reason": reason}
    )
    return value or 0.0


def _operator_alice(plane: Plane, tmp_path: Path) -> tuple[ClientIdentity, int]:
    """Alice made an operator, her SVID, and how many audit rows there were before her call."""
    plane.authority.operator_add(ALICE)
    alice = write_identity(tmp_path / "alice", plane.authority, ALICE)
    return alice, len(plane.authority.store.audit_entries())


# -- an operator's run: admitted, refused as busy, stopped at its limit --------------


async def test_a_run_refused_as_busy_is_audited_as_refused_not_as_run(
    plane: Plane, tmp_path: Path
) -> None:
    alice, start = _operator_alice(plane, tmp_path)
    plane.server._runs.busy.add(ALICE)  # a command of alice's is running
    err = await _refusal(plane, "POST", "/v1/admin/run", RUN_LIST, identity=alice)
    assert (err.status, err.reason) == (429, "remote_call_busy")
    [refused] = _calls(plane, start)
    assert refused["operator"] == str(ALICE) and refused["command"] == "policy list"
    assert refused["refused"] == "remote_call_busy"
    # once the slot is free the same call runs, and its row says it was admitted
    plane.server._runs.busy.discard(ALICE)
    answer = await plane.call("POST", "/v1/admin/run", RUN_LIST, identity=alice)
    assert answer["exit"] == 0
    [_, admitted] = _calls(plane, start)
    assert admitted["command"] == "policy list" and admitted["args"] == []
    assert "refused" not in admitted and "stopped" not in admitted


async def test_a_run_stopped_at_its_time_limit_is_audited_as_stopped(
    plane: Plane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adminrun, "RUN_TIMEOUT", 0.0)
    alice, start = _operator_alice(plane, tmp_path)
    err = await _refusal(plane, "POST", "/v1/admin/run", RUN_LIST, identity=alice)
    assert (err.status, err.reason) == (504, "remote_call_timeout")
    admitted, stopped = _calls(plane, start)
    assert "refused" not in admitted and admitted["command"] == "policy list"
    assert stopped["command"] == "policy list" and stopped["stopped"] == "remote_call_timeout"
    assert not plane.server._runs.busy  # the slot is given back


async def test_an_operator_removed_while_its_call_waits_for_a_slot_is_refused(
    plane: Plane, tmp_path: Path
) -> None:
    alice, start = _operator_alice(plane, tmp_path)
    limiter = plane.server._runs.limiter
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for holder in holders:  # every slot taken: other operators' commands are running
        limiter.acquire_on_behalf_of_nowait(holder)
    refused: list[ControlPlaneError] = []

    async def call() -> None:
        refused.append(await _refusal(plane, "POST", "/v1/admin/run", RUN_LIST, identity=alice))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            while not limiter.statistics().tasks_waiting:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(0.01)
            plane.authority.operator_remove(ALICE)
            for holder in holders:
                limiter.release_on_behalf_of(holder)
    [err] = refused
    assert (err.status, err.reason) == (403, "not_operator")
    assert all("args" not in c for c in _calls(plane, start))  # never admitted, never run
    assert not plane.server._runs.busy


# -- a workload on the management routes: audited, but not once per call -------------


async def test_refused_management_calls_write_one_row_per_caller_per_window(
    plane: Plane, clock: Clock, tmp_path: Path
) -> None:
    web = write_identity(tmp_path / "web", plane.authority, WEB)
    start = len(plane.authority.store.audit_entries())
    refused_before = _refused_metric(plane, "not_operator")
    calls = 30
    for n in range(calls):  # a bounded probe, over both kinds of management route
        route = ("/v1/admin/run", RUN_LIST) if n % 2 else ("/v1/admin/policy", POLICY_CHECK)
        err = await _refusal(plane, "POST", *route, identity=web)
        assert (err.status, err.reason) == (403, "not_operator")
    [first] = _calls(plane, start)
    assert first["operator"] == str(WEB) and first["refused"] == "not_operator"
    assert "suppressed" not in first
    assert _refused_metric(plane, "not_operator") - refused_before == calls  # every one
    # another caller is audited on its own
    other = write_identity(tmp_path / "db", plane.authority, SpiffeId(TD, "/db"))
    await _refusal(plane, "POST", "/v1/admin/policy", POLICY_CHECK, identity=other)
    assert [c["operator"] for c in _calls(plane, start)] == [str(WEB), f"spiffe://{TD.name}/db"]
    # a window later the prober is audited again, with the calls left out meanwhile
    clock.advance(REFUSAL_AUDIT_WINDOW)
    await _refusal(plane, "POST", "/v1/admin/policy", POLICY_CHECK, identity=web)
    *_, again = _calls(plane, start)
    assert again["operator"] == str(WEB) and again["suppressed"] == calls - 1
    assert len(_calls(plane, start)) == 3


# -- a workload's reports: the addresses it advertises change the map at a bounded rate --


async def test_reports_that_keep_changing_their_addresses_change_the_map_once_per_interval(
    plane: Plane, clock: Clock, tmp_path: Path
) -> None:
    web = write_identity(tmp_path / "web", plane.authority, WEB)
    start = len(plane.authority.store.audit_entries())
    version = plane.authority.versions()[0]

    async def advertise(n: int) -> None:
        report = {"v": 1, "instance": "w1", "advertise": [f"198.18.0.{n}:8080"]}
        await plane.call("POST", "/v1/report", report, identity=web)

    for n in range(1, 21):  # a bounded flapping: every report says something new
        await advertise(n)
    entries = plane.authority.store.audit_entries()[start:]
    assert [e.action for e in entries] == ["service_advertised"]
    assert plane.authority.versions()[0] == version + 1  # the fleet was woken once
    assert [(s.host, s.port) for s in plane.authority.services()] == [("198.18.0.1", 8080)]
    # an interval later, the latest report is taken
    clock.advance(ADVERTISE_CHANGE_INTERVAL)
    await advertise(21)
    assert [(s.host, s.port) for s in plane.authority.services()] == [("198.18.0.21", 8080)]
    assert plane.authority.versions()[0] == version + 2
