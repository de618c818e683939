"""Reading one TOML table of a config: key paths in errors, known keys, typed values.

A `Table` remembers its own key path (``outbound[0]``) so that every error
names the key that is wrong, and which keys were read. Given the keys it
knows, it checks them before any value is read, so that a misspelt key is
reported as itself with the nearest known key (did you mean ...?), rather
than as the key it failed to set being missing. Values are typed and bounded
here (durations, whole numbers, booleans, paths); what the keys mean is the
caller's.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from meshid.duration import parse_duration
from meshid.errors import ConfigError, MeshIdError

# Upper bounds, so that a typo (an extra three zeros) is an error, not a
# sidecar that waits a lifetime or allocates for a billion peers.
MAX_SECONDS = 30 * 86400.0
MAX_COUNT = 1_000_000


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def unknown_key_message(path: str, name: str, known: Collection[str]) -> str:
    """`path: unknown key (did you mean 'x'?)`, or the keys the table knows if none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f"{path}: unknown key (did you mean {close[0]!r}?)"
    return f"{path}: unknown key (known keys: {', '.join(sorted(known))})"


class Table:
    """A TOML table that remembers its own key path and which keys were read.

    With `known`, a key outside it is an error at once, before any value is
    read: a misspelt key must not first surface as the right one missing.
    """

    def __init__(self, data: Any, key: str, known: Collection[str] = ()) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{key or 'config'}: expected a table")
        self.data = data
        self.key = key
        self.known = known
        self.seen: set[str] = set()
        if known:
            for name in data:
                if name not in known:
                    raise ConfigError(unknown_key_message(self.path(name), name, known))

    def path(self, name: str) -> str:
        shown = name if _BARE_KEY.fullmatch(name) else json.dumps(name)[:64]  # as TOML quotes it
        return f"{self.key}.{shown}" if self.key else shown

    def get(self, name: str, default: Any = None) -> Any:
        self.seen.add(name)
        return self.data.get(name, default)

    def required(self, name: str) -> Any:
        self.seen.add(name)
        if name not in self.data:
            raise ConfigError(f"{self.path(name)}: missing")
        return self.data[name]

    def string(self, name: str, default: str | None = None) -> str:
        value = self.get(name, default) if default is not None else self.required(name)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.path(name)}: expected a non-empty string")
        return value

    def path_value(self, name: str, base: Path, *, optional: bool = False) -> Path | None:
        if optional and name not in self.data:
            self.seen.add(name)
            return None
        return base / self.string(name)

    def seconds(self, name: str, default: float, maximum: float = MAX_SECONDS) -> float:
        """A positive, finite duration: seconds as a number, or a string such as "30s"."""
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            raise ConfigError(f'{self.path(name)}: expected a duration such as "30s"')
        if isinstance(value, int | float):
            seconds = float(value)
            if not math.isfinite(seconds) or seconds <= 0:  # NaN fails every comparison
                raise ConfigError(f"{self.path(name)}: must be a positive, finite number")
        elif isinstance(value, str):
            try:
                seconds = parse_duration(value).total_seconds()
            except MeshIdError as exc:
                raise ConfigError(f"{self.path(name)}: {exc.message}") from None
        else:
            raise ConfigError(f'{self.path(name)}: expected a duration such as "30s"')
        if seconds > maximum:
            raise ConfigError(f"{self.path(name)}: longer than the limit of {maximum:g}s")
        return seconds

    def integer(self, name: str, default: int, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
        value = self.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= maximum:
            raise ConfigError(
                f"{self.path(name)}: expected a whole number from {minimum} to {maximum}"
            )
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path(name)}: expected true or false")
        return value

    def table(self, name: str, known: Collection[str]) -> Table | None:
        value = self.get(name)
        return None if value is None else Table(value, self.path(name), known)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = self.known or sorted(self.seen)
            raise ConfigError(unknown_key_message(self.path(unknown[0]), unknown[0], known))


def tables(value: Any, key: str, known: Collection[str]) -> list[Table]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [Table(value, key, known)]
    if isinstance(value, list):
        return [Table(item, f"{key}[{i}]", known) for i, item in enumerate(value)]
    raise ConfigError(f"{key}: expected a table or an array of tables")
