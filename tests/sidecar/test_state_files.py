"""`write_atomic` on a real full or read-only filesystem: the target whole, nothing left behind."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from small_fs import small_fs

from meshid.files import is_temp_of, temp_name, write_atomic, write_private


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
