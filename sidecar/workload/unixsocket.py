"""The Workload API's Unix socket: where it is bound, who may own it, who is calling.

The socket file is the only door, so its hygiene is the access control the
kernel enforces before any byte of HTTP/2: the directory must be ours and not
writable by others (or they could swap the socket), the socket is made 0660
and put in place by rename so it is never wider, a stale socket is replaced
but a live one is never stolen, and on exit the file is removed only if it is
still the one we made (compared by inode). Callers are identified by the
kernel's credentials for the connection (SO_PEERCRED), read once at accept.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

from meshid.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> PeerCred:
    """The kernel's word on who is at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def remove_if_ours(path: Path, inode: int) -> None:
    """Remove the socket file on exit, unless another process has replaced it since."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            path.unlink()


def bind_unix(path: Path) -> tuple[trio.socket.SocketType, int]:
    """A listening Unix socket at `path`, 0660, placed by rename so it is never wider.

    The directory is created (0750) if its parent exists; it must be ours and
    not writable by others (or they could swap the socket). A socket file
    nobody answers on is stale and replaced; a live one, or any other kind of
    file, is an error naming the key.
    """
    key = "workload_api.socket"
    directory = path.parent
    try:
        directory.mkdir(mode=0o750, exist_ok=True)  # its parent must exist; only this level
        info = os.stat(directory)
    except OSError as exc:
        raise ConfigError(f"{key}: directory {directory}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IWOTH | stat.S_IWGRP) and not info.st_mode & stat.S_ISVTX:
        raise ConfigError(f"{key}: directory {directory} is writable by others")
    if info.st_uid != os.geteuid():
        raise ConfigError(f"{key}: directory {directory} is not owned by this sidecar's user")
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise ConfigError(f"{key}: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            pass  # nobody answers: stale, replaced below
        else:
            raise ConfigError(f"{key}: {path} is served by another process")
        finally:
            probe.close()
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        raw.bind(str(tmp))
        os.chmod(tmp, 0o660)
        os.replace(tmp, path)
        raw.listen(4096)
    except OSError as exc:
        raw.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{key}: cannot listen on {path}: {exc.strerror}") from None
    return trio.socket.from_stdlib_socket(raw), os.lstat(path).st_ino
