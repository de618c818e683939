"""Which control-plane failures are worth retrying, and what to tell the operator about the rest.

Pure: the control client (`sidecar.control`) describes what went wrong as a
`Failure` (the stage it failed at and the facts it saw there: an errno, an
OpenSSL reason, the first bytes the server sent, the identity it presented,
an HTTP status and the authority's own reason) and `classify` judges it.

- **Transient**: the authority may answer next time without anyone doing
  anything - connection refused or reset, a timeout, a name that does not
  resolve yet, HTTP 408/429/5xx, a response cut short. Retried with backoff.
- **Permanent**: retrying the same request cannot help until an operator
  changes something - the address speaks plain HTTP or something else than
  TLS, the server is not our authority (another trust domain, another ID,
  a certificate that does not chain to the bundle), our own bundle holds no
  certificate, or the authority answered no (HTTP 4xx: a spent token, a
  revoked identity). The message is one line that names the fix.

An enrollment JWT (`authority.jwt_file`) refused for a reason the platform
fixes by itself - expired, already used, signed by a key the authority has
not fetched yet, half-written, or keys the authority cannot read right now -
is transient: the kubelet rotates the file,
and the next attempt reads it again (`JWT_REFUSALS_THAT_PASS`). A refusal no
new token can fix (another issuer or audience, a claim the attestor
requires, an identity that is not ours) stays permanent.

What a permanent failure does depends on the caller: before enrollment the
sidecar ends with the message; a serving sidecar keeps serving, says so and
retries slowly.
"""

from __future__ import annotations

import errno as errnos
from dataclasses import dataclass

from meshid.reasons import Reason

TRANSIENT = "transient"
PERMANENT = "permanent"

# stages of one request
LOCAL = "local"  # loading our own trust bundle or client certificate
CONNECT = "connect"
TIMEOUT = "timeout"
TLS = "tls"
IDENTITY = "identity"  # the handshake worked; the certificate is not the authority's
CLOSED = "closed"  # the connection broke after the handshake
PROTOCOL = "protocol"  # malformed HTTP, or a response too large
HTTP = "http"  # a complete HTTP response other than 200 with a JSON object

# reasons (the same strings in logs, /readyz and metric labels)
UNREACHABLE = "authority_unreachable"
UNAVAILABLE = "authority_unavailable"
PLAIN_HTTP = "authority_plain_http"
NOT_TLS = "authority_not_tls"
UNTRUSTED = "authority_untrusted"
TLS_FAILED = "authority_tls"
WRONG_IDENTITY = "authority_identity"
TRUST_DOMAIN_MISMATCH = "trust_domain_mismatch"
PROTOCOL_ERROR = "authority_protocol"
NOT_AUTHORITY = "not_an_authority"
JWT_REFUSALS_THAT_PASS = frozenset(
    {
        Reason.JWT_EXPIRED,
        Reason.JWT_REPLAYED,
        Reason.JWT_UNKNOWN_KEY,
        Reason.JWT_MALFORMED,
        Reason.JWKS_UNAVAILABLE,  # the authority cannot read the issuer's keys right now
    }
)
LOCAL_CREDENTIALS = "local_credentials"
REFUSED = "authority_refused"

# OpenSSL reasons for bytes that are not a TLS record at all
_NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "HTTP_REQUEST",
        "HTTPS_PROXY_REQUEST",
    }
)
# OpenSSL reasons for a TLS server that will not do TLS 1.3 with us
_OLD_TLS_REASONS = frozenset(
    {"UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"}
)
_TRANSIENT_STATUS = frozenset({408, 425, 429})
_PERMANENT_ERRNOS = frozenset({errnos.EACCES, errnos.EPERM, errnos.EAFNOSUPPORT})
_ERRNO_WORDS = {
    errnos.ECONNREFUSED: "connection refused",
    errnos.ECONNRESET: "connection reset",
    errnos.ETIMEDOUT: "timed out",
    errnos.EHOSTUNREACH: "host unreachable",
    errnos.ENETUNREACH: "network unreachable",
    errnos.ECONNABORTED: "connection aborted",
    errnos.EPIPE: "connection closed",
}


@dataclass(frozen=True, slots=True)
class Failure:
    """What one failed control-plane request saw; only the fields of its stage are set."""

    stage: str
    where: str  # HOST:PORT of the authority
    errno: int | None = None
    detail: str = ""  # strerror, OpenSSL's text, h11's complaint
    tls_reason: str | None = None  # OpenSSL's reason code, e.g. WRONG_VERSION_NUMBER
    first_bytes: bytes = b""  # what the server sent before the handshake failed
    presented: str | None = None  # the SPIFFE ID (or the lack of one) the server showed
    presented_trust_domain: str | None = None
    expected: str | None = None
    status: int = 0
    reason: str | None = None  # the authority's own error reason, from its JSON
    trust: str = "authority.bundle"  # what the server's certificate is checked against


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: str  # TRANSIENT or PERMANENT
    reason: str
    message: str  # one line for the log and the operator, naming the fix if permanent
    brief: str  # a few words for /readyz: "authority unreachable (connection refused)"

    @property
    def permanent(self) -> bool:
        return self.kind == PERMANENT


def _transient(reason: str, message: str, brief: str) -> Verdict:
    return Verdict(TRANSIENT, reason, message, brief)


def _permanent(reason: str, message: str, brief: str) -> Verdict:
    return Verdict(PERMANENT, reason, message, brief)


def classify(f: Failure) -> Verdict:
    """Transient or permanent, with the reason and the operator's one line."""
    where = f.where
    if f.stage == LOCAL:
        return _permanent(
            LOCAL_CREDENTIALS,
            f"cannot load credentials for the control plane: {f.detail}",
            "cannot load local credentials",
        )
    if f.stage == TIMEOUT:
        return _transient(
            UNREACHABLE,
            f"control plane {where} did not answer in time"
            + (f" ({f.detail})" if f.detail else ""),
            "authority unreachable (timed out)",
        )
    if f.stage in (CONNECT, CLOSED):
        words = _ERRNO_WORDS.get(f.errno or 0) or f.detail or "connection failed"
        if f.stage == CONNECT and f.errno in _PERMANENT_ERRNOS:
            return _permanent(
                UNREACHABLE,
                f"cannot connect to the authority at {where} ({words}): check authority.server",
                f"authority unreachable ({words})",
            )
        verb = "unreachable" if f.stage == CONNECT else "closed the connection"
        return _transient(
            UNREACHABLE,
            f"control plane {where} {verb}: {words}",
            f"authority unreachable ({words})",
        )
    if f.stage == TLS:
        return _classify_tls(f)
    if f.stage == IDENTITY:
        return _classify_identity(f)
    if f.stage == PROTOCOL:
        return _transient(
            PROTOCOL_ERROR,
            f"control plane {where} sent a malformed response: {f.detail}",
            "malformed response from the authority",
        )
    return _classify_http(f)


def _classify_tls(f: Failure) -> Verdict:
    where = f.where
    if f.first_bytes.startswith(b"HTTP/"):
        return _permanent(
            PLAIN_HTTP,
            f"authority at {where} answered plain HTTP, not TLS: check authority.server",
            "authority answered plain HTTP",
        )
    openssl = f.tls_reason or ""  # OpenSSL's own name for what failed, not one of ours
    if openssl in _NOT_TLS_REASONS:
        return _permanent(
            NOT_TLS,
            f"authority at {where} does not speak TLS: check authority.server",
            "authority does not speak TLS",
        )
    if openssl in _OLD_TLS_REASONS:
        return _permanent(
            NOT_TLS,
            f"the server at {where} does not speak TLS 1.3, so it is not a meshid authority: "
            "check authority.server",
            "authority does not speak TLS 1.3",
        )
    if openssl == "CERTIFICATE_VERIFY_FAILED":
        return _permanent(
            UNTRUSTED,
            f"the authority's certificate at {where} does not chain to {f.trust}: wrong bundle? "
            "('meshid ca bundle' on the authority prints the right one)",
            "authority certificate does not chain to the bundle",
        )
    detail = f.detail or openssl or "handshake failed"
    return _transient(
        TLS_FAILED, f"TLS with control plane {where} failed: {detail}", "TLS with authority failed"
    )


def _classify_identity(f: Failure) -> Verdict:
    where = f.where
    expected_td = _trust_domain_of(f.expected)
    if f.presented is None:
        return _permanent(
            NOT_AUTHORITY,
            f"the server at {where} is not a meshid authority (its certificate has no SPIFFE ID"
            f"{': ' + f.detail if f.detail else ''}): check authority.server",
            "server is not a meshid authority",
        )
    if f.presented_trust_domain and expected_td and f.presented_trust_domain != expected_td:
        return _permanent(
            TRUST_DOMAIN_MISMATCH,
            f"the authority's trust domain is {f.presented_trust_domain} but this sidecar's is "
            f"{expected_td}: fix trust_domain in the sidecar config (or authority.server)",
            f"trust domain mismatch ({f.presented_trust_domain} vs {expected_td})",
        )
    return _permanent(
        WRONG_IDENTITY,
        f"the server at {where} presented {f.presented}, not {f.expected}: it is not the "
        "authority; check authority.server",
        "server is not the authority",
    )


def _classify_http(f: Failure) -> Verdict:
    where = f.where
    status = f.status
    if status >= 500 or status in _TRANSIENT_STATUS:
        reason = f.reason or UNAVAILABLE
        text = f" ({f.detail})" if f.detail else ""
        return _transient(
            reason,
            f"control plane {where} answered HTTP {status}{text}",
            f"authority unavailable (HTTP {status})",
        )
    if f.reason is None:  # no JSON error of ours: something else answers at that address
        return _permanent(
            NOT_AUTHORITY,
            f"the server at {where} answered HTTP {status} without a meshid reply: it is not a "
            "meshid authority; check authority.server",
            f"server is not a meshid authority (HTTP {status})",
        )
    return _permanent(
        f.reason,
        f.detail or f"the authority refused (HTTP {status})",
        f"authority refused ({f.reason})",
    )


def _trust_domain_of(spiffe_id: str | None) -> str | None:
    if not spiffe_id or not spiffe_id.startswith("spiffe://"):
        return None
    return spiffe_id[len("spiffe://") :].split("/", 1)[0]


def another_server_may_answer(status: int, reason: str) -> bool:
    """Whether another instance of the authority may succeed where this one failed.

    Yes when this one gave no answer of the authority's: it did not answer or
    broke off, TLS failed, it is not the authority, it answered 5xx. No when it
    answered no (4xx with its reason: every instance shares the state, so
    every one would say the same; 429 included, since rate limits are shared
    too), or when the failure is our own (credentials we cannot load).
    """
    if reason == LOCAL_CREDENTIALS:
        return False
    if status == 0 or status >= 500:
        return True
    return reason == NOT_AUTHORITY
