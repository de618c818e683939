"""The audit of management calls tells the truth, and refusals cannot flood it.

An operator's run is audited once admitted, as refused when the operator is
busy, and again when it is stopped at its time limit. A workload knocking on
the management routes is audited once per window, the calls it made meanwhile
counted in the next row and every one in the refusal metric. Real TLS on
127.0.0.1, the real control plane and API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from ca_helpers import TD, Clock
from test_server import Plane, write_identity
from test_server_abuse import serving

from ca import adminrun
from meshid.spiffeid import SpiffeId
from sidecar.control import ControlPlaneError

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


# -- an operator's run: admitted, refused as busy, stopped at its limit --------------


async def test_a_run_refused_as_busy_is_audited_as_refused_not_as_run(
    plane: Plane, tmp_path: Path
) -> None:
    plane.authority.operator_add(ALICE)
    alice = write_identity(tmp_path / "alice", plane.authority, ALICE)
    start = len(plane.authority.store.audit_entries())
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
    plane.authority.operator_add(ALICE)
    alice = write_identity(tmp_path / "alice", plane.authority, ALICE)
    start = len(plane.authority.store.audit_entries())
    err = await _refusal(plane, "POST", "/v1/admin/run", RUN_LIST, identity=alice)
    assert (err.status, err.reason) == (504, "remote_call_timeout")
    admitted, stopped = _calls(plane, start)
    assert "refused" not in admitted and admitted["command"] == "policy list"
    assert stopped["command"] == "policy list" and stopped["stopped"] == "remote_call_timeout"
    assert not plane.server._runs.busy  # the slot is given back
