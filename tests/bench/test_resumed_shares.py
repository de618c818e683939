"""The bench reads from each sidecar's decision log how many new connections resumed."""

from __future__ import annotations

from pathlib import Path

from bench.topology import Chain
from bench.workloads import resumed_shares


def test_resumed_shares_count_allowed_connections_since_the_mark(tmp_path: Path) -> None:
    log = tmp_path / "web-events.log"
    log.write_bytes(b'{"event":"decision","decision":"allow","resumed":false}\n')
    mark = {"meshid-web": log.stat().st_size}
    with log.open("ab") as f:
        f.write(b'{"event":"decision","decision":"allow","resumed":false}\n')
        f.write(b'{"event":"decision","decision":"deny","resumed":true}\n')
        f.write(b'{"event":"close","reason":"closed"}\n')
        for _ in range(3):
            f.write(b'{"event":"decision","decision":"allow","resumed":true}\n')
    chain = Chain("meshid", {}, event_logs={"meshid-web": log})
    assert resumed_shares(chain, mark) == {"meshid-web: % of connections resumed": 75.0}
    assert resumed_shares(chain, {}) == {"meshid-web: % of connections resumed": 60.0}
