"""What a sidecar tells the authority about itself: one frozen type, one parse, one serialise.

A sidecar sends a `StatusReport` to ``POST /v1/report`` every few seconds;
the authority keeps the latest one per (identity, instance) and shows it in
`meshid ca status` and `meshid policy deny --dry-run`, and a root rollover
waits for the bundle sequence it names. Every byte of it came from a
workload, so `parse_report` checks the whole document before anything is
stored: types, integer ranges, list lengths, and text restricted to
printable ASCII (no newline, no terminal escape can reach an operator's
screen). What the authority reads back from its database goes through the
same parse, so a row damaged on disk is skipped, never trusted.

Limits:

    MAX_REPORT_BYTES   48 KiB of JSON           past it: refused whole, 413 report_too_large
    MAX_PAIRS          256 (direction, peer)    past it: refused whole, 413 report_too_large
                       connection counts        (a count left out would make --dry-run lie)
    MAX_CONNECTIONS    16 connections listed    past it: the first 16 are kept, the rest
                       one by one               counted in `connections_omitted`
    MAX_QUARANTINED    16 quarantined peers     past it: the first 16 are kept, the rest
                                                counted in `quarantined_omitted`
    MAX_REFUSALS       32 (direction, peer,     past it: the first 32 are kept, the rest
                       deny or cut, reason)     counted in `refusals_omitted`
                       counts of the last hour

The two lists kept in part are samples shown to an operator; every
connection is still counted in `pairs` and `live_connections`, and a sidecar
under attack (many quarantined sources) keeps reporting. A refused report
leaves the sidecar's previous one in place.

The sidecar stamps each report with its wall clock as it sends it
(`sent_at`, added later: a report without it is still accepted); the
authority measures the skew from it (`meshid.skew`) and keeps that beside
the report, never taking a skew the sidecar claims.

Anything else malformed is refused with reason ``invalid_report``. Fields
this version does not know are dropped, so older authorities accept reports
from newer sidecars.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from meshid.errors import InvalidInput, MeshIdError
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId

# Room for a shared service with a few hundred distinct callers; eight instances
# per identity keep one identity's stored reports under half a MiB.
MAX_REPORT_BYTES = 48 * 1024
MAX_PAIRS = 256
MAX_CONNECTIONS = 16
MAX_QUARANTINED = 16
MAX_REFUSALS = 32
REASON = re.compile(r"[a-z0-9_]{1,64}")
MAX_ADVERTISE = 64
MAX_TEXT = 256  # an address, a serial, a timestamp, a quarantined peer
MAX_INT = 2**63 - 1
INSTANCE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")

Direction = Literal["inbound", "outbound"]
INVALID = Reason.INVALID_REPORT
TOO_LARGE = Reason.REPORT_TOO_LARGE


@dataclass(frozen=True, slots=True)
class PairCount:
    direction: Direction
    peer_id: SpiffeId
    count: int


@dataclass(frozen=True, slots=True)
class PairRefusal:
    """Connections with one peer refused (`deny`) or closed by a change (`cut`) in the last hour."""

    direction: Direction
    peer_id: SpiffeId
    kind: Literal["deny", "cut"]
    reason: str
    count: int


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    id: int
    direction: Direction
    peer_id: SpiffeId
    peer_addr: str
    started: datetime | None
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class QuarantinedPeer:
    peer: str  # a SPIFFE ID or a source address
    seconds_left: int


@dataclass(frozen=True, slots=True)
class StatusReport:
    instance: str
    bundle_sequence: int = 0
    svid_serial: str | None = None
    svid_not_after: datetime | None = None
    policy_version: int | None = None
    revocation_version: int | None = None
    live_connections: int = 0
    pairs: tuple[PairCount, ...] = ()
    connections: tuple[ConnectionInfo, ...] = ()
    quarantined: tuple[QuarantinedPeer, ...] = ()
    connections_omitted: int = 0  # listed by the sidecar past MAX_CONNECTIONS
    quarantined_omitted: int = 0  # listed by the sidecar past MAX_QUARANTINED
    refusals: tuple[PairRefusal, ...] = ()
    refusals_omitted: int = 0  # listed by the sidecar past MAX_REFUSALS
    # Added later (an older sidecar sends none): the IP:PORT addresses at which this
    # workload is reached, for the authority's address map (transparent interception).
    advertise: tuple[str, ...] = ()
    # Added later (an older sidecar sends none): the sidecar's wall clock as it sent the
    # report, which the authority compares with its own (see `meshid.skew`).
    sent_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """The wire and storage form; `parse_report(r.to_json()) == r`."""
        return {
            "instance": self.instance,
            "bundle_sequence": self.bundle_sequence,
            "svid_serial": self.svid_serial,
            "svid_not_after": _iso(self.svid_not_after),
            "policy_version": self.policy_version,
            "revocation_version": self.revocation_version,
            "live_connections": self.live_connections,
            "pairs": [
                {"direction": p.direction, "peer_id": str(p.peer_id), "count": p.count}
                for p in self.pairs
            ],
            "connections": [
                {
                    "id": c.id,
                    "direction": c.direction,
                    "peer_id": str(c.peer_id),
                    "peer_addr": c.peer_addr,
                    "started": _iso(c.started),
                    "bytes_in": c.bytes_in,
                    "bytes_out": c.bytes_out,
                }
                for c in self.connections
            ],
            "quarantined": [
                {"peer": q.peer, "seconds_left": q.seconds_left} for q in self.quarantined
            ],
            "connections_omitted": self.connections_omitted,
            "quarantined_omitted": self.quarantined_omitted,
            "refusals": [
                {
                    "direction": r.direction,
                    "peer_id": str(r.peer_id),
                    "kind": r.kind,
                    "reason": r.reason,
                    "count": r.count,
                }
                for r in self.refusals
            ],
            "refusals_omitted": self.refusals_omitted,
            "advertise": list(self.advertise),
            "sent_at": _iso(self.sent_at),
        }

    def encode(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def decode_report(body: bytes) -> StatusReport:
    """A report as it arrives: the byte limit first, then JSON, then `parse_report`."""
    if len(body) > MAX_REPORT_BYTES:
        raise InvalidInput(
            f"report of {len(body)} bytes is over the limit of {MAX_REPORT_BYTES}",
            reason=TOO_LARGE,
        )
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidInput("report is not valid JSON", reason=INVALID) from None
    return parse_report(doc)


def parse_report(doc: object) -> StatusReport:
    """The whole report checked, or `InvalidInput` naming the first bad field."""
    fields = _object(doc, "report")
    instance = fields.get("instance")
    if not isinstance(instance, str) or not INSTANCE.fullmatch(instance):
        raise InvalidInput("instance: needs 1-64 of [A-Za-z0-9_.-]", reason=INVALID)
    connections, connections_omitted = _sample(fields, "connections", MAX_CONNECTIONS)
    quarantined, quarantined_omitted = _sample(fields, "quarantined", MAX_QUARANTINED)
    refusals, refusals_omitted = _sample(fields, "refusals", MAX_REFUSALS)
    return StatusReport(
        instance=instance,
        bundle_sequence=_int(fields, "bundle_sequence", 0),
        svid_serial=_opt_text(fields, "svid_serial", 64),
        svid_not_after=_opt_time(fields, "svid_not_after"),
        policy_version=_opt_int(fields, "policy_version"),
        revocation_version=_opt_int(fields, "revocation_version"),
        live_connections=_int(fields, "live_connections", 0),
        pairs=tuple(
            PairCount(
                _direction(item, where),
                _spiffe_id(item, "peer_id", where),
                _int(item, "count", None, where),
            )
            for item, where in _list(fields, "pairs", MAX_PAIRS)
        ),
        connections=tuple(
            ConnectionInfo(
                id=_int(item, "id", None, where),
                direction=_direction(item, where),
                peer_id=_spiffe_id(item, "peer_id", where),
                peer_addr=_opt_text(item, "peer_addr", 128, where) or "",
                started=_opt_time(item, "started", where),
                bytes_in=_int(item, "bytes_in", 0, where),
                bytes_out=_int(item, "bytes_out", 0, where),
            )
            for item, where in connections
        ),
        quarantined=tuple(
            QuarantinedPeer(
                _opt_text(item, "peer", MAX_TEXT, where) or "",
                _int(item, "seconds_left", 0, where),
            )
            for item, where in quarantined
        ),
        connections_omitted=min(
            MAX_INT, connections_omitted + _int(fields, "connections_omitted", 0)
        ),
        quarantined_omitted=min(
            MAX_INT, quarantined_omitted + _int(fields, "quarantined_omitted", 0)
        ),
        refusals=tuple(
            PairRefusal(
                _direction(item, where),
                _spiffe_id(item, "peer_id", where),
                _kind(item, where),
                _reason(item, where),
                _int(item, "count", None, where),
            )
            for item, where in refusals
        ),
        refusals_omitted=min(MAX_INT, refusals_omitted + _int(fields, "refusals_omitted", 0)),
        advertise=_advertise(fields.get("advertise", [])),
        sent_at=_opt_time(fields, "sent_at"),
    )


def _kind(fields: dict[str, Any], where: str) -> Literal["deny", "cut"]:
    value = fields.get("kind")
    if value == "deny":
        return "deny"
    if value == "cut":
        return "cut"
    raise _bad(f"{where}.kind", 'must be "deny" or "cut"')


def _reason(fields: dict[str, Any], where: str) -> str:
    value = fields.get("reason")
    if not isinstance(value, str) or not REASON.fullmatch(value):
        raise _bad(f"{where}.reason", "needs 1-64 of [a-z0-9_]")
    return value


def _advertise(value: object) -> tuple[str, ...]:
    """Short strings only; whether each is an IP:PORT is the authority's to judge."""
    if not isinstance(value, list) or len(value) > MAX_ADVERTISE:
        raise _bad("advertise", f"must be a list of at most {MAX_ADVERTISE} addresses")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not 0 < len(item) <= 64:
            raise _bad(f"advertise[{i}]", "must be an address of 1-64 characters")
    return tuple(value)


def _bad(where: str, what: str) -> InvalidInput:
    return InvalidInput(f"{where}: {what}", reason=INVALID)


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, "must be a JSON object")
    return value


def _list(fields: dict[str, Any], key: str, limit: int) -> list[tuple[dict[str, Any], str]]:
    value = fields.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(key, "must be a list")
    if len(value) > limit:
        raise InvalidInput(
            f"{key}: {len(value)} entries, over the limit of {limit}", reason=TOO_LARGE
        )
    return [(_object(item, f"{key}[{i}]"), f"{key}[{i}]") for i, item in enumerate(value)]


def _sample(
    fields: dict[str, Any], key: str, limit: int
) -> tuple[list[tuple[dict[str, Any], str]], int]:
    """The first `limit` entries of a list, checked, and how many more there were."""
    value = fields.get(key, [])
    if isinstance(value, list) and len(value) > limit:
        return _list({key: value[:limit]}, key, limit), len(value) - limit
    return _list(fields, key, limit), 0


def _int(fields: dict[str, Any], key: str, default: int | None, where: str = "") -> int:
    name = f"{where}.{key}" if where else key
    value = fields.get(key)
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise _bad(name, "must be a non-negative integer")
    return value


def _opt_int(fields: dict[str, Any], key: str) -> int | None:
    return None if fields.get(key) is None else _int(fields, key, None)


def _opt_text(fields: dict[str, Any], key: str, limit: int, where: str = "") -> str | None:
    name = f"{where}.{key}" if where else key
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or not _PRINTABLE.fullmatch(value):
        raise _bad(name, f"must be printable ASCII text of at most {limit} characters")
    return value


def _opt_time(fields: dict[str, Any], key: str, where: str = "") -> datetime | None:
    name = f"{where}.{key}" if where else key
    text = _opt_text(fields, key, 64, where)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _bad(name, "not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise _bad(name, "an ISO 8601 time needs a UTC offset")
    return value


def _direction(fields: dict[str, Any], where: str) -> Direction:
    value = fields.get("direction")
    if value == "inbound":
        return "inbound"
    if value == "outbound":
        return "outbound"
    raise _bad(f"{where}.direction", "must be 'inbound' or 'outbound'")


def _spiffe_id(fields: dict[str, Any], key: str, where: str) -> SpiffeId:
    value = fields.get(key)
    if not isinstance(value, str) or not _PRINTABLE.fullmatch(value):
        raise _bad(f"{where}.{key}", "must be a SPIFFE ID")
    try:
        return SpiffeId.parse(value)
    except MeshIdError:
        raise _bad(f"{where}.{key}", "must be a SPIFFE ID") from None
