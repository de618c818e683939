"""`meshid doctor`: the shape of a check and how a list of them is shown.

Pure: `ca.doctor` (against an authority's state directory) and
`sidecar.doctor` (against a sidecar's config) produce `Check` values; the
root command prints them, one line each, or as one JSON document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: `name` is stable (scripts key on it), `hint` says what to do if it failed."""

    name: str
    ok: bool
    detail: str
    hint: str = ""
    data: Mapping[str, object] | None = None  # what a script needs beyond the text, in --json


def render(checks: Sequence[Check]) -> list[str]:
    lines = []
    for check in checks:
        mark = "✓" if check.ok else "✗"
        hint = f" (hint: {check.hint})" if not check.ok and check.hint else ""
        lines.append(f"{mark} {check.name}: {check.detail}{hint}")
    return lines


def document(checks: Sequence[Check]) -> dict[str, object]:
    """{"ok": bool, "checks": [{"name", "ok", "detail", "hint", "data"?}]}.

    `data` only on the checks that have it (e.g. `clock_skew`: the limit and
    each sidecar's measured skew).
    """
    return {"ok": all(c.ok for c in checks), "checks": [_check_doc(c) for c in checks]}


def _check_doc(check: Check) -> dict[str, object]:
    doc: dict[str, object] = {
        "name": check.name,
        "ok": check.ok,
        "detail": check.detail,
        "hint": check.hint,
    }
    if check.data is not None:
        doc["data"] = dict(check.data)
    return doc
