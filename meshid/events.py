"""JSON-lines event log: one line per connection decision, per close, per notable event.

Field names are stable; `reason` is the same snake_case string as in the
metric labels. Nothing secret is ever passed here: peer IDs, addresses,
serials and counts only.

A sidecar writes two lines per connection, so a line is made with little
Python: one encoder built once (the C one, reused, where the interpreter has
it), and the time's text up to the second kept while the second lasts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from json import encoder as _json
from typing import Any, TextIO

# One encoder for every line: json.dumps with options builds a new one per call.
# The C encoder, when there is one, is called directly: JSONEncoder.encode builds
# a new one on every call. Records are flat dicts made here, never circular.
_c_encoder: Any = getattr(_json, "c_make_encoder", None)


def _c_encode(record: dict[str, Any]) -> str:
    return "".join(_c_made(record, 0))


if _c_encoder is not None:
    _c_made = _c_encoder(
        None, str, _json.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    _encode: Callable[[dict[str, Any]], str] = _c_encode
else:  # pragma: no cover - an interpreter without the C accelerator
    _encode = json.JSONEncoder(separators=(",", ":"), default=str, check_circular=False).encode


def utcnow() -> datetime:
    return datetime.now(UTC)


class EventLog:
    def __init__(self, stream: TextIO | None = None, clock: Callable[[], datetime] = utcnow):
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._second: float | None = None  # the UTC second whose text is `_prefix`
        self._prefix = ""  # "YYYY-MM-DDTHH:MM:SS"

    def _stamp(self) -> str:
        """The clock's time, to the millisecond: `2026-12-07T10:00:00.998Z` in UTC."""
        now = self._clock()
        if now.tzinfo is not UTC:
            return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        second = now.timestamp() // 1
        if second != self._second:
            self._second, self._prefix = second, now.isoformat(timespec="seconds")[:19]
        return f"{self._prefix}.{now.microsecond // 1000:03d}Z"

    def emit(self, event: str, **fields: Any) -> None:
        record: dict[str, Any] = {"time": self._stamp(), "event": event}
        for key, value in fields.items():
            if value is not None:
                record[key] = value
        try:
            self._stream.write(_encode(record) + "\n")
            self._stream.flush()
        except (OSError, ValueError, RecursionError):
            pass  # a full disk or closed stderr must not take connections down with it
