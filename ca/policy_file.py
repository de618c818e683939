"""The allow-list as a file: the static policy file's ``[[allow]]`` format, read and written.

`meshid policy apply` makes the allow-list equal to such a file and
`meshid policy export` writes one, so an allow-list can live in version
control. Pure: text in, pairs out (and back); no database, no I/O.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Iterable

from meshid.errors import InvalidInput

Pair = tuple[str, str]  # rule ends: IDs, or prefixes ending in /* (meshid.policy.rule_end)


def parse_policy_text(text: str, resolve: Callable[[str], str], *, name: str) -> set[Pair]:
    """The pairs of a policy file; a one-line InvalidInput naming the entry on any mistake.

    Unknown keys are refused rather than ignored: a misspelt ``form`` would
    otherwise silently drop a rule, and `apply` would then cut the pair.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{name}: not valid TOML: {exc}") from None
    extra = sorted(set(doc) - {"allow"})
    if extra:
        raise InvalidInput(f"{name}: unknown key {extra[0]!r} (only [[allow]] tables)")
    entries = doc.get("allow", [])
    if not isinstance(entries, list):
        raise InvalidInput(f"{name}: 'allow' must be an array of tables ([[allow]])")
    pairs: set[Pair] = set()
    for index, entry in enumerate(entries, start=1):
        where = f"{name}: [[allow]] #{index}"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where}: must be a table with 'from' and 'to'")
        unknown = sorted(set(entry) - {"from", "to"})
        if unknown:
            raise InvalidInput(f"{where}: unknown key {unknown[0]!r}")
        ends: list[str] = []
        for key in ("from", "to"):
            value = entry.get(key)
            if not isinstance(value, str):
                raise InvalidInput(f"{where}: '{key}' must be a string")
            try:
                ends.append(resolve(value))
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: '{key}': {exc}", reason=exc.reason) from None
        pairs.add((ends[0], ends[1]))
    return pairs


def render_policy(pairs: Iterable[Pair], version: int) -> str:
    """The pairs as a policy file, sorted, with full IDs (unambiguous in any trust domain)."""
    lines = [f"# meshid allow-list, policy version {version}"]
    for src, dst in sorted(pairs):
        # SPIFFE IDs hold no character a TOML basic string would need escaped
        # beyond what JSON escapes identically.
        lines += ["", "[[allow]]", f"from = {json.dumps(src)}", f"to = {json.dumps(dst)}"]
    return "\n".join(lines) + "\n"
