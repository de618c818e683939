"""The `[workload_api]` table of the sidecar config: where the socket is, who may call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshid.errors import ConfigError

KEYS = ("socket", "allow_uids", "allow_gids", "jwt_key")
MAX_ID = 2**32 - 2


@dataclass(frozen=True, slots=True)
class WorkloadApiConfig:
    socket: Path
    allow_uids: frozenset[int]
    allow_gids: frozenset[int]
    jwt_key: Path | None = None  # static mode: sign JWT-SVIDs with this key (PEM, EC or RSA)

    def admits(self, uid: int, gid: int) -> bool:
        """The kernel-reported uid or primary gid of the caller is listed."""
        return uid in self.allow_uids or gid in self.allow_gids


def _ids(table: Any, name: str) -> frozenset[int]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID for v in value
    ):
        raise ConfigError(f"{table.path(name)}: expected a list of numeric ids")
    return frozenset(value)


def parse_workload_api(table: Any, base: Path) -> WorkloadApiConfig:
    """`table` is the config parser's table for [workload_api] (keys already checked)."""
    socket = table.path_value("socket", base)
    assert socket is not None
    if len(str(socket).encode()) > 107:
        raise ConfigError(f"{table.path('socket')}: path longer than a Unix socket allows")
    uids = _ids(table, "allow_uids")
    gids = _ids(table, "allow_gids")
    if not uids and not gids:
        raise ConfigError(
            f"{table.path('allow_uids')}: name at least one uid (or a gid in allow_gids); "
            "nobody could call the socket"
        )
    jwt_key = table.path_value("jwt_key", base, optional=True)
    table.done()
    return WorkloadApiConfig(socket, uids, gids, jwt_key)
