"""Messages between the authority and its sidecars: one frozen type, one parse, one serialise.

Both sides import this module, so a field is named in one place: the
authority (`ca.api`) parses requests and builds replies through it, the
sidecar (`sidecar.control`, `sidecar.dynamic`) builds requests and parses
replies through it. Pure: no I/O, stdlib only.

    POST /v1/enroll   EnrollRequest {token, csr, jwt?}        -> SvidReply
    POST /v1/renew    RenewRequest {csr, bundle_sequence?}    -> SvidReply (mTLS)
    POST /v1/report   meshid.report.StatusReport              -> ReportAck (mTLS)
    GET  /v1/watch?WatchQuery                                 -> Feed, whole or a delta (mTLS;
                                                                 meshid.feedwire); with
                                                                 stream=1, one Feed a line
    GET  /v1/bundle                                           -> SPIFFE bundle (JWKS)
    POST /v1/jwt-svid JwtSvidRequest {spiffe_id, audience}    -> JwtSvidReply (mTLS)
    POST /v1/admin/run  meshid.adminwire.RunCall             -> RunAnswer (mTLS, operators)
    GET  /healthz     {status, version, …, time}              (time: for doctor's clock check)
    any refusal                                               -> ErrorBody {error, message}

Each parse checks the whole document and raises `WireError` (an
`InvalidInput`) naming the first bad field; nothing a peer sends ends in a
`KeyError` or a `TypeError`.

Versions. Every message carries ``"v": WIRE_VERSION`` (the watch query a
``v=`` parameter), except the error body: its two fields are what every
version reads, read leniently, so it never changes and carries no version.
The rule, both ways:

- Changes are additive. A reader ignores fields it does not know, and a
  writer keeps sending every field an older reader requires, so an old
  sidecar works with a new authority and a new sidecar with an old one.
- A message without ``v`` is from before versioning and reads as version 1
  (the shape then was the shape of version 1).
- A required field that is missing or malformed is refused with a one-line
  error naming the field and whom to upgrade: a request the authority cannot
  read says "upgrade the sidecar", a reply the sidecar cannot read says
  "upgrade the authority".
- ``WIRE_VERSION`` goes up only when a required field is added or changes
  meaning; a message of a version below `MIN_WIRE_VERSION` is refused whole,
  with the same advice.

The status report keeps its own module (`meshid.report`, with its limits)
under the same rule: the sidecar sends ``v`` with it, unknown fields are
dropped. The sidecar's ``feed.json`` is a `Feed` as the wire carries it, so
a file written before versioning reads as version 1 too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode

from meshid.errors import InvalidInput, MeshIdError
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId

WIRE_VERSION = 1
MIN_WIRE_VERSION = 1

AUTHORITY_PATH = "/meshid/authority"  # the SPIFFE ID path the control plane serves under

ENROLL = "/v1/enroll"
RENEW = "/v1/renew"
REPORT = "/v1/report"
BUNDLE = "/v1/bundle"
WATCH = "/v1/watch"
JWT_SVID = "/v1/jwt-svid"
ADMIN_POLICY = "/v1/admin/policy"  # operators only (see ca.adminapi, meshid.adminwire)
ADMIN_REVOKE = "/v1/admin/revoke"
ADMIN_RUN = "/v1/admin/run"  # any command of `ca.remotetable`, run for an operator
HEALTH = "/healthz"

MAX_INT = 2**63 - 1
MAX_WAIT = 3600.0
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_QUERY_INT = re.compile(r"-?[0-9]{1,19}")  # compiled once: every watch's query is read thrice

Sender = Literal["sidecar", "authority"]


class WireError(InvalidInput):
    """A message that does not have the shape this version reads; the message names the field."""

    reason = Reason.INVALID_JSON


def _bad(sender: Sender, field: str, what: str) -> WireError:
    return WireError(f"{field}: {what} (upgrade the {sender}?)")


def _object(doc: object, sender: Sender, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise WireError(f"{what} must be a JSON object")
    version = doc.get("v", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise _bad(sender, "v", "must be an integer")
    if version < MIN_WIRE_VERSION:
        raise WireError(
            f"{what} is of wire version {version}, older than {MIN_WIRE_VERSION}: "
            f"upgrade the {sender}"
        )
    return doc


def _text(doc: dict[str, Any], key: str, sender: Sender, *, empty: bool = False) -> str:
    value = doc.get(key)
    if value is None:
        raise WireError(f"{key}: missing (upgrade the {sender})")
    if not isinstance(value, str) or (not value and not empty):
        raise _bad(sender, key, "must be a non-empty string")
    return value


def _opt_text(doc: dict[str, Any], key: str, sender: Sender) -> str | None:
    return None if doc.get(key) is None else _text(doc, key, sender)


def _int(doc: dict[str, Any], key: str, sender: Sender, *, low: int = 0) -> int:
    value = doc.get(key)
    if value is None:
        raise WireError(f"{key}: missing (upgrade the {sender})")
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_INT:
        raise _bad(sender, key, f"must be an integer of at least {low}")
    return value


def _spiffe_id(value: object, field: str, sender: Sender) -> SpiffeId:
    if not isinstance(value, str) or not _PRINTABLE.fullmatch(value):
        raise _bad(sender, field, "must be a SPIFFE ID")
    try:
        return SpiffeId.parse(value)
    except MeshIdError:
        raise _bad(sender, field, "must be a SPIFFE ID") from None


def decode(body: bytes, what: str) -> object:
    """JSON as it arrives; `WireError` if it is not JSON at all."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise WireError(f"{what} is not valid JSON") from None


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    """A sidecar's first request: a join token, or a platform-issued JWT, and a CSR (PEM).

    `jwt` is optional and additive: a sidecar enrolling by JWT sends an empty
    `token` next to it, which an authority that predates attestors refuses.
    """

    token: str = ""
    csr: str = ""
    jwt: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"v": WIRE_VERSION, "token": self.token, "csr": self.csr}
        if self.jwt is not None:
            doc["jwt"] = self.jwt
        return doc

    @classmethod
    def parse(cls, doc: object) -> EnrollRequest:
        fields = _object(doc, "sidecar", "request body")
        jwt = _opt_text(fields, "jwt", "sidecar")
        token = _text(fields, "token", "sidecar", empty=jwt is not None)
        return cls(token=token, csr=_text(fields, "csr", "sidecar"), jwt=jwt)


@dataclass(frozen=True, slots=True)
class RenewRequest:
    """A renewal: a CSR, and the bundle sequence held (so the reply can leave the bundle out)."""

    csr: str = ""
    bundle_sequence: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"v": WIRE_VERSION, "csr": self.csr}
        if self.bundle_sequence is not None:
            doc["bundle_sequence"] = self.bundle_sequence
        return doc

    @classmethod
    def parse(cls, doc: object) -> RenewRequest:
        fields = _object(doc, "sidecar", "request body")
        held = fields.get("bundle_sequence")
        # Optional and only an optimisation: a value we cannot read means "send the bundle".
        if not isinstance(held, int) or isinstance(held, bool) or not 0 <= held <= MAX_INT:
            held = None
        return cls(csr=_text(fields, "csr", "sidecar"), bundle_sequence=held)


@dataclass(frozen=True, slots=True)
class SvidReply:
    """A new SVID (PEM chain) and, unless the caller holds this sequence already, the bundle."""

    spiffe_id: SpiffeId
    svid: str
    serial: str
    not_after: str
    bundle_sequence: int
    bundle: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "v": WIRE_VERSION,
            "spiffe_id": str(self.spiffe_id),
            "svid": self.svid,
            "serial": self.serial,
            "not_after": self.not_after,
            "bundle_sequence": self.bundle_sequence,
        }
        if self.bundle is not None:
            doc["bundle"] = self.bundle
        return doc

    @classmethod
    def parse(cls, doc: object) -> SvidReply:
        fields = _object(doc, "authority", "reply")
        return cls(
            spiffe_id=_spiffe_id(fields.get("spiffe_id"), "spiffe_id", "authority"),
            svid=_text(fields, "svid", "authority"),
            serial=_text(fields, "serial", "authority"),
            not_after=_text(fields, "not_after", "authority"),
            bundle_sequence=_int(fields, "bundle_sequence", "authority"),
            bundle=_opt_text(fields, "bundle", "authority"),
        )


@dataclass(frozen=True, slots=True)
class JwtSvidRequest:
    """A JWT-SVID for the caller itself (`spiffe_id` must be its own) and these audiences."""

    spiffe_id: SpiffeId
    audience: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "spiffe_id": str(self.spiffe_id),
            "audience": list(self.audience),
        }

    @classmethod
    def parse(cls, doc: object) -> JwtSvidRequest:
        fields = _object(doc, "sidecar", "request body")
        audience = fields.get("audience")
        if (
            not isinstance(audience, list)
            or not audience
            or not all(isinstance(a, str) and a for a in audience)
        ):
            raise _bad("sidecar", "audience", "must be a non-empty list of non-empty strings")
        return cls(
            spiffe_id=_spiffe_id(fields.get("spiffe_id"), "spiffe_id", "sidecar"),
            audience=tuple(audience),
        )


@dataclass(frozen=True, slots=True)
class JwtSvidReply:
    """The signed token and when it expires (seconds since the epoch)."""

    token: str
    expires_at: int

    def to_json(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "token": self.token, "expires_at": self.expires_at}

    @classmethod
    def parse(cls, doc: object) -> JwtSvidReply:
        fields = _object(doc, "authority", "reply")
        return cls(
            token=_text(fields, "token", "authority"),
            expires_at=_int(fields, "expires_at", "authority"),
        )


@dataclass(frozen=True, slots=True)
class WatchQuery:
    """The versions a sidecar holds (-1: none yet), and how long it will wait for a change.

    `delta`: the sidecar takes the allow-list changes since its policy version
    instead of the whole list (`meshid.feedwire`); sent as ``delta=1``, absent
    from an older sidecar's query, which therefore always gets whole lists.

    `stream`: the answer is a stream (``stream=1``): one feed a line, each as
    the versions move, for as long as the wait lasts; the first line at once
    if the sidecar is behind. A long poll costs the authority a request to
    read, authenticate and park again after every change, for every sidecar:
    at ten thousand sidecars that, not the feed, was most of a change's cost.
    An authority from before streams ignores the parameter and answers with
    one feed, which is a stream of one line too.
    """

    policy_version: int = -1
    revocation_version: int = -1
    bundle_sequence: int = -1
    wait: float | None = None
    delta: bool = False
    stream: bool = False

    def to_query(self) -> str:
        params = {
            "v": str(WIRE_VERSION),
            "policy_version": str(self.policy_version),
            "revocation_version": str(self.revocation_version),
            "bundle_sequence": str(self.bundle_sequence),
        }
        if self.wait is not None:
            params["wait"] = f"{self.wait:g}"
        if self.delta:
            params["delta"] = "1"
        if self.stream:
            params["stream"] = "1"
        return urlencode(params)

    def target(self) -> str:
        return f"{WATCH}?{self.to_query()}"

    @classmethod
    def parse(cls, query: dict[str, str]) -> WatchQuery:
        """The query parameters, each optional; a malformed version is refused naming it.

        A `wait` that is not a number of seconds reads as "the server's default",
        as it always has; a long one is cut to `MAX_WAIT`.
        """
        versions = [
            _query_int(query, key, "sidecar")
            for key in ("policy_version", "revocation_version", "bundle_sequence")
        ]
        version = _query_int(query, "v", "sidecar")
        if "v" in query and version < MIN_WIRE_VERSION:
            raise WireError(
                f"watch query of wire version {version}, older than {MIN_WIRE_VERSION}: "
                "upgrade the sidecar",
                reason=Reason.INVALID_QUERY,
            )
        wait = query.get("wait")
        seconds: float | None = None
        try:
            seconds = float(wait) if wait is not None else None
        except ValueError:
            seconds = None
        if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
            seconds = None
        elif seconds is not None:
            seconds = min(seconds, MAX_WAIT)  # the server cuts it shorter still
        return cls(
            versions[0],
            versions[1],
            versions[2],
            seconds,
            query.get("delta") == "1",
            query.get("stream") == "1",
        )

    @property
    def versions(self) -> tuple[int, int, int]:
        return self.policy_version, self.revocation_version, self.bundle_sequence


def _query_int(query: dict[str, str], key: str, sender: Sender) -> int:
    text = query.get(key, "-1")
    if text.isascii() and text.isdigit() and len(text) <= 19:  # the usual: no regex
        value: int | None = int(text)
    else:
        value = int(text) if _QUERY_INT.fullmatch(text) else None
    if value is None or not -1 <= value <= MAX_INT:
        raise WireError(
            f"{key}: must be an integer of at least -1 (upgrade the {sender}?)",
            reason=Reason.INVALID_QUERY,
        )
    return value


@dataclass(frozen=True, slots=True)
class ReportAck:
    """The answer to a status report (`meshid.report`): it was recorded."""

    recorded: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "recorded": self.recorded}

    @classmethod
    def parse(cls, doc: object) -> ReportAck:
        fields = _object(doc, "authority", "reply")
        recorded = fields.get("recorded")
        if not isinstance(recorded, bool):
            raise _bad("authority", "recorded", "must be true or false")
        return cls(recorded)


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """A refusal: a stable snake_case reason and one line for an operator."""

    error: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message}

    @classmethod
    def parse(cls, doc: object) -> ErrorBody:
        """Lenient: a refusal must reach the operator even when its body is odd.

        The reason is cut to 64 characters and the message to 300, both
        printable ASCII; a body without them still says what HTTP said.
        """
        fields = doc if isinstance(doc, dict) else {}
        error = fields.get("error")
        message = fields.get("message")
        return cls(
            error=_clean(error, 64)
            if isinstance(error, str) and error
            else Reason.AUTHORITY_REFUSED,
            message=_clean(message, 300) if isinstance(message, str) else "",
        )


def _clean(text: str, limit: int) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
