"""The version this installation of meshid reports: in logs, HTTP headers and metrics.

The package's own constant (`meshid.__version__`), not the installed metadata:
reading that (`importlib.metadata`) costs every sidecar a megabyte of memory
for one string. tests/meshid/test_root_cli.py checks that the two agree.
"""

from __future__ import annotations

from meshid import __version__

VERSION = __version__
SERVER_HEADER = f"meshid/{VERSION}"
