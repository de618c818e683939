"""SPIFFE IDs and trust domains as validated value types.

Follows the SPIFFE ID specification (spiffe/standards, SPIFFE-ID.md) to the
letter: scheme ``spiffe``, a lowercase trust domain of ``[a-z0-9._-]``, path
segments of ``[a-zA-Z0-9._-]`` with no empty, ``.`` or ``..`` segment, no
trailing slash, no percent-encoding, query, fragment, port or user info, and
at most 2048 bytes in all. Parsing is by character class, not by a URL
library, so nothing is normalised behind the caller's back.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshid.errors import InvalidIdentity
from meshid.reasons import Reason

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _shown(text: str) -> str:
    """Quote user input for an error message without letting it span lines."""
    shown = text if len(text) <= 80 else text[:77] + "..."
    return repr(shown)


def _check_trust_domain(name: str, original: str) -> None:
    if not name:
        raise InvalidIdentity(f"{_shown(original)}: trust domain is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidIdentity(f"{_shown(original)}: trust domain is longer than 255 bytes")
    for ch in name:
        if ch in _TD_CHARS:
            continue
        if ch == ":":
            raise InvalidIdentity(f"{_shown(original)}: a SPIFFE ID may not carry a port")
        if ch == "@":
            raise InvalidIdentity(f"{_shown(original)}: a SPIFFE ID may not carry user info")
        if ch.isupper():
            raise InvalidIdentity(f"{_shown(original)}: trust domain must be lowercase")
        raise InvalidIdentity(
            f"{_shown(original)}: trust domain may only hold a-z, 0-9, '.', '-', '_'"
        )


def _check_path(path: str, original: str) -> None:
    """`path` is everything after the trust domain, starting with '/'."""
    if path == "":
        return
    if path == "/" or path.endswith("/"):
        raise InvalidIdentity(f"{_shown(original)}: path may not end with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise InvalidIdentity(f"{_shown(original)}: path has an empty segment")
        if segment in (".", ".."):
            raise InvalidIdentity(f"{_shown(original)}: path may not hold '.' or '..' segments")
        for ch in segment:
            if ch in _PATH_CHARS:
                continue
            if ch == "%":
                raise InvalidIdentity(f"{_shown(original)}: percent-encoding is not allowed")
            if ch == "?":
                raise InvalidIdentity(f"{_shown(original)}: a SPIFFE ID may not carry a query")
            if ch == "#":
                raise InvalidIdentity(f"{_shown(original)}: a SPIFFE ID may not carry a fragment")
            raise InvalidIdentity(
                f"{_shown(original)}: path may only hold letters, digits, '.', '-', '_'"
            )


@dataclass(frozen=True, order=True, slots=True)
class TrustDomain:
    name: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.name, self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Accept ``example.org`` or ``spiffe://example.org``."""
        name = text[len(SCHEME_PREFIX) :] if text.startswith(SCHEME_PREFIX) else text
        if "/" in name:
            raise InvalidIdentity(f"{_shown(text)}: a trust domain has no path")
        return cls(name)

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own ID, ``spiffe://td`` (no path)."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True, slots=True)
class SpiffeId:
    trust_domain: TrustDomain
    path: str  # "" or "/seg/seg"

    def __post_init__(self) -> None:
        _check_path(self.path, self.path)
        if self.path and not self.path.startswith("/"):
            raise InvalidIdentity(f"{_shown(self.path)}: path must start with '/'")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
            raise InvalidIdentity(f"{_shown(text)}: longer than {MAX_ID_BYTES} bytes")
        if not text:
            raise InvalidIdentity("'': empty SPIFFE ID")
        if not text.startswith(SCHEME_PREFIX):
            if text.lower().startswith(SCHEME_PREFIX):
                raise InvalidIdentity(f"{_shown(text)}: scheme must be lowercase 'spiffe'")
            raise InvalidIdentity(f"{_shown(text)}: scheme must be 'spiffe://'")
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        td_text, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        for mark, what in (("?", "a query"), ("#", "a fragment")):
            if mark in td_text:
                raise InvalidIdentity(f"{_shown(text)}: a SPIFFE ID may not carry {what}")
        _check_trust_domain(td_text, text)
        _check_path(path, text)
        return cls(TrustDomain(td_text), path)

    @classmethod
    def resolve(cls, text: str, trust_domain: TrustDomain) -> SpiffeId:
        """Parse a full ID, or a bare path (``web``, ``ns/prod/sa/web``) in `trust_domain`.

        A full ID of another trust domain is refused: every place that takes
        an ID works inside one trust domain.
        """
        if "://" in text:
            sid = cls.parse(text)
        else:
            path = text if text.startswith("/") else "/" + text
            if text in ("", "/"):
                raise InvalidIdentity(f"{_shown(text)}: empty path")
            sid = cls.parse(SCHEME_PREFIX + trust_domain.name + path)
        if sid.trust_domain != trust_domain:
            raise InvalidIdentity(
                f"{sid}: belongs to trust domain {sid.trust_domain}, not {trust_domain}",
                reason=Reason.UNTRUSTED_TRUST_DOMAIN,
            )
        return sid

    @property
    def is_workload(self) -> bool:
        """A workload ID has a path; the bare trust domain ID names the authority's root."""
        return self.path != ""

    def require_workload(self) -> SpiffeId:
        if not self.is_workload:
            raise InvalidIdentity(f"{self}: a workload ID needs a path")
        return self

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path
