"""The version this installation of meshid reports: in logs, HTTP headers and metrics."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _installed() -> str:
    try:
        return version("meshid")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _installed()
SERVER_HEADER = f"meshid/{VERSION}"
