"""A host that cannot write (disk full, read-only): one clean error, nothing half-written.

The authority lives on a small tmpfs of its own, which the test fills up or
remounts read-only; every write path must roll back and raise
`StorageUnavailable`, and work again once there is room.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from ca_helpers import TD, Clock, make_csr, run, snapshot

from ca.authority import Authority
from meshid.errors import StorageUnavailable
from meshid.report import StatusReport, parse_report
from meshid.spiffeid import SpiffeId

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem of the test's own."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mountpoint))
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=30)


def _fill(disk: Path) -> Path:
    """Write until the filesystem refuses; returns the filler file to delete later."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (65536, 512, 1):  # big blocks, then the last partial one
            for _ in range(1024):  # bounded: far more than the 4 MiB the mount holds
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
            else:
                pytest.fail("the tmpfs never filled up")
    finally:
        os.close(fd)
    return filler


def _report(instance: str) -> StatusReport:
    return parse_report({"instance": instance, "bundle_sequence": 1})


WRITES: dict[str, Callable[[Authority], object]] = {
    "report": lambda a: a.record_report(WEB, _report("w1")),
    "token": lambda a: a.create_token(WEB),
    "allow": lambda a: a.allow(WEB, API),
    "revoke": lambda a: a.revoke(API),
    "issue": lambda a: a.issue(WEB, make_csr()[0].public_key()),
    "rotate": lambda a: a.rotate(timedelta(minutes=1)),
}
SINGLE = ("allow", "revoke", "rotate")  # one call is one write: all of it or none


@pytest.mark.parametrize("name", list(WRITES))
def test_disk_full_write_raises_storage_unavailable_and_changes_nothing(
    disk: Path, clock: Clock, name: str
) -> None:
    state = disk / "state"
    Authority.init(state, TD, clock=clock).close()
    authority = Authority.open(state, clock=clock)
    try:
        authority.signer()  # the key is read before the disk fills
        authority.record_report(WEB, _report("w0"))
        before = snapshot(state)
        filler = _fill(disk)
        with pytest.raises(StorageUnavailable) as caught:
            for _ in range(64):  # bounded: a few writes may still fit in allocated pages
                WRITES[name](authority)
                if name in SINGLE:
                    break
            else:
                pytest.fail("the writes never hit the full disk")
        assert caught.value.reason == "storage_unavailable"
        assert "\n" not in caught.value.message
        assert not authority.store.in_transaction
        filler.unlink()
        if name in SINGLE:  # nothing of it landed, no orphan key file either
            assert snapshot(state) == before
        WRITES["token"](authority)  # room again: writes work, no restart needed
        assert authority.store.verify_audit()[1] is None
    finally:
        authority.close()


def test_read_only_filesystem(disk: Path, clock: Clock) -> None:
    state = disk / "state"
    Authority.init(state, TD, clock=clock).close()
    before = snapshot(state)
    _mount("-o", "remount,ro", str(disk))  # nothing holds a file open now
    try:
        with pytest.raises(StorageUnavailable) as caught:
            Authority.open(state, clock=clock).close()
        assert "\n" not in caught.value.message
        result = run("policy", "allow", "web", "api", "--state", str(state))
    finally:
        _mount("-o", "remount,rw", str(disk))
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert snapshot(state) == before


def test_batch_on_a_full_disk_loses_every_write_of_the_batch(disk: Path, clock: Clock) -> None:
    """A request in a batch that hits the full disk fails the whole batch: no half commit."""
    state = disk / "state"
    Authority.init(state, TD, clock=clock).close()
    authority = Authority.open(state, clock=clock)
    try:
        authority.allow(WEB, API)
        before = snapshot(state)
        filler = _fill(disk)
        with pytest.raises(StorageUnavailable), authority.store.batch():
            for i in range(200):
                with contextlib.suppress(StorageUnavailable):
                    authority.record_report(WEB, _report(f"i{i % 8}"))
                authority.create_token(WEB)
        assert not authority.store.in_transaction
        filler.unlink()
        assert snapshot(state) == before
    finally:
        authority.close()


def test_cli_on_a_full_disk_prints_one_line(disk: Path, clock: Clock) -> None:
    state = disk / "state"
    Authority.init(state, TD, clock=clock).close()
    assert run("policy", "allow", "web", "db", "--state", str(state)).exit_code == 0
    before = snapshot(state)
    filler = _fill(disk)
    try:
        result = run("policy", "allow", "web", "api", "--state", str(state))
    finally:
        filler.unlink()
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ")
    assert "authority database" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert snapshot(state) == before


def test_the_api_answers_503_with_retry_after_on_a_full_disk(disk: Path, clock: Clock) -> None:
    import json
    import time

    from ca.api import ControlApi, Request
    from meshid.ratelimit import FailureLimiter

    state = disk / "state"
    Authority.init(state, TD, clock=clock).close()
    authority = Authority.open(state, clock=clock)
    try:
        cert = authority.issue(WEB, make_csr()[0].public_key()).leaf
        api = ControlApi(authority, clock, time.monotonic, FailureLimiter())
        api.handle_batch([])  # the writer lock exists before the disk fills
        before = snapshot(state)
        filler = _fill(disk)
        replies = []
        for i in range(64):  # bounded: a few small writes may still fit in allocated pages
            body = json.dumps(_report(f"w{i % 8}").to_json()).encode()
            (reply,) = api.handle_batch([Request("POST", "/v1/report", {}, body, "x", cert)])
            replies.append(reply)
            if reply.status != 200:
                break
        filler.unlink()
        assert replies[-1].status == 503, replies[-1].body
        assert replies[-1].body["error"] == "storage_unavailable"
        assert ("retry-after", "5") in replies[-1].headers
        if len(replies) == 1:
            assert snapshot(state) == before
    finally:
        authority.close()
