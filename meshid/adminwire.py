"""The management calls an operator makes through the control plane, and their answers.

Typed like `meshid.wire`: one parse per message that checks every field and
raises `InvalidInput` naming the first bad one. IDs travel as text and are
resolved by the authority (a bare path means this trust domain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from meshid.errors import InvalidInput
from meshid.reasons import Reason

PolicyAction = Literal["allow", "deny", "list", "check"]
ACTIONS: tuple[PolicyAction, ...] = ("allow", "deny", "list", "check")
MAX_ID = 2048


def _text(fields: dict[str, Any], key: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise InvalidInput(f"{key}: needs a SPIFFE ID", reason=Reason.INVALID_JSON)
    return value


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidInput("body: must be a JSON object", reason=Reason.INVALID_JSON)
    return doc


@dataclass(frozen=True, slots=True)
class PolicyCall:
    action: PolicyAction
    source: str = ""  # FROM, for allow, deny and check
    target: str = ""  # TO

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "from": self.source, "to": self.target}

    @classmethod
    def parse(cls, doc: object) -> PolicyCall:
        fields = _object(doc)
        action = fields.get("action")
        for known in ACTIONS:
            if action == known:
                if known == "list":
                    return cls(known)
                return cls(known, _text(fields, "from"), _text(fields, "to"))
        raise InvalidInput("action: must be allow, deny, list or check", reason=Reason.INVALID_JSON)


@dataclass(frozen=True, slots=True)
class RevokeCall:
    spiffe_id: str

    def to_json(self) -> dict[str, Any]:
        return {"spiffe_id": self.spiffe_id}

    @classmethod
    def parse(cls, doc: object) -> RevokeCall:
        return cls(_text(_object(doc), "spiffe_id"))


@dataclass(frozen=True, slots=True)
class AdminAnswer:
    """What an operator's command prints (`lines`) and exits with (`ok`)."""

    ok: bool
    lines: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "lines": list(self.lines)}

    @classmethod
    def parse(cls, doc: object) -> AdminAnswer:
        fields = _object(doc)
        ok, lines = fields.get("ok"), fields.get("lines")
        if not isinstance(ok, bool) or not isinstance(lines, list):
            raise InvalidInput("answer: needs ok and lines", reason=Reason.INVALID_JSON)
        return cls(ok, tuple(str(line)[:4096] for line in lines[:100_000]))
