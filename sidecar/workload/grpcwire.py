"""The gRPC layer that rides on HTTP/2: statuses, message framing, and the call a handler sees.

A gRPC message on the wire is a 5-byte prefix (compressed flag, length) and
its bytes. A call ends with trailers: `grpc-status`, and `grpc-message`
percent-encoded (the gRPC HTTP/2 protocol document). A handler refuses a call
by raising `GrpcError` with the status the client sees and a `reason` for our
own log and metrics. Nothing here does I/O.
"""

from __future__ import annotations

import struct
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from sidecar.workload.unixsocket import PeerCred

# gRPC status codes (grpc/doc/statuscodes.md).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14

PREFIX = struct.Struct(">BI")  # compressed flag, message length


class GrpcError(Exception):
    """End the call with this gRPC status; `reason` is for our log and metrics."""

    def __init__(self, status: int, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    metadata: Mapping[str, str]
    message: bytes
    peer: PeerCred


class Reply(Protocol):
    async def send(self, message: bytes) -> None: ...


Handler = Callable[[Call, Reply], Awaitable[None]]
Admit = Callable[[PeerCred], bool]
Check = Callable[[Call], None]  # raises GrpcError to refuse a call before its handler


def grpc_message(text: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (the gRPC HTTP/2 protocol document)."""
    return urllib.parse.quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()


def grpc_timeout(value: str) -> float | None:
    """grpc-timeout: up to 8 digits and a unit; None if absent or malformed."""
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    if 2 <= len(value) <= 9 and value[:-1].isdigit() and value[-1] in units:
        return int(value[:-1]) * units[value[-1]]
    return None
