"""State files on a real full or read-only filesystem: the target whole, nothing left behind.

`write_atomic` first, then the dynamic sidecar's `StateDir` without a network:
the key file that commits key and chain together, clean-up at start, and how a
failing write is logged, counted and retried.
"""

from __future__ import annotations

import errno
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from sidecar_helpers import TD, Creds, ForeignCa, LogCapture, forge, utcnow
from small_fs import small_fs

from meshid.bundle import TrustBundle
from meshid.events import EventLog
from meshid.files import is_temp_of, temp_name, write_atomic, write_private
from meshid.svid import certs_to_pem, public_key_matches
from sidecar.statedir import KEY_FILE, SVID_FILE, StateDir, identity_pem


def test_disk_full_leaves_the_old_file_whole_and_no_temp(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs") as fs:
        target = fs.root / "feed.json"
        write_atomic(target, b"old contents")
        fs.fill()
        with pytest.raises(OSError) as info:
            write_atomic(target, b"x" * 64 * 1024)
        assert info.value.errno == errno.ENOSPC
        assert target.read_bytes() == b"old contents"
        assert fs.stray_temps() == []
        fs.free()
        write_atomic(target, b"new contents")
        assert target.read_bytes() == b"new contents"
        assert fs.stray_temps() == []


def test_disk_full_for_a_new_private_file_leaves_nothing(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs") as fs:
        fs.fill()
        with pytest.raises(OSError) as info:
            write_private(fs.root / "svid.key", b"k" * 64 * 1024)
        assert info.value.errno == errno.ENOSPC
        assert not (fs.root / "svid.key").exists()
        assert fs.stray_temps() == []


def test_read_only_filesystem_leaves_the_old_file(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs") as fs:
        target = fs.root / "bundle.pem"
        write_atomic(target, b"old")
        fs.read_only()
        try:
            with pytest.raises(OSError) as info:
                write_atomic(target, b"new")
            assert info.value.errno == errno.EROFS
            assert target.read_bytes() == b"old"
        finally:
            fs.read_write()
        assert fs.stray_temps() == []


def test_staging_names_are_recognised_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "svid.key"
    assert is_temp_of(temp_name(target), "svid.key")
    assert not is_temp_of(tmp_path / "svid.key", "svid.key")
    assert not is_temp_of(tmp_path / ".svid.key.notahex!.tmp", "svid.key")
    assert not is_temp_of(temp_name(tmp_path / "svid.pem"), "svid.key")


# -- the dynamic sidecar's state directory --


def _pair(name: str = "web") -> Creds:
    now = utcnow()
    ca = ForeignCa.create(TD)
    return forge(
        uris=[f"spiffe://{TD}/{name}"],
        issuer=ca.root,
        issuer_key=ca.key,
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(hours=1),
    )


def _state(path: Path) -> tuple[StateDir, LogCapture]:
    log = LogCapture()
    return StateDir(path, EventLog(log)), log


def test_the_key_file_carries_its_chain_so_a_half_done_update_reads_as_one_pair(
    tmp_path: Path,
) -> None:
    state, _ = _state(tmp_path)
    state.prepare()
    old, new = _pair(), _pair()
    bundle = TrustBundle.from_pem(TD, certs_to_pem([ForeignCa.create(TD).root]))
    state.write_identity(old.key, old.chain, bundle)
    # A crash after the key file was renamed into place, before svid.pem was.
    write_private(tmp_path / KEY_FILE, identity_pem(new.key, new.chain))
    chain, key, _ = state.read_identity()
    assert chain[0].serial_number == new.chain[0].serial_number
    assert public_key_matches(key, chain[0])
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_a_key_file_without_its_chain_reads_the_chain_from_svid_pem(tmp_path: Path) -> None:
    state, _ = _state(tmp_path)
    creds = _pair()
    (tmp_path / KEY_FILE).write_bytes(creds.key_pem())
    (tmp_path / SVID_FILE).write_bytes(creds.cert_pem())
    (tmp_path / "bundle.pem").write_bytes(b"")
    chain, key, _ = state.read_identity()
    assert chain[0].serial_number == creds.chain[0].serial_number
    assert public_key_matches(key, chain[0])


def test_prepare_removes_what_a_crash_left_and_nothing_else(tmp_path: Path) -> None:
    state, _ = _state(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    left = temp_name(tmp_path / KEY_FILE)
    left.write_bytes(b"half a key")
    keep = tmp_path / ".operator-notes.tmp"
    keep.write_bytes(b"not ours")
    state.prepare()
    assert not left.exists() and keep.exists()
    assert tmp_path.stat().st_mode & 0o777 == 0o700


def test_a_read_only_state_dir_does_not_stop_a_start(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs") as fs:
        directory = fs.root / "state"
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)
        fs.read_only()
        try:
            state, log = _state(directory)
            state.prepare()  # cannot tighten the mode: said, not fatal
        finally:
            fs.read_write()
    [failed] = log.find("state_write_failed")
    assert failed["what"] == "state_dir" and failed["errno"] == "EROFS"
    assert failed["reason"] == "storage_unavailable"


async def test_a_failing_retry_is_counted_but_logged_once_and_a_new_state_again(
    tmp_path: Path,
) -> None:
    state, log = _state(tmp_path)
    attempts: list[int] = []

    def write() -> None:
        attempts.append(1)
        if len(attempts) < 5:
            raise OSError(errno.ENOSPC, "No space left on device")

    state.request("feed", write)
    assert not await state.flush()
    state.request("feed", write)  # what the writer task does after a backoff
    state._fresh.clear()
    assert not await state.flush()
    assert not state.writable and state.failures["feed"] == 2
    assert len(log.find("state_write_failed")) == 1  # the retry was counted, not logged
    state.request("feed", write)  # a newer state: its failure is news
    assert not await state.flush()
    assert len(log.find("state_write_failed", operation="write")) == 2
    assert "feed (ENOSPC)" in (state.describe() or "")
    state.request("feed", write)
    assert not await state.flush()
    state.request("feed", write)
    assert await state.flush()
    assert state.writable and state.describe() is None
    assert len(log.find("state_write_recovered", what="feed")) == 1


async def test_the_writer_retries_with_backoff_until_the_write_succeeds(tmp_path: Path) -> None:
    state, log = _state(tmp_path)
    attempts: list[int] = []
    delays: list[int] = []

    def write() -> None:
        attempts.append(1)
        if len(attempts) == 2:
            raise ValueError("a bug of ours: the writer task must survive it")
        if len(attempts) < 5:
            raise OSError(errno.EROFS, "Read-only file system")

    def backoff(failures: int) -> float:
        delays.append(failures)
        return 0.01

    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.run, backoff)
        state.request("bundle", write)
        with trio.fail_after(10):
            await log.wait_for("state_write_recovered", what="bundle")
            await state.wait_saved()
        nursery.cancel_scope.cancel()
    assert len(attempts) == 5 and delays == [1, 2, 3, 4]
    assert [(r["reason"], r["errno"]) for r in log.find("state_write_failed")] == [
        ("storage_unavailable", "EROFS"),
        ("internal_error", "internal_error"),
        ("storage_unavailable", "EROFS"),  # a different failure than the last: said again
    ]
    assert state.failures["bundle"] == 4 and state.writable
