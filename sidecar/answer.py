"""What the authority's answer means to the sidecar: a document, a refusal, or a stream.

Every request to the control plane fails as a `ControlPlaneError`, judged by
`sidecar.failures` (whether another server may answer, whether retrying can
help). An answer is one JSON document, a refusal read from its body (with its
reason, Retry-After, and the revocation it names), or, for a streamed watch,
one document a line, each handed on as its line completes. Reading an answer
is apart from `sidecar.control`, which owns the connections it arrives on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from meshid.errors import AuthorityError
from meshid.wire import ErrorBody
from sidecar import failures
from sidecar.failures import Failure, Verdict

MAX_RETRY_AFTER = 86400  # seconds: a longer Retry-After is taken as a day
_HEX_SERIAL = re.compile(r"[0-9a-f]{1,40}")  # a serial as the authority writes it


class ControlPlaneError(AuthorityError):
    """The control plane could not be reached, or it refused; `status` is its HTTP status.

    `permanent` (see `sidecar.failures`): retrying the same request cannot help
    until an operator changes something; `brief` is a few words for /readyz.
    `revocation_version` comes with an `identity_revoked` refusal of the
    caller itself: the feed that would carry it is refused to a revoked caller.
    `revoked_serial` comes with it when what is revoked is the SVID presented
    (`ca revoke --serial`), not the identity. `retry_after` is the refusal's
    Retry-After in seconds (say, a renewal past its identity's budget).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        status: int = 0,
        permanent: bool = False,
        brief: str | None = None,
        revocation_version: int | None = None,
        revoked_serial: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.status = status
        self.permanent = permanent
        self.brief = brief or reason.replace("_", " ")
        self.revocation_version = revocation_version
        self.revoked_serial = revoked_serial
        self.retry_after = retry_after

    @classmethod
    def judged(
        cls,
        failure: Failure,
        *,
        revocation_version: int | None = None,
        revoked_serial: int | None = None,
        retry_after: float | None = None,
    ) -> ControlPlaneError:
        verdict: Verdict = failures.classify(failure)
        return cls(
            verdict.message,
            reason=verdict.reason,
            status=failure.status,
            permanent=verdict.permanent,
            brief=verdict.brief,
            revocation_version=revocation_version,
            revoked_serial=revoked_serial,
            retry_after=retry_after,
        )

    @property
    def refused(self) -> bool:
        """True when the control plane answered no (retrying the same request is futile)."""
        return 400 <= self.status < 500 and self.status not in (408, 429)


def judge(
    where: str, status: int, received: bytearray, retry_after: float | None = None
) -> dict[str, Any]:
    """The answer's document, or the refusal it carries as an error (`where`: the server)."""
    try:
        doc = json.loads(bytes(received))
    except (UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    if not isinstance(doc, dict):
        raise ControlPlaneError.judged(Failure(failures.HTTP, where, status=status))
    if status != 200:
        refusal = ErrorBody.parse(doc)
        version = doc.get("revocation_version")
        raise ControlPlaneError.judged(
            Failure(
                failures.HTTP,
                where,
                status=status,
                reason=refusal.error[:64],
                detail=(refusal.message or f"HTTP {status}")[:300],
            ),
            revocation_version=(
                version if isinstance(version, int) and not isinstance(version, bool) else None
            ),
            revoked_serial=_serial(doc.get("revoked_serial")),
            retry_after=retry_after,
        )
    return doc


Each = Callable[[dict[str, Any]], Awaitable[None]]  # takes one document of a stream


class Lines:
    """The documents of a streamed answer, one a line, handed on as each line completes."""

    def __init__(self, each: Each, where: str) -> None:
        self.each = each
        self.where = where
        self.last: dict[str, Any] = {}

    async def take(self, received: bytearray) -> None:
        """Hand on every whole line of `received`, leaving only the unfinished one in it."""
        while (end := received.find(b"\n")) >= 0:
            line = bytes(received[:end])
            del received[: end + 1]
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                doc = None
            if not isinstance(doc, dict):
                raise ControlPlaneError.judged(
                    Failure(failures.PROTOCOL, self.where, detail="a streamed line is not JSON")
                )
            await self.each(doc)
            self.last = doc


def retry_after_header(headers: Any) -> float | None:
    """A Retry-After in whole seconds (at most a day), or None for anything else."""
    for name, value in headers:
        if name == b"retry-after":
            text = bytes(value).strip()
            if text.isdigit() and len(text) <= 6:
                return float(min(int(text), MAX_RETRY_AFTER))
            return None
    return None


def _serial(value: object) -> int | None:
    """A serial in hex as the authority writes it, or None for anything else."""
    if not isinstance(value, str) or not _HEX_SERIAL.fullmatch(value):
        return None
    return int(value, 16)
