"""`meshid ca serve` rolls a short-lived root by itself: a real process, real time.

The shortest root the authority allows is 31s (longer than the shortest SVID,
30s). Such a root is due for rotation as soon as it exists: the next root is
published within the first poll, and signs after the minimum propagation
delay of 15s, long before the old root's 31s are up.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from ca_helpers import events_in, run, serving_process, wait_event

from meshid.svid import certs_from_pem

_events, _wait_event, _serving = events_in, wait_event, serving_process


def _init_shortest(state: Path) -> None:
    result = run(
        "ca", "init", "--state", str(state), "--trust-domain", "example.org",
        "--svid-ttl", "30s", "--root-ttl", "31s",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_serve_help_documents_the_switch() -> None:
    result = run("ca", "serve", "--help")
    assert "--auto-rotate / --no-auto-rotate" in result.output


def test_serve_publishes_the_next_root_of_a_short_lived_one(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "ca.log"
    _init_shortest(state)
    with _serving(state, log, "--workers", "2") as proc:
        prepared = _wait_event(log, "root_prepared", proc, 20, generation=2)
        assert prepared["reason"] == "root_rotation_due" and prepared["replaces"] == 1
        roots = certs_from_pem((state / "bundle.pem").read_bytes(), "bundle")
        assert len(roots) == 2
        _wait_event(log, "root_active", proc, 20, worker=1)
        _wait_event(log, "root_active", proc, 20, worker=0)
        assert len(_events(log, "root_prepared")) == 1
    assert proc.returncode == 0


def test_no_auto_rotate_leaves_the_root_alone(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "ca.log"
    _init_shortest(state)
    with _serving(state, log, "--no-auto-rotate") as proc:
        # The keeper logs this on its first look; with rotation on, a root this short
        # would be replaced in that same look.
        active = _wait_event(log, "root_active", proc, 20, generation=1)
        assert active["auto_rotate"] is False
    assert proc.returncode == 0
    assert not _events(log, "root_prepared")
    assert len(certs_from_pem((state / "bundle.pem").read_bytes(), "bundle")) == 1


@pytest.mark.slow
def test_serve_activates_the_next_root_before_the_old_one_expires(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "ca.log"
    _init_shortest(state)
    with _serving(state, log) as proc:
        first = _wait_event(log, "root_active", proc, 20, generation=1)
        activated = _wait_event(log, "root_activated", proc, 40, generation=2)
        when = datetime.fromisoformat(str(activated["time"]))
        assert when < datetime.fromisoformat(str(first["not_after"])) - timedelta(seconds=10)
        # Root 1 is gone from the bundle once its last SVID has expired; nothing ever stopped.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            roots = certs_from_pem((state / "bundle.pem").read_bytes(), "bundle")
            if all("root 1 " not in r.subject.rfc4514_string() for r in roots):
                break
            assert proc.poll() is None
            time.sleep(0.2)
        else:
            raise AssertionError(log.read_text())
        assert not _events(log, "root_rotation_failed") and not _events(log, "root_expired")
