"""Clients for the Workload API tests: py-spiffe, raw grpcio, short socket paths."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

SERVICE = "/SpiffeWorkloadAPI/"


@contextmanager
def short_dir() -> Iterator[Path]:
    """A fresh 0700 directory with a short path: a Unix socket path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="wl", dir="/tmp"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        os.rmdir(path)


def raw_call(
    socket: Path,
    method: str,
    request: bytes = b"",
    *,
    metadata: tuple[tuple[str, str], ...] = (("workload.spiffe.io", "true"),),
    stream: bool = False,
    timeout: float = 5.0,
) -> list[bytes]:
    """One call with plain grpcio (blocking; run it in a thread); grpc.RpcError on failure."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        if stream:
            call = channel.unary_stream(
                SERVICE + method,
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )(request, metadata=metadata, timeout=timeout)
            try:
                return [next(call)]
            finally:
                call.cancel()
        reply = channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )(request, metadata=metadata, timeout=timeout)
        return [reply]
