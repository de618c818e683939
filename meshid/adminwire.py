"""The management calls an operator makes through the control plane, and their answers.

Typed like `meshid.wire`: one parse per message that checks every field and
raises `InvalidInput` naming the first bad one. IDs travel as text and are
resolved by the authority (a bare path means this trust domain).

`RunCall` is the one call every remote command makes: a command of the
authority's command line (its words, e.g. ``policy apply``) and its
arguments as typed, with the files it reads sent by value; `RunAnswer` is
what it printed, byte for byte, and its exit status. `PolicyCall` and
`RevokeCall` are the calls of older clients, still answered.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Literal

from meshid.errors import InvalidInput
from meshid.reasons import Reason

PolicyAction = Literal["allow", "deny", "list", "check"]
ACTIONS: tuple[PolicyAction, ...] = ("allow", "deny", "list", "check")
MAX_ID = 2048
# `list` answers a page of rules at a time, in (FROM, TO) order, after a cursor (the
# last rule of the page before): 100,000 rules never make one answer.
PAGE = 1_000  # rules per page the CLI asks for
MAX_PAGE = 10_000  # rules per page the authority answers with, whatever is asked


def _text(fields: dict[str, Any], key: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise InvalidInput(f"{key}: needs a SPIFFE ID", reason=Reason.INVALID_JSON)
    return value


def _object(doc: object) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidInput("body: must be a JSON object", reason=Reason.INVALID_JSON)
    return doc


def _rule(value: object, key: str) -> tuple[str, str] | None:
    """An optional [FROM, TO] rule, as a cursor travels."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(end, str) and 0 < len(end) <= MAX_ID for end in value)
    ):
        raise InvalidInput(f"{key}: must be a [from, to] rule", reason=Reason.INVALID_JSON)
    return value[0], value[1]


@dataclass(frozen=True, slots=True)
class PolicyCall:
    action: PolicyAction
    source: str = ""  # FROM, for allow, deny and check
    target: str = ""  # TO
    # For list (additive; an older authority ignores them and answers everything):
    # the rules after this one, at most `limit` of them (cut to MAX_PAGE).
    after: tuple[str, str] | None = None
    limit: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"action": self.action, "from": self.source, "to": self.target}
        if self.after is not None:
            doc["after"] = list(self.after)
        if self.limit is not None:
            doc["limit"] = self.limit
        return doc

    @classmethod
    def parse(cls, doc: object) -> PolicyCall:
        fields = _object(doc)
        action = fields.get("action")
        for known in ACTIONS:
            if action == known:
                if known == "list":
                    limit = fields.get("limit")
                    if limit is not None and (
                        not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
                    ):
                        raise InvalidInput(
                            "limit: must be a positive integer", reason=Reason.INVALID_JSON
                        )
                    return cls(known, after=_rule(fields.get("after"), "after"), limit=limit)
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
    # A page of `list` that is not the last: the cursor for the next (additive).
    next: tuple[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ok": self.ok, "lines": list(self.lines)}
        if self.next is not None:
            doc["next"] = list(self.next)
        return doc

    @classmethod
    def parse(cls, doc: object) -> AdminAnswer:
        fields = _object(doc)
        ok, lines = fields.get("ok"), fields.get("lines")
        if not isinstance(ok, bool) or not isinstance(lines, list):
            raise InvalidInput("answer: needs ok and lines", reason=Reason.INVALID_JSON)
        return cls(
            ok,
            tuple(str(line)[:4096] for line in lines[:100_000]),
            _rule(fields.get("next"), "next"),
        )


MAX_WORDS = 4  # `ca token delete`: the longest command path
MAX_ARGS = 256
MAX_ARG = 4096
MAX_FILES = 4
MAX_OUTPUT = 8 * 1024 * 1024  # of stdout and of stderr each, as the authority sends them
INVALID = Reason.INVALID_JSON


def _bytes(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: must be base64 text", reason=INVALID)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{where}: must be base64 text", reason=INVALID) from None


def _words(value: object, where: str, limit: int) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise InvalidInput(f"{where}: must be a list of at most {limit} strings", reason=INVALID)
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_ARG or "\x00" in item:
            raise InvalidInput(
                f"{where}: each must be a string of at most {MAX_ARG} characters", reason=INVALID
            )
    return tuple(value)


@dataclass(frozen=True, slots=True)
class RunFile:
    """The contents of the file an argument names: `args[at]` is its name as typed."""

    at: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RunCall:
    command: tuple[str, ...]  # e.g. ("policy", "apply")
    args: tuple[str, ...] = ()  # as typed, without --server and --svid
    files: tuple[RunFile, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "command": list(self.command),
            "args": list(self.args),
            "files": [
                {"at": f.at, "data": base64.b64encode(f.data).decode("ascii")} for f in self.files
            ],
        }

    @classmethod
    def parse(cls, doc: object) -> RunCall:
        fields = _object(doc)
        command = _words(fields.get("command"), "command", MAX_WORDS)
        if not command:
            raise InvalidInput("command: must name a command", reason=INVALID)
        args = _words(fields.get("args", []), "args", MAX_ARGS)
        files_doc = fields.get("files", [])
        if not isinstance(files_doc, list) or len(files_doc) > MAX_FILES:
            raise InvalidInput(f"files: at most {MAX_FILES}", reason=INVALID)
        files: list[RunFile] = []
        for i, item in enumerate(files_doc):
            entry = _object(item)
            at = entry.get("at")
            if not isinstance(at, int) or isinstance(at, bool) or not 0 <= at < len(args):
                raise InvalidInput(f"files[{i}].at: must index args", reason=INVALID)
            files.append(RunFile(at, _bytes(entry.get("data"), f"files[{i}].data")))
        return cls(command, args, tuple(files))


@dataclass(frozen=True, slots=True)
class RunAnswer:
    """What the command printed, byte for byte, and how it exited."""

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {
            "exit": self.exit_code,
            "stdout": base64.b64encode(self.stdout).decode("ascii"),
            "stderr": base64.b64encode(self.stderr).decode("ascii"),
        }

    @classmethod
    def parse(cls, doc: object) -> RunAnswer:
        fields = _object(doc)
        code = fields.get("exit")
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
            raise InvalidInput("exit: must be an exit status", reason=INVALID)
        return cls(
            code, _bytes(fields.get("stdout"), "stdout"), _bytes(fields.get("stderr"), "stderr")
        )
