"""The enrollment guessing limit, shared by every worker of one `meshid ca serve`.

`meshid.ratelimit.FailureLimiter` keeps its counts in the memory of one
process; with ``--workers N`` each worker would count on its own and a
guesser would get N times the tries. `SharedFailureLimiter` keeps the same
counts in a table every worker sees.

Theory of operation:

- The parent creates the table before it forks: an anonymous in-memory file
  (``memfd_create``) mapped ``MAP_SHARED``. The children inherit the mapping,
  so they read and write the same bytes. Nothing touches the state directory,
  so the limiter works on a full or read-only disk, and nothing outlives the
  process group.
- Every read-modify-write of a slot holds a POSIX record lock (``lockf``) on
  that file. Such locks belong to a process, not to a file description, so
  they exclude the other workers even though all share one descriptor; a
  thread lock excludes the other threads of the same worker.
- The table has a fixed number of slots. A source lands on a slot by a keyed
  hash (the key is random per server, so nobody can aim their addresses at
  someone else's slot) and probes a few neighbours. When all of them are
  taken, the one idle the longest is reused: an attacker with many addresses
  can make the limiter forget a source, never grow the memory.
- The rules are `FailureLimiter`'s: `max_failures` failures within `window`
  seconds block the source for `block` seconds. Time comes in as a
  parameter (``time.monotonic`` is the same clock in every process).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from meshid.ratelimit import FailureLimiter

SLOTS = 4096
PROBE = 8
_HEAD = struct.Struct("<16sddI")  # key digest, blocked until, last seen, number of times


class SharedFailureLimiter(FailureLimiter):
    """A `FailureLimiter` whose counts are shared with the processes forked after it."""

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 60.0,
        block: float = 60.0,
        slots: int = SLOTS,
    ) -> None:
        super().__init__(max_failures=max_failures, window=window, block=block, max_sources=slots)
        self._slots = slots
        self._times = struct.Struct(f"<{max_failures}d")
        self._size = _HEAD.size + self._times.size
        self._salt = secrets.token_bytes(16)
        self._fd = os.memfd_create("meshid-enroll-limiter", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self._size * slots)
        self._map = mmap.mmap(self._fd, self._size * slots, mmap.MAP_SHARED)
        self._thread_lock = threading.Lock()

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _digest(self, source: str) -> bytes:
        return hashlib.blake2b(source.encode(), key=self._salt, digest_size=16).digest()

    def _read(self, index: int) -> tuple[bytes, float, float, list[float]]:
        offset = index * self._size
        key, until, seen, count = _HEAD.unpack_from(self._map, offset)
        times = list(self._times.unpack_from(self._map, offset + _HEAD.size))[:count]
        return key, until, seen, times

    def _write(self, index: int, key: bytes, until: float, seen: float, times: list[float]) -> None:
        offset = index * self._size
        times = times[-self.max_failures :]
        _HEAD.pack_into(self._map, offset, key, until, seen, len(times))
        padded = times + [0.0] * (self.max_failures - len(times))
        self._times.pack_into(self._map, offset + _HEAD.size, *padded)

    def _find(self, digest: bytes, *, claim: bool) -> int | None:
        """The slot holding `digest`; with `claim`, a free or the stalest slot otherwise."""
        start = int.from_bytes(digest[:8], "little") % self._slots
        candidates = [(start + i) % self._slots for i in range(min(PROBE, self._slots))]
        stalest: tuple[float, int] | None = None
        for index in candidates:
            key, _until, seen, _times = self._read(index)
            if key == digest:
                return index
            if stalest is None or seen < stalest[0]:
                stalest = (seen, index)
        if not claim or stalest is None:
            return None
        return stalest[1]

    def blocked(self, source: str, now: float) -> float:
        """Seconds `source` must still wait (0 when it may try)."""
        digest = self._digest(source)
        with self._locked():
            index = self._find(digest, claim=False)
            if index is None:
                return 0.0
            _key, until, _seen, _times = self._read(index)
        return max(0.0, until - now)

    def failed(self, source: str, now: float) -> bool:
        """Record a failure; True when it tips `source` into being blocked."""
        digest = self._digest(source)
        with self._locked():
            index = self._find(digest, claim=True)
            assert index is not None
            key, until, _seen, times = self._read(index)
            if key != digest:
                until, times = 0.0, []
            times = [t for t in times if t > now - self.window] + [now]
            tipped = len(times) >= self.max_failures
            if tipped:
                until, times = now + self.block, []
            self._write(index, digest, until, now, times)
        return tipped

    def active(self, now: float) -> dict[str, float]:
        """Every blocked source (by its keyed hash: the table keeps no addresses)."""
        out: dict[str, float] = {}
        with self._locked():
            for index in range(self._slots):
                key, until, _seen, _times = self._read(index)
                if until > now:
                    out[key.hex()] = until - now
        return out
