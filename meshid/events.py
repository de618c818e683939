"""JSON-lines event log: one line per connection decision, per close, per notable event.

Field names are stable; `reason` is the same snake_case string as in the
metric labels. Nothing secret is ever passed here: peer IDs, addresses,
serials and counts only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

# One encoder for every line: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def utcnow() -> datetime:
    return datetime.now(UTC)


class EventLog:
    def __init__(self, stream: TextIO | None = None, clock: Callable[[], datetime] = utcnow):
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock

    def emit(self, event: str, **fields: Any) -> None:
        record: dict[str, Any] = {
            "time": self._clock().isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "event": event,
        }
        for key, value in fields.items():
            if value is not None:
                record[key] = value
        try:
            self._stream.write(_encode(record) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a full disk or closed stderr must not take connections down with it
